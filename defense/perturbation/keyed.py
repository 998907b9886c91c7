"""Keyed, repeat-stable logit noise: the default output perturbation.

Each returned alternative moves by ``sigma * strength * N(0, 1)`` in logit space, where the normal draw
comes from the project PRF keyed by a secret derived from the key file (never the public key id) over
(model, canonical context digest, generated position, token id). So:
- an exact repeat gets bit-identical values: averaging repeats learns nothing (an i.i.d. draw per request
  would fall as sigma / sqrt(n));
- whitespace and case variants share the canonical context digest, hence the noise;
- the noise enters before temperature (n / T on processed logprobs), so two temperatures difference to
  z + n, not the clean z;
- the argmax is kept by default and the top-k's total mass is unchanged (full vectors sum to one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import prf
from ..base import Deps
from ..errors import InvalidInput
from ..types import LogprobBatch, RequestContext
from . import kernels
from .base import LogitShift
from .ops import ARGMAX_MARGIN, shift_logprobs


@dataclass(frozen=True, slots=True)
class KeyedNoiseParams:
    # 0.5 nats of logit noise: mean TV 0.04 on a tiny LM's top-5 (0.06 on top-20), every argmax kept (see
    # benchmarks/results/perturbation.json); the profile's strength multiplier scales it per request
    sigma: float = 0.5
    keep_argmax: bool = True
    max_strength: float = 8.0  # a suspicious client's noise grows with strength, up to this multiple

    def __post_init__(self) -> None:
        if not (np.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not (np.isfinite(self.max_strength) and self.max_strength >= 1):
            raise ValueError(f"max_strength must be >= 1, got {self.max_strength}")


class KeyedNoise(LogitShift):
    Params = KeyedNoiseParams
    PURPOSE = "perturbation"

    def __init__(self, params: KeyedNoiseParams | None = None, *, deps: Deps | None = None) -> None:
        super().__init__(params, deps=deps)
        # one global key for the protective noise: per-client keys would let many accounts average it away
        self._key = self.deps.require_keys("keyed_noise").derive(self.PURPOSE)
        self.keep_argmax = self.params.keep_argmax
        self._seeds: dict[tuple[str, bytes], int] = {}

    def strength(self, ctx: RequestContext) -> float:
        return min(ctx.strength, self.params.max_strength)

    def seed(self, model: str, digest: bytes) -> int:
        if not digest:
            raise InvalidInput("keyed_noise needs the request's context digest (Admit returns it)")
        s = self._seeds.get((model, digest))
        if s is None:
            if len(self._seeds) > 4096:  # streamed chunks of one request reuse it; keep the cache small
                self._seeds.clear()
            s = self._seeds[(model, digest)] = prf.key_seed(self._key, model.encode(), digest)
        return s

    def prime(self, ctx: RequestContext) -> None:
        if ctx.context_digest:
            self.seed(ctx.model, ctx.context_digest)  # cached for the answer's apply

    def delta(self, batch: LogprobBatch, ctx: RequestContext, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        h = prf.hash_combine(self.seed(ctx.model, ctx.context_digest), rows + batch.position_offset, ids)
        return prf.normal(h) * (self.params.sigma * self.strength(ctx))

    def _fused_shift(self, values: np.ndarray, ids: np.ndarray, offset: int, ctx: RequestContext,
                     sampled_ids: np.ndarray, sampled_values: np.ndarray, scale: float,
                     prob: bool) -> tuple[Any, Any, int]:
        return kernels.keyed_shift(self.seed(ctx.model, ctx.context_digest), offset,
                                   self.params.sigma * self.strength(ctx), scale, values, ids,
                                   sampled_ids, sampled_values, self.keep_argmax, prob, prob, ARGMAX_MARGIN)

    def perturb(self, values: Any, token_ids: Any, *, seeds: Any, positions: Any, strength: float = 1.0,
                scale: float = 1.0, normalize: bool = False) -> Any:
        """The same perturbation on raw arrays, numpy or torch (any device), for engine-side callers.

        values: [..., K] logprobs (float); token_ids: [..., K] int64 (-1 missing); seeds: int64 per request,
        broadcastable (``seed(model, digest)``, e.g. [B, 1, 1]); positions: broadcastable ([1, P, 1]);
        scale: 1 / T for processed logprobs. Returns new logprobs; missing slots come back -inf.
        """
        h = prf.hash_combine(seeds, positions, token_ids)
        sigma = self.params.sigma * min(strength, self.params.max_strength) * scale
        if type(values).__module__.startswith("torch"):
            import torch

            noise = prf.normal(h, dtype=torch.float64).to(values.dtype) * sigma
        else:
            noise = prf.normal(h) * sigma
        out, _ = shift_logprobs(values, token_ids >= 0, noise, keep_argmax=self.keep_argmax, normalize=normalize)
        return out

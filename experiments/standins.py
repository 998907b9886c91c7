"""Stand-in defenses for developing and testing the harness, named in configs as
``experiments.standins:Class`` (the registry resolves ``module:Class``).

They exist so the harness runs end to end before defense/perturbation, defense/watermark and
defense/throttle land, and so tests can exercise each kind of defense (response, sampling, admission)
with a known effect. They are deliberately simple and are not defenses to deploy.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from defense.base import AdmissionDefense, ResponseDefense, SamplingDefense
from defense.types import ALLOW, Cost, Decision, LogprobBatch, OutputKind, RequestContext, Verdict


def _probs(batch: LogprobBatch) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [P, K] float64 with 0 at missing slots, present mask)."""
    present = batch.present
    v = batch.values.astype(np.float64)
    p = np.exp(np.minimum(v, 0.0)) if batch.kind is OutputKind.TOP_LOGPROBS else v
    return np.where(present, p, 0.0), present


def _back(batch: LogprobBatch, p: np.ndarray, present: np.ndarray) -> LogprobBatch:
    if batch.kind is OutputKind.TOP_LOGPROBS:
        with np.errstate(divide="ignore"):
            vals = np.where(present, np.log(np.maximum(p, 1e-30)), batch.values)
    else:
        vals = p
    return replace(batch, values=vals.astype(np.float32))


def _renormalize(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Scale each row of ``new`` to the total of the same row of ``old`` (tail mass kept)."""
    return new * (old.sum(axis=1, keepdims=True) / np.maximum(new.sum(axis=1, keepdims=True), 1e-300))


@dataclass(frozen=True, slots=True)
class FlattenParams:
    t: float = 2.0  # > 1 flattens the returned distribution toward uniform, < 1 sharpens it

    def __post_init__(self) -> None:
        if not (self.t > 0 and math.isfinite(self.t)):
            raise ValueError(f"t must be > 0, got {self.t}")


class Flatten(ResponseDefense):
    """Returned probabilities raised to 1/t and renormalized to the returned mass; argmax kept."""

    Params = FlattenParams

    def apply(self, batch: LogprobBatch, ctx: RequestContext) -> LogprobBatch:
        p, present = _probs(batch)
        new = np.where(present, np.power(np.maximum(p, 1e-300), 1.0 / self.params.t), 0.0)
        return _back(batch, _renormalize(new, p), present)


@dataclass(frozen=True, slots=True)
class IidNoiseParams:
    sigma: float = 1.0  # logit-space standard deviation, fresh per request

    def __post_init__(self) -> None:
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")


class IidNoise(ResponseDefense):
    """Gaussian logit noise drawn per request id: the baseline that averaging repeats defeats."""

    Params = IidNoiseParams

    def apply(self, batch: LogprobBatch, ctx: RequestContext) -> LogprobBatch:
        p, present = _probs(batch)
        seed = int.from_bytes(hashlib.sha256(ctx.request_id.encode()).digest()[:8], "little")
        noise = np.random.default_rng(seed).normal(0.0, self.params.sigma * ctx.strength, size=p.shape)
        new = np.where(present, np.maximum(p, 1e-300) * np.exp(noise), 0.0)
        return _back(batch, _renormalize(new, p), present)


@dataclass(frozen=True, slots=True)
class UniformMixParams:
    eps: float = 0.1  # weight of the uniform distribution mixed into the sampling distribution

    def __post_init__(self) -> None:
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")


class UniformMix(SamplingDefense):
    """Samples from (1 - eps) * softmax(logits) + eps / V: argmax-invariant, raises the sampled text's entropy."""

    Params = UniformMixParams

    def process_logits(self, logits, prefixes: Sequence[Sequence[int]], ctxs: Sequence[RequestContext]):
        import torch

        # logits: [B, V] float32 -> [B, V] log-probabilities of the mixture
        v = logits.shape[-1]
        mix = (1 - self.params.eps) * torch.softmax(logits, dim=-1) + self.params.eps / v
        return torch.log(mix)

    def is_argmax_invariant(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class RequestCapParams:
    max_requests: int = 100  # per client per window
    window_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")


class RequestCap(AdmissionDefense):
    """At most ``max_requests`` per client in a sliding window (in memory, on the injected clock)."""

    Params = RequestCapParams

    def __init__(self, params: RequestCapParams | None = None, **kw) -> None:
        super().__init__(params, **kw)
        self._seen: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def admit(self, ctx: RequestContext, cost: Cost) -> Verdict:
        now = self.deps.clock.now()
        q = self._seen[(ctx.tenant, ctx.client_id)]
        while q and q[0] <= now - self.params.window_s:
            q.popleft()
        if len(q) >= self.params.max_requests:
            return Verdict(Decision.THROTTLE, reason="request cap", reason_code="request_cap",
                           retry_after_s=max(0.0, q[0] + self.params.window_s - now))
        q.append(now)
        return ALLOW

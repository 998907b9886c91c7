"""i.i.d. Gaussian logit noise drawn fresh for every request: the baseline that averaging defeats.

Kept so studies can show the averaging attack working (n repeats bring it sigma / sqrt(n) from the clean
values) against the keyed perturbation, which the same attack does not move. Applied exactly like the
keyed noise (before temperature, argmax kept, top-k mass kept) so the two differ only in their randomness.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from ..base import Deps
from ..types import LogprobBatch, RequestContext
from .base import LogitShift


@dataclass(frozen=True, slots=True)
class RandomNoiseParams:
    sigma: float = 0.5
    keep_argmax: bool = True
    seed: int | None = None  # fixed for reproducible studies; None draws one from the OS

    def __post_init__(self) -> None:
        if not (np.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")


class RandomNoise(LogitShift):
    Params = RandomNoiseParams

    def __init__(self, params: RandomNoiseParams | None = None, *, deps: Deps | None = None) -> None:
        super().__init__(params, deps=deps)
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(64)
        self._rng = np.random.default_rng(seed)
        self.keep_argmax = self.params.keep_argmax

    def delta(self, batch: LogprobBatch, ctx: RequestContext, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self._rng.standard_normal(ids.shape) * (self.params.sigma * ctx.strength)

"""Flatten (t > 1) or sharpen (t < 1) the returned distribution, a baseline.

Within the returned alternatives: p_i^(1/t), renormalized to the mass they had (top-k logprobs) or to one
(full vectors). The argmax is unchanged. A deterministic, invertible map: an attacker who knows t undoes
it, which is why it is a baseline. The strength raises t to that power (more flattening).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..types import LogprobBatch, OutputKind, RequestContext
from .base import Reshape
from .ops import logsumexp


@dataclass(frozen=True, slots=True)
class TemperatureParams:
    t: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t) and self.t > 0):
            raise ValueError(f"t must be > 0, got {self.t}")


class Temperature(Reshape):
    Params = TemperatureParams

    def reshape(self, lp: np.ndarray, present: np.ndarray, batch: LogprobBatch,
                ctx: RequestContext) -> tuple[np.ndarray, np.ndarray]:
        t = self.params.t ** max(ctx.strength, 1.0)
        scaled = np.where(present, lp / t, -np.inf)
        target = 0.0 if batch.kind is OutputKind.PROBABILITIES else logsumexp(lp)
        return scaled - logsumexp(scaled) + target, present

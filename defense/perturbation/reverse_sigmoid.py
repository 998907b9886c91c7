"""Reverse sigmoid (Lee et al., 2019), a baseline.

y' proportional to y - beta * (sigmoid(gamma * logit(y)) - 1/2), clipped at zero and renormalized (to
one for full vectors, to the returned mass for top-k logprobs). Probabilities above one half are pushed
down and small ones up, so a student fitting y' by cross-entropy learns misleading logits. A
deterministic, nearly invertible elementwise map that does not protect the top-1; kept as a baseline.
The strength multiplies beta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..types import LogprobBatch, OutputKind, RequestContext
from .base import Reshape


@dataclass(frozen=True, slots=True)
class ReverseSigmoidParams:
    beta: float = 0.3
    gamma: float = 0.4

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be > 0, got {self.gamma}")


class ReverseSigmoid(Reshape):
    Params = ReverseSigmoidParams

    def reshape(self, lp: np.ndarray, present: np.ndarray, batch: LogprobBatch,
                ctx: RequestContext) -> tuple[np.ndarray, np.ndarray]:
        p: ReverseSigmoidParams = self.params
        y = np.clip(np.exp(lp), 1e-12, 1 - 1e-12)
        logit = np.log(y) - np.log1p(-y)
        r = p.beta * ctx.strength * (1.0 / (1.0 + np.exp(-p.gamma * logit)) - 0.5)
        moved = np.where(present, np.maximum(y - r, 0.0), 0.0)
        total = moved.sum(axis=1, keepdims=True)
        target = 1.0 if batch.kind is OutputKind.PROBABILITIES else np.where(present, np.exp(lp), 0.0).sum(
            axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(total > 0, moved / np.where(total > 0, total, 1.0) * target, np.exp(lp))
            return np.log(out), present

"""Quantize returned values, a baseline.

``mode: step`` floors logprobs to a multiple of ``step`` nats (probability vectors: probabilities to a
multiple of ``step``); ``mode: digits`` floors probabilities to ``digits`` decimals. Flooring, not
rounding: every probability can only fall, so a top-k's sum stays <= 1; full vectors are renormalized to
sum to one. The strength multiplies the step (digits: removes one decimal per doubling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..types import LogprobBatch, OutputKind, RequestContext
from .base import Reshape


@dataclass(frozen=True, slots=True)
class QuantizeParams:
    mode: Literal["step", "digits"] = "step"
    step: float = 0.5
    digits: int = 2

    def __post_init__(self) -> None:
        if self.mode not in ("step", "digits"):
            raise ValueError(f"mode must be 'step' or 'digits', got {self.mode!r}")
        if not (math.isfinite(self.step) and self.step > 0):
            raise ValueError(f"step must be > 0, got {self.step}")
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not 0 <= self.digits <= 9:
            raise ValueError(f"digits must be an int in 0..9, got {self.digits!r}")


class Quantize(Reshape):
    Params = QuantizeParams

    def reshape(self, lp: np.ndarray, present: np.ndarray, batch: LogprobBatch,
                ctx: RequestContext) -> tuple[np.ndarray, np.ndarray]:
        p: QuantizeParams = self.params
        s = max(ctx.strength, 1.0)
        probs = batch.kind is OutputKind.PROBABILITIES
        if p.mode == "step" and not probs:
            step = p.step * s
            with np.errstate(invalid="ignore"):
                new = np.floor(lp / step) * step
            return np.where(np.isfinite(lp), new, -np.inf), present
        if p.mode == "step":
            q = p.step * s
        else:
            q = 10.0 ** -max(0, p.digits - int(math.floor(math.log2(s))))
        pr = np.exp(lp)
        floored = np.floor(pr / q + 1e-9) * q  # 1e-9: 0.3 / 0.1 is 2.9999999999999996 in floating point
        floored = np.minimum(floored, pr)
        if probs:
            total = floored.sum(axis=1, keepdims=True)
            # a row floored to all zeros keeps its argmax as a one-hot rather than vanish
            onehot = np.zeros_like(pr)
            np.put_along_axis(onehot, np.argmax(pr, axis=1)[:, None], 1.0, axis=1)
            floored = np.where(total > 0, floored / np.where(total > 0, total, 1.0), onehot)
        with np.errstate(divide="ignore"):
            return np.log(floored), present

"""Cap the number of returned alternatives (top-k truncation), a baseline.

Top-k logprobs come back sorted, best first, as ``min(k, K)`` columns; a full probability vector keeps
its k largest entries, renormalized to sum to one (a valid vector, the shape classifier clients expect).
The profile's strength divides k (a suspicious client sees fewer alternatives), never below one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..base import ResponseDefense
from ..types import LogprobBatch, OutputKind, RequestContext
from .base import as_logprobs, column_ids, sampled_after


@dataclass(frozen=True, slots=True)
class TopKCapParams:
    k: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")


def keep_top(batch: LogprobBatch, k: int) -> LogprobBatch:
    """The batch with only each row's k largest alternatives (see the module docstring)."""
    if batch.values.size == 0:
        return batch
    lp = as_logprobs(batch)
    order = np.argsort(-lp, axis=1, kind="stable")  # missing slots are -inf: they sort last
    if batch.kind is OutputKind.PROBABILITIES:
        keep = np.zeros(lp.shape, dtype=bool)
        np.put_along_axis(keep, order[:, :k], True, axis=1)
        kept = np.where(keep, batch.values.astype(np.float64), 0.0)
        total = kept.sum(axis=1, keepdims=True)
        values = np.divide(kept, total, out=np.zeros_like(kept), where=total > 0).astype(np.float32)
        return replace(batch, values=values, sampled_values=sampled_after(batch, values, column_ids(batch)))
    cols = order[:, : min(k, lp.shape[1])]
    vals = np.take_along_axis(lp, cols, axis=1)
    ids = np.take_along_axis(batch.token_ids, cols, axis=1)
    ids = np.where(np.isneginf(vals) & (ids < 0), -1, ids)
    values = np.where(ids >= 0, vals, -np.inf).astype(np.float32)
    return replace(batch, values=values, token_ids=ids, sampled_values=sampled_after(batch, values, ids))


class TopKCap(ResponseDefense):
    Params = TopKCapParams

    def k_for(self, ctx: RequestContext) -> int:
        return max(1, math.floor(self.params.k / max(ctx.strength, 1.0)))

    def apply(self, batch: LogprobBatch, ctx: RequestContext) -> LogprobBatch:
        k = self.k_for(ctx)
        if batch.kind is OutputKind.TOP_LOGPROBS and batch.values.shape[1] <= k:
            return batch
        return keep_top(batch, k)

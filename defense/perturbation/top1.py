"""Return only the top alternative: the top-1 logprob, or a one-hot vector for probability outputs (the
label-only API a classifier attacker falls back to). A baseline; the strength has nothing to scale."""

from __future__ import annotations

from ..base import ResponseDefense
from ..types import LogprobBatch, RequestContext
from .cap import keep_top


class Top1Only(ResponseDefense):
    def apply(self, batch: LogprobBatch, ctx: RequestContext) -> LogprobBatch:
        return keep_top(batch, 1)

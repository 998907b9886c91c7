"""What every output perturbation shares: reading a LogprobBatch as logprobs, the per-request strength,
and writing the result back as a new batch of the same kind.

Two families sit on top:
- ``LogitShift`` subclasses only say how much each returned alternative moves in logit space
  (``delta``); the base applies it before temperature, keeps the argmax if asked, keeps the top-k's mass
  (or makes probability vectors sum to one) and keeps the sampled token's logprob consistent.
- ``Reshape`` subclasses rewrite the distribution directly (caps, quantization, temperature, reverse
  sigmoid) and return valid values: each in [0, 1] as a probability, sums <= 1, full vectors sum to 1.
"""

from __future__ import annotations

import abc
from dataclasses import replace
from typing import Any

import numpy as np

from ..base import ResponseDefense
from ..types import LogprobBatch, LogprobsMode, OutputKind, RequestContext, dense_ids
from . import kernels
from .ops import ARGMAX_MARGIN, shift_logprobs

_NO_IDS = np.empty(0, dtype=np.int64)
_NO_VALUES = np.empty(0, dtype=np.float32)

__all__ = ["LogitShift", "Reshape", "as_logprobs", "column_ids", "from_logprobs", "temperature_scale"]


def as_logprobs(batch: LogprobBatch, present: np.ndarray | None = None) -> np.ndarray:
    """[P, K] float64 logprobs; a probability of 0 becomes -inf, missing slots -inf (``present``:
    ``batch.present``, when the caller has it already)."""
    v = batch.values.astype(np.float64)
    if batch.kind is OutputKind.PROBABILITIES:
        with np.errstate(divide="ignore"):
            v = np.log(v)
    return np.where(batch.present if present is None else present, v, -np.inf)


def from_logprobs(lp: np.ndarray, batch: LogprobBatch, present: np.ndarray | None = None) -> np.ndarray:
    """Back to the batch's kind and float32; missing slots keep the values they came with."""
    out = np.exp(lp) if batch.kind is OutputKind.PROBABILITIES else lp
    return np.where(batch.present if present is None else present, out, batch.values).astype(np.float32)


def column_ids(batch: LogprobBatch) -> np.ndarray:
    """[P, K] int64 token ids, or class indices for dense probability vectors."""
    if batch.token_ids.shape == batch.values.shape:
        return batch.token_ids
    return np.broadcast_to(np.arange(batch.values.shape[1], dtype=np.int64), batch.values.shape)


def temperature_scale(batch: LogprobBatch) -> float:
    """Factor on a logit-space perturbation for these values.

    Raw logprobs (before temperature) take it as is. Processed logprobs are log_softmax(z / T): the same
    logit perturbation n shows up as n / T there, so differencing two temperatures recovers z + n, never z.
    T = 0 is greedy decoding, whose processed logprobs are the raw ones.
    """
    if batch.logprobs_mode is LogprobsMode.PROCESSED and batch.temperature > 0:
        return 1.0 / batch.temperature
    return 1.0


class LogitShift(ResponseDefense):
    """A perturbation that moves each returned alternative by ``delta`` in logit space.

    The chain calls ``apply_counted`` (``apply`` is the same without the count): a subclass changes the
    shift through ``delta``/``deltas`` and ``_fused_shift``, not by overriding ``apply``."""

    keep_argmax: bool = True

    @abc.abstractmethod
    def delta(self, batch: LogprobBatch, ctx: RequestContext, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[P, K'] float64 logit-space perturbation for token ``ids`` ([P, K']) at batch ``rows`` ([P, 1])."""

    def strength(self, ctx: RequestContext) -> float:
        return ctx.strength

    def deltas(self, batch: LogprobBatch, ctx: RequestContext, sampled_ids: np.ndarray) -> np.ndarray:
        """``delta`` for the batch's column ids [P, K] and, when ``sampled_ids`` has P entries, one more column
        for them."""
        ids = column_ids(batch)
        rows = np.arange(ids.shape[0])[:, None]
        if sampled_ids.shape[0] == ids.shape[0]:
            return self.delta(batch, ctx, np.concatenate([ids, sampled_ids[:, None]], axis=1), rows)
        return self.delta(batch, ctx, ids, rows)

    def apply(self, batch: LogprobBatch, ctx: RequestContext) -> LogprobBatch:
        return self.apply_counted(batch, ctx)[0]

    def apply_counted(self, batch: LogprobBatch, ctx: RequestContext) -> tuple[LogprobBatch, int | None]:
        if batch.values.size == 0 or self.strength(ctx) == 0:
            return batch, 0
        if kernels.ENABLED:
            return self._apply_fused(batch, ctx)
        present = batch.present
        lp = as_logprobs(batch, present)
        ids = column_ids(batch)
        rows = np.arange(lp.shape[0])[:, None]
        scale = temperature_scale(batch)
        with_sampled = batch.sampled_values is not None and batch.sampled_token_ids is not None
        if with_sampled:
            # the sampled tokens' moves in the same call, as one more column: one pass of the PRF, not two
            sid = batch.sampled_token_ids[:, None]  # type: ignore[index]
            d = self.delta(batch, ctx, np.concatenate([ids, sid], axis=1), rows) * scale
            d, d_sampled = d[:, :-1], d[:, -1]
        else:
            d = self.delta(batch, ctx, ids, rows) * scale
        new, shift = shift_logprobs(lp, present, d, keep_argmax=self.keep_argmax,
                                    normalize=batch.kind is OutputKind.PROBABILITIES)
        sampled = (self._sampled(batch, ids, present, new, shift, d_sampled) if with_sampled
                   else batch.sampled_values)
        return replace(batch, values=from_logprobs(new, batch, present), sampled_values=sampled), None

    def _apply_fused(self, batch: LogprobBatch, ctx: RequestContext) -> tuple[LogprobBatch, int]:
        """``apply_counted`` in one compiled pass after the deltas (kernels.shift): the same steps as the numpy
        code, counting the values it changed on the way."""
        with_sampled = batch.sampled_values is not None and batch.sampled_token_ids is not None
        sids = batch.sampled_token_ids if with_sampled else _NO_IDS
        svals = batch.sampled_values if with_sampled else _NO_VALUES
        scale = temperature_scale(batch)
        prob = batch.kind is OutputKind.PROBABILITIES
        fused = self._fused_shift(batch.values, batch.token_ids, batch.position_offset, ctx, sids, svals,  # type: ignore[arg-type]
                                  scale, prob)
        if fused is None:
            d = self.deltas(batch, ctx, sids)  # type: ignore[arg-type]
            if scale != 1.0:
                d = d * scale
            fused = kernels.shift(batch.values, batch.token_ids, d, sids, svals, self.keep_argmax, prob, prob,
                                  ARGMAX_MARGIN)
        new, sampled, changed = fused
        return batch.with_values(new, sampled if with_sampled else batch.sampled_values), int(changed)

    def apply_dense(self, values: np.ndarray, ctx: RequestContext) -> tuple[np.ndarray, int] | None:
        """``_apply_fused`` for dense probability vectors given as values: the same kernel call, no batch."""
        if not kernels.ENABLED:
            return None
        if values.size == 0 or self.strength(ctx) == 0:
            return values, 0
        fused = self._fused_shift(values, dense_ids(values.shape[0]), 0, ctx, _NO_IDS, _NO_VALUES, 1.0, True)
        if fused is None:
            return None
        return fused[0], int(fused[2])

    def _fused_shift(self, values: np.ndarray, ids: np.ndarray, offset: int, ctx: RequestContext,
                     sampled_ids: np.ndarray, sampled_values: np.ndarray, scale: float,
                     prob: bool) -> tuple[Any, Any, int] | None:
        """A subclass whose deltas a kernel can draw inside the shift's pass (kernels.keyed_shift) returns
        ``kernels``' (values, sampled values, changed) here, for a batch's values, token ids and position
        offset; None: deltas first, then kernels.shift."""
        return None

    def _sampled(self, batch: LogprobBatch, ids: np.ndarray, present: np.ndarray, new: np.ndarray,
                 shift: np.ndarray, d_sampled: np.ndarray) -> np.ndarray:
        """The sampled token's value, consistent with the perturbed alternatives (``d_sampled``: its move).

        In the top-k: its perturbed value. Outside: the same logit move and renormalizing shift, and never
        above the smallest returned alternative (a token outside the top-k cannot outrank it).
        """
        assert batch.sampled_token_ids is not None and batch.sampled_values is not None  # noqa: S101 - caller checks
        sid = batch.sampled_token_ids[:, None]
        hit = (ids == sid) & present
        in_topk = hit.any(axis=1)
        from_topk = np.where(hit, new, -np.inf).max(axis=1)
        s = batch.sampled_values.astype(np.float64)
        if batch.kind is OutputKind.PROBABILITIES:
            with np.errstate(divide="ignore"):
                s = np.log(s)
        moved = s + d_sampled - shift[:, 0]
        floor = np.where(present, new, np.inf).min(axis=1)
        out = np.where(in_topk, from_topk, np.minimum(moved, floor))
        out = np.minimum(out, 0.0)
        if batch.kind is OutputKind.PROBABILITIES:
            out = np.exp(out)
        return out.astype(np.float32)


class Reshape(ResponseDefense):
    """A baseline that rewrites the returned distribution directly, row by row (vectorized)."""

    @abc.abstractmethod
    def reshape(self, lp: np.ndarray, present: np.ndarray, batch: LogprobBatch,
                ctx: RequestContext) -> tuple[np.ndarray, np.ndarray]:
        """(new logprobs [P, K], new present mask [P, K]) from clean logprobs."""

    def apply(self, batch: LogprobBatch, ctx: RequestContext) -> LogprobBatch:
        if batch.values.size == 0:
            return batch
        lp = as_logprobs(batch)
        new, present = self.reshape(lp, batch.present, batch, ctx)
        if batch.kind is OutputKind.PROBABILITIES:
            values = np.where(present, np.exp(new), 0.0).astype(np.float32)
            return replace(batch, values=values, sampled_values=sampled_after(batch, values, column_ids(batch)))
        values = np.where(present, np.minimum(new, 0.0), -np.inf).astype(np.float32)
        ids = np.where(present, batch.token_ids, -1) if batch.token_ids.shape == values.shape else batch.token_ids
        return replace(batch, values=values, token_ids=ids, sampled_values=sampled_after(batch, values, ids))


def sampled_after(batch: LogprobBatch, values: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    """The sampled token's value consistent with reshaped alternatives (``values``/``ids``, batch units).

    Among the returned alternatives: their new value. Otherwise never above the smallest returned
    value (a token outside the top-k cannot outrank it), so the sampled token does not leak the clean value
    of an alternative the defense moved or removed.
    """
    if batch.sampled_values is None or batch.sampled_token_ids is None:
        return batch.sampled_values
    present = ids >= 0
    hit = (ids == batch.sampled_token_ids[:, None]) & present
    from_row = np.where(hit, values, -np.inf).max(axis=1)
    floor = np.where(present, values, np.inf).min(axis=1)
    out = np.where(hit.any(axis=1), from_row, np.minimum(batch.sampled_values, floor))
    return out.astype(np.float32)

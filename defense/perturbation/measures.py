"""What a perturbation costs legitimate users, as pure functions (the experiments reuse them).

Inputs are LogprobBatches of either kind; two batches are compared row by row, alternatives matched by
token id (class index for dense vectors). Top-k rows are compared as distributions over the returned
tokens plus one "rest" bucket holding the mass outside them, so truncating the top-k counts as a change.
"""

from __future__ import annotations

import numpy as np

from ..types import LogprobBatch, OutputKind
from .base import as_logprobs, column_ids

__all__ = ["expected_calibration_error", "kl_divergence", "rank_correlation", "top1_agreement", "total_variation"]


def _aligned(a: LogprobBatch, b: LogprobBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities over a's slots, then b's slots a lacks, plus the rest buckets: (pa, pb, rest_a, rest_b)."""
    if a.values.shape[0] != b.values.shape[0]:
        raise ValueError(f"batches have {a.values.shape[0]} and {b.values.shape[0]} rows")
    ia, ib = column_ids(a), column_ids(b)
    pa = np.where(a.present, np.exp(as_logprobs(a)), 0.0)
    pb_all = np.where(b.present, np.exp(as_logprobs(b)), 0.0)
    match = (ia[:, :, None] == ib[:, None, :]) & a.present[:, :, None] & b.present[:, None, :]  # [P, Ka, Kb]
    pb_on_a = (match * pb_all[:, None, :]).sum(axis=2)
    b_only = pb_all * ~match.any(axis=1)  # b's alternatives that a did not return
    pa_full = np.concatenate([pa, np.zeros_like(b_only)], axis=1)
    pb_full = np.concatenate([pb_on_a, b_only], axis=1)
    rest_a = np.clip(1.0 - pa.sum(axis=1), 0.0, 1.0)
    rest_b = np.clip(1.0 - pb_all.sum(axis=1), 0.0, 1.0)
    return pa_full, pb_full, rest_a, rest_b


def total_variation(a: LogprobBatch, b: LogprobBatch) -> np.ndarray:
    """[P] total variation distance per row, in [0, 1]."""
    pa, pb, ra, rb = _aligned(a, b)
    return 0.5 * (np.abs(pa - pb).sum(axis=1) + np.abs(ra - rb))


def kl_divergence(a: LogprobBatch, b: LogprobBatch, *, eps: float = 1e-9) -> np.ndarray:
    """[P] KL(a || b) in nats; b's zeros are floored at ``eps`` so a truncation gives a large finite value."""
    pa, pb, ra, rb = _aligned(a, b)
    p = np.concatenate([pa, ra[:, None]], axis=1)
    q = np.concatenate([pb, rb[:, None]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, eps))), 0.0)
    return np.maximum(terms.sum(axis=1), 0.0)


def top1_agreement(a: LogprobBatch, b: LogprobBatch) -> float:
    """Fraction of rows whose highest alternative is the same token."""
    if a.values.shape[0] == 0:
        return 1.0
    ta = np.take_along_axis(column_ids(a), np.argmax(as_logprobs(a), axis=1)[:, None], axis=1)[:, 0]
    tb = np.take_along_axis(column_ids(b), np.argmax(as_logprobs(b), axis=1)[:, None], axis=1)[:, 0]
    return float(np.mean(ta == tb))


def rank_correlation(a: LogprobBatch, b: LogprobBatch) -> np.ndarray:
    """[P] Spearman correlation between the orders a and b give a's returned alternatives.

    An alternative b dropped ranks below all of b's. Rows with fewer than two alternatives give 1.
    """
    la = as_logprobs(a)
    ia, ib = column_ids(a), column_ids(b)
    lb_all = as_logprobs(b)
    match = (ia[:, :, None] == ib[:, None, :]) & b.present[:, None, :]
    lb = np.where(match.any(axis=2), np.where(match, lb_all[:, None, :], -np.inf).max(axis=2), -np.inf)
    out = np.ones(la.shape[0])
    for_rows = a.present.sum(axis=1) >= 2
    if not for_rows.any():
        return out
    ra = _ranks(np.where(a.present, la, -np.inf), a.present)
    rb = _ranks(np.where(a.present, np.where(np.isfinite(lb), lb, -1e300), -np.inf), a.present)
    n = a.present.sum(axis=1)
    ma = np.where(a.present, ra, 0).sum(axis=1) / np.maximum(n, 1)
    mb = np.where(a.present, rb, 0).sum(axis=1) / np.maximum(n, 1)
    da, db = np.where(a.present, ra - ma[:, None], 0), np.where(a.present, rb - mb[:, None], 0)
    den = np.sqrt((da**2).sum(axis=1) * (db**2).sum(axis=1))
    rho = np.divide((da * db).sum(axis=1), den, out=np.ones_like(den), where=den > 0)
    return np.where(for_rows, rho, 1.0)


def _ranks(x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Average ranks (1 = largest) along each row, over present slots; ties share their mean rank."""
    order = np.argsort(-x, axis=1, kind="stable")
    ranks = np.empty_like(x, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(1, x.shape[1] + 1, dtype=np.float64)[None, :].repeat(x.shape[0], 0),
                      axis=1)
    # average tied ranks: equal values get the mean of their positions
    eq = (x[:, :, None] == x[:, None, :]) & present[:, None, :]
    return np.where(eq, ranks[:, None, :], 0).sum(axis=2) / np.maximum(eq.sum(axis=2), 1)


def expected_calibration_error(probs: np.ndarray | LogprobBatch, labels: np.ndarray, *, bins: int = 15) -> float:
    """ECE of predicted probability vectors [N, C] against integer labels [N], equal-width confidence bins."""
    if isinstance(probs, LogprobBatch):
        if probs.kind is not OutputKind.PROBABILITIES:
            raise ValueError("calibration error needs full probability vectors")
        probs = probs.values
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"need probs [N, C] and labels [N], got {probs.shape} and {labels.shape}")
    if probs.shape[0] == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):  # bins, not samples: a fixed, small loop
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)

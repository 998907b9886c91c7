"""Headline and utility metrics as pure numpy functions (property-tested in tests/unit/experiments).

Scores are "higher is better" only by convention of the caller: the gain-erased family is invariant to
any affine change of the score (including a sign flip), so a perplexity or a KL can be passed as is.
Points are 0-100 and named ``_pts``; everything else is a fraction.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "bootstrap_ci",
    "bootstrap_rows_ci",
    "expected_calibration_error",
    "gain_erased",
    "interpolate_curve",
    "kl_divergence",
    "logprob_extra_gain_erased",
    "matched_gain_erased",
    "mean_ci",
    "spearman_topk",
    "top1_agreement",
    "topk_total_variation",
    "total_variation",
]


def gain_erased(s_def: float, s_clean: float, s0: float) -> float:
    """1 - (S_def - S_0) / (S_clean - S_0): 0 when the defense changes nothing, 1 when it erases all gain.

    NaN when distillation gained nothing (S_clean == S_0): there is no gain to erase, and a number would lie.
    """
    gain = s_clean - s0
    if gain == 0 or not math.isfinite(gain):
        return math.nan
    return 1.0 - (s_def - s0) / gain


def logprob_extra_gain_erased(s_kd_def: float, s_kd_clean: float, s_sft_clean: float) -> float:
    """How much of what top-k logprobs add over text-only SFT the defense takes away (1: all of it)."""
    return gain_erased(s_kd_def, s_kd_clean, s_sft_clean)


def interpolate_curve(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """y at ``x`` on the piecewise-linear curve through the points (xs, ys), given in any order.

    Points sharing an x are averaged; outside the curve's x range the nearest end's y is returned
    (no extrapolation). Non-finite points are ignored; NaN when none is left or ``x`` is not finite.
    """
    pts = [(float(a), float(b)) for a, b in zip(xs, ys, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if not pts or not math.isfinite(x):
        return math.nan
    grouped: dict[float, list[float]] = {}
    for a, b in pts:
        grouped.setdefault(a, []).append(b)
    gx = sorted(grouped)
    gy = [sum(grouped[a]) / len(grouped[a]) for a in gx]
    x = float(x)
    if x <= gx[0]:
        return gy[0]
    if x >= gx[-1]:
        return gy[-1]
    i = bisect.bisect_right(gx, x)  # gx[i - 1] <= x < gx[i]
    # the fraction of the segment, in [0, 1] even where np.interp's slope (dy / dx) overflows: two
    # points closer than ~1e-308 made it return inf between them
    t = (x - gx[i - 1]) / (gx[i] - gx[i - 1])
    return gy[i - 1] + t * (gy[i] - gy[i - 1])


def matched_gain_erased(s_def: float, x_def: float, curve_x: Sequence[float], curve_s: Sequence[float],
                        s0: float) -> float:
    """1 - (S_def - S_0) / (S_ref - S_0), S_ref the reference curve's student score at the defense's x.

    The reasoning track's ``gain_erased_vs_temperature``: x is the teacher's accuracy as served, the curve
    is temperature sampling's (teacher accuracy, student accuracy) points, S_0 the student before
    distillation. 0: the defense is no better than temperature at the same teacher accuracy; 1: it erases
    all the gain temperature sampling leaves.
    """
    return gain_erased(s_def, interpolate_curve(x_def, curve_x, curve_s), s0)


def kl_divergence(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis from log-probabilities: [..., V] -> [...] (nats).

    Terms where p is 0 contribute 0 (the 0 log 0 = 0 convention), even where q is 0 too.
    """
    p_log = np.asarray(p_log, dtype=np.float64)
    q_log = np.asarray(q_log, dtype=np.float64)
    p = np.exp(p_log)
    with np.errstate(invalid="ignore"):  # -inf - -inf where both are 0: masked below
        terms = np.where(p > 0, p * (p_log - q_log), 0.0)
    return terms.sum(axis=-1)


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """0.5 * sum |p - q| over the last axis, for dense probability vectors: [..., C] -> [...]."""
    return 0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum(axis=-1)


def _dense(values: np.ndarray, ids: np.ndarray, n_ids: int, *, logprobs: bool) -> np.ndarray:
    """Returned alternatives -> dense [P, n_ids + 1] probabilities; the last column is the unreturned rest."""
    probs = np.exp(values.astype(np.float64)) if logprobs else values.astype(np.float64)
    present = ids >= 0
    probs = np.where(present, probs, 0.0)
    dense = np.zeros((values.shape[0], n_ids + 1))
    # missing slots write 0 into a scratch column that the rest bucket then overwrites
    cols = np.where(present, ids, n_ids)
    np.put_along_axis(dense, cols, probs, axis=1)
    dense[:, n_ids] = np.clip(1.0 - probs.sum(axis=1), 0.0, 1.0)
    return dense


def topk_total_variation(
    clean_values: np.ndarray,
    clean_ids: np.ndarray,
    def_values: np.ndarray,
    def_ids: np.ndarray,
    *,
    logprobs: bool = True,
    chunk: int = 4096,
) -> np.ndarray:
    """Per-position TV between two returned top-k answers: [P] in [0, 1].

    Each answer is a distribution over the union of returned tokens plus one bucket for the unreturned
    rest (1 - returned mass), so a cap or a top-1-only answer is charged for the mass it withholds.
    ids use -1 for a missing alternative. ``logprobs`` False means the values are probabilities.
    """
    clean_ids = np.asarray(clean_ids)
    def_ids = np.asarray(def_ids)
    n_pos = clean_values.shape[0]
    if def_values.shape[0] != n_pos:
        raise ValueError(f"position counts differ: {n_pos} and {def_values.shape[0]}")
    out = np.empty(n_pos)
    n_ids = int(max(clean_ids.max(initial=-1), def_ids.max(initial=-1))) + 1
    for s in range(0, n_pos, chunk):  # chunks bound the dense [chunk, V] scratch for large vocabularies
        sl = slice(s, s + chunk)
        p = _dense(clean_values[sl], clean_ids[sl], n_ids, logprobs=logprobs)
        q = _dense(def_values[sl], def_ids[sl], n_ids, logprobs=logprobs)
        out[sl] = total_variation(p, q)
    return out


def _top_ids(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The id of each row's highest returned value; ties go to the smallest id, so the order of the
    alternatives in an answer never matters."""
    masked = np.where(ids >= 0, values, -np.inf)
    best = masked.max(axis=1, keepdims=True)
    return np.where((masked == best) & (ids >= 0), ids, np.iinfo(np.int64).max).min(axis=1)


def top1_agreement(clean_values: np.ndarray, clean_ids: np.ndarray, def_values: np.ndarray,
                   def_ids: np.ndarray) -> float:
    """Fraction of positions whose highest returned alternative is the same token. Dense probability
    vectors pass ``ids`` as ``np.broadcast_to(np.arange(C), values.shape)``."""
    if clean_values.shape[0] == 0:
        return math.nan
    return float(np.mean(_top_ids(clean_values, clean_ids) == _top_ids(def_values, def_ids)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1 = smallest) with ties averaged, along the last axis: [P, K] -> [P, K]."""
    order = np.argsort(x, axis=1, kind="stable")
    ranks = np.empty_like(x, dtype=np.float64)
    k = x.shape[1]
    rows = np.arange(x.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, k + 1, dtype=np.float64)
    # ties: replace each tied group's ranks by their mean (a per-row loop only over rows that have ties)
    sorted_x = np.take_along_axis(x, order, axis=1)
    tied_rows = np.nonzero((np.diff(sorted_x, axis=1) == 0).any(axis=1))[0]
    for r in tied_rows:
        vals = x[r]
        for v in np.unique(vals):
            m = vals == v
            if m.sum() > 1:
                ranks[r, m] = ranks[r, m].mean()
    return ranks


def spearman_topk(clean_values: np.ndarray, clean_ids: np.ndarray, def_values: np.ndarray,
                  def_ids: np.ndarray) -> float:
    """Mean over positions of Spearman's rho between the clean and the defended ranking of the clean
    top-k tokens. A token the defended answer withholds ranks below every returned one.

    A position with fewer than two clean alternatives, or where either ranking is constant, counts 1
    when the two rankings are identical and 0 otherwise (rho is undefined there).
    """
    clean_ids = np.asarray(clean_ids)
    def_ids = np.asarray(def_ids)
    n_pos, k = clean_values.shape
    if n_pos == 0:
        return math.nan
    # the defended value of each clean token: matched by id, -inf where withheld
    match = (clean_ids[:, :, None] == def_ids[:, None, :]) & (clean_ids[:, :, None] >= 0)  # [P, K, K2]
    dv = np.where(match, def_values[:, None, :].astype(np.float64), -np.inf).max(axis=2)  # [P, K]
    cv = clean_values.astype(np.float64)
    present = clean_ids >= 0
    rhos = np.empty(n_pos)
    full = present.all(axis=1)
    if full.any():
        a = _average_ranks(cv[full])
        b = _average_ranks(np.where(np.isfinite(dv[full]), dv[full], -1e300))
        a -= a.mean(axis=1, keepdims=True)
        b -= b.mean(axis=1, keepdims=True)
        den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = (a * b).sum(axis=1) / den
        same = np.all(a == b, axis=1)
        rhos[full] = np.where(den > 0, rho, np.where(same, 1.0, 0.0))
    for r in np.nonzero(~full)[0]:  # rows with missing clean alternatives: rare, ragged, done one by one
        m = present[r]
        rhos[r] = spearman_topk(cv[r : r + 1, m], clean_ids[r : r + 1, m], def_values[r : r + 1], def_ids[r : r + 1]) \
            if m.sum() >= 2 else 1.0
    return float(np.clip(rhos, -1.0, 1.0).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| x bin weight."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.shape[0] == 0:
        return math.nan
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # a confidence of exactly 1.0 belongs to the last bin, not a bin of its own
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        m = bins == b
        ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def bootstrap_ci(
    fn: Callable[..., float],
    groups: Sequence[Sequence[float]],
    *,
    n: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, low, high): ``fn`` of the groups' means, with a percentile bootstrap interval.

    Each group (e.g. the defended students' seeds, the clean students' seeds, the untrained students'
    seeds) is resampled with replacement independently, as each is measured over its own seeds.
    Resamples where ``fn`` is not finite are dropped; with none left the interval is NaN.
    """
    columns = [np.asarray(g, dtype=np.float64).reshape(-1, 1) for g in groups]  # one metric per row
    return bootstrap_rows_ci(lambda *ms: fn(*(m[0] for m in ms)), columns, n=n, level=level, seed=seed)


def bootstrap_rows_ci(
    fn: Callable[..., float],
    groups: Sequence[np.ndarray],
    *,
    n: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, low, high) like ``bootstrap_ci``, for groups of paired measurements.

    Each group is an array [n_i, k_i]: rows are seeds, columns metrics measured together (a cell's
    teacher accuracy and its student's accuracy). Rows are resampled, so the columns stay paired; groups
    are resampled independently. ``fn`` receives each group's column means (a length-k_i array).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    arrays = [np.atleast_2d(np.asarray(g, dtype=np.float64)) for g in groups]
    if any(a.shape[0] == 0 or a.size == 0 for a in arrays):
        return math.nan, math.nan, math.nan
    point = float(fn(*(a.mean(axis=0) for a in arrays)))
    if n < 1 or all(a.shape[0] == 1 for a in arrays):
        return point, point, point
    rng = np.random.default_rng(seed)
    means = [a[rng.integers(0, a.shape[0], size=(n, a.shape[0]))].mean(axis=1) for a in arrays]  # [n, k_i]
    stats = np.array([fn(*(m[i] for m in means)) for i in range(n)], dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return point, math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return point, float(lo), float(hi)


def mean_ci(values: Sequence[float], *, n: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) with a percentile bootstrap over the values (e.g. one per seed)."""
    return bootstrap_ci(lambda m: m, [values], n=n, level=level, seed=seed)

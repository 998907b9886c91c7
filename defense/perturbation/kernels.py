"""Fused loops for the response path's small arrays, compiled with numba; numpy code stays the reference.

A response of 16 positions x top-5 is 80 numbers. The numpy path spends ~60 ufunc calls on it (the PRF,
Box-Muller, the shift that keeps the argmax and the top-k's mass, the sampled token, the input checks):
about 100 us of call overhead for under 1 us of arithmetic. Each kernel here does one of those steps in one
pass, with the same operations in the same order as the numpy code it replaces. Integer hashing is
bit-identical; float64 ``log`` and ``exp`` come from libm here and from numpy's own SIMD routines there,
which differ in the last bit for ~0.3% of inputs: invisible after the float32 cast in nearly every case,
and tests hold the two paths to 1e-6 of each other on every kind of batch.

Without numba (or with ``DISTILLGUARD_KERNELS=0``) ``ENABLED`` is False and callers use the numpy path.
Compiled code is cached on disk (numba's ``cache=True``) and ``warm()`` compiles it before the first request.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

log = logging.getLogger("distillguard.kernels")

try:  # an optional accelerator: every caller has a numpy path
    import numba as _numba
except ImportError:  # pragma: no cover - numba is a declared dependency; this keeps a stripped install working
    _numba = None

ENABLED = _numba is not None and os.environ.get("DISTILLGUARD_KERNELS", "1") != "0"

# the PRF's constants (defense.prf), as unsigned words
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)
_LOW53 = float(2**-53)
_TWO_PI = 2.0 * math.pi

# check_top / check_probs result codes (the caller words the error)
OK, NOT_FINITE, ABOVE_ZERO, DUPLICATE, MASS_ABOVE_ONE, NEGATIVE, NOT_NORMALIZED = range(7)


def _jit(fn: Any) -> Any:
    if not ENABLED:
        return fn
    return _numba.njit(cache=True, nogil=True, error_model="numpy")(fn)


@_jit
def _mix(x: Any) -> Any:
    x ^= x >> _S30
    x *= _C1
    x ^= x >> _S27
    x *= _C2
    x ^= x >> _S31
    return x


@_jit
def _keyed_row(s: Any, row: int, ids: np.ndarray, i: int, dense: bool, k: int, sid: int, extra: int, factor: float,
               scale: float, out: np.ndarray) -> None:
    """Row ``i``'s draws (position ``row``) into ``out`` [k + extra]: keyed_normal's loop body, times ``scale``
    when it is not 1 (a separate product, as the numpy path multiplies the deltas by the temperature's)."""
    h_row = _mix(np.uint64(row) * _GOLDEN + s)
    for j in range(k + extra):
        if j == k:
            t = sid
        elif dense:
            t = j
        else:
            t = ids[i, j]
        h = _mix(np.uint64(t) * _GOLDEN + h_row)
        h2 = _mix(h ^ _GOLDEN)
        u1 = 1.0 - float(h >> _S11) * _LOW53
        u2 = float(h2 >> _S11) * _LOW53
        x = (math.sqrt(-2.0 * math.log(u1)) * math.cos(_TWO_PI * u2)) * factor
        out[j] = x * scale if scale != 1.0 else x


@_jit
def keyed_normal(seed: int, offset: int, ids: np.ndarray, k: int, sampled: np.ndarray, factor: float) -> np.ndarray:
    """``prf.normal(hash_combine(seed, row + offset, id)) * factor`` for every id of ``ids`` [P, k] and, when
    ``sampled`` has P entries, one more column for them: [P, k + (1 if sampled else 0)] float64. ``ids`` of
    shape [P, 0] means dense probability vectors: column j is class j."""
    p = ids.shape[0]
    dense = ids.shape[1] != k
    extra = 1 if sampled.shape[0] == p and p > 0 else 0
    out = np.empty((p, k + extra), dtype=np.float64)
    s = np.uint64(seed)
    for i in range(p):
        _keyed_row(s, i + offset, ids, i, dense, k, sampled[i] if extra else 0, extra, factor, 1.0, out[i])
    return out


@_jit
def shift(values: np.ndarray, ids: np.ndarray, delta: np.ndarray, sampled_ids: np.ndarray,
          sampled_values: np.ndarray, keep_argmax: bool, probabilities: bool, normalize: bool,
          margin: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``LogitShift.apply``'s math in one pass: (new values [P, K] float32, new sampled values [P] float32,
    how many of the values changed).

    values [P, K] float32 (logprobs, or probabilities when ``probabilities``); ids [P, K] int64, -1 for a
    missing slot, or [P, 0] for dense probability vectors (column j is class j, every slot present); delta
    [P, K] (+1 column for the sampled token when ``sampled_ids`` has P entries). Same steps as
    ops.shift_logprobs, base.from_logprobs and LogitShift._sampled."""
    p, k = values.shape
    dense = ids.shape[1] != k
    out = np.empty((p, k), dtype=np.float32)
    with_sampled = sampled_ids.shape[0] == p and p > 0
    sout = np.empty(p if with_sampled else 0, dtype=np.float32)
    lp = np.empty(k, dtype=np.float64)
    moved = np.empty(k, dtype=np.float64)
    changed = 0
    for i in range(p):
        changed += _shift_row(values, ids, i, dense, delta[i], with_sampled, sampled_ids, sampled_values, keep_argmax,
                              probabilities, normalize, margin, lp, moved, out, sout)
    return out, sout, changed


@_jit
def keyed_shift(seed: int, offset: int, factor: float, scale: float, values: np.ndarray, ids: np.ndarray,
                sampled_ids: np.ndarray, sampled_values: np.ndarray, keep_argmax: bool, probabilities: bool,
                normalize: bool, margin: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``shift`` with ``keyed_normal(seed, offset, ids, K, sampled_ids, factor) * scale`` as its delta, drawn
    row by row in the same pass (the keyed noise's whole Protect in one call)."""
    p, k = values.shape
    dense = ids.shape[1] != k
    out = np.empty((p, k), dtype=np.float32)
    with_sampled = sampled_ids.shape[0] == p and p > 0
    extra = 1 if with_sampled else 0
    sout = np.empty(p if with_sampled else 0, dtype=np.float32)
    lp = np.empty(k, dtype=np.float64)
    moved = np.empty(k, dtype=np.float64)
    drow = np.empty(k + extra, dtype=np.float64)
    s = np.uint64(seed)
    changed = 0
    for i in range(p):
        _keyed_row(s, i + offset, ids, i, dense, k, sampled_ids[i] if extra else 0, extra, factor, scale, drow)
        changed += _shift_row(values, ids, i, dense, drow, with_sampled, sampled_ids, sampled_values, keep_argmax,
                              probabilities, normalize, margin, lp, moved, out, sout)
    return out, sout, changed


@_jit
def _shift_row(values: np.ndarray, ids: np.ndarray, i: int, dense: bool, delta: np.ndarray, with_sampled: bool,
               sampled_ids: np.ndarray, sampled_values: np.ndarray, keep_argmax: bool, probabilities: bool,
               normalize: bool, margin: float, lp: np.ndarray, moved: np.ndarray, out: np.ndarray,
               sout: np.ndarray) -> int:
    """Row ``i`` of ``shift`` (``delta``: that row's [K (+1)] moves) into ``out`` and ``sout``; the number of
    the row's values that changed (``!=``, as the chain counts them)."""
    k = values.shape[1]
    ninf = -np.inf
    # as_logprobs, and the row's target mass (logsumexp with numpy's summation order)
    for j in range(k):
        if dense or ids[i, j] >= 0:
            v = np.float64(values[i, j])  # float() keeps float32 in numba: log must run in float64
            lp[j] = math.log(v) if probabilities else v
        else:
            lp[j] = ninf
    target = 0.0 if normalize else _logsumexp(lp, k)
    top = 0
    for j in range(k):
        moved[j] = lp[j] + delta[j] if dense or ids[i, j] >= 0 else ninf
        if lp[j] > lp[top]:
            top = j
    if keep_argmax:
        cap = moved[top] - margin
        for j in range(k):
            if j != top and moved[j] > cap:
                moved[j] = cap
    sh = _logsumexp(moved, k) - target
    if not math.isfinite(sh):
        sh = 0.0
    floor = np.inf
    changed = 0
    for j in range(k):
        x = moved[j] - sh
        x = x if x < 0.0 else 0.0  # np.minimum(x, 0.0); NaN cannot occur: moved is finite or -inf
        moved[j] = x
        if dense or ids[i, j] >= 0:
            out[i, j] = math.exp(x) if probabilities else x
            if x < floor:
                floor = x
        else:
            out[i, j] = values[i, j]
        if out[i, j] != values[i, j]:
            changed += 1
    if with_sampled:
        sid = sampled_ids[i]
        hit = False
        best = ninf
        for j in range(k):
            if (j == sid) if dense else (ids[i, j] >= 0 and ids[i, j] == sid):
                hit = True
                if moved[j] > best:
                    best = moved[j]
        if hit:
            r = best
        else:
            sv = np.float64(sampled_values[i])
            if probabilities:
                sv = math.log(sv) if sv > 0 else ninf
            r = sv + delta[k] - sh
            if floor < r:
                r = floor
        if r > 0.0:
            r = 0.0
        sout[i] = math.exp(r) if probabilities else r
    return changed


@_jit
def _logsumexp(x: np.ndarray, k: int) -> float:
    m = x[0]
    for j in range(1, k):
        if x[j] > m:
            m = x[j]
    safe = m if math.isfinite(m) else 0.0
    return math.log(_exp_sum(x, 0, k, safe)) + safe


@_jit
def _exp_sum(x: np.ndarray, start: int, n: int, safe: float) -> float:
    """sum(exp(x[start:start + n] - safe)) in numpy's pairwise order up to 128 terms (sequential below 8,
    eight lanes above); longer rows keep the eight lanes throughout where numpy splits them in halves (no
    recursion: numba's on-disk cache cannot link recursive kernels), a last-bit difference at most."""
    if n < 8:
        res = 0.0
        for i in range(start, start + n):
            res += math.exp(x[i] - safe)
        return res
    r = np.empty(8, dtype=np.float64)
    for j in range(8):
        r[j] = math.exp(x[start + j] - safe)
    i = 8
    while i < n - (n % 8):
        for j in range(8):
            r[j] += math.exp(x[start + i + j] - safe)
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        res += math.exp(x[start + i] - safe)
        i += 1
    return res


@_jit
def check_top(values: np.ndarray, ids: np.ndarray, slack: float, tol: float) -> tuple[int, int, float, int]:
    """Top-k logprobs checks in one pass: (code, row, value, token id); code OK when the batch is sound.
    Missing slots (id < 0) are skipped. Same rules as chain.check_values."""
    p, k = values.shape
    top = -np.inf
    for i in range(p):
        for j in range(k):
            if ids[i, j] >= 0:
                v = values[i, j]
                if math.isnan(v) or v == np.inf:
                    return NOT_FINITE, i, 0.0, 0
                if v > top:
                    top = v
    if top > slack:
        return ABOVE_ZERO, 0, top, 0
    for i in range(p):
        for j in range(1, k):
            t = ids[i, j]
            if t < 0:
                continue
            for q in range(j):
                if ids[i, q] == t:
                    return DUPLICATE, i, 0.0, t
    for i in range(p):
        total = 0.0
        for j in range(k):
            if ids[i, j] >= 0:
                v = np.float64(values[i, j])  # float() keeps float32 in numba: log must run in float64
                total += math.exp(v if v < 0.0 else 0.0)
        if total > 1.0 + tol:
            return MASS_ABOVE_ONE, i, total, 0
    return OK, 0, 0.0, 0


@_jit
def check_probs(values: np.ndarray, tol: float) -> tuple[int, int, float]:
    """Probability-vector checks in one pass: (code, row, value); same rules as chain.check_values."""
    p, k = values.shape
    low = np.inf
    for i in range(p):
        for j in range(k):
            v = values[i, j]
            if not math.isfinite(v):
                return NOT_FINITE, i, 0.0
            if v < low:
                low = v
    if p * k and low < 0:
        return NEGATIVE, 0, float(low)
    worst, worst_row, worst_sum = -1.0, 0, 0.0
    for i in range(p):
        total = np.float32(0.0)
        for j in range(k):
            total += values[i, j]
        off = abs(float(total) - 1.0)
        if off > worst:
            worst, worst_row, worst_sum = off, i, float(total)
    if worst > tol:
        return NOT_NORMALIZED, worst_row, worst_sum
    return OK, 0, 0.0


def warm() -> None:
    """Compile (or load from numba's cache) every kernel now, not on the first request."""
    if not ENABLED:
        return
    ids = np.array([[1, 2]], dtype=np.int64)
    one, none = np.array([1], dtype=np.int64), np.empty(0, dtype=np.int64)
    vals = np.array([[-0.5, -1.5]], dtype=np.float32)
    for sampled in (one, none):
        d = keyed_normal(7, 0, ids, 2, sampled, 0.5)
        shift(vals, ids, d, sampled, np.full(sampled.shape, -0.5, dtype=np.float32), True, False, False, 1e-4)
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    dense = np.empty((1, 0), dtype=np.int64)
    for sampled in (one, none):
        d = keyed_normal(7, 0, dense, 2, sampled, 0.5)
        shift(probs, dense, d, sampled, np.full(sampled.shape, 0.75, dtype=np.float32), True, True, True, 1e-4)
    for v, i, prob in ((vals, ids, False), (probs, dense, True)):
        for sampled in (one, none):
            keyed_shift(7, 0, 0.5, 1.0, v, i, sampled, np.full(sampled.shape, v[0, 1], dtype=np.float32), True, prob,
                        prob, 1e-4)
    check_top(vals, ids, 1e-3, 1e-3)
    check_probs(probs, 1e-3)

"""Exact tail probabilities as log10 p, finite far into the tail (no underflow to 0), vectorized.

- Green-list: P(Binomial(n, gamma) >= k), the regularized incomplete beta ``I_gamma(k, n - k + 1)``.
- Gumbel: P(Gamma(n, 1) >= s), the regularized upper incomplete gamma ``Q(n, s)`` (n an integer).
- Open-box radioactivity: the normal tail, through ``log_ndtr``.

scipy's ``betainc`` and ``gammaincc`` are accurate in relative terms down to the smallest doubles;
where they underflow (p below about 1e-300, which a long radioactivity test reaches) the tail is
summed in log space instead: the binomial's upper-tail terms and, for an integer n, the finite
Poisson sum ``Q(n, s) = exp(-s) * sum_{j<n} s**j / j!``. Normal approximations are never used for
p-values, because they are wrong by orders of magnitude exactly where the decisions are made.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

__all__ = ["binom_log10_sf", "bonferroni_log10", "gamma_log10_sf", "norm_log10_sf"]

_LN10 = math.log(10.0)
_TINY = 1e-290  # below this the special functions are in denormals or 0: recompute in log space


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))


def _binom_ln_sf_exact(k: int, n: int, p: float) -> float:
    """ln P(X >= k) by summing the log pmf of k..n (used only where betainc underflows)."""
    j = np.arange(k, n + 1, dtype=np.float64)
    logpmf = (special.gammaln(n + 1) - special.gammaln(j + 1) - special.gammaln(n - j + 1)
              + j * math.log(p) + (n - j) * math.log1p(-p))
    return _logsumexp(logpmf)


def binom_log10_sf(k: np.ndarray | int, n: np.ndarray | int, p: float) -> np.ndarray:
    """log10 P(Binomial(n, p) >= k), elementwise; 0 where k <= 0; n >= 1."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    k_arr, n_arr = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    out = np.zeros(k_arr.shape, dtype=np.float64)
    tail = k_arr > 0
    if not tail.any():
        return out
    kk, nn = k_arr[tail], n_arr[tail]
    sf = special.betainc(kk.astype(np.float64), (nn - kk + 1).astype(np.float64), p)
    with np.errstate(divide="ignore"):
        vals = np.log10(sf)
    deep = np.flatnonzero(sf < _TINY)
    for i in deep:  # rare: only results stronger than 1e-290 land here
        vals[i] = _binom_ln_sf_exact(int(kk[i]), int(nn[i]), p) / _LN10
    out[tail] = vals
    return out


def _gamma_ln_sf_exact(n: int, s: float) -> float:
    """ln Q(n, s) for an integer n, as the log of the finite Poisson sum."""
    j = np.arange(n, dtype=np.float64)
    return -s + _logsumexp(j * math.log(s) - special.gammaln(j + 1))


def gamma_log10_sf(s: np.ndarray | float, n: np.ndarray | int) -> np.ndarray:
    """log10 P(Gamma(n, 1) >= s), elementwise, for integer n >= 1 and s >= 0."""
    s_arr, n_arr = np.broadcast_arrays(np.asarray(s, dtype=np.float64), np.asarray(n, dtype=np.int64))
    out = np.zeros(s_arr.shape, dtype=np.float64)
    pos = (s_arr > 0) & (n_arr > 0)
    if not pos.any():
        return out
    ss, nn = s_arr[pos], n_arr[pos]
    sf = special.gammaincc(nn.astype(np.float64), ss)
    with np.errstate(divide="ignore"):
        vals = np.log10(sf)
    for i in np.flatnonzero(sf < _TINY):
        vals[i] = _gamma_ln_sf_exact(int(nn[i]), float(ss[i])) / _LN10
    out[pos] = vals
    return out


def norm_log10_sf(z: np.ndarray | float) -> np.ndarray:
    """log10 P(N(0, 1) >= z), accurate for any z (log_ndtr never underflows)."""
    return special.log_ndtr(-np.asarray(z, dtype=np.float64)) / _LN10


def bonferroni_log10(log10_p: np.ndarray | float, m: int) -> np.ndarray:
    """min(1, m * p) in log10: the correction for trying m keys, valid under any dependence."""
    if m < 1:
        raise ValueError(f"the number of tests must be >= 1, got {m}")
    return np.minimum(np.asarray(log10_p, dtype=np.float64) + math.log10(m), 0.0)

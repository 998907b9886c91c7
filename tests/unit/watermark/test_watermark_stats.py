"""Exact tails in log10: equal to scipy where scipy is representable, finite and exact far beyond."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from scipy import stats

from defense.watermark.stats import binom_log10_sf, bonferroni_log10, gamma_log10_sf, norm_log10_sf


def test_binomial_matches_scipy_in_range():
    k = np.array([0, 1, 50, 60, 80, 120, 199, 200])
    n = 200
    ref = np.log10(stats.binom.sf(k - 1, n, 0.25))
    np.testing.assert_allclose(binom_log10_sf(k, n, 0.25), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k, n, p", [(900, 1000, 0.25), (1000, 1000, 0.25), (5000, 10_000, 0.25), (2000, 2500, 0.25)])
def test_binomial_deep_tail_is_exact(k, n, p):
    mpmath.mp.dps = 40
    exact = mpmath.log10(mpmath.betainc(k, n - k + 1, 0, p, regularized=True))
    got = float(binom_log10_sf(k, n, p))
    assert math.isfinite(got) and got < -300  # far below the smallest double: no underflow to 0
    assert got == pytest.approx(float(exact), rel=1e-9)


def test_gamma_tail_matches_scipy_and_goes_deep():
    s = np.array([0.0, 50.0, 100.0, 150.0])
    np.testing.assert_allclose(gamma_log10_sf(s, 100), np.log10(stats.gamma.sf(s, 100)), rtol=1e-9, atol=1e-12)
    mpmath.mp.dps = 40
    for s_, n in ((2500.0, 200), (40_000.0, 10_000)):
        exact = mpmath.log10(mpmath.gammainc(n, s_, mpmath.inf, regularized=True))
        assert float(gamma_log10_sf(s_, n)) == pytest.approx(float(exact), rel=1e-9)


def test_normal_tail_and_bonferroni():
    assert float(norm_log10_sf(40.0)) == pytest.approx(float(mpmath.log10(mpmath.ncdf(-40))), rel=1e-9)
    assert float(bonferroni_log10(-10.0, 100)) == pytest.approx(-8.0)
    assert float(bonferroni_log10(-0.5, 100)) == 0.0  # capped at p = 1
    with pytest.raises(ValueError, match="number of tests"):
        bonferroni_log10(-1.0, 0)

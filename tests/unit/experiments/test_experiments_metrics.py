"""Headline and utility metrics: properties that must hold for any input (hypothesis)."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from experiments.metrics import (
    bootstrap_ci,
    expected_calibration_error,
    gain_erased,
    kl_divergence,
    logprob_extra_gain_erased,
    mean_ci,
    spearman_topk,
    top1_agreement,
    topk_total_variation,
    total_variation,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@st.composite
def logit_pairs(draw):
    shape = draw(st.tuples(st.integers(1, 6), st.integers(2, 12)))
    el = st.floats(-8, 8)
    return draw(arrays(np.float64, shape, elements=el)), draw(arrays(np.float64, shape, elements=el))


# -- gain erased ------------------------------------------------------------------------------------
@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(finite, finite, finite)
def test_gain_erased_anchors(s_def, s_clean, s0):
    assume(abs(s_clean - s0) > 1e-6)
    assert gain_erased(s_clean, s_clean, s0) == pytest.approx(0.0, abs=1e-9)
    assert gain_erased(s0, s_clean, s0) == pytest.approx(1.0, abs=1e-9)


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(finite, finite, finite, st.floats(0.01, 100), finite)
def test_gain_erased_is_invariant_to_affine_rescaling_of_the_score(s_def, s_clean, s0, a, b):
    """A loss (lower is better) or an accuracy in points gives the same number: flip and scale freely."""
    assume(abs(s_clean - s0) > 1e-3)
    ref = gain_erased(s_def, s_clean, s0)
    for scale in (a, -a):
        assert gain_erased(scale * s_def + b, scale * s_clean + b, scale * s0 + b) == pytest.approx(ref, rel=1e-6, abs=1e-6)


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(finite, finite, finite, st.floats(0.001, 10))
def test_gain_erased_grows_as_the_defended_student_gets_worse(s_def, s_clean, s0, eps):
    assume(s_clean - s0 > 1e-3)
    assert gain_erased(s_def - eps, s_clean, s0) > gain_erased(s_def, s_clean, s0)


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(finite, finite)
def test_gain_erased_is_nan_without_a_gain(s_def, s):
    assert math.isnan(gain_erased(s_def, s, s))


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(finite, finite, finite)
def test_logprob_extra_gain_erased_is_gain_erased_over_the_sft_floor(kd_def, kd_clean, sft_clean):
    assume(abs(kd_clean - sft_clean) > 1e-6)
    v = logprob_extra_gain_erased(kd_def, kd_clean, sft_clean)
    assert v == pytest.approx(gain_erased(kd_def, kd_clean, sft_clean))
    if kd_def == sft_clean:
        assert v == pytest.approx(1.0)  # logprobs add nothing over text once defended


# -- distributions ----------------------------------------------------------------------------------
@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(logit_pairs())
def test_kl_is_nonnegative_and_zero_on_itself(pair):
    a, b = pair
    p, q = _log_softmax(a), _log_softmax(b)
    assert (kl_divergence(p, q) >= -1e-9).all()
    assert np.allclose(kl_divergence(p, p), 0.0, atol=1e-9)


def test_kl_treats_zero_probability_terms_as_zero():
    with np.errstate(divide="ignore"):
        p = np.log(np.array([[0.5, 0.5, 0.0]]))
    q = np.log(np.array([[0.25, 0.25, 0.5]]))
    assert kl_divergence(p, q)[0] == pytest.approx(math.log(2))
    assert kl_divergence(p, p)[0] == 0.0


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(logit_pairs())
def test_total_variation_is_a_bounded_symmetric_distance(pair):
    a, b = pair
    p, q = np.exp(_log_softmax(a)), np.exp(_log_softmax(b))
    tv = total_variation(p, q)
    assert ((tv >= 0) & (tv <= 1 + 1e-12)).all()
    assert np.allclose(tv, total_variation(q, p))
    assert np.allclose(total_variation(p, p), 0.0)


@st.composite
def topk_answers(draw):
    """Two top-k answers over one vocabulary: a clean one and a perturbed, possibly shorter, one."""
    n, v = draw(st.integers(1, 5)), draw(st.integers(3, 30))
    k = draw(st.integers(1, min(v, 8)))
    lg = draw(arrays(np.float64, (n, v), elements=st.floats(-6, 6)))
    lp = _log_softmax(lg)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(lp, ids, axis=1)
    noise = draw(arrays(np.float64, (n, v), elements=st.floats(-2, 2)))
    lp2 = _log_softmax(lg + noise)
    k2 = draw(st.integers(1, k))
    ids2 = np.argsort(-lp2, axis=1, kind="stable")[:, :k2]
    vals2 = np.take_along_axis(lp2, ids2, axis=1)
    return vals, ids, vals2, ids2


@settings(max_examples=200, deadline=None)
@given(topk_answers())
def test_topk_tv_is_in_unit_interval_symmetric_and_zero_on_identical_answers(ans):
    v, i, v2, i2 = ans
    tv = topk_total_variation(v, i, v2, i2)
    assert ((tv >= -1e-12) & (tv <= 1 + 1e-12)).all()
    assert np.allclose(tv, topk_total_variation(v2, i2, v, i))
    assert np.allclose(topk_total_variation(v, i, v, i), 0.0)


def test_topk_tv_charges_withheld_mass_and_ignores_missing_slots():
    clean_v = np.log(np.array([[0.5, 0.3, 0.1]]))
    clean_i = np.array([[4, 7, 9]])
    top1_v = np.array([[math.log(0.5), 0.0, 0.0]])
    top1_i = np.array([[4, -1, -1]])  # values under -1 ids are garbage and must be ignored
    # clean: 4:.5 7:.3 9:.1 rest:.1 ; top-1: 4:.5 rest:.5 -> TV = .5 * (.3 + .1 + .4)
    assert topk_total_variation(clean_v, clean_i, top1_v, top1_i)[0] == pytest.approx(0.4)


def test_topk_tv_on_probability_vectors():
    p = np.array([[0.7, 0.2, 0.1]])
    q = np.array([[0.6, 0.3, 0.1]])
    ids = np.arange(3)[None, :]
    assert topk_total_variation(p, ids, q, ids, logprobs=False)[0] == pytest.approx(0.1)


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(topk_answers(), st.permutations(range(8)))
def test_top1_agreement_ignores_the_order_of_alternatives(ans, perm):
    v, i, _, _ = ans
    k = v.shape[1]
    order = [j for j in perm if j < k]
    assert top1_agreement(v, i, v[:, order], i[:, order]) == 1.0


def test_top1_agreement_counts_positions():
    v = np.log(np.array([[0.6, 0.4], [0.6, 0.4]]))
    i = np.array([[1, 2], [3, 4]])
    swapped = np.log(np.array([[0.6, 0.4], [0.4, 0.6]]))
    assert top1_agreement(v, i, swapped, i) == 0.5


@settings(max_examples=200, deadline=None)
@given(topk_answers())
def test_spearman_is_in_range_and_one_on_identical_answers(ans):
    v, i, v2, i2 = ans
    assert -1.0 <= spearman_topk(v, i, v2, i2) <= 1.0
    assert spearman_topk(v, i, v, i) == pytest.approx(1.0)


def test_spearman_reversed_ranking_is_minus_one():
    v = np.log(np.array([[0.5, 0.3, 0.2]]))
    i = np.array([[1, 2, 3]])
    rev = np.log(np.array([[0.2, 0.3, 0.5]]))
    assert spearman_topk(v, i, rev, i) == pytest.approx(-1.0)


def test_spearman_matches_scipy_on_full_rankings():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 6))
    b = a + rng.normal(scale=0.7, size=a.shape)
    ids = np.broadcast_to(np.arange(6), a.shape)
    expected = np.mean([spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)])
    assert spearman_topk(a, ids, b, ids) == pytest.approx(expected)


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(arrays(np.float64, st.tuples(st.integers(1, 40), st.just(4)), elements=st.floats(0.01, 10)),
       st.integers(0, 3), st.integers(1, 20))
def test_ece_is_in_unit_interval(raw, label_shift, bins):
    probs = raw / raw.sum(axis=1, keepdims=True)
    labels = (probs.argmax(axis=1) + label_shift) % 4
    assert 0.0 <= expected_calibration_error(probs, labels, bins) <= 1.0


def test_ece_is_zero_for_confident_correct_answers_and_one_for_confident_wrong_ones():
    probs = np.eye(3)[[0, 1, 2, 0]]
    assert expected_calibration_error(probs, np.array([0, 1, 2, 0])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 2, 0, 1])) == pytest.approx(1.0)


# -- intervals --------------------------------------------------------------------------------------
@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(st.lists(finite, min_size=1, max_size=8))
def test_mean_ci_brackets_the_mean(values):
    mean, lo, hi = mean_ci(values, n=200)
    assert mean == pytest.approx(np.mean(values))
    assert lo <= mean + 1e-9 and mean - 1e-9 <= hi
    assert min(values) - 1e-9 <= lo and hi <= max(values) + 1e-9


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(finite)
def test_bootstrap_of_constant_groups_collapses_to_the_point(c):
    point, lo, hi = bootstrap_ci(lambda a, b: a - b, [[c, c, c], [1.0, 1.0]], n=100)
    assert point == lo == hi


def test_bootstrap_gain_erased_interval_contains_the_point_and_is_reproducible():
    groups = [[0.60, 0.62, 0.58], [0.90, 0.92, 0.91], [0.10, 0.11, 0.09]]
    a = bootstrap_ci(gain_erased, groups, n=500, seed=3)
    assert a == bootstrap_ci(gain_erased, groups, n=500, seed=3)
    assert a[1] <= a[0] <= a[2]
    assert a[0] == pytest.approx(1 - (0.60 - 0.10) / (0.91 - 0.10))

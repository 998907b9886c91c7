"""The compiled response-path kernels against the numpy code they replace, on every kind of batch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from support.perturb import ctx, prob_batch, topk_batch

from defense import prf
from defense.base import Deps
from defense.chain import check_values
from defense.errors import InvalidInput
from defense.keys import KeyRing
from defense.perturbation import kernels
from defense.perturbation.keyed import KeyedNoise, KeyedNoiseParams
from defense.perturbation.random_noise import RandomNoise, RandomNoiseParams
from defense.types import LogprobBatch, LogprobsMode, OutputKind

pytestmark = pytest.mark.skipif(not kernels.ENABLED, reason="numba is not installed (the numpy path is in use)")

KEYS = KeyRing.generate()


def _both(defense, batch, c, monkeypatch):
    fused = defense.apply(batch, c)
    monkeypatch.setattr(kernels, "ENABLED", False)
    try:
        ref = defense.apply(batch, c)
    finally:
        monkeypatch.setattr(kernels, "ENABLED", True)
    return fused, ref


def _close(a: LogprobBatch, b: LogprobBatch) -> None:
    assert a.values.dtype == b.values.dtype == np.float32
    assert np.array_equal(a.token_ids, b.token_ids)
    # exp/log differ between libm and numpy's SIMD routines in the last float64 bit: a float32 ulp at most
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-6)
    if b.sampled_values is None:
        assert a.sampled_values is None
    else:
        np.testing.assert_allclose(a.sampled_values, b.sampled_values, rtol=1e-6, atol=1e-6)


def _with_sampled(b: LogprobBatch, rng: np.random.Generator) -> LogprobBatch:
    """Sampled tokens: mostly one of the returned alternatives, some outside the top-k (a lower value)."""
    p = b.values.shape[0]
    cols = rng.integers(0, b.values.shape[1], p)
    sid = b.token_ids[np.arange(p), cols].copy()
    sval = b.values[np.arange(p), cols].copy()
    outside = (rng.random(p) < 0.3) | (sid < 0)
    sid[outside] = 10_000 + np.arange(p)[outside]
    sval[outside] = b.values.min() - 1.0
    return replace(b, sampled_token_ids=sid, sampled_values=sval)


@pytest.mark.parametrize("seed", range(12))
def test_keyed_noise_fused_matches_numpy(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    p, v = int(rng.integers(1, 40)), int(rng.integers(3, 200))
    k = int(rng.integers(1, min(v, 25) + 1))
    logits = rng.normal(0, 3, (p, v))
    mode = LogprobsMode.PROCESSED if seed % 3 == 0 else LogprobsMode.RAW
    b = topk_batch(logits, k, missing=1 if k > 2 and seed % 2 else 0, temperature=0.7 if seed % 3 == 0 else 1.0,
                   mode=mode, offset=int(rng.integers(0, 50)))
    if seed % 4 != 1:
        b = _with_sampled(b, rng)
    d = KeyedNoise(KeyedNoiseParams(sigma=float(rng.uniform(0.1, 2)), keep_argmax=seed % 5 != 0),
                   deps=Deps(keys=KEYS))
    fused, ref = _both(d, b, ctx(rng.bytes(32), strength=float(rng.uniform(0.5, 4))), monkeypatch)
    _close(fused, ref)


@pytest.mark.parametrize("seed", range(6))
def test_probability_vectors_fused_match_numpy(seed, monkeypatch):
    rng = np.random.default_rng(100 + seed)
    b = prob_batch(rng.normal(0, 2, (int(rng.integers(1, 9)), int(rng.integers(2, 300)))))
    if seed % 2:
        b = replace(b, sampled_token_ids=rng.integers(0, b.values.shape[1], b.values.shape[0]).astype(np.int64),
                    sampled_values=np.full(b.values.shape[0], 0.01, dtype=np.float32))
    fused, ref = _both(KeyedNoise(deps=Deps(keys=KEYS)), b, ctx(rng.bytes(32)), monkeypatch)
    _close(fused, ref)
    np.testing.assert_allclose(fused.values.sum(1), 1.0, atol=1e-5)


def test_float32_near_ties_keep_the_argmax_either_way(monkeypatch):
    """Values one float32 ulp apart: the log runs in float64 in both paths, so the kept argmax is the same."""
    logits = np.full((2, 17), -1.1920929e-07)
    logits[0, 1], logits[1, 0] = 0.0, 1.0
    b = prob_batch(logits)
    assert b.values[0, 1] > b.values[0, 0]  # distinct in float32, equal in a float32 log
    c = ctx(b"\0" * 32)
    fused, ref = _both(KeyedNoise(KeyedNoiseParams(sigma=1.0), deps=Deps(keys=KEYS)), b, c, monkeypatch)
    _close(fused, ref)
    np.testing.assert_array_equal(fused.values.argmax(1), b.values.argmax(1))
    top = topk_batch(np.log(b.values.astype(np.float64)), 5)
    fused, ref = _both(KeyedNoise(KeyedNoiseParams(sigma=1.0), deps=Deps(keys=KEYS)), top, c, monkeypatch)
    _close(fused, ref)
    np.testing.assert_array_equal(fused.values.argmax(1), top.values.argmax(1))


def test_other_logit_shifts_use_the_fused_shift(monkeypatch):
    rng = np.random.default_rng(7)
    b = _with_sampled(topk_batch(rng.normal(0, 3, (16, 50)), 5), rng)
    fused = RandomNoise(RandomNoiseParams(sigma=0.5, seed=3)).apply(b, ctx())
    monkeypatch.setattr(kernels, "ENABLED", False)
    ref = RandomNoise(RandomNoiseParams(sigma=0.5, seed=3)).apply(b, ctx())
    _close(fused, ref)


def test_keyed_normal_is_the_prf():
    """The fused draw is prf.normal over prf.hash_combine, bit for bit in the hashing."""
    rng = np.random.default_rng(3)
    ids = rng.integers(-1, 2**40, (7, 6)).astype(np.int64)
    sampled = rng.integers(0, 2**40, 7).astype(np.int64)
    seed, offset = int(rng.integers(-2**63, 2**63 - 1)), 11
    got = kernels.keyed_normal(seed, offset, ids, 6, sampled, 0.75)
    allids = np.concatenate([ids, sampled[:, None]], axis=1)
    want = prf.normal(prf.hash_combine(seed, np.arange(7)[:, None] + offset, allids)) * 0.75
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=1e-15)
    assert kernels.keyed_normal(seed, offset, ids, 6, np.empty(0, dtype=np.int64), 0.75).shape == (7, 6)
    dense = kernels.keyed_normal(seed, offset, np.empty((7, 0), dtype=np.int64), 4, sampled, 0.75)
    cols = np.concatenate([np.broadcast_to(np.arange(4), (7, 4)), sampled[:, None]], axis=1)
    np.testing.assert_allclose(dense, prf.normal(prf.hash_combine(seed, np.arange(7)[:, None] + offset, cols)) * 0.75,
                               rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("seed", range(8))
def test_keyed_shift_is_keyed_normal_then_shift_bit_for_bit(seed):
    """The keyed noise's one-call Protect draws the same deltas and shifts them the same way, and counts
    the values it changed as the chain would (``!=``)."""
    rng = np.random.default_rng(500 + seed)
    p = int(rng.integers(1, 20))
    if seed % 2:
        b = prob_batch(rng.normal(0, 2, (p, int(rng.integers(2, 40)))))
    else:
        b = topk_batch(rng.normal(0, 3, (p, 60)), int(rng.integers(1, 8)), missing=1 if seed % 4 == 2 else 0)
    if seed % 3 and seed % 2:  # dense: the sampled class is one of the columns
        b = replace(b, sampled_token_ids=rng.integers(0, b.values.shape[1], p).astype(np.int64),
                    sampled_values=np.full(p, 0.01, dtype=np.float32))
    elif seed % 3:
        b = _with_sampled(b, rng)
    prob = b.kind is OutputKind.PROBABILITIES
    with_sampled = b.sampled_token_ids is not None
    sids = b.sampled_token_ids if with_sampled else np.empty(0, dtype=np.int64)
    svals = b.sampled_values if with_sampled else np.empty(0, dtype=np.float32)
    k = b.values.shape[1]
    seed_word, offset = int(rng.integers(-2**63, 2**63 - 1)), int(rng.integers(0, 100))
    factor, scale = float(rng.uniform(0.1, 3)), (1.0, 1 / 0.7)[seed % 2]
    d = kernels.keyed_normal(seed_word, offset, b.token_ids, k, sids, factor)
    if scale != 1.0:
        d = d * scale
    want = kernels.shift(b.values, b.token_ids, d, sids, svals, seed % 5 != 0, prob, prob, 1e-4)
    got = kernels.keyed_shift(seed_word, offset, factor, scale, b.values, b.token_ids, sids, svals, seed % 5 != 0,
                              prob, prob, 1e-4)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2] == int(np.count_nonzero(got[0] != b.values))


@pytest.mark.parametrize("make", ["keyed", "random"])
def test_fused_shifts_count_what_the_chain_would(make, monkeypatch):
    from defense.chain import _n_changed

    rng = np.random.default_rng(9)
    b = _with_sampled(topk_batch(rng.normal(0, 3, (16, 50)), 5, missing=1), rng)
    d = (KeyedNoise(KeyedNoiseParams(sigma=0.5), deps=Deps(keys=KEYS)) if make == "keyed"
         else RandomNoise(RandomNoiseParams(sigma=0.5, seed=3)))
    out, n = d.apply_counted(b, ctx(rng.bytes(32)))
    assert n == _n_changed(b, out) > 0
    assert d.apply_counted(b, ctx(rng.bytes(32), strength=0.0)) == (b, 0)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert d.apply_counted(b, ctx(rng.bytes(32)))[1] is None  # the numpy path leaves the count to the chain


def _same_refusal(b: LogprobBatch, monkeypatch) -> None:
    """The compiled and the numpy checks refuse ``b`` with the same message."""
    with pytest.raises(InvalidInput) as fused:
        check_values(b)
    monkeypatch.setattr(kernels, "ENABLED", False)
    with pytest.raises(InvalidInput) as ref:
        check_values(b)
    assert str(fused.value) == str(ref.value)


@pytest.mark.parametrize("case", ["nan", "inf", "positive", "duplicate", "mass"])
def test_check_values_refuses_the_same_batches_either_way(case, monkeypatch):
    vals = np.log(np.array([[0.5, 0.2, 0.1], [0.4, 0.3, 0.2]], dtype=np.float32))
    ids = np.array([[1, 2, 3], [4, 5, -1]], dtype=np.int64)
    if case == "nan":
        vals[1, 1] = np.nan
    elif case == "inf":
        vals[0, 2] = np.inf
    elif case == "positive":
        vals[0, 0] = 0.5
    elif case == "duplicate":
        ids[1, 1] = 4
    else:
        vals[1] = np.log([0.6, 0.5, 0.9])
    _same_refusal(LogprobBatch(values=vals, token_ids=ids), monkeypatch)


@pytest.mark.parametrize("case", ["nan", "negative", "sum"])
def test_check_values_refuses_the_same_probability_vectors_either_way(case, monkeypatch):
    vals = np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]], dtype=np.float32)
    if case == "nan":
        vals[1, 0] = np.nan
    elif case == "negative":
        vals[0] = [0.75, -0.25, 0.5]
    else:
        vals[1, 2] = 0.5
    _same_refusal(LogprobBatch(values=vals, token_ids=np.empty((2, 0), dtype=np.int64), kind=OutputKind.PROBABILITIES),
                  monkeypatch)


def test_check_values_passes_sound_batches_and_ignores_missing_slots():
    vals = np.array([[-0.7, -1.6, 55.0], [-0.9, -1.2, -2.3]], dtype=np.float32)  # 55 sits in a missing slot
    ids = np.array([[1, 2, -1], [1, 2, 3]], dtype=np.int64)
    check_values(LogprobBatch(values=vals, token_ids=ids))

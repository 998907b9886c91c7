"""The keyed perturbation: valid, repeat-stable, keyed, argmax- and mass-preserving (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from support.perturb import ctx, prob_batch, topk_batch

from defense.base import Deps
from defense.errors import InvalidInput
from defense.keys import KeyRing
from defense.perturbation.keyed import KeyedNoise, KeyedNoiseParams
from defense.perturbation.measures import top1_agreement
from defense.types import LogprobsMode

KEYS = KeyRing.generate(), KeyRing.generate()
DEF = KeyedNoise(KeyedNoiseParams(sigma=1.0), deps=Deps(keys=KEYS[0]))
OTHER = KeyedNoise(KeyedNoiseParams(sigma=1.0), deps=Deps(keys=KEYS[1]))
FREE = KeyedNoise(KeyedNoiseParams(sigma=1.0, keep_argmax=False), deps=Deps(keys=KEYS[0]))
FREE_OTHER = KeyedNoise(KeyedNoiseParams(sigma=1.0, keep_argmax=False), deps=Deps(keys=KEYS[1]))

logit_rows = st.integers(1, 12).flatmap(
    lambda p: st.integers(2, 40).flatmap(
        lambda v: arrays(np.float64, (p, v), elements=st.floats(-30, 30, allow_nan=False, allow_subnormal=False))))


@settings(max_examples=80, deadline=None)
@given(logits=logit_rows, k=st.integers(1, 20), strength=st.floats(0.1, 8), digest=st.binary(min_size=32, max_size=32))
def test_topk_outputs_valid_mass_kept_argmax_kept(logits, k, strength, digest):
    k = min(k, logits.shape[1])
    b = topk_batch(logits, k, missing=1 if k > 2 else 0)
    out = DEF.apply(b, ctx(digest, strength=strength))
    present = b.present
    assert out.values.dtype == np.float32 and out.values.shape == b.values.shape
    assert np.array_equal(out.token_ids, b.token_ids)
    assert (out.values[present] <= 0).all() and np.isfinite(out.values[present]).all()
    mass_in = np.where(present, np.exp(b.values.astype(np.float64)), 0).sum(1)
    mass_out = np.where(present, np.exp(out.values.astype(np.float64)), 0).sum(1)
    np.testing.assert_allclose(mass_out, mass_in, rtol=2e-5, atol=1e-6)
    assert (mass_out <= 1 + 1e-5).all()
    assert top1_agreement(b, out) == 1.0
    # missing slots are left exactly as they came
    assert np.array_equal(out.values[~present], b.values[~present])


@settings(max_examples=60, deadline=None)
@given(logits=logit_rows, digest=st.binary(min_size=32, max_size=32))
def test_probability_vectors_stay_vectors(logits, digest):
    b = prob_batch(logits)
    out = DEF.apply(b, ctx(digest))
    assert ((out.values >= 0) & (out.values <= 1)).all()
    np.testing.assert_allclose(out.values.sum(1), 1.0, atol=1e-5)
    assert (out.values.argmax(1) == b.values.argmax(1)).all() or np.allclose(
        b.values.max(1), np.sort(b.values, 1)[:, -2])  # exact ties may resolve either way


@settings(max_examples=40, deadline=None)
@given(logits=logit_rows, digest=st.binary(min_size=32, max_size=32))
def test_same_key_and_context_identical_other_key_different(logits, digest):
    k = min(5, logits.shape[1])
    b = topk_batch(logits, k)
    a1, a2 = DEF.apply(b, ctx(digest)), DEF.apply(b, ctx(digest))
    assert np.array_equal(a1.values, a2.values)  # bit-identical
    other_digest = bytes(x ^ 1 for x in digest)
    ids, rows = b.token_ids, np.arange(b.values.shape[0])[:, None]
    noise = DEF.delta(b, ctx(digest), ids, rows)
    assert not np.array_equal(OTHER.delta(b, ctx(digest), ids, rows), noise)  # another key: other noise
    assert not np.array_equal(DEF.delta(b, ctx(other_digest), ids, rows), noise)  # another context: other noise
    if k >= 2 and np.ptp(b.values) > 1e-3:
        # and other values; compared without the argmax guard, which maps every draw that would flip a
        # row's top to the same tie-by-a-margin values (two keys that both flip [-1, 0] answer alike)
        free = FREE.apply(b, ctx(digest)).values
        assert not np.array_equal(FREE_OTHER.apply(b, ctx(digest)).values, free)
        assert not np.array_equal(FREE.apply(b, ctx(other_digest)).values, free)


def test_noise_depends_on_position_not_on_chunking():
    logits = np.random.default_rng(1).normal(size=(10, 50)) * 2
    whole = DEF.apply(topk_batch(logits, 5), ctx())
    first = DEF.apply(topk_batch(logits[:4], 5), ctx())
    rest = DEF.apply(topk_batch(logits[4:], 5, offset=4), ctx())
    np.testing.assert_array_equal(np.concatenate([first.values, rest.values]), whole.values)


def test_key_id_alone_does_not_set_the_noise():
    # two key rings whose entries share a key id but not the secret give different noise
    from dataclasses import replace

    a, other = KeyRing.generate(), KeyRing.generate()
    b = KeyRing([replace(other._entry(other.primary_id), key_id=a.primary_id)])
    assert a.primary_id == b.primary_id
    logits = np.random.default_rng(2).normal(size=(4, 30))
    ba = topk_batch(logits, 5)
    assert not np.array_equal(KeyedNoise(deps=Deps(keys=a)).apply(ba, ctx()).values,
                              KeyedNoise(deps=Deps(keys=b)).apply(ba, ctx()).values)


def test_strength_scales_the_noise_and_is_capped():
    logits = np.random.default_rng(3).normal(size=(200, 60))
    b = topk_batch(logits, 10)
    dev = [np.abs(DEF.apply(b, ctx(strength=s)).values - b.values).mean() for s in (0.5, 1, 2, 100)]
    assert dev[0] < dev[1] < dev[2] < dev[3]
    capped = KeyedNoise(KeyedNoiseParams(sigma=1.0, max_strength=2.0), deps=Deps(keys=KEYS[0]))
    np.testing.assert_array_equal(capped.apply(b, ctx(strength=100)).values, capped.apply(b, ctx(strength=2)).values)
    assert DEF.apply(b, ctx(strength=0)) is b


def test_sampled_value_consistent():
    logits = np.random.default_rng(4).normal(size=(6, 40)) * 2
    b = topk_batch(logits, 3)
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    sampled = np.array([b.token_ids[0, 1], 39, b.token_ids[2, 0], 7, 8, b.token_ids[5, 2]])
    b = type(b)(values=b.values, token_ids=b.token_ids, sampled_token_ids=sampled,
                sampled_values=lp[np.arange(6), sampled].astype(np.float32))
    out = DEF.apply(b, ctx())
    for row, tok in enumerate(sampled):
        hit = np.flatnonzero(b.token_ids[row] == tok)
        if hit.size:
            assert out.sampled_values[row] == out.values[row, hit[0]]
        else:  # outside the top-k: never above the smallest returned alternative
            assert out.sampled_values[row] <= out.values[row].min() + 1e-7


def test_processed_logprobs_get_noise_over_temperature():
    logits = np.random.default_rng(5).normal(size=(50, 30))
    raw = DEF.apply(topk_batch(logits, 30), ctx())
    # at T=2 processed, the result is the top-k of (logits + n) / 2: the same noise n, scaled
    hot = DEF.apply(topk_batch(logits, 30, temperature=2.0, mode=LogprobsMode.PROCESSED), ctx())
    order = np.argsort(raw.token_ids, 1)
    r = np.take_along_axis(raw.values.astype(np.float64), order, 1)
    h_order = np.argsort(hot.token_ids, 1)
    h = np.take_along_axis(hot.values.astype(np.float64), h_order, 1)
    # logits recovered up to a per-row constant: raw gives z + n, processed (z + n) / 2
    np.testing.assert_allclose((r - r.mean(1, keepdims=True)) / 2, h - h.mean(1, keepdims=True), atol=2e-3)


def test_prime_computes_the_seed_ahead_and_changes_nothing():
    digest = bytes(range(32))
    b = topk_batch(np.random.default_rng(3).normal(size=(4, 20)), 5)
    fresh = KeyedNoise(KeyedNoiseParams(sigma=1.0), deps=Deps(keys=KEYS[0]))
    fresh.prime(ctx(b""))  # nothing to key by yet: no seed, no error (apply says why)
    assert fresh._seeds == {}
    fresh.prime(ctx(digest))
    assert list(fresh._seeds) == [("tiny", digest)]
    assert np.array_equal(fresh.apply(b, ctx(digest)).values, DEF.apply(b, ctx(digest)).values)


def test_missing_digest_is_an_error():
    b = topk_batch(np.zeros((1, 5)), 2)
    with pytest.raises(InvalidInput, match="context digest"):
        DEF.apply(b, ctx(b""))


def test_params_validated():
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        KeyedNoiseParams(sigma=-1.0)
    with pytest.raises(ValueError, match="needs a key file"):
        KeyedNoise(deps=Deps())

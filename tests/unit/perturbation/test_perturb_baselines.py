"""Every output perturbation returns a valid distribution of the same kind, never mutates its input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from support.perturb import ctx, prob_batch, topk_batch

from defense.base import Deps
from defense.keys import KeyRing
from defense.perturbation.cap import TopKCap, TopKCapParams
from defense.perturbation.keyed import KeyedNoise
from defense.perturbation.quantize import Quantize, QuantizeParams
from defense.perturbation.random_noise import RandomNoise, RandomNoiseParams
from defense.perturbation.reverse_sigmoid import ReverseSigmoid, ReverseSigmoidParams
from defense.perturbation.temperature import Temperature, TemperatureParams
from defense.perturbation.top1 import Top1Only
from defense.types import LogprobBatch

DEPS = Deps(keys=KeyRing.generate())
ALL = {
    "keyed_noise": KeyedNoise(deps=DEPS),
    "random_noise": RandomNoise(RandomNoiseParams(seed=0)),
    "top_k_cap": TopKCap(TopKCapParams(k=3)),
    "top1_only": Top1Only(),
    "quantize_step": Quantize(QuantizeParams(step=0.5)),
    "quantize_digits": Quantize(QuantizeParams(mode="digits", digits=2)),
    "temperature_flat": Temperature(TemperatureParams(t=2.0)),
    "temperature_sharp": Temperature(TemperatureParams(t=0.5)),
    "reverse_sigmoid": ReverseSigmoid(ReverseSigmoidParams(beta=0.5, gamma=0.5)),
}

logits = st.integers(1, 8).flatmap(lambda p: st.integers(2, 30).flatmap(
    lambda v: arrays(np.float64, (p, v), elements=st.floats(-25, 25, allow_nan=False, allow_subnormal=False))))


@pytest.mark.parametrize("name", sorted(ALL))
@settings(max_examples=40, deadline=None)
@given(z=logits, k=st.integers(1, 12), strength=st.sampled_from([1.0, 2.5]))
def test_topk_logprobs_stay_valid(name, z, k, strength):
    k = min(k, z.shape[1])
    b = topk_batch(z, k, missing=1 if k > 2 else 0)
    before = b.values.copy()
    out = ALL[name].apply(b, ctx(strength=strength))
    assert np.array_equal(b.values, before)  # the input is not mutated
    present = out.token_ids >= 0
    v = out.values[present].astype(np.float64)
    assert np.isfinite(v[v != -np.inf]).all() and (v <= 0).all()
    assert (np.where(present, np.exp(out.values.astype(np.float64)), 0).sum(1) <= 1 + 1e-5).all()
    assert out.values.shape[1] <= b.values.shape[1]
    # every returned token was among those the engine returned at that position
    for row in range(out.values.shape[0]):
        assert set(out.token_ids[row][present[row]]) <= set(b.token_ids[row][b.token_ids[row] >= 0])


@pytest.mark.parametrize("name", sorted(ALL))
@settings(max_examples=40, deadline=None)
@given(z=logits)
def test_probability_vectors_stay_valid(name, z):
    b = prob_batch(z)
    out = ALL[name].apply(b, ctx())
    assert out.values.shape == b.values.shape
    assert ((out.values >= 0) & (out.values <= 1)).all()
    np.testing.assert_allclose(out.values.sum(1), 1.0, atol=1e-5)


def test_argmax_preserving_defenses_keep_it():
    z = np.random.default_rng(0).normal(size=(300, 40)) * 3
    b = topk_batch(z, 10)
    for name in ("keyed_noise", "random_noise", "top_k_cap", "top1_only", "quantize_step", "temperature_flat"):
        out = ALL[name].apply(b, ctx())
        top_in = b.token_ids[np.arange(300), b.values.argmax(1)]
        top_out = out.token_ids[np.arange(300), out.values.argmax(1)]
        assert (top_in == top_out).mean() >= (0.97 if name == "quantize_step" else 1.0), name  # floor ties


def test_cap_and_top1_shapes():
    z = np.random.default_rng(1).normal(size=(5, 30))
    b = topk_batch(z, 8)
    capped = ALL["top_k_cap"].apply(b, ctx())
    assert capped.values.shape == (5, 3)
    np.testing.assert_array_equal(capped.token_ids, b.token_ids[:, :3])  # sorted best first already
    assert ALL["top_k_cap"].apply(b, ctx(strength=3.0)).values.shape == (5, 1)  # strength divides k
    one_hot = ALL["top1_only"].apply(prob_batch(z), ctx())
    assert set(np.unique(one_hot.values)) == {0.0, 1.0}


def test_temperature_keeps_mass_and_flattens():
    b = topk_batch(np.random.default_rng(2).normal(size=(20, 30)) * 3, 5)
    out = ALL["temperature_flat"].apply(b, ctx())
    np.testing.assert_allclose(np.exp(out.values.astype(np.float64)).sum(1), np.exp(b.values.astype(np.float64)).sum(1),
                               rtol=1e-5)
    assert (np.ptp(out.values, 1) < np.ptp(b.values, 1)).all()


def test_random_noise_differs_per_request_keyed_does_not():
    b = topk_batch(np.random.default_rng(3).normal(size=(4, 30)), 5)
    r = ALL["random_noise"]
    assert not np.array_equal(r.apply(b, ctx()).values, r.apply(b, ctx()).values)
    k = ALL["keyed_noise"]
    assert np.array_equal(k.apply(b, ctx()).values, k.apply(b, ctx()).values)


@pytest.mark.parametrize(("cls", "kw", "msg"), [
    (TopKCapParams, {"k": 0}, "k must be an int >= 1"),
    (QuantizeParams, {"step": 0}, "step must be > 0"),
    (QuantizeParams, {"mode": "round"}, "mode must be"),
    (TemperatureParams, {"t": -1}, "t must be > 0"),
    (ReverseSigmoidParams, {"beta": float("nan")}, "beta must be >= 0"),
    (RandomNoiseParams, {"sigma": -0.1}, "sigma must be >= 0"),
])
def test_params_validated(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        cls(**kw)


@pytest.mark.parametrize("name", sorted(ALL))
def test_sampled_token_value_never_leaks_a_clean_value(name):
    z = np.random.default_rng(9).normal(size=(30, 40)) * 2
    b = topk_batch(z, 6)
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    sampled = np.where(np.arange(30) % 2 == 0, b.token_ids[:, 2], 39)  # half inside the top-k, half outside
    b = LogprobBatch(values=b.values, token_ids=b.token_ids, sampled_token_ids=sampled,
                     sampled_values=lp[np.arange(30), sampled].astype(np.float32))
    out = ALL[name].apply(b, ctx())
    for row in range(30):
        ret = out.token_ids[row] >= 0
        hit = np.flatnonzero((out.token_ids[row] == sampled[row]) & ret)
        if hit.size:
            assert out.sampled_values[row] == out.values[row, hit[0]]
        else:
            assert out.sampled_values[row] <= out.values[row][ret].min() + 1e-7

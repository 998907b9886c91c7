"""Targeted redirection: valid, within budget, argmax and mass kept, and more misleading than noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from support.perturb import ctx, prob_batch, topk_batch

from defense.config import parse_config
from defense.errors import ConfigError, InvalidInput
from defense.perturbation.redirect import redirect
from defense.perturbation.targeted import GateParams, LMShape, Targeted, TargetedParams
from defense.types import LogprobBatch, Prompt, RequestContext


def learning_alignment(y_def: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """cos between what a student with prediction s learns from y_def and from y (last layer: y - m s)."""
    m = y.sum(1, keepdims=True)
    a, b = y_def - m * s, y - m * s
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


rows = st.integers(1, 10).flatmap(lambda p: st.integers(2, 25).flatmap(
    lambda k: arrays(np.float64, (p, k), elements=st.floats(-8, 8, allow_nan=False, allow_subnormal=False))))


@settings(max_examples=80, deadline=None)
@given(z=rows, eps=st.floats(0, 2), seed=st.integers(0, 100))
def test_redirect_valid_within_budget_argmax_and_mass_kept(z, eps, seed):
    y = np.exp(z) / np.exp(z).sum(1, keepdims=True) * 0.9  # a top-k slice holding 90% of the mass
    s = np.random.default_rng(seed).dirichlet(np.ones(z.shape[1]), size=z.shape[0])
    present = np.ones_like(y, dtype=bool)
    out = redirect(y, s, present, eps)
    assert (out >= 0).all()
    np.testing.assert_allclose(out.sum(1), y.sum(1), atol=1e-9)
    assert (np.abs(out - y).sum(1) <= eps + 1e-9).all()
    top = y.argmax(1)
    assert (out[np.arange(len(y)), top] == y[np.arange(len(y)), top]).all()
    others = np.where(np.arange(y.shape[1]) == top[:, None], -1, out)
    assert (others.max(1) < out[np.arange(len(y)), top] + 1e-12).all() or y.shape[1] == 1


def test_redirect_misleads_more_than_noise_at_equal_distortion():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 10)) * 2
    y = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    s = np.exp(z * 0.5) / np.exp(z * 0.5).sum(1, keepdims=True)  # a half-trained student
    present = np.ones_like(y, dtype=bool)
    red = redirect(y, s, present, 0.4)
    l1 = np.abs(red - y).sum(1)
    # random mass moves of the same L1 size, mass kept, argmax kept where possible
    d = rng.normal(size=y.shape)
    d -= d.mean(1, keepdims=True)
    noise = np.clip(y + d / np.abs(d).sum(1, keepdims=True) * l1[:, None], 0, None)
    noise = noise / noise.sum(1, keepdims=True)
    assert learning_alignment(red, y, s).mean() < learning_alignment(noise, y, s).mean() - 0.3


def test_targeted_defense_on_topk_and_vectors():
    d = Targeted(TargetedParams(epsilon=0.3, gate=GateParams(enabled=False)))
    b = topk_batch(np.random.default_rng(1).normal(size=(40, 60)) * 2, 8, missing=2)
    out = d.apply(b, ctx())
    p_in = np.where(b.present, np.exp(b.values.astype(np.float64)), 0)
    p_out = np.where(out.token_ids >= 0, np.exp(out.values.astype(np.float64)), 0)
    np.testing.assert_allclose(p_out.sum(1), p_in.sum(1), rtol=1e-5)
    assert (np.abs(p_out - p_in).sum(1) <= 0.3 + 1e-5).all() and np.abs(p_out - p_in).sum(1).mean() > 0.1
    assert (p_out.argmax(1) == p_in.argmax(1)).all()
    assert np.array_equal(d.apply(b, ctx()).values, out.values)  # deterministic
    v = d.apply(prob_batch(np.random.default_rng(2).normal(size=(30, 10))), ctx())
    np.testing.assert_allclose(v.values.sum(1), 1.0, atol=1e-5)


def test_gate_spends_the_budget_on_unfamiliar_queries():
    d = Targeted(TargetedParams(epsilon=0.4))
    confident = np.array([[0.95, 0.03, 0.02]])
    unsure = np.array([[0.4, 0.35, 0.25]])
    present = np.ones((1, 3), dtype=bool)
    c = ctx()
    assert d.budget(unsure, present, c)[0] > 3 * d.budget(confident, present, c)[0]
    assert d.budget(unsure, present, ctx(strength=2.0))[0] == pytest.approx(2 * d.budget(unsure, present, c)[0])


def test_classifier_proxy_reads_the_input_tensor(tmp_path):
    from defense.models import ClassifierConfig, build_classifier, save_classifier

    cfg = ClassifierConfig(in_dim=6, n_classes=4, hidden=(8,))
    folder = save_classifier(build_classifier(cfg, seed=0), cfg, tmp_path / "proxy")
    d = Targeted(TargetedParams(proxy="classifier", proxy_path=str(folder), gate=GateParams(enabled=False)))
    x = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
    b = prob_batch(np.random.default_rng(4).normal(size=(5, 4)))
    c = RequestContext(request_id="r", client_id="c", prompt=Prompt(tensor_bytes=x.tobytes()), context_digest=b"d" * 32)
    out = d.apply(b, c)
    np.testing.assert_allclose(out.values.sum(1), 1.0, atol=1e-5)
    assert not np.array_equal(out.values, b.values)
    with pytest.raises(InvalidInput, match="needs the input tensor"):
        d.apply(b, ctx())


def test_lm_proxy_reads_prompt_and_completion():
    d = Targeted(TargetedParams(proxy="lm", proxy_shape=LMShape(vocab_size=64), gate=GateParams(enabled=False)))
    z = np.random.default_rng(5).normal(size=(6, 64)) * 2
    b = topk_batch(z, 5)
    b = LogprobBatch(values=b.values, token_ids=b.token_ids, sampled_token_ids=b.token_ids[:, 0].copy(),
                     sampled_values=b.values[:, 0].copy())
    c = RequestContext(request_id="r", client_id="c", prompt=Prompt(token_ids=(1, 2, 3)), context_digest=b"d" * 32)
    with torch.no_grad():
        s = d.proxy_probs(b, c)
    assert s.shape == (6, 5) and (s > 0).all() and (s < 1).all()
    out = d.apply(b, c)
    assert (out.sampled_values == out.values[:, 0]).all()  # the sampled token follows its alternative


def test_config_validation():
    with pytest.raises(ConfigError, match="proxy_path"):
        parse_config({"version": 1, "defenses": [{"type": "targeted", "params": {"proxy": "classifier"}}]})
    with pytest.raises(ConfigError, match="gate.tau"):
        parse_config({"version": 1, "defenses": [{"type": "targeted", "params": {"gate": {"tau": 2}}}]})
    loaded = parse_config({"version": 1, "defenses": [{"type": "targeted", "params": {"epsilon": 0.1,
                                                                                      "distance": "tv"}}]})
    assert loaded.defenses[0].params.epsilon == 0.1


def test_input_density_detector_fit_score_and_file(tmp_path):
    from defense.perturbation.ood import InputDensity

    rng = np.random.default_rng(0)
    basis = rng.normal(size=(4, 12))
    train = rng.normal(size=(2000, 4)) @ basis + 0.05 * rng.normal(size=(2000, 12))  # near a 4-d subspace
    det = InputDensity.fit(train, quantile=0.99)
    held_out = rng.normal(size=(1000, 4)) @ basis + 0.05 * rng.normal(size=(1000, 12))
    assert 0.003 < np.mean(det.score(held_out) > 1) < 0.03  # about 1% of the same distribution
    assert np.mean(det.score(rng.normal(size=(500, 12))) > 1) > 0.99  # off the subspace: flagged
    again = InputDensity.load(det.save(tmp_path / "det.bin"))
    np.testing.assert_allclose(again.score(held_out), det.score(held_out))
    with pytest.raises(InvalidInput, match="inputs of 12 values"):
        det.score(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="more inputs than dimensions"):
        InputDensity.fit(np.zeros((5, 12)))
    (tmp_path / "junk.npz").write_bytes(b"not a detector")
    with pytest.raises(ConfigError, match="cannot read the OOD detector"):
        InputDensity.load(tmp_path / "junk.npz")


def test_misinformation_gate_answers_flagged_queries_wrongly_and_the_rest_truthfully(tmp_path):
    from defense.perturbation.ood import InputDensity

    rng = np.random.default_rng(1)
    train = rng.normal(size=(3000, 6)) * 0.1
    path = InputDensity.fit(train, quantile=0.999).save(tmp_path / "density.npz")
    d = Targeted(TargetedParams(epsilon=0.3, gate=GateParams(detector=str(path), misinform=True, nu=50.0)))
    x = np.concatenate([rng.normal(size=(20, 6)) * 0.1, rng.normal(size=(20, 6)) * 3.0]).astype(np.float32)
    b = prob_batch(rng.normal(size=(40, 5)) * 2)
    c = RequestContext(request_id="r", client_id="c", prompt=Prompt(tensor_bytes=x.tobytes()), context_digest=b"d" * 32)
    out = d.apply(b, c).values
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
    clean = b.values
    assert (out[:20].argmax(1) == clean[:20].argmax(1)).all()  # in distribution: the argmax kept
    assert (out[20:].argmax(1) == clean[20:].argmin(1)).all()  # flagged: the least likely class on top
    np.testing.assert_allclose(np.sort(out[20:], 1), np.sort(clean[20:], 1), atol=1e-5)  # same confidence profile
    with pytest.raises(InvalidInput, match="needs the input tensor"):
        d.apply(b, ctx())
    with pytest.raises(ConfigError, match="experiments harness"):
        Targeted(TargetedParams(gate=GateParams(detector="auto")))


def test_misinform_reverses_the_ranking_over_present_slots_only():
    from defense.perturbation.targeted import misinform

    y = np.array([[0.6, 0.25, 0.1, 0.0], [0.5, 0.3, 0.15, 0.05]])
    present = np.array([[True, True, True, False], [True, True, True, True]])
    np.testing.assert_allclose(misinform(y, present, np.array([1.0, 1.0])),
                               [[0.1, 0.25, 0.6, 0.0], [0.05, 0.15, 0.3, 0.5]])
    np.testing.assert_allclose(misinform(y, present, np.array([0.0, 0.5])),
                               [y[0], 0.5 * y[1] + 0.5 * np.array([0.05, 0.15, 0.3, 0.5])])

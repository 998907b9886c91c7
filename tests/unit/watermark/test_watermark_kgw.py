"""Green-list watermark: the step, its parameters, its place in a chain, and detection on a trained LM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.watermark import fixed_ring

from defense.base import Deps, Mode
from defense.chain import DefenseChain
from defense.config import parse_config
from defense.errors import ConfigError
from defense.registry import Registry
from defense.types import RequestContext
from defense.watermark import GreenListParams, GreenListWatermark, processed_logprobs, top_logprobs
from server_plugins.transformers import generate


def ctxs(n, **kw):
    return [RequestContext(request_id=f"r{i}", client_id="c", **kw) for i in range(n)]


def wm(ring, **params):
    return GreenListWatermark(GreenListParams(**params), deps=Deps(keys=ring))


def test_bias_is_delta_on_green_tokens_only(ring):
    d = wm(ring, gamma=0.25, delta=2.0, context=2)
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(0))
    prefixes = [[1, 2, 3], [4], [], [9, 8, 7, 6]]
    out = d.process_logits(logits, prefixes, ctxs(4))
    mask = d.green_mask(prefixes, ctxs(4), 3000)
    assert torch.equal(torch.isclose(out - logits, torch.tensor(2.0)), mask) and torch.all((out - logits)[~mask] == 0)
    assert abs(mask.float().mean().item() - 0.25) < 0.02
    assert out is not logits and not d.is_argmax_invariant()
    # a [B, L] tensor of prefixes (what engines hold) gives the same result as lists
    t = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 4], [0, 0, 0, 0], [9, 8, 7, 6]])
    t_out = d.process_logits(logits, t, ctxs(4))
    assert torch.equal(t_out[[0, 3]], out[[0, 3]])
    # each row depends on its own context only: the batch is one vectorized pass, not B coupled ones
    single = d.process_logits(logits[3:4], prefixes[3:4], ctxs(1))
    assert torch.equal(single[0], out[3])


def test_entropy_gate_leaves_confident_rows_alone(ring):
    d = wm(ring, delta=2.0, entropy_threshold=1.0)
    logits = torch.zeros(2, 1000)
    logits[0, 7] = 30.0  # entropy ~ 0: gated
    out = d.process_logits(logits, [[1], [1]], ctxs(2))
    assert torch.equal(out[0], logits[0])
    assert (out[1] - logits[1]).abs().sum() > 0


def test_per_tenant_keys(ring):
    d = wm(ring, per_tenant=True)
    a = RequestContext(request_id="a", client_id="c", tenant="acme")
    b = RequestContext(request_id="b", client_id="c", tenant="bolt")
    m = d.green_mask([[5], [5], [5]], [a, b, a], 4000)
    assert torch.equal(m[0], m[2]) and not torch.equal(m[0], m[1])
    assert d.detector(tenant="acme") is not d.detector(tenant="bolt")


def test_processed_logprobs_are_what_was_sampled(ring):
    d = wm(ring, delta=3.0)
    logits = torch.randn(3, 500)
    cs = [RequestContext(request_id=f"r{i}", client_id="c", temperature=t) for i, t in enumerate((0.7, 1.0, 0.0))]
    lp = processed_logprobs(d, logits, [[1], [2], [3]], cs)
    processed = d.process_logits(logits, [[1], [2], [3]], cs)
    assert torch.allclose(lp[0], torch.log_softmax(processed[0] / 0.7, 0))
    assert torch.allclose(lp[2], torch.log_softmax(processed[2], 0))  # greedy rows report T=1
    assert not torch.allclose(lp[1], torch.log_softmax(logits[1], 0))  # not the clean distribution
    vals, ids = top_logprobs(lp, 5)
    assert vals.shape == ids.shape == (3, 5)


@pytest.mark.parametrize("bad, words", [
    (dict(gamma=0.0), "gamma"), (dict(delta=0.0), "delta"), (dict(delta=float("inf")), "delta"),
    (dict(context=9), "context"), (dict(hashing="x"), "hashing"), (dict(entropy_threshold=-1.0), "entropy_threshold"),
    (dict(min_tokens=0), "min_tokens"), (dict(detection_p=1.0), "detection_p"), (dict(vocab_size=1), "vocab_size"),
])
def test_params_validated(bad, words):
    with pytest.raises(ValueError, match=words):
        GreenListParams(**bad)


def test_needs_a_key_ring():
    with pytest.raises(ValueError, match="needs a key file"):
        GreenListWatermark(GreenListParams())


def test_registered_and_configurable(ring):
    from defense.watermark import GumbelWatermark

    assert Registry().resolve("watermark") is GreenListWatermark
    assert Registry().resolve("watermark_gumbel") is GumbelWatermark
    doc = {"defenses": [{"type": "watermark", "mode": "shadow", "params": {"gamma": 0.5, "context": 2}},
                        {"type": "watermark_gumbel", "mode": "off"}]}
    loaded = parse_config(doc)
    chain = DefenseChain.from_config(loaded, deps=Deps(keys=ring))
    assert chain.entries[0].mode is Mode.SHADOW and chain.entries[0].defense.params.gamma == 0.5
    logits = torch.randn(2, 100)
    assert torch.equal(chain.process_logits(logits, [[1], [2]], ctxs(2)), logits)  # shadow: computed, not applied
    with pytest.raises(ConfigError, match=r"defenses\[0\].params: gamma"):
        parse_config({"defenses": [{"type": "watermark", "params": {"gamma": 2}}]})
    with pytest.raises(ConfigError, match="unknown key 'delt'"):
        parse_config({"defenses": [{"type": "watermark", "params": {"delt": 2}}]})


def test_fused_step_equals_eager(ring):
    eager = wm(ring, context=2)
    fused = wm(ring, context=2, fused=True)
    logits = torch.randn(3, 2000)
    prefixes = torch.randint(0, 2000, (3, 6))
    assert torch.equal(fused.process_logits(logits, prefixes, ctxs(3)), eager.process_logits(logits, prefixes, ctxs(3)))


def test_fused_falls_back_to_eager_when_compiling_fails(ring, monkeypatch, caplog):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fused = wm(ring, fused=True)
    logits = torch.randn(2, 100)
    out = fused.process_logits(logits, [[1], [2]], ctxs(2))
    assert torch.equal(out, wm(ring).process_logits(logits, [[1], [2]], ctxs(2)))
    assert not fused._kernel.fused and "running eager" in caplog.text


# -- on the model factory's trained LM ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("context, hashing", [(1, "lefthash"), (4, "selfhash")])
def test_detects_in_200_tokens_on_a_trained_lm(tiny_lm, prompts, tmp_path, context, hashing):
    """gamma 0.25, delta 2, temperature 1: 200-token streams, each tested alone, reach p < 1e-6.

    The tiny LM is far more certain than a chat model (facts, sums, counting runs), and dedup drops
    repeated (context, token) pairs, so at h=1 about a fifth of the streams stay above 1e-6; the
    assertion is on the median and the fraction, and pooled streams are overwhelming."""
    model, _, _ = tiny_lm
    ring = fixed_ring(tmp_path, tag="detect")
    d = wm(ring, gamma=0.25, delta=2.0, context=context, hashing=hashing)
    streams = generate(model, prompts[:48], defense=d, max_new_tokens=200, temperature=1.0, stop_at_eos=False, seed=11)
    assert all(len(s) == 200 for s in streams)
    report = d.detector().detect_many(streams)
    lp = np.array([r.log10_p for r in report.results])
    print(f"\n{hashing} h={context}: log10 p median {np.median(lp):.1f}, worst {lp.max():.1f}, "
          f"detected {np.mean(lp <= -6):.2f}, tokens scored median {np.median([r.tokens_scored for r in report.results])}")
    assert np.median(lp) < -6
    assert np.mean(lp <= -6) >= (0.7 if context == 1 else 0.9)
    assert all(r.key_id == ring.primary_id for r in report.results)
    assert report.combined.detected and report.combined.log10_p < -30
    # another key finds nothing in the same text
    other = wm(fixed_ring(tmp_path, tag="other"), gamma=0.25, delta=2.0, context=context, hashing=hashing).detector()
    other_report = other.detect_many(streams)
    assert not any(r.detected for r in other_report.results)
    assert other_report.combined.log10_p > -3

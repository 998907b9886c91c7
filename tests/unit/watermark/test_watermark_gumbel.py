"""Gumbel-max watermark: one-hot choice, distortion-free over keys, greedy and repeats left alone, detected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from support.watermark import fixed_ring

from defense import prf
from defense.base import Deps
from defense.types import RequestContext
from defense.watermark import GumbelParams, GumbelWatermark, processed_logprobs
from defense.watermark.kernels import gumbel_choice
from server_plugins.transformers import generate


def ctxs(n, temperature=1.0):
    return [RequestContext(request_id=f"r{i}", client_id="c", temperature=temperature) for i in range(n)]


def test_output_is_one_hot_and_logprobs_match(ring):
    d = GumbelWatermark(GumbelParams(context=2), deps=Deps(keys=ring))
    logits = torch.randn(5, 300)
    prefixes = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    out = d.process_logits(logits, prefixes, ctxs(5))
    assert torch.all((out == 0).sum(1) == 1) and torch.all(torch.isinf(out).sum(1) == 299)
    assert torch.equal(out, d.process_logits(logits, prefixes, ctxs(5)))  # deterministic per (key, context)
    lp = processed_logprobs(d, logits, prefixes, ctxs(5))
    assert torch.equal(lp.argmax(1), out.argmax(1)) and torch.allclose(lp.max(1).values, torch.zeros(5))


def test_distortion_free_over_keys():
    """For one context, the choice over many keys is distributed as softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temp = 0.8
    n_keys = 20_000
    seeds = torch.from_numpy(prf.hash_combine(7, np.arange(n_keys))).reshape(-1, 1)
    choice = gumbel_choice(logits.expand(n_keys, -1), seeds, torch.full((n_keys, 1), 42), torch.arange(6),
                           torch.full((n_keys, 1), 1 / temp), hashing="lefthash")
    counts = np.bincount(choice.numpy(), minlength=6)
    expected = torch.softmax(logits.double() / temp, 0).numpy() * n_keys
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_greedy_and_repeated_contexts_sample_normally(ring):
    d = GumbelWatermark(GumbelParams(context=1), deps=Deps(keys=ring))
    logits = torch.randn(3, 50)
    cs = ctxs(2) + [RequestContext(request_id="g", client_id="c", temperature=0.0)]
    out = d.process_logits(logits, [[1, 2, 3], [4, 5, 4], [7]], cs)
    assert torch.isinf(out[0]).any()  # watermarked
    assert torch.equal(out[1], logits[1])  # context (4,) seen before in this sequence
    assert torch.equal(out[2], logits[2])  # greedy
    off = GumbelWatermark(GumbelParams(context=1, skip_repeated_context=False), deps=Deps(keys=ring))
    assert torch.isinf(off.process_logits(logits, [[1, 2, 3], [4, 5, 4], [7]], cs)[1]).any()


def test_params_validated():
    with pytest.raises(ValueError, match="context"):
        GumbelParams(context=0)
    with pytest.raises(ValueError, match="detection_p"):
        GumbelParams(detection_p=0.0)


@pytest.mark.slow
def test_detects_on_a_trained_lm(tiny_lm, prompts, tmp_path):
    model, _, _ = tiny_lm
    d = GumbelWatermark(GumbelParams(context=2), deps=Deps(keys=fixed_ring(tmp_path, tag="gumbel")))
    streams = generate(model, prompts[:48], defense=d, max_new_tokens=200, stop_at_eos=False, seed=5)
    report = d.detector().detect_many(streams)
    lp = np.array([r.log10_p for r in report.results])
    print(f"\ngumbel h=2: log10 p median {np.median(lp):.1f}, worst {lp.max():.1f}, detected {np.mean(lp <= -6):.2f}")
    assert np.median(lp) < -6 and report.combined.log10_p < -100
    other = GumbelWatermark(GumbelParams(context=2), deps=Deps(keys=fixed_ring(tmp_path, tag="other"))).detector()
    assert other.detect_many(streams).combined.log10_p > -3
    clean = generate(model, prompts[:48], max_new_tokens=200, stop_at_eos=False, seed=5)
    assert not any(r.detected for r in d.detector().detect_many(clean).results)

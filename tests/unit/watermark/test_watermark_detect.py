"""Detectors: false-positive rates at their nominal level, dedup, several keys, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from support.watermark import fixed_ring, one_thread, sample_streams

from defense.base import Deps
from defense.errors import InvalidInput
from defense.watermark import GreenListParams, GreenListWatermark, GumbelParams, GumbelWatermark
from server_plugins.transformers import generate

ALPHAS = (0.001, 0.01, 0.05)


@pytest.fixture(scope="module")
def lm_streams(tiny_lm, prompts):
    """The trained LM's own unwatermarked 200-token samples (as many as fit the CI budget)."""
    model, _, _ = tiny_lm
    with one_thread():
        return generate(model, prompts[:256], max_new_tokens=200, stop_at_eos=False, seed=99)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["kgw", "gumbel"])
def test_false_positive_rate_is_at_most_alpha(tmp_path, lm_streams, scheme):
    """10,000 uniform random 200-token streams plus the LM's own samples: FPR <= alpha within its interval."""
    ring = fixed_ring(tmp_path, tag=f"fpr-{scheme}")
    cls, params = (GreenListWatermark, GreenListParams()) if scheme == "kgw" else (GumbelWatermark, GumbelParams())
    det = cls(params, deps=Deps(keys=ring)).detector()
    uniform = np.random.default_rng(2026).integers(0, 50_000, size=(10_000, 200))
    lp = np.concatenate([det.score(uniform).log10_p, det.score(lm_streams).log10_p])
    n = lp.size
    for alpha in ALPHAS:
        false_pos = int(np.sum(lp <= math.log10(alpha)))
        upper = stats.binom.ppf(1 - 1e-4, n, alpha)  # a 99.99% one-sided interval around alpha
        print(f"\n{scheme}: alpha {alpha}: {false_pos}/{n} = {false_pos / n:.4f} (upper {upper / n:.4f})", end="")
        assert false_pos <= upper
    assert det.score(uniform).n.min() >= 195  # almost nothing repeats in uniform text: dedup keeps it


@pytest.mark.parametrize("scheme", ["kgw", "gumbel"])
def test_null_pvalues_are_uniform_enough(ring, scheme):
    """A KS check of the null p-values for the continuous (Gumbel) test; the discrete binomial is conservative."""
    cls, params = (GreenListWatermark, GreenListParams()) if scheme == "kgw" else (GumbelWatermark, GumbelParams())
    det = cls(params, deps=Deps(keys=ring)).detector()
    p = 10 ** det.score(np.random.default_rng(1).integers(0, 30_000, size=(4000, 100))).log10_p
    if scheme == "gumbel":
        assert stats.kstest(p, "uniform").pvalue > 1e-3
    else:
        assert np.mean(p <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / p.size)


def test_dedup_scores_each_context_token_pair_once(ring):
    d = GreenListWatermark(GreenListParams(context=1), deps=Deps(keys=ring))
    chunk = list(range(100, 130))
    det = d.detector()
    once = det.detect(chunk)
    repeated = det.detect(chunk * 10)
    assert once.tokens_scored == 29
    assert repeated.tokens_scored == 30  # the 29 pairs again, plus the (129 -> 100) seam
    # watermarked text repeated many times does not become more significant than its distinct pairs
    wm = sample_streams(d, 1, 60, 5000)[0].tolist()
    assert det.detect(wm * 20).log10_p >= det.detect(wm).log10_p - 1.0


def test_pooled_and_excluded(ring):
    d = GreenListWatermark(GreenListParams(), deps=Deps(keys=ring))
    streams = sample_streams(d, 6, 40, 4000)
    report = d.detector().detect_many(streams)
    assert len(report.results) == 6 and report.combined.tokens_scored <= sum(r.tokens_scored for r in report.results)
    assert report.combined.log10_p < min(r.log10_p for r in report.results)
    # windows that occur in the excluded text (the prompts) are not scored
    excl = d.detector().detect_many(streams, exclude=[streams[0].tolist()], per_sequence=False)
    assert excl.results == () and excl.combined.tokens_scored == report.combined.tokens_scored - report.results[0].tokens_scored


def test_several_keys_report_the_match_and_correct_for_them(tmp_path):
    old = fixed_ring(tmp_path, 1, tag="rot")  # k-rot-0 is primary and embeds
    rotated = fixed_ring(tmp_path, 3, tag="rot", retired=1)  # later: k-rot-0 retired, k-rot-2 the primary
    assert rotated.primary_id == "k-rot-2"
    stream = sample_streams(GreenListWatermark(GreenListParams(), deps=Deps(keys=old)), 1, 120, 5000)[0]
    det = GreenListWatermark(GreenListParams(), deps=Deps(keys=rotated)).detector()
    assert det.key_ids[0] == "k-rot-2" and set(det.key_ids) == {"k-rot-0", "k-rot-1", "k-rot-2"}
    found = det.detect(stream)
    assert found.key_id == "k-rot-0" and found.detected
    alone = det.detect(stream, key_ids=["k-rot-0"])
    assert found.log10_p == pytest.approx(alone.log10_p + math.log10(3))  # Bonferroni over 3 keys
    assert det.detect(stream, key_ids=["k-rot-1"]).log10_p > -3


@pytest.mark.parametrize("seqs, kw, words", [
    ([], {}, "no sequences"),
    ([[]], {}, "sequence 0 is empty"),
    ([list(range(20)), list(range(10))], {}, r"sequence 1 has 10 tokens; a test needs at least 17"),
    ([list(range(30)), [5] * 20 + [99_999]], {}, r"sequence 1 holds token id 99999, outside the vocabulary \(\[0, 1000\)\)"),
    ([list(range(20)) + [-3]], {}, "token id -3"),
    ([[0.5] * 30], {}, "integer token ids"),
    ([list(range(30))], {"key_ids": ["k-nope"]}, "unknown key id.*'k-nope'.*known: k-wm-0"),
])
def test_bad_input_is_refused_clearly(ring, seqs, kw, words):
    det = GreenListWatermark(GreenListParams(vocab_size=1000), deps=Deps(keys=ring)).detector()
    with pytest.raises(InvalidInput, match=words):
        det.detect_many(seqs, **kw)

"""Radioactivity: a student trained on watermarked teacher samples carries the mark; one trained on
unwatermarked samples does not. Closed-box (sample the student) and open-box (teacher-force our texts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from support.watermark import fixed_ring, one_thread

from defense.base import Deps
from defense.models import LMTrainConfig, TinyLMConfig, build_lm, train_lm
from defense.watermark import GreenListParams, GreenListWatermark, closed_box_test, open_box_test
from defense.watermark.radioactivity import alternative_seeds, open_box_statistics
from server_plugins.transformers import generate

pytestmark = pytest.mark.slow
N_TRAIN = 1024  # teacher samples of 64 tokens: ~66k tokens of distillation data
N_TEST = 300  # held-out prompts the suspect is sampled on (~19k tokens before dedup)


@pytest.fixture(scope="module")
def setting(tiny_lm, prompts, tmp_path_factory):
    with one_thread():  # module fixtures run before the per-test one-thread fixture
        return _setting(tiny_lm, prompts, tmp_path_factory)


def _setting(tiny_lm, prompts, tmp_path_factory):
    teacher, tok, _ = tiny_lm
    ring = fixed_ring(tmp_path_factory.mktemp("radio"), tag="radio")
    wm = GreenListWatermark(GreenListParams(gamma=0.25, delta=2.0, context=1), deps=Deps(keys=ring))
    train_prompts = prompts[:N_TRAIN]
    marked = generate(teacher, train_prompts, defense=wm, max_new_tokens=64, stop_at_eos=False, seed=1)
    clean = generate(teacher, train_prompts, max_new_tokens=64, stop_at_eos=False, seed=1)

    def student(samples):
        texts = [tok.decode(p + s) for p, s in zip(train_prompts, samples, strict=True)]
        cfg = TinyLMConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4, max_positions=256)
        model = build_lm(cfg, tokenizer=tok, seed=5)
        train_lm(model, tok, texts, LMTrainConfig(steps=300, batch_size=16, seq_len=64, seed=3))
        return model

    return {"wm": wm, "detector": wm.detector(), "teacher": teacher, "marked": marked,
            "texts": [p + s for p, s in zip(train_prompts, marked, strict=True)],
            "students": {"watermarked": student(marked), "clean": student(clean)},
            "held_out": prompts[N_TRAIN : N_TRAIN + N_TEST]}


def test_closed_box_flags_only_the_student_of_watermarked_text(setting):
    det = setting["detector"]
    assert det.detect_many(setting["marked"], per_sequence=False).combined.log10_p < -50  # the teacher data is marked
    results = {}
    for name, model in setting["students"].items():
        results[name] = closed_box_test(
            det, lambda ps, m=model: generate(m, ps, max_new_tokens=64, stop_at_eos=False, seed=2), setting["held_out"])
        print(f"\nclosed-box {name} student: log10 p {results[name].log10_p:.2f}, z {results[name].z:.2f}, "
              f"{results[name].tokens_scored} distinct tokens", end="")
    assert results["watermarked"].log10_p < math.log10(1e-3)
    assert results["clean"].log10_p > math.log10(0.05)


def test_open_box_flags_only_the_student_of_watermarked_text(setting):
    det = setting["detector"]
    texts = setting["texts"][:300]
    marked = open_box_test(setting["students"]["watermarked"], texts, det, alternative_keys=1000)
    clean = open_box_test(setting["students"]["clean"], texts, det, alternative_keys=1000)
    teacher = open_box_test(setting["teacher"], texts, det, alternative_keys=1000)  # the unmarked base model
    for name, r in (("watermarked", marked), ("clean", clean), ("teacher", teacher)):
        print(f"\nopen-box {name}: z {r.z:.2f}, log10 p {r.log10_p:.2f}, rank p {r.empirical_p:.4f}, "
              f"{r.contexts} contexts", end="")
    assert marked.log10_p < math.log10(1e-3) and marked.empirical_p < 0.01
    assert clean.log10_p > math.log10(1e-3) and teacher.log10_p > math.log10(1e-3)


def test_open_box_null_is_calibrated_on_clean_models(setting):
    """On models that never saw the key, each of 100 keys taken as 'ours' against 1000 others gives a
    p-value; they should look uniform (and the null statistic normal, which the parametric p assumes)."""
    det = setting["detector"]
    seeds = alternative_seeds(det.key_seed(), 1100)
    for name in ("clean", "teacher"):
        model = setting["students"]["clean"] if name == "clean" else setting["teacher"]
        s, _ = open_box_statistics(model, setting["texts"][:300], det.spec, seeds)
        null, ours = s[100:], s[:100]
        z = (ours - null.mean()) / null.std(ddof=1)
        p = stats.norm.sf(z)
        print(f"\n{name}: KS vs uniform p {stats.kstest(p, 'uniform').pvalue:.3f}; "
              f"null normality p {stats.normaltest(null).pvalue:.3f}; min p {p.min():.4f}", end="")
        assert stats.kstest(p, "uniform").pvalue > 1e-3
        assert np.mean(p < 0.05) <= 0.15 and p.min() > 1e-4

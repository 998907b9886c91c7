"""Small pieces of the tracks: data generators, sampling, sequence data, aggregation, summary, report."""

import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.aggregate import Delta, Gain, Spec, build_rows
from experiments.generate import generate
from experiments.report import write_report
from experiments.summarize import summarize
from experiments.tracks.arithmetic import make_problem, parse_answer, solve
from experiments.tracks.digits import digits_split, indist_queries, nudge, ood_queries, shift_images
from experiments.train import build_seq_data

SUMMARY_KEYS = {
    "classifier_ood": {"defense", "clone_acc_drop_pts", "benign_loss_pts"},
    "classifier_indist": {"defense", "clone_acc_drop_pts", "benign_loss_pts"},
    "lm_logprob": {"defense", "logprob_extra_gain_erased", "top1_agreement", "mean_tv"},
    "lm_radioactivity": {"student_tokens", "log10_p", "clean_students", "clean_false_positives"},
    # the issue's keys, and each attack's value (the correctness-filtering attacker's too)
    "reasoning": {"defense", "gain_erased_vs_temperature", "teacher_acc_loss_pts", "by_attack"},
}


# -- data -------------------------------------------------------------------------------------------
@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(0, 2), st.integers(10, 40))
def test_arithmetic_traces_are_correct_and_checkable_from_the_question(seed, lo, extra, max_value):
    p = make_problem(random.Random(seed), min_steps=lo, max_steps=lo + extra, max_value=max_value)
    assert parse_answer(p.trace) == p.answer == solve(p.prompt)
    totals = [int(s.split("=")[1].strip(" .")) for s in p.trace.split("Answer")[0].split(".") if "=" in s]
    assert all(0 <= t <= max_value for t in totals)
    assert p.prompt.endswith("\nA:") and p.text == p.prompt + p.trace


def test_parse_answer_and_solve_on_malformed_text():
    assert parse_answer("3 + 4 = 7. no answer") is None
    assert solve("not a question") is None
    assert solve("Q: 5 - 2 + 9 = ?\nA:") == 12


def test_digits_split_is_fixed_by_its_seed_and_disjoint():
    a, b = digits_split(0), digits_split(0)
    assert np.array_equal(a.x_test, b.x_test)
    assert len(a.x_teacher) + len(a.x_pool) + len(a.x_test) == 1797
    assert a.x_teacher.max() <= 1.0 and a.x_teacher.dtype == np.float32


def test_query_sets_are_images_in_range_and_seeded():
    split = digits_split(0)
    for make in (lambda r: ood_queries(90, r), lambda r: indist_queries(split.x_pool, 700, r)):
        x = make(np.random.default_rng(1))
        assert x.shape[1] == 64 and x.min() >= 0 and x.max() <= 1 and x.dtype == np.float32
        assert np.array_equal(x, make(np.random.default_rng(1)))
    assert nudge(split.x_test[:3], 0, 1) is split.x_test[:3] or np.array_equal(nudge(split.x_test[:3], 0, 1), split.x_test[:3])
    moved = nudge(split.x_test[:3], 2, 1)
    assert np.abs(moved - split.x_test[:3]).max() <= 1 / 255 + 1e-7 and moved.tobytes() != split.x_test[:3].tobytes()


def test_shift_images_moves_pixels_and_fills_zeros():
    img = np.zeros((1, 64), dtype=np.float32)
    img[0, 3 * 8 + 4] = 1.0  # row 3, col 4
    out = shift_images(img, np.array([1]), np.array([-1]))
    assert out.reshape(8, 8)[4, 3] == 1.0 and out.sum() == 1.0
    edge = np.zeros((1, 64), dtype=np.float32)
    edge[0, 7] = 1.0  # row 0, col 7: shifted right it falls off
    assert shift_images(edge, np.array([0]), np.array([1])).sum() == 0.0


# -- sequences and sampling ---------------------------------------------------------------------------
def test_seq_data_supervises_exactly_the_completion():
    d = build_seq_data([[5, 6], [7]], [[8, 9, 1], [2]], pad_id=0,
                       kd=[(np.array([[8, 3]] * 3), np.zeros((3, 2))), (np.array([[2, -1]]), np.zeros((1, 2)))], k=3)
    assert d.input_ids.tolist() == [[5, 6, 8, 9, 1], [7, 2, 0, 0, 0]]
    assert d.loss_mask.tolist() == [[False, True, True, True], [True, False, False, False]]
    # the targets at supervised positions are the completion's tokens
    assert d.input_ids[:, 1:][d.loss_mask].tolist() == [8, 9, 1, 2]
    assert d.kd_ids[0, 1].tolist() == [8, 3, -1] and d.kd_ids[1, 0].tolist() == [2, -1, -1]
    assert (d.kd_ids[~d.loss_mask] == -1).all()


class _Bigram(torch.nn.Module):
    """A stand-in LM: logits depend on the last token only; supports the cache kwargs generate uses."""

    def __init__(self, v: int = 12) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(v, v, generator=torch.Generator().manual_seed(0)) * 3)

    def forward(self, input_ids, use_cache=False, cache=None):
        class Out:
            pass

        out = Out()
        out.logits = self.table[input_ids]
        out.cache = None
        return out


def test_generate_is_seeded_greedy_is_argmax_and_the_hook_sees_every_step():
    model = _Bigram()
    prompts = [[1, 2], [3, 4], [5], [6, 7]]
    a = generate(model, prompts, max_new_tokens=6, temperature=1.0, eos_id=0, seed=3, top_k=4)
    b = generate(model, prompts, max_new_tokens=6, temperature=1.0, eos_id=0, seed=3, top_k=4)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert a[0].top_ids.shape == (6, 4) and np.all(np.diff(a[0].top_logprobs[1.0], axis=1) <= 0)
    greedy = generate(model, prompts, max_new_tokens=3, temperature=0.0, eos_id=0, seed=0)
    last = prompts[0][-1]
    for tok in greedy[0].tokens:
        assert tok == int(model.table[last].argmax())
        last = tok
    calls = []

    def hook(logits, seqs, idx):
        calls.append((logits.shape[0], [len(s) for s in seqs], list(idx)))
        return logits

    generate(model, prompts, max_new_tokens=2, temperature=1.0, eos_id=0, seed=0, logits_hook=hook)
    # batched by prompt length: [5] alone, then the three two-token prompts; the hook sees growing prefixes
    assert calls[0] == (1, [1], [2]) and calls[1] == (1, [2], [2])
    assert calls[2] == (3, [2, 2, 2], [0, 1, 3]) and calls[3] == (3, [3, 3, 3], [0, 1, 3])


def test_generate_stops_at_eos_and_reports_temperatures():
    model = _Bigram()
    model.table.data[:, 0] = 100.0  # eos (0) always wins
    out = generate(model, [[1]], max_new_tokens=5, temperature=0.0, eos_id=0, seed=0, stop_at_eos=True,
                   top_k=3, logprob_temperatures=(1.0, 0.5))
    assert out[0].tokens == [0] and set(out[0].top_logprobs) == {1.0, 0.5}


# -- aggregation, summary, report ---------------------------------------------------------------------
def _rec(label, seed, result, *, defense=None, value=None, typ=None, attack="base"):
    return {"attack": attack, "label": label, "defense": defense or label, "seed": seed, "value": value,
            "type": typ, "param": None, "result": result}


def test_rows_compute_gain_erased_and_deltas_against_the_same_attacks_baseline():
    spec = Spec(x="loss_pts", y="gain_erased", columns=("acc",), gains=(Gain("gain_erased", "acc", "acc", "acc0"),),
                deltas=(Delta("loss_pts", "benign", 100.0),))
    recs = [_rec("none", s, {"acc": 0.9, "acc0": 0.1, "benign": 0.95}) for s in (0, 1)]
    recs += [_rec("d(x=1)", s, {"acc": 0.5, "acc0": 0.1, "benign": 0.94}, defense="d", value=1) for s in (0, 1)]
    rows = build_rows(recs, lambda r: r, spec, bootstrap=50)
    assert [r["label"] for r in rows] == ["none", "d(x=1)"]
    d = rows[1]["metrics"]
    assert d["gain_erased"]["mean"] == pytest.approx(0.5)
    assert d["loss_pts"]["mean"] == pytest.approx(1.0)
    assert rows[0]["metrics"]["gain_erased"]["mean"] == pytest.approx(0.0)


def _metrics(tracks):
    return {"study": "t", "device": "cpu", "seeds": [0], "timings_s": {"total": 1.0}, "tracks": tracks}


def _row(label, metrics, *, attack="base", defense=None, **extra):
    return {"attack": attack, "label": label, "defense": defense or label.split("(")[0], "seeds": [0],
            "metrics": {k: {"mean": v, "lo": v, "hi": v} for k, v in metrics.items()}, **extra}


def _spec(x, y, cols):
    return {"x": x, "y": y, "columns": cols, "gains": [], "deltas": [], "notes": []}


def test_summary_has_exactly_the_issue_keys_and_applies_the_constraints(tmp_path):
    cls = {"spec": _spec("benign_loss_pts", "gain_erased", ["gain_erased"]),
           "constraint": {"benign_loss_pts_max": 0.5},
           "rows": [_row("none", {"gain_erased": 0.0, "benign_loss_pts": 0.0, "clone_acc_drop_pts": 0.0}),
                    _row("a(s=1)", {"gain_erased": 0.9, "benign_loss_pts": 2.0, "clone_acc_drop_pts": 60.0}),
                    _row("b(s=1)", {"gain_erased": 0.3, "benign_loss_pts": 0.0, "clone_acc_drop_pts": 25.0}),
                    _row("b(s=1)", {"gain_erased": 0.2, "benign_loss_pts": 0.0, "clone_acc_drop_pts": 18.0},
                         attack="avg")]}
    lm = {"spec": _spec("mean_tv", "logprob_extra_gain_erased", []),
          "constraint": {"top1_agreement_min": 1.0, "mean_tv_max": 0.1},
          "rows": [_row("k(s=1)", {"logprob_extra_gain_erased": 0.8, "top1_agreement": 0.99, "mean_tv": 0.05}),
                   _row("k(s=2)", {"logprob_extra_gain_erased": 0.6, "top1_agreement": 1.0, "mean_tv": 0.08}),
                   # a watermark's logprobs are what it served: TV 0 says nothing of its cost
                   _row("watermark(delta=4.0)", {"logprob_extra_gain_erased": 4.0, "top1_agreement": 1.0,
                                                 "mean_tv": 0.0}, type="watermark")]}
    def rs_row(label, acc, student, **extra):
        row = _row(label, {"teacher_acc": acc, "student_acc": student, "student_acc0": 0.0,
                           "teacher_acc_loss_pts": 100 * (1 - acc)}, **extra)
        for m in row["metrics"].values():
            m["values"] = [m["mean"]]
        return row

    rs = {"spec": _spec("teacher_acc_loss_pts", "gain_erased", []), "constraint": {"teacher_acc_loss_pts_max": 2.0},
          "rows": [rs_row("none", 1.0, 0.9, is_temperature=False),
                   rs_row("temp(t=1)", 0.98, 0.8, is_temperature=True),
                   rs_row("temp(t=2)", 0.9, 0.6, is_temperature=True),
                   rs_row("ads(l=1)", 0.99, 0.51, is_temperature=False, type="antidistill"),
                   rs_row("ads(l=2)", 0.97, 0.1, is_temperature=False, type="antidistill")]}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics({"classifier_ood": cls, "lm_logprob": lm, "reasoning": rs})))
    s = summarize([run])
    assert {k: set(v) for k, v in s.items()} == SUMMARY_KEYS
    # a breaks the benign constraint; b's worst case over attacks counts
    assert s["classifier_ood"] == {"defense": "b(s=1)", "clone_acc_drop_pts": 18.0, "benign_loss_pts": 0.0}
    assert s["classifier_indist"]["defense"] is None
    assert s["lm_logprob"]["defense"] == "k(s=2)"  # k(s=1) changes the top-1; the watermark is no candidate
    # temperature's student at the same teacher accuracy (0.99) is 0.85: ads(l=1) erases 1 - 0.51 / 0.85 of
    # its gain; ads(l=2) erases more but costs 3 points of teacher accuracy
    r = s["reasoning"]
    assert r["defense"] == "ads(l=1)" and r["teacher_acc_loss_pts"] == pytest.approx(1.0)
    assert r["gain_erased_vs_temperature"] == pytest.approx(0.4) and set(r["by_attack"]) == {"base"}
    assert s["lm_radioactivity"]["log10_p"] is None


def test_report_has_a_table_and_a_pareto_plot_per_track(tmp_path):
    rows = [_row("none", {"gain_erased": 0.0, "benign_loss_pts": 0.0}, value=None),
            _row("d(s=1)", {"gain_erased": 0.4, "benign_loss_pts": 0.2}, value=1.0),
            _row("d(s=2)", {"gain_erased": math.nan, "benign_loss_pts": 0.5}, value=2.0)]
    sub = {"spec": _spec("benign_loss_pts", "gain_erased", ["gain_erased", "benign_loss_pts"]), "rows": rows,
           "teacher_acc": 0.97}
    path = write_report(tmp_path, _metrics({"classifier_ood": sub, "lm_logprob": sub}))
    text = path.read_text()
    assert "## classifier_ood" in text and "## lm_logprob" in text
    assert "| defense | seeds | gain_erased | benign_loss_pts |" in text
    assert "| d(s=2) | 1 | – | 0.500 |" in text
    for name in ("classifier_ood", "lm_logprob"):
        png = tmp_path / f"pareto_{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](pareto_{name}.png)" in text


def test_classifier_queries_average_repeats_into_one_vector_per_query(tmp_path):
    """Repeats of a deterministic answer average to that answer; hard labels keep only its argmax."""
    from defense.models.classifier import ClassifierConfig, build_classifier
    from experiments.api import open_api
    from experiments.config import AttackConfig
    from experiments.runner import experiment_keys
    from experiments.tracks.classifier import predict_proba, query_api

    teacher = build_classifier(ClassifierConfig(), seed=0)
    x = np.random.default_rng(0).uniform(size=(5, 64)).astype(np.float32)
    keys = experiment_keys(tmp_path / "k.yaml", 0)
    with open_api({"version": 1, "state": {"uri": "memory://"}}, keys=keys, key_file=tmp_path / "k.yaml") as api:
        one, kept = query_api(api, teacher, x, who="a", attack=AttackConfig(), seed=0, output="probabilities")
        avg, _ = query_api(api, teacher, x, who="b", attack=AttackConfig(repeats=3), seed=0, output="probabilities")
        hard, _ = query_api(api, teacher, x, who="c", attack=AttackConfig(hard_labels=True), seed=0,
                            output="probabilities")
    assert kept.all() and api.requests == 5 + 15 + 5
    assert np.allclose(one, predict_proba(teacher, x), atol=1e-6)
    assert np.allclose(avg, one, atol=1e-6)
    assert np.array_equal(hard, np.eye(10, dtype=np.float32)[one.argmax(1)])


def test_radioactivity_counts_each_detectors_clean_students_once():
    from experiments.tracks.radioactivity import aggregate_radioactivity

    def rec(label, seed, **extra):
        r = {"student_tokens": 900.0, "log10_p": -7.0 - seed, "detected": 1.0, "detector": "kgw-h2", **extra}
        return {"attack": "base", "label": label, "defense": "watermark", "seed": seed, "result": {"radioactivity": r}}

    clean = {"clean_students": 20, "clean_false_positives": 1, "clean_log10_p": [-1.0] * 20}
    sub = aggregate_radioactivity([rec("wm(delta=2)", 0, **clean), rec("wm(delta=2)", 1), rec("wm(delta=4)", 0)])
    assert sub["clean_students"] == 20 and sub["clean_false_positives"] == 1
    row = sub["rows"][0]["metrics"]
    assert row["log10_p"]["mean"] == -7.0  # the least significant seed
    assert row["clean_students"]["mean"] == 20 and sub["rows"][1]["metrics"]["clean_false_positives"]["mean"] == 1

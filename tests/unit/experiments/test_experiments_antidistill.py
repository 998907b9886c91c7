"""Antidistillation sampling in the harness: the matched-accuracy metric (properties), the proxy and its
gradient prepared once per study, config validation, and the summary's reasoning row."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from defense.antidistill.gradient import load_gradient
from defense.errors import ConfigError
from defense.models import TinyLMConfig, build_lm, train_tokenizer
from experiments.aggregate import add_matched_gain
from experiments.config import LMSpec, ProxySpec, defenses_for, parse_study
from experiments.metrics import bootstrap_rows_ci, gain_erased, interpolate_curve, matched_gain_erased
from experiments.summarize import summarize
from experiments.tracks.adsproxy import RECIPE, disjoint_problems, parameter_count, prepare_proxy
from experiments.tracks.arithmetic import problems

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
unit = st.floats(0, 1, allow_nan=False)


# -- the metric ---------------------------------------------------------------------------------------
@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(st.lists(st.tuples(unit, unit), min_size=1, max_size=6, unique_by=lambda p: p[0]), st.randoms())
def test_interpolation_passes_through_the_points_in_any_order(points, rnd):
    shuffled = points[:]
    rnd.shuffle(shuffled)
    xs, ys = [p[0] for p in shuffled], [p[1] for p in shuffled]
    for x, y in points:
        assert interpolate_curve(x, xs, ys) == pytest.approx(y, abs=1e-12)


@settings(deadline=None)
@given(st.lists(st.tuples(unit, unit), min_size=2, max_size=6, unique_by=lambda p: p[0]), unit)
@example([(0.0, 0.0), (2.2250738585e-313, 1.0)], 1e-313)  # two points 2e-313 apart: np.interp's slope overflowed, and it gave inf between them
def test_interpolation_stays_between_its_neighbours_and_clamps_at_the_ends(points, x):
    pts = sorted(points)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    y = interpolate_curve(x, xs, ys)
    if x <= xs[0]:
        assert y == pytest.approx(ys[0])
    elif x >= xs[-1]:
        assert y == pytest.approx(ys[-1])
    else:
        i = next(i for i in range(len(xs) - 1) if xs[i] <= x <= xs[i + 1])
        assert min(ys[i], ys[i + 1]) - 1e-12 <= y <= max(ys[i], ys[i + 1]) + 1e-12


def test_interpolation_averages_ties_and_ignores_nonfinite_points():
    assert interpolate_curve(0.5, [0.5, 0.5, 1.0], [0.2, 0.4, 1.0]) == pytest.approx(0.3)
    assert interpolate_curve(0.75, [0.5, math.nan, 1.0], [0.0, 5.0, 1.0]) == pytest.approx(0.5)
    assert math.isnan(interpolate_curve(0.5, [math.nan], [1.0]))
    assert math.isnan(interpolate_curve(math.nan, [0.0, 1.0], [0.0, 1.0]))


@settings(deadline=None)
@given(unit, st.lists(st.tuples(unit, unit), min_size=2, max_size=5, unique_by=lambda p: p[0]), unit)
@example(1e-313, [(0.0, 0.0), (2.2250738585e-313, 1.0)], 0.0)  # found by a random seed: the curve read inf there, and the gain NaN
def test_matched_gain_is_zero_on_the_curve_and_one_at_the_untrained_student(x, points, s0):
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    s_ref = interpolate_curve(x, xs, ys)
    assume(abs(s_ref - s0) > 1e-3)
    assert matched_gain_erased(s_ref, x, xs, ys, s0) == pytest.approx(0.0, abs=1e-9)
    assert matched_gain_erased(s0, x, xs, ys, s0) == pytest.approx(1.0, abs=1e-9)
    assert matched_gain_erased(0.3, x, xs, ys, s0) == pytest.approx(gain_erased(0.3, s_ref, s0))


@settings(deadline=None)
@given(unit, unit, st.lists(st.tuples(unit, unit), min_size=2, max_size=5, unique_by=lambda p: p[0]), unit,
       st.floats(0.01, 100), finite)
def test_matched_gain_is_invariant_to_affine_rescaling_of_the_student_score(s_def, x, points, s0, a, b):
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    assume(abs(interpolate_curve(x, xs, ys) - s0) > 1e-3)
    ref = matched_gain_erased(s_def, x, xs, ys, s0)
    for k in (a, -a):
        got = matched_gain_erased(k * s_def + b, x, xs, [k * y + b for y in ys], k * s0 + b)
        assert got == pytest.approx(ref, rel=1e-6, abs=1e-6)


@settings(deadline=None)
@given(st.integers(1, 5), st.integers(1, 4))
def test_bootstrap_rows_keeps_columns_paired(n, m):
    rng = np.random.default_rng(n * 10 + m)
    a = rng.uniform(size=n)
    group = np.column_stack([a, 2 * a])  # the second column is always twice the first
    b = rng.uniform(size=(m, 1))
    point, lo, hi = bootstrap_rows_ci(lambda g, h: g[1] - 2 * g[0] + 0 * h[0], [group, b], n=200)
    assert point == pytest.approx(0) and lo == pytest.approx(0) and hi == pytest.approx(0)
    point, lo, hi = bootstrap_rows_ci(lambda g, h: g[0] + h[0], [group, b], n=200)
    assert point == pytest.approx(a.mean() + b.mean()) and lo <= point + 1e-12 and hi >= point - 1e-12


def _row(label, attack="base", *, seeds=(0, 1, 2), is_temperature=False, **vals):
    metrics = {k: {"mean": float(np.mean(v)), "lo": min(v), "hi": max(v), "values": list(v)} for k, v in vals.items()}
    defense = label.split("(")[0]
    return {"attack": attack, "label": label, "defense": defense, "seeds": list(seeds), "metrics": metrics,
            "is_temperature": is_temperature, "type": "antidistill" if defense == "ads" else None}


def _curve_rows(attack="base"):
    return [_row("none", attack, teacher_acc=[1.0] * 3, student_acc=[0.9] * 3, student_acc0=[0.1] * 3,
                 teacher_acc_loss_pts=[0.0] * 3),
            _row("temperature(t=1)", attack, is_temperature=True, teacher_acc=[0.96] * 3, student_acc=[0.86] * 3,
                 teacher_acc_loss_pts=[4.0] * 3),
            _row("temperature(t=2)", attack, is_temperature=True, teacher_acc=[0.8] * 3, student_acc=[0.5] * 3,
                 teacher_acc_loss_pts=[20.0] * 3)]


def test_rows_get_the_gain_against_temperature_at_their_teacher_accuracy():
    rows = _curve_rows() + [_row("ads(lam=1)", teacher_acc=[0.98] * 3, student_acc=[0.5] * 3,
                                 teacher_acc_loss_pts=[2.0] * 3),
                            _row("ads(lam=9)", teacher_acc=[0.5] * 3, student_acc=[0.1] * 3,
                                 teacher_acc_loss_pts=[50.0] * 3)]
    add_matched_gain(rows, is_reference=lambda r: r["is_temperature"], x="teacher_acc", score="student_acc",
                     floor="student_acc0", name="g", ref_name="s_ref", bootstrap=100)
    ads = rows[3]["metrics"]
    # the curve at 0.98 is halfway between (0.96, 0.86) and (1.0, 0.9): 0.88; 1 - 0.4 / 0.78
    assert ads["s_ref"]["mean"] == pytest.approx(0.88)
    assert ads["g"]["mean"] == pytest.approx(1 - 0.4 / 0.78) and rows[3]["matched"] is True
    assert rows[4]["matched"] is False and rows[4]["metrics"]["g"]["mean"] == pytest.approx(1.0)  # clamped at 0.8
    assert "g" not in rows[0]["metrics"] and "g" not in rows[1]["metrics"]  # baseline and the curve itself


def test_summary_reasoning_row_picks_the_best_strength_within_the_loss_limit_worst_over_attacks(tmp_path):
    def ads(label, attack, acc, student):
        return _row(label, attack, teacher_acc=[acc] * 3, student_acc=[student] * 3,
                    teacher_acc_loss_pts=[100 * (1 - acc)] * 3)

    rows = _curve_rows("base") + _curve_rows("filtered")
    rows += [ads("ads(lam=1)", "base", 0.99, 0.6), ads("ads(lam=1)", "filtered", 0.99, 0.8),
             ads("ads(lam=2)", "base", 0.985, 0.3), ads("ads(lam=2)", "filtered", 0.985, 0.7),
             ads("ads(lam=3)", "base", 0.9, 0.1), ads("ads(lam=3)", "filtered", 0.9, 0.1),  # breaks the limit
             {**ads("wm(delta=1)", "base", 0.99, 0.1), "type": "watermark"}]  # not antidistillation sampling
    sub = {"spec": {"x": "teacher_acc_loss_pts", "y": "gain_erased", "columns": []},
           "constraint": {"teacher_acc_loss_pts_max": 2.0}, "rows": rows}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"study": "t", "tracks": {"reasoning": sub}}))
    r = summarize([run])["reasoning"]
    ref = 0.86 + (0.985 - 0.96) / 0.04 * 0.04  # the curve at 0.985: 0.885
    assert r["defense"] == "ads(lam=2)" and r["teacher_acc_loss_pts"] == pytest.approx(1.5)
    assert r["gain_erased_vs_temperature"] == pytest.approx(1 - 0.6 / (ref - 0.1), abs=1e-6)  # filtered: the worst
    assert set(r["by_attack"]) == {"base", "filtered"}
    assert r["by_attack"]["base"]["gain_erased_vs_temperature"] == pytest.approx(1 - 0.2 / (ref - 0.1), abs=1e-6)
    assert r["by_attack"]["base"]["matched"] is True


# -- config -----------------------------------------------------------------------------------------
def _ads(**kw):
    return {"name": "ads", "type": "antidistill", "param": "lam", "values": [0.1], **kw}


def test_antidistill_runs_only_where_the_harness_prepares_a_proxy():
    study = parse_study({"name": "s", "defenses": [_ads()]})
    assert [d.name for d in defenses_for(study, "reasoning")] == ["ads"]
    assert defenses_for(study, "lm") == []  # a sampling defense, but the lm track builds no proxy


def test_antidistill_on_an_unsupported_track_is_a_clear_error():
    with pytest.raises(ConfigError, match="only on the reasoning track, not on lm") as e:
        parse_study({"name": "s", "defenses": [_ads(tracks=["reasoning", "lm"])]})
    assert e.value.path == "defenses[0].tracks"
    # with its own proxy and gradient it may run anywhere its kind fits
    study = parse_study({"name": "s", "defenses": [_ads(tracks=["lm"], params={"proxy_path": "/p",
                                                                            "gradient_path": "/g"})]})
    assert [d.name for d in defenses_for(study, "lm")] == ["ads"]


def test_proxy_spec_is_validated():
    with pytest.raises(ValueError, match="hidden"):
        ProxySpec(hidden=0)
    with pytest.raises(ValueError, match="teacher_temperature"):
        ProxySpec(teacher_temperature=-1)


# -- proxy preparation ------------------------------------------------------------------------------
def test_disjoint_problems_avoid_the_excluded_prompts_and_repeat_none():
    kw = {"min_steps": 1, "max_steps": 2, "max_value": 20}
    banned = [p.prompt for p in problems(300, 5, **kw)]
    got = disjoint_problems(200, 9, banned, **kw)
    prompts = [p.prompt for p in got]
    assert len(set(prompts)) == 200 and not set(prompts) & set(banned)
    assert prompts == [p.prompt for p in disjoint_problems(200, 9, banned, **kw)]  # seeded
    with pytest.raises(ConfigError, match="too small"):
        disjoint_problems(10_000, 0, [], min_steps=1, max_steps=1, max_value=10)


@pytest.fixture(scope="module")
def tiny():
    kw = {"min_steps": 1, "max_steps": 2, "max_value": 12}
    texts = [p.text for p in problems(300, 0, **kw)]
    tok = train_tokenizer(texts, 300)
    teacher = build_lm(TinyLMConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4,
                                    max_positions=64), tokenizer=tok, seed=0)
    return tok, teacher, kw


def _prepare(folder, tiny, spec, exclude=("Q: 1 + 1 = ?\nA:",)):
    tok, teacher, kw = tiny

    def build(s: LMSpec, seed: int):
        return build_lm(TinyLMConfig(arch=s.arch, vocab_size=len(tok), hidden_size=s.hidden, num_layers=s.layers,
                                     num_heads=s.heads, max_positions=64), tokenizer=tok, seed=seed)

    return prepare_proxy(folder, spec, teacher=teacher, tokenizer=tok, build=build, seed=0, problem_kw=kw,
                         exclude=list(exclude), seq_len=64, gen_tokens=12, gen_batch=16)


def test_proxy_and_gradient_are_prepared_once_with_provenance(tmp_path, tiny):
    spec = ProxySpec(hidden=16, layers=1, heads=2, problems=40, steps=3, batch=8, holdout=20)
    prep = _prepare(tmp_path / "p", tiny, spec)
    rec = json.loads((tmp_path / "p" / RECIPE).read_text())
    assert rec["proxy_parameters"] <= 0.25 * rec["teacher_parameters"] and rec["holdout_tokens"] > 0
    from defense.models import load_model

    proxy, _ = load_model(prep.proxy_path)
    grad, record = load_gradient(prep.gradient_path, model=proxy)
    assert set(grad) == {n for n, _ in proxy.named_parameters()} and record["norm"] > 0
    assert "clean teacher traces" in record["source"]
    assert prep.params()["proxy_path"].startswith("/")
    # a resumed study reuses it: nothing is rewritten
    stamp = (prep.gradient_path / "proxy_gradient.safetensors").stat().st_mtime_ns
    again = _prepare(tmp_path / "p", tiny, spec)
    assert again.record == prep.record
    assert (prep.gradient_path / "proxy_gradient.safetensors").stat().st_mtime_ns == stamp
    # another recipe is refused, not silently mixed
    with pytest.raises(ConfigError, match="another recipe"):
        _prepare(tmp_path / "p", tiny, ProxySpec(hidden=16, layers=1, heads=2, problems=40, steps=4, batch=8,
                                                 holdout=20))


def test_the_antidistill_sampler_runs_on_the_prepared_proxy(tmp_path, tiny):
    from defense.antidistill.sampler import AntidistillParams, AntidistillSampling
    from defense.types import RequestContext

    tok, teacher, _ = tiny
    prep = _prepare(tmp_path / "p", tiny, ProxySpec(hidden=16, layers=1, heads=2, problems=20, steps=0, holdout=10))
    d = AntidistillSampling(AntidistillParams(lam=0.5, **prep.params()))
    logits = torch.zeros(2, len(tok))
    out = d.process_logits(logits, [[3, 4], [5]], [RequestContext(request_id=f"r{i}", client_id="c") for i in (0, 1)])
    assert out.shape == logits.shape and torch.isfinite(out).all() and not torch.equal(out, logits)


def test_a_proxy_larger_than_a_quarter_of_the_teacher_is_refused(tmp_path, tiny):
    _, teacher, _ = tiny
    spec = ProxySpec(hidden=64, layers=2, heads=4, problems=10, steps=0, holdout=5)
    with pytest.raises(ConfigError, match="quarter|0.25") as e:
        _prepare(tmp_path / "big", tiny, spec)
    assert e.value.path == "tracks.reasoning.proxy" and parameter_count(teacher) > 0

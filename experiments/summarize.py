"""experiments/results/summary.json from finished standard runs.

Per track, the defense with the highest gain erased among those meeting the track's utility constraint.
A defense's gain erased is its worst case over the attacks its run measured (a defense must hold
against the adaptive attacks in the study, not only the plain one); its utility numbers do not depend on
the attack. A track no run measured, or where no defense meets the constraint, has null values.
"""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from defense.errors import ConfigError

from .aggregate import add_matched_gain
from .config import BASELINE

DEFAULT_OUT = Path("experiments/results/summary.json")
MATCHED = "gain_erased_vs_temperature"  # reasoning: gain erased against temperature at the same teacher accuracy
MATCHED_REF = "student_acc_temperature"  # the temperature curve's student accuracy there
_TOP1_TOL = 1e-9


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    runs = []
    for d in run_dirs:
        p = Path(d) / "metrics.json"
        if not p.exists():
            raise ConfigError(f"{d} has no metrics.json (is it a finished run directory?)")
        runs.append(json.loads(p.read_text()))
    return runs


def _m(row: dict[str, Any], key: str) -> float:
    v = (row["metrics"].get(key) or {}).get("mean")
    return float(v) if isinstance(v, (int, float)) else math.nan


def _by_defense(subs: list[dict[str, Any]], headline: str) -> list[dict[str, Any]]:
    """One candidate per (run, defense label): the worst headline over attacks, utility from any attack."""
    out = []
    for i, sub in enumerate(subs):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in sub["rows"]:
            if row["defense"] != BASELINE:
                groups[row["label"]].append(row)
        for label, rows in groups.items():
            heads = [_m(r, headline) for r in rows]
            worst = min(heads) if all(math.isfinite(h) for h in heads) else math.nan
            out.append({"run": i, "label": label, "row": rows[0], "headline": worst, "sub": sub})
    return out


def _best(cands: list[dict[str, Any]], ok) -> dict[str, Any] | None:
    good = [c for c in cands if math.isfinite(c["headline"]) and ok(c)]
    return max(good, key=lambda c: c["headline"]) if good else None


def _r(v: float) -> float | None:
    return round(float(v), 6) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _subtracks(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r["tracks"][name] for r in runs if name in r.get("tracks", {})]


def classifier_entry(subs: list[dict[str, Any]]) -> dict[str, Any]:
    def ok(c: dict[str, Any]) -> bool:
        limit = c["sub"].get("constraint", {}).get("benign_loss_pts_max", 0.5)
        return _m(c["row"], "benign_loss_pts") <= limit

    best = _best(_by_defense(subs, "gain_erased"), ok)
    if best is None:
        return {"defense": None, "clone_acc_drop_pts": None, "benign_loss_pts": None}
    return {"defense": best["label"], "clone_acc_drop_pts": _r(_worst(best, "clone_acc_drop_pts")),
            "benign_loss_pts": _r(_m(best["row"], "benign_loss_pts"))}


def _worst(cand: dict[str, Any], key: str) -> float:
    """The defense's smallest value of ``key`` over the attacks of its run (a drop: the attacker's best)."""
    vals = [_m(r, key) for r in cand["sub"]["rows"] if r["label"] == cand["label"]]
    vals = [v for v in vals if math.isfinite(v)]
    return min(vals) if vals else math.nan


def _is_sampling(row: dict[str, Any]) -> bool:
    """A sampling defense (watermark, antidistillation): it changes what is generated, not what is returned."""
    t = row.get("type")
    if not t:
        return False
    from defense.base import SamplingDefense
    from defense.registry import default_registry

    try:
        cls = default_registry().resolve(str(t))
    except Exception:  # noqa: BLE001 - a type this install cannot resolve is judged by its numbers
        return False
    return isinstance(cls, type) and issubclass(cls, SamplingDefense)


def lm_logprob_entry(subs: list[dict[str, Any]]) -> dict[str, Any]:
    """The response defense with the most ``logprob_extra_gain_erased`` within the utility constraint.

    Sampling defenses are not candidates: their returned logprobs match what they served (top-1 agreement
    1, TV 0 by construction), so the constraint says nothing about what they cost; that cost is the
    perplexity of their generations under the clean teacher (``gen_ppl_increase``), in the report."""

    def ok(c: dict[str, Any]) -> bool:
        con = c["sub"].get("constraint", {})
        return (not _is_sampling(c["row"])
                and _m(c["row"], "top1_agreement") >= con.get("top1_agreement_min", 1.0) - _TOP1_TOL
                and _m(c["row"], "mean_tv") <= con.get("mean_tv_max", 0.10))

    best = _best(_by_defense(subs, "logprob_extra_gain_erased"), ok)
    if best is None:
        return {"defense": None, "logprob_extra_gain_erased": None, "top1_agreement": None, "mean_tv": None}
    return {"defense": best["label"], "logprob_extra_gain_erased": _r(best["headline"]),
            "top1_agreement": _r(_m(best["row"], "top1_agreement")), "mean_tv": _r(_m(best["row"], "mean_tv"))}


def radioactivity_entry(subs: list[dict[str, Any]]) -> dict[str, Any]:
    cands = [(sub, row) for sub in subs for row in sub["rows"] if row["defense"] != BASELINE]
    cands = [(s, r) for s, r in cands if math.isfinite(_m(r, "log10_p"))]
    if not cands:
        return {"student_tokens": None, "log10_p": None, "clean_students": None, "clean_false_positives": None}
    sub, row = min(cands, key=lambda sr: _m(sr[1], "log10_p"))
    # the clean students tested with this row's detector (older runs: the run's totals)
    n = (row["metrics"].get("clean_students") or {}).get("mean", sub.get("clean_students"))
    fp = (row["metrics"].get("clean_false_positives") or {}).get("mean", sub.get("clean_false_positives"))
    return {"student_tokens": _r(_m(row, "student_tokens")), "log10_p": _r(_m(row, "log10_p")),
            "clean_students": n, "clean_false_positives": fp}


def _is_antidistill(row: dict[str, Any]) -> bool:
    t = str(row.get("type") or "")
    return t == "antidistill" or t.endswith(":AntidistillSampling")


def reasoning_entry(subs: list[dict[str, Any]], *, bootstrap: int = 1000) -> dict[str, Any]:
    """The antidistillation-sampling strength with the highest ``gain_erased_vs_temperature`` among those
    within the teacher-accuracy constraint (other defenses of the runs, the watermark, are not candidates).

    gain_erased_vs_temperature = 1 - (S_def - S_0) / (S_temp - S_0), S_temp the student from
    temperature-sampled traces at the defense's teacher accuracy (the run's temperature curve, its
    undefended greedy point included, interpolated linearly in teacher accuracy), per attack. As on the
    other tracks a defense's value is its worst case over the attacks of its run; ``by_attack`` gives each
    attack's value with its 95% bootstrap interval over seeds, and ``matched`` whether the temperature
    curve brackets the defense's teacher accuracy.
    """
    empty = {"defense": None, "gain_erased_vs_temperature": None, "teacher_acc_loss_pts": None, "by_attack": {}}
    best: tuple[float, dict[str, Any]] | None = None
    for sub in subs:
        rows = copy.deepcopy(sub["rows"])
        add_matched_gain(rows, is_reference=lambda r: bool(r.get("is_temperature")), x="teacher_acc",
                         score="student_acc", floor="student_acc0", name=MATCHED, ref_name=MATCHED_REF,
                         bootstrap=bootstrap)
        limit = sub.get("constraint", {}).get("teacher_acc_loss_pts_max", 2.0)
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if _is_antidistill(row):
                groups[row["label"]].append(row)
        for label, group in groups.items():
            x = _m(group[0], "teacher_acc_loss_pts")
            vals = [_m(r, MATCHED) for r in group]
            if not math.isfinite(x) or x > limit or not vals or not all(math.isfinite(v) for v in vals):
                continue
            worst = min(vals)
            by_attack = {r["attack"]: {"gain_erased_vs_temperature": _r(_m(r, MATCHED)),
                                       "interval": [_r(r["metrics"][MATCHED]["lo"]), _r(r["metrics"][MATCHED]["hi"])],
                                       "student_acc": _r(_m(r, "student_acc")),
                                       "student_acc_temperature": _r(_m(r, MATCHED_REF)),
                                       "matched": r.get("matched")} for r in group}
            entry = {"defense": label, "gain_erased_vs_temperature": _r(worst), "teacher_acc_loss_pts": _r(x),
                     "by_attack": by_attack}
            if best is None or worst > best[0]:
                best = (worst, entry)
    return best[1] if best else empty


def summarize(run_dirs: Sequence[str | Path]) -> dict[str, Any]:
    runs = load_runs(run_dirs)
    return {
        "classifier_ood": classifier_entry(_subtracks(runs, "classifier_ood")),
        "classifier_indist": classifier_entry(_subtracks(runs, "classifier_indist")),
        "lm_logprob": lm_logprob_entry(_subtracks(runs, "lm_logprob")),
        "lm_radioactivity": radioactivity_entry(_subtracks(runs, "lm_radioactivity")),
        "reasoning": reasoning_entry(_subtracks(runs, "reasoning")),
    }


def write_summary(run_dirs: Sequence[str | Path], out: str | Path = DEFAULT_OUT) -> dict[str, Any]:
    summary = summarize(run_dirs)
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(summary, indent=2) + "\n")
    return summary

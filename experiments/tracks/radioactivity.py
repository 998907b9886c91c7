"""Radioactivity of SFT students (the lm track's watermark hook).

The detector is the cell's own watermark: the first chain defense with a ``detector()`` (the
watermark's keyed detector, trying every key of the ring). The suspect student is sampled on benign
prompts and its continuations go through ``defense.watermark.radioactivity.closed_box_test``, which
deduplicates and scores them with the exact test, prompt windows left out. For the false-positive
count, ``clean_students`` small students, each trained on its own sample of unwatermarked teacher text,
are tested by the same detector.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from defense.errors import ConfigError

from ..aggregate import Spec, subtrack
from ..generate import generate
from ..train import build_seq_data, train_lm_student

if TYPE_CHECKING:
    from ..api import TeacherAPI
    from ..runner import Cell
    from .lm import LMRunner

SPEC = Spec(x="student_tokens", y="log10_p", columns=("student_tokens", "log10_p", "detected"))
DETECTED_LOG10_P = -6.0  # the goal's bar: p < 1e-6


def find_detector(api: TeacherAPI) -> Any:
    for _, entry in api.chain.sampling:
        make = getattr(entry.defense, "detector", None)
        if callable(make):
            return make()
    raise ConfigError("radioactivity is enabled but this cell's chain has no watermark with a detector()",
                      path="tracks.lm.radioactivity")


def closed_box(runner: LMRunner, detector: Any, model: Any, seed: int) -> dict[str, Any]:
    from defense.watermark.radioactivity import closed_box_test

    cfg = runner.cfg
    n_seq = max(1, math.ceil(runner.cfg.radioactivity.student_tokens / cfg.gen_tokens))
    prompts = [runner.benign_prompts[i % len(runner.benign_prompts)] for i in range(n_seq)]

    def sample(ps: list[list[int]]) -> list[list[int]]:
        gens = generate(model, ps, max_new_tokens=cfg.gen_tokens, temperature=1.0, eos_id=runner.eos, seed=seed,
                        batch_size=cfg.gen_batch, desc="suspect samples")
        return [g.tokens for g in gens]

    det = closed_box_test(detector, sample, prompts)
    return {"student_tokens": float(det.tokens_scored), "log10_p": float(det.log10_p),
            "detected": float(det.log10_p < DETECTED_LOG10_P)}


def radioactivity(runner: LMRunner, api: TeacherAPI, model: Any, cell: Cell) -> dict[str, Any]:
    """The cell's SFT student's closed-box result; in the first seed, the clean students' too."""
    rc = runner.cfg.radioactivity
    detector = find_detector(api)
    out = closed_box(runner, detector, model, seed=cell.seed)
    # clean students once per detector (two strengths of one watermark share it): the same students
    # tested twice would count each false positive twice
    spec = repr(getattr(detector, "spec", None))
    out["detector"] = spec
    done: set[str] = runner.__dict__.setdefault("_clean_specs_done", set())
    if cell.seed == runner.env.study.seeds[0] and rc.clean_students and spec not in done:
        done.add(spec)
        clean_p = []
        with runner.env.api(None, None) as clean_api:  # the undefended teacher: unwatermarked text
            for i in range(rc.clean_students):
                seed = 10_000 + i  # each clean student: its own queries, init and batch order
                got = runner.collect(clean_api, runner.attacker_prompts(seed)[: rc.clean_queries], who=f"clean{i}",
                                     attack=runner.plain, seed=seed)
                texts = [j for j, t in enumerate(got.texts) if t]
                data = build_seq_data([got.prompts[j] for j in texts], [got.texts[j] for j in texts],
                                      pad_id=runner.pad)
                student = runner.student(seed)
                train_lm_student(student, data, loss="sft", steps=rc.clean_student_steps,
                                 batch_size=runner.cfg.student_batch, lr=runner.cfg.student_lr, seed=seed,
                                 desc=f"clean student {i + 1}/{rc.clean_students}")
                clean_p.append(closed_box(runner, detector, student, seed=seed)["log10_p"])
        out["clean_log10_p"] = clean_p
        out["clean_students"] = len(clean_p)
        out["clean_false_positives"] = int(np.sum(np.asarray(clean_p) < DETECTED_LOG10_P))
    return out


def aggregate_radioactivity(records: list[dict[str, Any]]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    clean: dict[str | None, tuple[int, int]] = {}  # detector -> (clean students, false positives)
    for rec in records:
        r = rec["result"]["radioactivity"]
        if "clean_students" in r:
            clean[r.get("detector")] = (r["clean_students"], r["clean_false_positives"])
        row = rows.setdefault(rec["label"], {"attack": rec["attack"], "defense": rec["defense"], "label": rec["label"],
                                            "param": rec.get("param"), "value": rec.get("value"), "seeds": [],
                                            "_vals": {"student_tokens": [], "log10_p": [], "detected": []}})
        row["seeds"].append(rec["seed"])
        row["detector"] = r.get("detector")
        for k in row["_vals"]:
            row["_vals"][k].append(r[k])
    out_rows = []
    for row in rows.values():
        vals = row.pop("_vals")
        # log10_p: the least significant seed, since a detection claim must hold for every student
        row["metrics"] = {k: {"mean": float(np.max(v) if k == "log10_p" else np.mean(v)), "values": v}
                          for k, v in vals.items()}
        n, fp = clean.get(row["detector"], (None, None))
        row["metrics"]["clean_students"] = {"mean": n}
        row["metrics"]["clean_false_positives"] = {"mean": fp}
        out_rows.append(row)
    return subtrack(out_rows, SPEC, clean_students=sum(n for n, _ in clean.values()),
                    clean_false_positives=sum(fp for _, fp in clean.values()))

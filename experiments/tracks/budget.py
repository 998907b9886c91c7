"""Budget study: simulated legitimate users and distillers through the admission path, on the
classifier teacher, in simulated time (a FakeClock injected into the chain; nothing sleeps).

Users send ``legit_requests`` each at random times over the horizon; each distiller paces
``distiller_queries`` evenly over it, split round-robin over ``accounts`` client ids. Admission defenses
(budgets, throttles) decide each request. Measured: the fraction of legitimate requests refused, and the
distiller's student accuracy after each checkpoint of admitted queries (student quality over queries).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from defense.clock import FakeClock
from defense.errors import ConfigError
from defense.types import Api, LogprobBatch, OutputKind, Prompt, RequestContext, Usage

from ..aggregate import Delta, Gain, Spec, build_rows, subtrack
from ..config import AttackConfig, BudgetTrack
from ..runner import Cell
from . import TrackRunner
from .classifier import MODEL, ClassifierRunner, predict_proba
from .digits import N_CLASSES, indist_queries, ood_queries

SPEC = Spec(
    x="legit_refused_pts",
    y="gain_erased",
    columns=("distiller_admitted", "clone_acc", "gain_erased", "clone_acc_drop_pts", "legit_refused_pts"),
    gains=(Gain("gain_erased", "clone_acc", "clone_acc", "clone_acc0"),),
    deltas=(Delta("clone_acc_drop_pts", "clone_acc", 100.0),),
)
_T0 = 1_000_000.0  # the simulated clock's origin


class BudgetRunner(TrackRunner):
    cfg: BudgetTrack

    @property
    def attacks(self) -> tuple[AttackConfig, ...]:
        return (AttackConfig(name="budget", accounts=self.cfg.accounts),)

    def prepare(self) -> None:
        if self.env.study.api.path != "in_process":
            raise ConfigError("the budget study simulates time with an injected clock, so it runs in_process",
                              path="api.path")
        self.cls = ClassifierRunner(self.env, self.env.study.tracks.classifier)
        self.cls.prepare()

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        cfg, split = self.cfg, self.cls.split
        rng = np.random.default_rng([cell.seed, 99])
        events: list[tuple[float, int, str, int]] = []  # (time, order, who, query index)
        n_legit = cfg.legit_users * cfg.legit_requests
        legit_x = split.x_test[rng.integers(0, len(split.x_test), size=n_legit)]
        for u in range(cfg.legit_users):
            for i, t in enumerate(np.sort(rng.uniform(0, cfg.horizon_s, size=cfg.legit_requests))):
                events.append((float(t), len(events), f"user-{u}", u * cfg.legit_requests + i))
        dist_x = []
        for d in range(cfg.distillers):
            qrng = np.random.default_rng([cell.seed, d, 98])
            x = (ood_queries(cfg.distiller_queries, qrng) if cfg.attacker == "ood"
                 else indist_queries(split.x_pool, cfg.distiller_queries, qrng))
            dist_x.append(x)
            for i, t in enumerate(np.linspace(0, cfg.horizon_s, cfg.distiller_queries, endpoint=False)):
                events.append((float(t), len(events), f"distiller{d}", i))
        events.sort()
        raw_legit = predict_proba(self.cls.teacher, legit_x)
        raw_dist = [predict_proba(self.cls.teacher, x) for x in dist_x]
        clock = FakeClock(_T0)
        refused_legit = 0
        admitted: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(cfg.distillers)]
        no_ids = np.empty((1, 0), dtype=np.int64)
        usage = Usage(prompt_tokens=64, completion_tokens=1, logprob_values=N_CLASSES)
        with self.env.api(cell.entry, cell.value, clock=clock) as api:
            for t, _order, who, i in events:
                clock.set(_T0 + t)
                is_user = who.startswith("user")
                x = legit_x[i] if is_user else dist_x[int(who[9:])][i]
                client = who if is_user else f"{who}-{i % cfg.accounts}"
                ctx = RequestContext(request_id=f"{who}-{cell.seed}-{i}", client_id=client, model=MODEL,
                                     api=Api.KSERVE_V2, prompt=Prompt(tensor_bytes=x.tobytes()), max_tokens=1)
                granted = api.admit(ctx)
                if granted is None:
                    refused_legit += is_user
                    continue
                raw = raw_legit[i] if is_user else raw_dist[int(who[9:])][i]
                batch = LogprobBatch(values=raw[None, :], token_ids=no_ids, kind=OutputKind.PROBABILITIES)
                vec = api.answer(granted, batch, usage).values[0]
                if not is_user:
                    admitted[int(who[9:])].append((i, vec))
            refusals = dict(api.refusals)
        # student quality over admitted queries: the first distiller's data, in the order it arrived
        got = admitted[0]
        x0 = dist_x[0]
        curve = {}
        for c in sorted({*cfg.checkpoints, len(got)}):
            if 0 < c <= len(got):
                idx = np.array([i for i, _ in got[:c]])
                targets = np.stack([v for _, v in got[:c]]).astype(np.float32)
                curve[str(c)] = self.cls.distill(x0[idx], targets, cell.seed)["clone_acc"]
        zero = self.cls.distill(x0[:0], np.zeros((0, N_CLASSES), np.float32), cell.seed)
        return {
            "legit_requests": n_legit, "legit_refused": refused_legit,
            "legit_refused_pts": 100.0 * refused_legit / max(1, n_legit),
            "distiller_admitted": float(np.mean([len(a) for a in admitted])),
            "clone_acc": curve.get(str(len(got)), math.nan) if got else zero["clone_acc0"],
            "clone_acc0": zero["clone_acc0"], "curve": curve, "refusals": refusals,
        }

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        def pick(result: dict[str, Any]) -> dict[str, float]:
            return {k: v for k, v in result.items() if isinstance(v, (int, float))}

        rows = build_rows(records, pick, SPEC, bootstrap=self.env.study.bootstrap)
        curves: dict[str, dict[str, list[float]]] = {}
        for r in records:
            c = curves.setdefault(r["label"], {})
            for q, acc in r["result"]["curve"].items():
                c.setdefault(q, []).append(acc)
        mean_curves = {label: {q: float(np.mean(v)) for q, v in sorted(c.items(), key=lambda kv: int(kv[0]))}
                       for label, c in curves.items()}
        return {"budget": subtrack(rows, SPEC, curves=mean_curves, horizon_s=self.cfg.horizon_s,
                                   distiller_queries=self.cfg.distiller_queries, accounts=self.cfg.accounts)}

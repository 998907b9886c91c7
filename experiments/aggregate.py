"""Cells -> rows: per (attack, defense, strength), every metric's mean and interval over seeds, and the
headline numbers against the baseline row of the same attack.

Each subtrack declares its plot axes and table columns (``Spec``) so report.md and summarize need no
per-track code.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import BASELINE
from .metrics import bootstrap_ci, gain_erased, mean_ci


@dataclass(frozen=True)
class Gain:
    """A gain-erased headline: 1 - (S_def - S_floor) / (S_clean - S_floor).

    ``score`` is read from this row's cells, ``clean`` from the baseline row's cells, and ``floor``
    from this row's cells (``floor_from="self"``, e.g. the untrained student) or the baseline row's.
    """

    name: str
    score: str
    clean: str
    floor: str
    floor_from: str = "self"


@dataclass(frozen=True)
class Delta:
    """scale * (baseline mean - this row's mean) of a metric, e.g. a benign accuracy loss in points."""

    name: str
    metric: str
    scale: float = 1.0


@dataclass(frozen=True)
class Spec:
    x: str  # utility cost on the Pareto plot's x axis (a metric or a delta)
    y: str  # gain erased on its y axis (a headline)
    columns: tuple[str, ...]  # the report table's columns, in order
    gains: tuple[Gain, ...] = ()
    deltas: tuple[Delta, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def stat(values: Sequence[float], *, n: int, seed: int = 0) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    mean, lo, hi = mean_ci(vals, n=n, seed=seed) if vals else (math.nan, math.nan, math.nan)
    return {"mean": mean, "lo": lo, "hi": hi, "values": vals}


def build_rows(
    records: list[dict[str, Any]],
    pick: Callable[[dict[str, Any]], dict[str, float] | None],
    spec: Spec,
    *,
    bootstrap: int,
) -> list[dict[str, Any]]:
    """``pick`` returns one cell's flat metrics for this subtrack (None: the cell has none)."""
    groups: dict[tuple[str, str], list[tuple[dict, dict]]] = defaultdict(list)
    order: list[tuple[str, str]] = []
    for rec in records:
        m = pick(rec["result"])
        if m is None:
            continue
        key = (rec["attack"], rec["label"])
        if key not in groups:
            order.append(key)
        groups[key].append((rec, m))
    rows = []
    for attack, label in order:
        cells = groups[(attack, label)]
        first = cells[0][0]
        base = groups.get((attack, BASELINE), [])
        names = sorted({k for _, m in cells for k in m})
        row: dict[str, Any] = {
            "attack": attack, "defense": first["defense"], "label": label, "type": first.get("type"),
            "param": first.get("param"), "value": first.get("value"), "seeds": [c["seed"] for c, _ in cells],
            "metrics": {k: stat([m.get(k, math.nan) for _, m in cells], n=bootstrap) for k in names},
        }
        for d in spec.deltas:
            here = _vals(cells, d.metric)
            there = _vals(base, d.metric)
            point, lo, hi = bootstrap_ci(lambda a, b, s=d.scale: s * (b - a), [here, there], n=bootstrap)
            row["metrics"][d.name] = {"mean": point, "lo": lo, "hi": hi}
        for g in spec.gains:
            score = _vals(cells, g.score)
            clean = _vals(base, g.clean)
            floor = _vals(cells if g.floor_from == "self" else base, g.floor)
            point, lo, hi = bootstrap_ci(gain_erased, [score, clean, floor], n=bootstrap)
            row["metrics"][g.name] = {"mean": point, "lo": lo, "hi": hi}
        rows.append(row)
    return rows


def _vals(cells: list[tuple[dict, dict]], key: str) -> list[float]:
    out = []
    for _, m in cells:
        v = m.get(key)
        if v is not None and math.isfinite(float(v)):
            out.append(float(v))
    return out


def subtrack(rows: list[dict[str, Any]], spec: Spec, **extra: Any) -> dict[str, Any]:
    return {"spec": asdict(spec), "rows": rows, **extra}

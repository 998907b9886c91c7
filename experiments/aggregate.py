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

import numpy as np

from .config import BASELINE
from .metrics import (
    bootstrap_ci,
    bootstrap_rows_ci,
    gain_erased,
    interpolate_curve,
    matched_gain_erased,
    mean_ci,
)


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
    plots: tuple[tuple[str, str], ...] = ()  # further (x, y) metric plots, one curve per defense


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


def _paired(row: dict[str, Any], *keys: str) -> np.ndarray:
    """[seeds, len(keys)]: a row's per-seed values of ``keys``, paired by seed (cut to the shortest)."""
    cols = [[float(v) for v in (row["metrics"].get(k) or {}).get("values", [])] for k in keys]
    n = min(len(c) for c in cols)
    return np.array([c[:n] for c in cols], dtype=np.float64).T.reshape(n, len(keys))


def add_matched_gain(rows: list[dict[str, Any]], *, is_reference: Callable[[dict[str, Any]], bool], x: str,
                     score: str, floor: str, name: str, ref_name: str, bootstrap: int) -> None:
    """Add ``name`` (``matched_gain_erased``) and ``ref_name`` (the reference curve's score at the row's
    x) to every row that is neither a baseline nor on the reference curve, per attack.

    The curve is the attack's baseline row (the undefended point) plus its reference rows; S_0 is the
    baseline's ``floor``. The interval resamples seeds of the row, of each curve point (x and score
    paired) and of S_0 independently. ``matched`` says whether the row's x lies within the curve's range
    (outside it the curve's end is used, not an extrapolation).
    """
    for attack in dict.fromkeys(r["attack"] for r in rows):
        mine = [r for r in rows if r["attack"] == attack]
        base = next((r for r in mine if r["defense"] == BASELINE), None)
        if base is None:
            continue
        curve = [base] + [r for r in mine if is_reference(r)]
        s0 = _paired(base, floor)
        points = [_paired(c, x, score) for c in curve]
        if len(points) < 2 or any(p.shape[0] == 0 for p in points) or s0.shape[0] == 0:
            continue
        cx = [_mean(c, x) for c in curve]
        lo_x, hi_x = min(cx), max(cx)

        def fn(d: np.ndarray, s0m: np.ndarray, *cs: np.ndarray) -> float:
            return matched_gain_erased(d[1], d[0], [c[0] for c in cs], [c[1] for c in cs], s0m[0])

        for r in mine:
            if r is base or is_reference(r):
                continue
            here = _paired(r, x, score)
            if here.shape[0] == 0:
                continue
            point, lo, hi = bootstrap_rows_ci(fn, [here, s0, *points], n=bootstrap)
            xm = _mean(r, x)
            r["metrics"][name] = {"mean": point, "lo": lo, "hi": hi}
            r["metrics"][ref_name] = {"mean": interpolate_curve(xm, cx, [_mean(c, score) for c in curve]),
                                      "lo": math.nan, "hi": math.nan}
            r["matched"] = bool(lo_x <= xm <= hi_x)


def _mean(row: dict[str, Any], key: str) -> float:
    v = (row["metrics"].get(key) or {}).get("mean")
    return float(v) if isinstance(v, (int, float)) else math.nan

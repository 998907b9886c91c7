"""What every benchmark shares: where results go and how a run is recorded.

Each benchmark writes benchmarks/results/NAME.json and appends one dated line to benchmarks/results.md
(the Contracts). Import as ``from common import record, machine`` (benchmarks/ is the script's folder).
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, str]:
    """Where and when: goes into every result file, since ratios only compare within one run."""
    return {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "date": datetime.now(UTC).strftime("%Y-%m-%d")}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time process ``pid`` (all its threads) has used, from /proc; None elsewhere.

    Latency on these shared 2-core machines swings with whatever else runs; the CPU a server process
    spends per request moves far less, so benchmarks report it beside the latencies (a diagnostic: the
    targets stay on the latencies)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_ms_per_call(before: float | None, after: float | None, calls: int) -> float | None:
    if before is None or after is None or calls <= 0:
        return None
    return round((after - before) * 1e3 / calls, 3)


def record(name: str, result: dict, summary: str) -> Path:
    """Write results/NAME.json and append a dated summary line to results.md; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    with open(ROOT / "benchmarks" / "results.md", "a") as f:
        f.write(f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC `{name}`: {summary}\n")
    return path


def p50_ratio_interval(lat: dict[str, list[float]], block: int, over: tuple[str, str], under: tuple[str, str], *,
                       resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """A 95% interval for (p50[over[0]] - p50[over[1]]) / (p50[under[0]] - p50[under[1]]), the targets' ratio
    of added latencies, by resampling the run's rounds.

    A run measures its paths in rounds, one block of ``block`` calls to each path in turn, so the k-th block
    of every path shares the k-th stretch of the machine's weather; a resample draws rounds with replacement
    and takes every path's blocks of those rounds together. The p50 is the benches' own (the sorted value
    at index int(n / 2)). None when there are fewer than two rounds, or a resample's denominator is not
    positive in over 1% of draws (the ratio is then not defined enough to bound)."""
    import numpy as np

    names = sorted({*over, *under})
    rounds = min(len(lat[n]) for n in names) // block
    if rounds < 2:
        return None
    rng = np.random.default_rng(seed)
    arr = {n: np.asarray(lat[n][:rounds * block]).reshape(rounds, block) for n in names}
    picks = rng.integers(0, rounds, size=(resamples, rounds))
    mid = rounds * block // 2
    p50 = {n: np.partition(arr[n][picks].reshape(resamples, -1), mid, axis=1)[:, mid] for n in names}
    den = p50[under[0]] - p50[under[1]]
    ok = den > 0
    if ok.mean() < 0.99:
        return None
    ratio = (p50[over[0]][ok] - p50[over[1]][ok]) / den[ok]
    lo, hi = np.quantile(ratio, [0.025, 0.975])
    return round(float(lo), 3), round(float(hi), 3)

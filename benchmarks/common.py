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

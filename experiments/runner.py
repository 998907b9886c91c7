"""Run a study: resolve it, train (or reload) each track's teacher, run every (defense, strength, seed)
cell with a checkpoint per cell, then write metrics.json, report.md and the plots.

A run directory holds::

    config.yaml        the resolved study (every default filled in), the one a resume must match
    run.json           command line, versions, device, timings
    keys.yaml          the experiment's key file (mode 0600), derived from teacher_seed: reruns match
    teachers/<track>/  trained teachers, reused on resume
    cells/<track>/<attack>/<defense>/seed<N>.json   one finished cell each
    metrics.json, report.md, *.png
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from defense.clock import SYSTEM_CLOCK, Clock
from defense.errors import ConfigError
from defense.keys import KeyRing

from .api import TeacherAPI, open_api
from .config import (
    BASELINE,
    AttackConfig,
    DefenseEntry,
    Study,
    chain_doc,
    config_digest,
    defenses_for,
    resolved,
)
from .progress import bar

log = logging.getLogger("distillguard.experiments")


@dataclass(frozen=True)
class Cell:
    track: str
    attack: AttackConfig
    entry: DefenseEntry | None  # None: the undefended baseline
    value: Any
    seed: int

    @property
    def defense(self) -> str:
        return BASELINE if self.entry is None else self.entry.name

    @property
    def label(self) -> str:
        return BASELINE if self.entry is None else self.entry.label(self.value)

    @property
    def is_baseline(self) -> bool:
        return self.entry is None

    def path(self, root: Path) -> Path:
        return root / "cells" / self.track / self.attack.name / self.label / f"seed{self.seed}.json"

    def describe(self) -> dict[str, Any]:
        return {"track": self.track, "attack": self.attack.name, "defense": self.defense, "label": self.label,
                "type": None if self.entry is None else self.entry.type,
                "param": None if self.entry is None else self.entry.param, "value": self.value, "seed": self.seed}


@dataclass
class Env:
    """What every track gets: the study, the run directory, the device, the keys, and cell plumbing."""

    study: Study
    out_dir: Path
    device: str = "cpu"
    keys: KeyRing | None = None
    key_file: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cells_run: int = 0  # this invocation's, not loaded from checkpoints

    def api(self, entry: DefenseEntry | None, value: Any, *, clock: Clock = SYSTEM_CLOCK) -> TeacherAPI:
        doc = chain_doc(self.study, entry, value)
        assert self.keys is not None and self.key_file is not None  # noqa: S101 - set by run_study
        return open_api(doc, keys=self.keys, key_file=self.key_file, path=self.study.api.path,
                        timeout_s=self.study.api.timeout_s, clock=clock, log_dir=self.out_dir / "logs")

    def teacher_dir(self, track: str) -> Path:
        return self.out_dir / "teachers" / track

    def cells(self, track: str, attacks: Iterable[AttackConfig]) -> list[Cell]:
        """Baseline first for every (seed, attack), so the cells that compare against it find it done."""
        entries = defenses_for(self.study, track)
        out = []
        for seed in self.study.seeds:
            for attack in attacks:
                out.append(Cell(track, attack, None, None, seed))
                for e in entries:
                    out.extend(Cell(track, attack, e, v, seed) for v in e.strengths)
        return out

    def run_cells(self, track: str, cells: list[Cell], fn: Callable[[Cell], dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``fn`` on each cell not yet checkpointed; returns every cell's record, finished ones loaded."""
        records = []
        progress = bar(total=len(cells), desc=f"{track} cells", leave=True)
        for cell in cells:
            path = cell.path(self.out_dir)
            if path.exists():
                records.append(json.loads(path.read_text()))
                progress.update(1)
                continue
            t0 = time.perf_counter()
            log.info("cell %s / %s / %s / seed %d", track, cell.attack.name, cell.label, cell.seed)
            result = fn(cell)
            self.cells_run += 1
            rec = {**cell.describe(), "seconds": time.perf_counter() - t0, "result": result}
            _write_json_atomic(path, rec)
            records.append(rec)
            progress.update(1)
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(last=cell.label)
        progress.close()
        return records


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_json(path: Path, obj: Any) -> None:
    _write_json_atomic(path, obj)


def experiment_keys(path: Path, seed: int) -> KeyRing:
    """A key file derived from the study's teacher seed: the same study keys its noise the same way on
    every run (an experiment key protects nothing; it only has to be reproducible)."""
    if not path.exists():
        secret = hashlib.sha256(f"distillguard-experiments/{seed}".encode()).digest()
        doc = {"version": 1, "keys": [{"id": f"exp-{seed}", "status": "active", "created": "",
                                       "secret": base64.b64encode(secret).decode()}]}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# experiment key: derived from the study's teacher_seed; not a production secret\n")
            yaml.safe_dump(doc, f, sort_keys=False)
    return KeyRing.load(path)


def default_out_dir(study: Study, root: Path = Path("runs")) -> Path:
    return root / f"{study.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def _check_resume(out_dir: Path, study: Study) -> bool:
    """True when ``out_dir`` holds a run of this same study (resume); raises if it holds another one."""
    cfg = out_dir / "config.yaml"
    if not cfg.exists():
        return False
    old = yaml.safe_load(cfg.read_text())
    new = resolved(study)
    if old == json.loads(json.dumps(new, default=str)):
        return True
    diffs = _diff(old, json.loads(json.dumps(new, default=str)))
    raise ConfigError(f"{out_dir} holds a run of a different config (differs at: {', '.join(diffs[:8])}); "
                      "give another --out, or the same config to resume")


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "<top>"]


def run_study(study: Study, out_dir: Path | None = None, *, device: str | None = None,
              argv: list[str] | None = None) -> Path:
    """Run (or resume) a study into ``out_dir``; returns the run directory."""
    import torch

    from .report import write_report
    from .tracks import TRACK_RUNNERS

    device = device or study.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA device", path="device")
    if study.threads:
        torch.set_num_threads(study.threads)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(study)
    resuming = _check_resume(out_dir, study)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(resolved(study), default=str)),
                                                        sort_keys=False))
    keys = experiment_keys(out_dir / "keys.yaml", study.teacher_seed)
    env = Env(study, out_dir, device=device, keys=keys, key_file=out_dir / "keys.yaml")
    # one entry per invocation: a resumed study keeps the timing of the sittings before it
    previous = json.loads((out_dir / "run.json").read_text()).get("invocations", []) \
        if resuming and (out_dir / "run.json").exists() else []
    this = {"argv": argv or sys.argv, "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "resumed": resuming, "device": device, "threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    run_info = {
        "study": study.name, "config_digest": config_digest(study), "python": platform.python_version(),
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(), "api": study.api.path,
        "invocations": [*previous, this],
    }
    write_json(out_dir / "run.json", run_info)
    t_start = time.perf_counter()
    tracks_out: dict[str, Any] = {}
    for name in study.enabled_tracks():
        t0 = time.perf_counter()
        runner = TRACK_RUNNERS[name](env, getattr(study.tracks, name))
        runner.prepare()
        records = env.run_cells(name, env.cells(name, runner.attacks), runner.run_cell)
        tracks_out.update(runner.aggregate(records))
        env.timings[name] = time.perf_counter() - t0
    metrics = {"study": study.name, "config_digest": config_digest(study), "device": device,
               "seeds": list(study.seeds), "timings_s": {**env.timings, "total": time.perf_counter() - t_start},
               "tracks": tracks_out}
    write_json(out_dir / "metrics.json", metrics)
    write_report(out_dir, metrics)
    this["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    this["seconds"] = time.perf_counter() - t_start
    this["cells_run"] = env.cells_run
    run_info["seconds_total"] = sum(i.get("seconds", 0.0) for i in run_info["invocations"])
    write_json(out_dir / "run.json", run_info)
    return out_dir

"""Configs for starting the real sidecar process in integration tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from defense.sidecar.process import SidecarProcess  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "distillguard.yaml"


def write_config(tmp: Path, *, listen: list[str] | None = None, overrides: dict | None = None) -> Path:
    """The example config, pointed at tmp (socket, state, keys), with ``overrides`` merged per section."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["server"]["listen"] = listen or [f"unix:{tmp}/sidecar.sock"]
    doc["server"]["metrics_port"] = 0
    doc["server"]["reload_poll_s"] = 0.2
    doc["server"]["drain_s"] = 0.5
    doc["server"]["grace_s"] = 1
    doc["state"]["uri"] = f"sqlite:///{tmp}/state.db"
    doc["keys"]["file"] = str(tmp / "keys.yaml")
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(doc.get(section), dict):
            doc[section].update(values)
        else:
            doc[section] = values
    path = tmp / "distillguard.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    if not (tmp / "keys.yaml").exists():
        subprocess.run([sys.executable, "-m", "defense.cli", "keys", "new", str(tmp / "keys.yaml")], check=True,
                       capture_output=True)
    return path

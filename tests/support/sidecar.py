"""Start the real sidecar process (``distillguard serve``) for integration tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

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


class SidecarProcess:
    def __init__(self, config: Path, *, env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> None:
        self.config = config
        cmd = [sys.executable, "-m", "defense.cli", "serve", "--config", str(config), *(extra_args or [])]
        self.log_path = config.parent / "sidecar.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=config.parent,
                                     env={**os.environ, **(env or {})})
        self.addresses: list[str] = []
        self.metrics_port: int | None = None
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
                continue
            m = re.match(r"distillguard sidecar serving on (.*?)(?:; metrics http://[^:]+:(\d+)/metrics)?$", line.strip())
            if m:
                self.addresses = m.group(1).split(", ")
                self.metrics_port = int(m.group(2)) if m.group(2) else None
                return
        raise RuntimeError(f"sidecar not ready in {timeout} s:\n{self.log()}")

    @property
    def target(self) -> str:
        return self.addresses[0]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

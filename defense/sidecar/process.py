"""Run ``distillguard serve`` as a child process and wait until it is ready (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ..childproc import ChildProcess

_READY = re.compile(r"^distillguard sidecar serving on (.*?)(?:; metrics http://[^:]+:(\d+)/metrics)?$")


class SidecarProcess(ChildProcess):
    name = "sidecar"

    def __init__(self, config: str | os.PathLike[str], *, env: dict[str, str] | None = None,
                 args: list[str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None, ready_timeout_s: float = 30.0) -> None:
        self.config = Path(config)
        cmd = [sys.executable, "-m", "defense.cli", "serve", "--config", str(self.config), *(args or [])]
        self._spawn(cmd, log_path=Path(log_path) if log_path else self.config.parent / "sidecar.log",
                    env={**os.environ, **(env or {})}, cwd=cwd or self.config.parent, pipe_stdout=True)
        m = self._ready(lambda: self.wait_for_line(_READY, ready_timeout_s))
        self.addresses: list[str] = m.group(1).split(", ")
        self.metrics_port: int | None = int(m.group(2)) if m.group(2) else None

    @property
    def target(self) -> str:
        return self.addresses[0]

    def log(self, chars: int = 1_000_000) -> str:
        return super().log(chars)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

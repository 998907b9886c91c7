"""Run ``distillguard serve`` as a child process and wait until it is ready (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

_READY = re.compile(r"distillguard sidecar serving on (.*?)(?:; metrics http://[^:]+:(\d+)/metrics)?$")


class SidecarProcess:
    def __init__(self, config: str | os.PathLike[str], *, env: dict[str, str] | None = None,
                 args: list[str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None, ready_timeout_s: float = 30.0) -> None:
        self.config = Path(config)
        cmd = [sys.executable, "-m", "defense.cli", "serve", "--config", str(self.config), *(args or [])]
        self.log_path = Path(log_path) if log_path else self.config.parent / "sidecar.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - open for the child's whole life
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     cwd=cwd or self.config.parent, env={**os.environ, **(env or {})})
        self.addresses: list[str] = []
        self.metrics_port: int | None = None
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None  # noqa: S101 - Popen was given stdout=PIPE
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
                time.sleep(0.01)
                continue
            m = _READY.match(line.strip())
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
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> SidecarProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

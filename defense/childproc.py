"""A server run as a child process (the sidecar, Envoy, vLLM, Triton, the KServe proxy) for the demo,
tests and benchmarks: output in a log file, readiness awaited (a line on stdout or a probe), stopped on
exit and on every failure to start, with the log in the error.

``group=True`` starts the child in its own session, so ``stop`` also ends what it spawned (vLLM's engine
core, tritonserver behind pytriton).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["ChildProcess"]


class ChildProcess:
    name = "child"  # what errors call it
    proc: subprocess.Popen[str]
    log_path: Path
    _log: IO[str]
    _group = False

    def _spawn(self, cmd: Sequence[str], *, log_path: str | os.PathLike[str], env: dict[str, str] | None = None,
               cwd: str | os.PathLike[str] | None = None, pipe_stdout: bool = False, group: bool = False) -> None:
        """Start ``cmd``; its stderr (and stdout unless ``pipe_stdout``) goes to ``log_path``."""
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - open for the child's whole life
        self._group = group
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if pipe_stdout else self._log,
                                     stderr=self._log if pipe_stdout else subprocess.STDOUT, text=True,
                                     env=env, cwd=cwd, start_new_session=group)

    def _ready(self, wait: Callable[[], Any]) -> Any:
        """Run ``wait`` (one of the waits below); any failure stops the child before it propagates."""
        try:
            return wait()
        except BaseException:
            self.stop()
            raise

    # -- readiness ----------------------------------------------------------------------------------
    def wait_for_line(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        """The first stdout line matching ``pattern`` (children print whole lines, flushed)."""
        out = self.proc.stdout
        assert out is not None  # noqa: S101 - started with pipe_stdout
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if select.select([out], [], [], 0.2)[0]:
                line = out.readline()
                m = pattern.search(line)
                if m:
                    return m
                if line:
                    continue
            if self.proc.poll() is not None:
                raise self.failure(f"exited with {self.proc.returncode}")
        self.dump_stacks()
        raise self.failure(f"not ready in {timeout_s:g} s")

    def wait_until(self, probe: Callable[[], bool], timeout_s: float, *, interval_s: float = 0.05) -> None:
        """Poll ``probe`` (OSError counts as not yet) until it returns True."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.failure(f"exited with {self.proc.returncode}")
            try:
                if probe():
                    return
            except OSError:
                pass
            time.sleep(interval_s)
        self.dump_stacks()
        raise self.failure(f"not ready in {timeout_s:g} s")

    # -- diagnosis ----------------------------------------------------------------------------------
    def log(self, chars: int = 6000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def diagnosis(self) -> str:
        """What a failure to start shows: the log by default."""
        return self.log()

    def dump_stacks(self) -> None:
        """Before a not-ready error: children that print their stacks on a signal do it here."""

    def failure(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.name} {what}:\n{self.diagnosis()}")

    # -- stopping -----------------------------------------------------------------------------------
    def _signal(self, sig: int) -> None:
        try:
            if self._group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (to the whole group when started as one), SIGKILL after ``timeout``; idempotent."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        if self._group:  # what the leader started may outlive it by a moment
            self._signal(signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Start a real Triton (nvidia-pytriton, in .venvs/triton) and the proxy as child processes.

For the integration tests, the benchmark and demos. Triton runs in its own venv (numpy<2); the classifier
it serves comes from the model factory, its weights exported here to an .npz so that venv needs no torch.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from defense.childproc import ChildProcess

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venvs" / "triton"
SERVE_SCRIPT = Path(__file__).with_name("mlp_triton.py")
SETUP_FAILED = VENV.parent / "triton.setup-failed"  # written by ./dev when the venv could not be made


def triton_python() -> Path:
    return VENV / "bin" / "python"


def unavailable_reason() -> str | None:
    """Why a Triton server cannot be started here, or None when it can."""
    if SETUP_FAILED.exists():
        return f".venvs/triton could not be created: {SETUP_FAILED.read_text().strip()}"
    if not triton_python().exists():
        return ".venvs/triton does not exist: run ./dev setup (it installs nvidia-pytriton there)"
    return None


@functools.cache
def triton_env() -> dict[str, str]:
    """The environment Triton needs: the Python backend stub links libpython3.11.so, which must resolve to
    the venv interpreter's own library (the system's is another patch release and fails on load)."""
    libdir = subprocess.run([str(triton_python()), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            check=True, capture_output=True, text=True).stdout.strip()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = libdir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_classifier(model: Any, path: str | os.PathLike[str]) -> Path:
    """An MLPClassifier's Linear layers as ``w{i}`` [out, in] / ``b{i}`` [out] float32 arrays in an .npz."""
    import numpy as np
    from torch import nn

    linear = [m for m in model.net if isinstance(m, nn.Linear)]
    arrays: dict[str, Any] = {"n_layers": np.array(len(linear))}
    for i, layer in enumerate(linear):
        arrays[f"w{i}"] = layer.weight.detach().cpu().numpy().astype(np.float32)
        arrays[f"b{i}"] = layer.bias.detach().cpu().numpy().astype(np.float32)
    out = Path(path)
    np.savez(out, **arrays)
    return out


class _Child(ChildProcess):
    """A child in its own process group, so stopping it also stops what it started (tritonserver)."""

    def _start(self, cmd: list[str], *, env: dict[str, str], log_path: Path, ready: re.Pattern[str],
               timeout_s: float) -> re.Match[str]:
        self._spawn(cmd, log_path=log_path, env=env, cwd=ROOT, pipe_stdout=True, group=True)
        return self._ready(lambda: self.wait_for_line(ready, timeout_s))


class TritonProcess(_Child):
    """``mlp_triton.py`` serving ``model`` from ``weights`` on free loopback ports."""

    name = "TritonProcess"

    def __init__(self, weights: str | os.PathLike[str], workdir: str | os.PathLike[str], *, model: str = "mlp",
                 ready_timeout_s: float = 180.0) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        self.grpc_port, http_port = free_port(), free_port()
        self.server_log = work / "tritonserver.log"
        cmd = [str(triton_python()), str(SERVE_SCRIPT), "--weights", str(weights), "--model", model,
               "--grpc-port", str(self.grpc_port), "--http-port", str(http_port), "--workspace", str(work / "pytriton"),
               "--server-log", str(self.server_log)]
        self._start(cmd, env=triton_env(), log_path=work / "triton.log", ready=re.compile(r"^READY \d+$", re.M),
                    timeout_s=ready_timeout_s)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def dump_stacks(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGUSR1)  # mlp_triton.py registered faulthandler for it
                time.sleep(1.0)
            except ProcessLookupError:
                pass

    def diagnosis(self) -> str:
        server = self.server_log.read_text(errors="replace")[-3000:] if self.server_log.exists() else "(none)"
        return f"{self.log()}\n--- tritonserver log ---\n{server}"


class ProxyProcess(_Child):
    """``distillguard kserve-proxy`` with the given configs; ``target`` is where clients connect."""

    name = "ProxyProcess"

    def __init__(self, config: str | os.PathLike[str], proxy_config: str | os.PathLike[str], *,
                 args: list[str] | None = None, env: dict[str, str] | None = None,
                 log_path: str | os.PathLike[str] | None = None, ready_timeout_s: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "defense.cli", "kserve-proxy", "--config", str(config),
               "--proxy-config", str(proxy_config), *(args or [])]
        log = Path(log_path) if log_path else Path(proxy_config).with_suffix(".log")
        m = self._start(cmd, env={**os.environ, **(env or {})}, log_path=log, timeout_s=ready_timeout_s,
                        ready=re.compile(r"serving on (\S+) -> \S+(?:; metrics http://[^:]+:(\d+)/metrics)?$", re.M))
        self.target = m.group(1).rstrip(",")
        self.metrics_port = int(m.group(2)) if m.group(2) else None

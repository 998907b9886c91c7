"""Run the transformers OpenAI-compatible server (``python -m server_plugins.transformers.server``) as a
child process on a free port, until stopped: the engine of the demo when vLLM is not installed, and of
the front's integration tests."""

from __future__ import annotations

import os
import re
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from defense.childproc import ChildProcess

ROOT = Path(__file__).resolve().parents[2]
_SERVING = re.compile(r"^serving on (http://\S+)")


class TransformersServer(ChildProcess):
    """``url`` and ``address`` once the server answers /health."""

    name = "the transformers server"

    def __init__(self, model: str | os.PathLike[str], log_path: str | os.PathLike[str], *,
                 served_model_name: str = "tiny", config: str | os.PathLike[str] | None = None,
                 logprobs_mode: str | None = None, gzip: bool = False, middleware: Sequence[str] = (),
                 env: dict[str, str] | None = None, timeout_s: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "server_plugins.transformers.server", "--model", str(model),
               "--served-model-name", served_model_name, "--port", "0"]
        if config:
            cmd += ["--config", str(config)]
        if logprobs_mode:
            cmd += ["--logprobs-mode", logprobs_mode]
        if gzip:
            cmd.append("--gzip")
        for m in middleware:
            cmd += ["--middleware", m]
        self.url = self.address = ""
        self._spawn(cmd, log_path=log_path, env={**os.environ, **(env or {})}, cwd=ROOT, pipe_stdout=True)
        self._ready(lambda: self._wait(timeout_s))

    def _wait(self, timeout_s: float) -> None:
        self.url = self.wait_for_line(_SERVING, timeout_s).group(1)
        self.address = self.url.removeprefix("http://")
        self.wait_until(self._healthy, timeout_s, interval_s=0.1)

    def _healthy(self) -> bool:
        with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
            return r.status == 200

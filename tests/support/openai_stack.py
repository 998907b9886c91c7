"""The pieces of an OpenAI-compatible stack for integration tests: a tiny model, the transformers server as
a real process, configs for the sidecar's front, and a small HTTP client that can also leave early."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .asgi import sse_events  # noqa: F401 - re-exported for the tests
from .sidecar import write_config

ROOT = Path(__file__).resolve().parents[2]

# small limits so a test can hit them; one fresh API key per test keeps tests apart
DEFENSES = [
    {"type": "request_rules", "params": {"max_top_logprobs": 5}},
    {"type": "budget", "params": {"limits": {
        "requests_per_minute": {"unit": "requests", "amount": 6, "period_s": 60},
        "tokens_per_day": {"unit": "total_tokens", "amount": 10_000_000, "period_s": 86400,
                           "window": "sliding_window"},
        "logprob_values_per_day": {"unit": "logprob_values", "amount": 10_000_000, "period_s": 86400,
                                   "window": "sliding_window"}}}},
    {"type": "keyed_noise"},
]


def tiny_model(folder: Path) -> Path:
    """A random tiny Llama with its own tokenizer (about 1 s): outputs are arbitrary but deterministic."""
    from defense.models import build_tiny_lm_folder, synthetic_corpus

    if (folder / "config.json").exists():
        return folder
    return build_tiny_lm_folder(folder, hidden=64, heads=2, layers=2, max_positions=256,
                                corpus=synthetic_corpus(300))


def front_config(tmp: Path, *, ext_proc: bool = True, defenses: list | None = None) -> Path:
    return write_config(tmp, overrides={"front": {"envoy_ext_proc": ext_proc},
                                        "defenses": defenses if defenses is not None else DEFENSES})


def engine_config(tmp: Path, keys: Path, defenses: list | None = None) -> Path:
    """What the engine side reads: the same key file (to verify the signed profile), its sampling defenses."""
    doc = {"version": 1, "state": {"uri": "memory://"}, "keys": {"file": str(keys)}, "defenses": defenses or []}
    path = tmp / "engine.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class ModelServer:
    """``python -m server_plugins.transformers.server`` on a free port, until stopped."""

    def __init__(self, model: Path, log_path: Path, *, config: Path | None = None, gzip: bool = False,
                 middleware: tuple[str, ...] = (), env: dict[str, str] | None = None, timeout_s: float = 120) -> None:
        cmd = [sys.executable, "-m", "server_plugins.transformers.server", "--model", str(model),
               "--served-model-name", "tiny", "--port", "0"]
        if config:
            cmd += ["--config", str(config)]
        if gzip:
            cmd.append("--gzip")
        for m in middleware:
            cmd += ["--middleware", m]
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - the child's stderr for its whole life
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        try:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line.startswith("serving on "):
                raise RuntimeError(f"model server did not start: {line!r}\n{self.log()}")
            self.url = line.split()[-1]
            self.address = self.url.removeprefix("http://")
            deadline = time.monotonic() + timeout_s
            while call("GET", self.url + "/health").status != 200:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"model server not healthy:\n{self.log()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> bytes:
        """The body, decoded from gzip when it came compressed."""
        return gzip.decompress(self.body) if self.headers.get("content-encoding") == "gzip" else self.body


def _conn(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout), u.path + (f"?{u.query}" if u.query else "")


def call(method: str, url: str, body: Any = None, *, headers: dict[str, str] | None = None,
         timeout: float = 60) -> Response:
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    conn, path = _conn(url, timeout)
    try:
        conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    except OSError:
        return Response(0, {}, b"")
    finally:
        conn.close()


def leave_after_first_event(url: str, body: Any, *, headers: dict[str, str] | None = None) -> bytes:
    """POST a streaming request, read until the first SSE event, then drop the connection."""
    conn, path = _conn(url, 30)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        got = b""
        while b"\n\n" not in got:
            chunk = r.read1(4096) if hasattr(r, "read1") else r.read(1)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        conn.close()  # closes the socket mid-answer: to Envoy and the server, the client went away


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of a Prometheus family's samples on a text endpoint whose labels include ``labels``."""
    text = call("GET", f"http://127.0.0.1:{port}/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample != name:
            continue
        got = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if "=" in kv)
        if all(got.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total

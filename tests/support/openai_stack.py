"""The pieces of an OpenAI-compatible stack for integration tests: a tiny model, the transformers server as
a real process, configs for the sidecar's front, and a small HTTP client that can also leave early."""

from __future__ import annotations

import gzip
import http.client
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from defense.identity import client_id_from_token
from defense.keys import KeyRing
from defense.sidecar.process import SidecarProcess
from server_plugins.client import SidecarClient
from server_plugins.transformers.process import TransformersServer

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


class ModelServer(TransformersServer):
    """The transformers server as the tests start it (model name ``tiny``), until stopped."""

    def __init__(self, model: Path, log_path: Path, *, config: Path | None = None, gzip: bool = False,
                 middleware: tuple[str, ...] = (), env: dict[str, str] | None = None, timeout_s: float = 120) -> None:
        super().__init__(model, log_path, config=config, gzip=gzip, middleware=middleware, env=env,
                         timeout_s=timeout_s)

    def log(self, chars: int = 4000) -> str:
        return super().log(chars)


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


# -- helpers the front's integration tests share ------------------------------------------------
def key() -> str:
    """A fresh API key: one client per test keeps the tests' budgets apart."""
    return "sk-" + uuid.uuid4().hex


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def tops(doc: dict[str, Any]) -> list[list[tuple[str, float]]]:
    """A completion's top_logprobs as (token, logprob) lists per position."""
    return [list(d.items()) for d in doc["choices"][0]["logprobs"]["top_logprobs"]]


def stream_tops(events: list[Any]) -> list[list[tuple[str, float]]]:
    """A streamed completion's top_logprobs as (token, logprob) lists per position, in order. An event may
    carry several positions: vLLM merges the tokens it made while the server was busy into one event."""
    return [list(d.items()) for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0]["logprobs"]
            for d in e["choices"][0]["logprobs"]["top_logprobs"]]


def chat_top_values(doc: dict[str, Any]) -> list[list[float]]:
    """A chat completion's top_logprobs values per position."""
    return [[a["logprob"] for a in e["top_logprobs"]] for e in doc["choices"][0]["logprobs"]["content"]]


def streamed_chat_top_values(events: list[Any]) -> list[list[float]]:
    """The same from a streamed chat completion's events (one position per event)."""
    return [[a["logprob"] for a in e["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
            for e in events[:-1] if e["choices"] and e["choices"][0].get("logprobs")]


def values(doc: dict[str, Any]) -> np.ndarray:
    return np.array([[v for _, v in row[:5]] for row in tops(doc)])


def settles(metrics_port: int, status: str) -> float:
    return metric(metrics_port, "distillguard_settles_total", status=status)


def wait_for(pred: Any, timeout: float = 15.0) -> bool:
    """True once ``pred()`` is, False at the deadline (a settle lands just after the answer does)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# -- an engine behind Envoy with the sidecar's ext_proc -----------------------------------------
def no_envoy_reason() -> str:
    failed = ROOT / ".venvs" / "envoy.setup-failed"
    return "no Envoy: " + (failed.read_text().strip() if failed.exists() else "./dev setup makes .venvs/envoy")


class EnvoyStack:
    """``start_engine()``'s server, the sidecar (``config``, admin token ``ADMIN``) and Envoy in front of
    both, on loopback; stopped together, also when one of them fails to start."""

    ADMIN = "front-test-admin"

    def __init__(self, tmp: Path, config: Path, start_engine: Any) -> None:
        from server_plugins.envoy.process import EnvoyProcess, render_config

        self.tmp, self.config = tmp, config
        self.keys = KeyRing.load(tmp / "keys.yaml")
        self.engine = self.sidecar = self.envoy = None
        try:
            self.engine = start_engine()
            self.sidecar = SidecarProcess(config, env={"DISTILLGUARD_ADMIN_TOKEN": self.ADMIN})
            self.envoy = EnvoyProcess(render_config(upstream=self.engine.address, sidecar=self.sidecar.target), tmp)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in (self.envoy, self.sidecar, self.engine):
            if p is not None:
                p.stop()

    def client(self, token: str) -> str:
        return client_id_from_token(token, self.keys)

    def budget(self, token: str) -> dict[str, Any]:
        """The client's limits by name, through GetBudget."""
        with SidecarClient(self.sidecar.target, admin_token=self.ADMIN, timeout_s=5) as c:
            resp = c.get_budget(self.client(token))
        return {lim.name: lim for lim in resp.limits}


# -- what both Envoy stacks (the transformers server, vLLM) must show -----------------------------
def check_settle(stack: EnvoyStack, completion: Callable[..., dict]) -> dict[str, Any]:
    """One completion through Envoy: once settled (just after the answer, defense.deferred) the budget holds
    the engine's usage and the logprob values returned, and nothing reserved. Returns the client's limits."""
    t = key()
    r = call("POST", stack.envoy.url + "/v1/completions", completion(), headers=auth(t))
    usage = r.json()["usage"]
    disclosed = sum(min(len(row), 5) for row in tops(r.json()))
    assert wait_for(lambda: stack.budget(t)["tokens_per_day"].reserved == 0)
    limits = stack.budget(t)
    assert limits["tokens_per_day"].used == usage["total_tokens"]
    assert limits["logprob_values_per_day"].used == disclosed
    return limits


def check_throttle(stack: EnvoyStack, completion: Callable[..., dict]) -> None:
    """requests_per_minute is 6 in both configs: the 7th request gets 429 with Retry-After and RateLimit-*,
    nothing stays reserved for it, and another client still gets 200."""
    t = key()
    statuses = []
    for _ in range(12):  # a refill (one per 10 s) on a slow machine may let one more through
        r = call("POST", stack.envoy.url + "/v1/completions", completion(max_tokens=1, logprobs=None),
                 headers=auth(t))
        statuses.append(r.status)
        if r.status == 429:
            break
    assert statuses[:6] == [200] * 6 and statuses[-1] == 429
    assert int(r.headers["retry-after"]) >= 1 and r.headers["ratelimit-remaining"] == "0"
    assert r.json()["error"]["type"] == "rate_limit_error"
    # nothing held for the refused request (the last admitted one settles just after its answer)
    assert wait_for(lambda: stack.budget(t)["requests_per_minute"].reserved == 0)
    other = call("POST", stack.envoy.url + "/v1/completions", completion(max_tokens=1), headers=auth(key()))
    assert other.status == 200  # budgets are per client

"""Budgets across real sidecar processes: three sharing one store (sqlite, redis), kill -9 of a sidecar under
load, Redis going away mid-run, a corrupt state file, and `distillguard budget show`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.redis_server import RedisServer
from support.sidecar import ROOT, SidecarProcess, write_config

from defense.types import Decision, Prompt, RequestContext, Usage
from server_plugins.client import AsyncSidecarClient, SidecarClient, SidecarError

pytestmark = pytest.mark.integration
ADMIN = "budget-admin-token"
ENV = {"DISTILLGUARD_ADMIN_TOKEN": ADMIN}
LIMIT = 2000  # tokens; each request reserves 10 prompt + 90 completion = 100
RESERVATION = 100


def budget_config(tmp: Path, uri: str, *, limits: dict | None = None, **params) -> Path:
    # a day's sliding window: nothing slides out while a test runs, so counts are exact
    limits = limits or {"tokens": {"unit": "total_tokens", "amount": LIMIT, "period_s": 86400,
                                   "window": "sliding_window"}}
    return write_config(tmp, overrides={
        "state": {"uri": uri},
        "defenses": [{"type": "budget", "params": {"limits": limits, **params}}],
    })


def ctx(rid: str, client: str = "c_shared", **kw) -> RequestContext:
    kw.setdefault("prompt", Prompt(text=f"request {rid}"))
    return RequestContext(request_id=rid, client_id=client, model="tiny", prompt_tokens=10, max_tokens=90, **kw)


def tokens_used(target: str, client: str = "c_shared") -> tuple[int, int]:
    with SidecarClient(target, admin_token=ADMIN, timeout_s=5) as c:
        lim = {x.name: x for x in c.get_budget(client).limits}["tokens"]
    return lim.used, lim.reserved


def metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_three_sidecars_sharing_a_store_never_overspend(tmp_path, backend, request):
    if backend == "redis":
        srv = request.getfixturevalue("redis_server")
        uri = srv.uri.replace("/0", "/1")  # a database of its own
    else:
        uri = f"sqlite:///{tmp_path}/shared/state.db"
    procs = []
    try:
        for i in range(3):
            d = tmp_path / f"s{i}"
            d.mkdir()
            procs.append(SidecarProcess(budget_config(d, uri), env=ENV))

        async def burst() -> list[tuple[int, bool]]:
            clients = [AsyncSidecarClient(p.target, timeout_s=10) for p in procs]
            try:
                results = await asyncio.gather(*(clients[i % 3].admit(ctx(f"b{i}")) for i in range(100)))
                admitted = [i for i, r in enumerate(results) if r.decision is Decision.ALLOW]
                assert all(r.decision is Decision.THROTTLE for r in results if not r.allowed)
                # every admitted request uses all it reserved
                await asyncio.gather(*(clients[i % 3].settle(ctx(f"b{i}"), Usage(prompt_tokens=10, completion_tokens=90))
                                       for i in admitted))
                return [(i, True) for i in admitted]
            finally:
                for c in clients:
                    await c.close()

        admitted = asyncio.run(burst())
        spent = len(admitted) * RESERVATION
        assert spent <= LIMIT + RESERVATION, (len(admitted), spent)
        assert len(admitted) >= 10  # budget held back by the other processes' leases is bounded
        used, reserved = tokens_used(procs[0].target)
        assert used + reserved <= LIMIT + RESERVATION
        print(f"{backend}: {len(admitted)} of 100 admitted, {spent} tokens spent, limit {LIMIT}")
    finally:
        for p in procs:
            p.stop()


def test_kill_9_mid_load_loses_no_settled_charge(tmp_path):
    """sqlite: every Settle the client saw succeed is in the file after a kill -9 and a restart."""
    uri = f"sqlite:///{tmp_path}/state.db"
    # 366 days: the bucket drains 10^7 / 31.6 M s, about 0.3 tokens a second
    limits = {"tokens": {"unit": "total_tokens", "amount": 10_000_000, "period_s": 366 * 86400}}
    cfg = budget_config(tmp_path, uri, limits=limits)
    proc = SidecarProcess(cfg, env=ENV)
    settled = {"tokens": 0, "requests": 0}
    stop = threading.Event()

    def load() -> None:
        with SidecarClient(proc.target, timeout_s=2) as c:
            i = 0
            while not stop.is_set():
                try:
                    c.admit(ctx(f"k{i}", client="c_kill"))
                    if c.settle(ctx(f"k{i}", client="c_kill"), Usage(prompt_tokens=10, completion_tokens=7 + i % 50)):
                        settled["tokens"] += 17 + i % 50
                        settled["requests"] += 1
                except SidecarError:
                    return  # the sidecar is gone
                i += 1

    t = threading.Thread(target=load)
    t.start()
    time.sleep(1.5)
    os.kill(proc.proc.pid, signal.SIGKILL)
    t.join(10)
    stop.set()
    proc.proc.wait(10)
    proc.stop()
    assert settled["requests"] > 20
    again = SidecarProcess(cfg, env=ENV)
    try:
        used, reserved = tokens_used(again.target, "c_kill")
        assert used + reserved + 5 >= settled["tokens"]  # 5: what ~15 s of draining could have taken
        # and bounded: the killed process's unused lease (16 requests' worth) and the request in flight
        assert used + reserved <= settled["tokens"] + 17 * RESERVATION
    finally:
        again.stop()
    print(f"kill -9: {settled['requests']} settled requests, {settled['tokens']} tokens; after restart the "
          f"file holds {used + reserved}")


def test_redis_going_away_mid_run(tmp_path):
    srv = RedisServer(tmp_path / "redis")
    cfg = budget_config(tmp_path, srv.uri, on_store_unavailable="local", store_retry_s=0.5, store_timeout_s=2.0)
    proc = SidecarProcess(cfg, env=ENV)
    try:
        with SidecarClient(proc.target, timeout_s=5) as c:
            for i in range(4):
                assert c.admit(ctx(f"r{i}", client="c_r")).allowed
            assert c.settle(ctx("r0", client="c_r"), Usage(prompt_tokens=10, completion_tokens=10))
            srv.stop()
            during = [c.admit(ctx(f"d{i}", client="c_r")) for i in range(5)]
            assert all(r.allowed for r in during)  # local limits, as configured
            assert c.settle(ctx("r1", client="c_r"), Usage(prompt_tokens=10, completion_tokens=10))  # queued
            assert c.settle(ctx("d0", client="c_r"), Usage(prompt_tokens=10, completion_tokens=10))  # local
            assert metric(proc.metrics_port, "distillguard_state_store_fallback") == 1
            assert metric(proc.metrics_port, "distillguard_state_store_errors_total") >= 1
            with grpc.insecure_channel(proc.target) as ch:
                assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING
            srv.start()
            time.sleep(0.6)  # past store_retry_s
            assert c.admit(ctx("after", client="c_r")).allowed  # back on Redis; the queued settle replayed
            assert metric(proc.metrics_port, "distillguard_state_store_fallback") == 0
            assert not c.settle(ctx("r1", client="c_r"), Usage(prompt_tokens=10, completion_tokens=10))
        used, reserved = tokens_used(proc.target, "c_r")
        # in Redis: r0 and r1 charged 20 each, once; r2, r3 and "after" still reserved
        assert (used, reserved) == (40, 3 * RESERVATION)
        assert "budget store redis failed" in proc.log()
    finally:
        proc.stop()
        srv.stop()


@pytest.mark.parametrize("content, words", [
    (b"garbage, not sqlite" * 200, "is not a usable sqlite database"),
    (b"SQLite format 3\x00" + os.urandom(8000), "is not a usable sqlite database"),
])
def test_corrupt_state_file_refuses_to_start_with_a_clear_error(tmp_path, content, words):
    (tmp_path / "state.db").write_bytes(content)
    cfg = budget_config(tmp_path, f"sqlite:///{tmp_path}/state.db")
    r = subprocess.run([sys.executable, "-m", "defense.cli", "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "state.uri" in r.stderr and "move it aside" in r.stderr


def test_budget_show_through_get_budget(tmp_path):
    cfg = budget_config(tmp_path, f"sqlite:///{tmp_path}/state.db", tiers={"default": {"max_parallel": 8}})
    proc = SidecarProcess(cfg, env=ENV)
    try:
        with SidecarClient(proc.target, timeout_s=5) as c:
            c.admit(ctx("s1", client="c_cli"))
            c.settle(ctx("s1", client="c_cli"), Usage(prompt_tokens=10, completion_tokens=30))
            c.admit(ctx("s2", client="c_cli"))
        cmd = [sys.executable, "-m", "defense.cli", "budget", "show", "c_cli", "--target", proc.target]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT, env={**os.environ, **ENV})
        assert r.returncode == 0, r.stderr
        assert "tier default" in r.stdout and "tokens" in r.stdout and "max_parallel" in r.stdout
        line = next(x for x in r.stdout.splitlines() if x.startswith("tokens "))
        assert line.split()[3:6] == ["40", "100", str(LIMIT - 140)]  # used, reserved, remaining
        r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30, cwd=ROOT,
                           env={**os.environ, **ENV})
        assert '"suspicion_score"' in r.stdout and '"client_id": "c_cli"' in r.stdout
        env = {k: v for k, v in os.environ.items() if k != "DISTILLGUARD_ADMIN_TOKEN"}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT, env=env)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr and "DISTILLGUARD_ADMIN_TOKEN" in r.stderr
    finally:
        proc.stop()

"""The Redis store against a real redis-server: Lua arithmetic equal to strategy.py, hash tags, TTLs,
password, and the outage policy when the server goes away and comes back."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import sample
from hypothesis import HealthCheck, given, settings
from support.budget_fuzz import OPS, drive, fuzz_plan
from support.redis_server import RedisServer

from defense.metrics import Metrics
from defense.throttle.memory import MemoryStore
from defense.throttle.redis import RedisStore
from defense.throttle.store import OK, UNAVAILABLE, StoreOptions
from defense.throttle.strategy import CONCURRENCY, SLIDING_WINDOW, TOKEN_BUCKET, Bucket, Plan

pytestmark = pytest.mark.integration
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"), password="s3cret")
    yield srv
    srv.stop()


@pytest.fixture
def store(redis_server):
    import redis

    redis.Redis.from_url(redis_server.uri).flushall()
    s = RedisStore(redis_server.uri, metrics=Metrics())
    s.configure(StoreOptions(timeout_s=1.0))
    yield s
    s.close()


def _plan(group="g1", shadow=False):
    return Plan((
        Bucket.make(key="n|req|tb", algo=TOKEN_BUCKET, cap=20, period=60.0, unit=0, limit="req",
                    unit_name="requests", scope="client"),
        Bucket.make(key="n|tok|sw", algo=SLIDING_WINDOW, cap=3000, period=100.0, unit=3, limit="tok",
                    unit_name="total_tokens", scope="client", shadow=shadow),
        Bucket.make(key="n|lp|tb", algo=TOKEN_BUCKET, cap=900, period=30.0, unit=4, limit="lp",
                    unit_name="logprob_values", scope="client"),
        Bucket.make(key="n|par", algo=CONCURRENCY, cap=4, period=1.0, unit=5, limit="max_parallel",
                    unit_name="requests_in_flight", scope="client"),
    ), "default", group)


def test_lua_agrees_with_the_python_strategies(store):
    """The same random reserve/settle sequence through MemoryStore and RedisStore gives the same answers."""
    rng = random.Random(5)
    mem = MemoryStore()
    plan = _plan()
    t = T0
    open_: list[str] = []
    for i in range(400):
        t += rng.expovariate(1 / 0.7)
        if open_ and rng.random() < 0.45:
            rk = open_.pop(rng.randrange(len(open_)))
            p, c = rng.randint(0, 50), rng.randint(0, 400)
            actual = (1, p, c, p + c, rng.choice([0, c * 3]), 0)
            assert store.settle(rk, plan, actual, t, 900.0) == mem.settle(rk, plan, actual, t, 900.0)
            continue
        p, c = rng.randint(1, 60), rng.randint(1, 300)
        amounts = (1, p, c, p + c, rng.choice([0, c * 2, c * 5]), 1)
        rk = f"r{i}"
        got, want = store.reserve(rk, plan, amounts, t, 40.0), mem.reserve(rk, plan, amounts, t, 40.0)
        assert got[0] == want[0], (i, got, want)
        assert got[1] == pytest.approx(want[1], rel=1e-6, abs=1e-6)
        assert got[2] == pytest.approx(want[2], rel=1e-6, abs=1e-9)
        if got[0] == OK:
            open_.append(rk)
        if i % 50 == 49:
            for (u1, r1, _), (u2, r2, _) in zip(store.status(plan, t), mem.status(plan, t), strict=True):
                assert u1 == pytest.approx(u2, abs=1e-6) and r1 == pytest.approx(r2, abs=1e-6)


def test_keys_share_a_hash_tag_and_expire(store, redis_server):
    import redis

    plan = _plan(group="budget:abc123")
    assert store.reserve("tenant\x1fc_1\x1fr1", plan, (1, 5, 5, 10, 0, 1), T0, 60.0)[0] == OK
    r = redis.Redis.from_url(redis_server.uri)
    keys = [k.decode() for k in r.keys("*")]
    assert keys and all("{budget:abc123}" in k for k in keys)  # one cluster slot for one client's call
    assert all(r.pttl(k) > 0 for k in keys)  # nothing lives forever
    assert store.settle("tenant\x1fc_1\x1fr1", plan, (1, 5, 1, 6, 0, 0), T0 + 1, 900.0) is True
    assert store.settle("tenant\x1fc_1\x1fr1", plan, (1, 5, 1, 6, 0, 0), T0 + 1, 900.0) is False


def test_a_plan_without_buckets_still_reserves_and_settles_once(store):
    empty = Plan((), "default", "g2")
    assert store.reserve("e1", empty, (1, 1, 1, 2, 0, 1), T0, 30.0)[0] == OK
    assert store.settle("e1", empty, (1, 1, 1, 2, 0, 0), T0, 900.0) is True
    assert store.settle("e1", empty, (1, 1, 1, 2, 0, 0), T0, 900.0) is False
    assert store.status(empty, T0) == []


def test_expired_reservations_come_back_without_a_sweeper(store):
    plan = _plan()
    for i in range(4):
        assert store.reserve(f"x{i}", plan, (1, 1, 1, 2, 0, 1), T0, 30.0)[0] == OK
    assert store.reserve("x4", plan, (1, 1, 1, 2, 0, 1), T0, 30.0)[0] == 3  # max_parallel
    assert store.reserve("x4", plan, (1, 1, 1, 2, 0, 1), T0 + 31, 30.0)[0] == OK  # the next call released them
    assert store.settle("x0", plan, (1, 1, 1, 2, 0, 0), T0 + 32, 900.0) is True  # late: charged as unknown
    assert sample(store.metrics, "distillguard_state_store_events_total", backend="redis",
                  event="reservation_expired") == 4


def test_wrong_password_is_an_error_counted_not_a_crash(redis_server):
    s = RedisStore(redis_server.uri.replace("s3cret", "wrong"), metrics=Metrics())
    s.configure(StoreOptions(on_unavailable="refuse", timeout_s=0.5))
    assert s.reserve("a", _plan(), (1, 1, 1, 2, 0, 1), T0, 30.0)[0] == UNAVAILABLE
    assert sample(s.metrics, "distillguard_state_store_errors_total", backend="redis", op="reserve") == 1
    s.close()


@pytest.mark.parametrize("policy", ["local", "refuse"])
def test_redis_going_away_and_back(tmp_path, policy):
    srv = RedisServer(tmp_path / "r")
    m = Metrics()
    s = RedisStore(srv.uri, metrics=m)
    # a stopped server refuses connections at once; the timeout only has to outlast a loaded machine
    s.configure(StoreOptions(on_unavailable=policy, retry_s=1.0, timeout_s=2.0))
    plan = _plan()
    try:
        for i in range(3):
            assert s.reserve(f"r{i}", plan, (1, 10, 10, 20, 0, 1), T0, 60.0)[0] == OK
        assert s.settle("r0", plan, (1, 10, 5, 15, 0, 0), T0, 900.0) is True
        srv.stop()
        code = s.reserve("during", plan, (1, 10, 10, 20, 0, 1), T0 + 1, 60.0)[0]
        assert code == (OK if policy == "local" else UNAVAILABLE)
        assert sample(m, "distillguard_state_store_fallback", backend="redis") == 1
        assert sample(m, "distillguard_state_store_errors_total", backend="redis", op="reserve") >= 1
        assert s.settle("r1", plan, (1, 10, 5, 15, 0, 0), T0 + 1.5, 900.0) is True  # queued
        srv.start()
        assert s.reserve("after", plan, (1, 10, 10, 20, 0, 1), T0 + 3, 60.0)[0] == OK  # retried: back, replayed
        assert sample(m, "distillguard_state_store_fallback", backend="redis") == 0
        assert s.settle("r1", plan, (1, 10, 5, 15, 0, 0), T0 + 4, 900.0) is False  # the replay charged it, once
        used = s.status(plan, T0 + 4)
        assert used[1][0] == pytest.approx(30)  # tokens: r0 and r1 settled at 15 each; r2 and "after" reserved
        assert used[1][1] == pytest.approx(40)
    finally:
        s.close()
        srv.stop()


def _certs(d: Path) -> tuple[Path, Path, Path]:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return d / "server.pem", d / "server.key", d / "ca.pem"


def test_rediss_with_password(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    srv = RedisServer(tmp_path / "tls", password="pa55", tls=_certs(tmp_path))
    s = RedisStore(srv.uri, metrics=Metrics())
    s.configure(StoreOptions(timeout_s=2.0, on_unavailable="refuse"))
    try:
        assert srv.uri.startswith("rediss://:pa55@")
        assert s.reserve("t1", _plan(), (1, 10, 10, 20, 0, 1), T0, 60.0)[0] == OK
        assert s.settle("t1", _plan(), (1, 10, 5, 15, 0, 0), T0 + 1, 900.0) is True
        assert s.status(_plan(), T0 + 1)[1][0] == pytest.approx(15)
        assert sample(s.metrics, "distillguard_state_store_errors_total", backend="redis", op="reserve") == 0
    finally:
        s.close()
        srv.stop()



@pytest.mark.parametrize("window", [TOKEN_BUCKET, SLIDING_WINDOW])
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=OPS)
def test_two_replicas_never_overspend_and_redis_holds_what_was_charged(redis_server, window, ops):
    """support.budget_fuzz's interleavings through two RedisStore replicas sharing one server."""
    import redis

    redis.Redis.from_url(redis_server.uri).flushall()

    def replica() -> RedisStore:
        s = RedisStore(redis_server.uri, metrics=Metrics())
        s.configure(StoreOptions(timeout_s=1.0))
        return s

    drive([replica(), replica()], fuzz_plan(window), ops, replica)

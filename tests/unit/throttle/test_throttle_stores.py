"""Stores under an injected clock: atomic reserve, settle once, expiry, leases shared through one sqlite file,
corrupt files, and the outage policy of shared stores."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from conftest import sample

from defense.errors import ConfigError
from defense.metrics import Metrics
from defense.throttle.memory import MemoryStore
from defense.throttle.shared import SharedStore
from defense.throttle.sqlite import SqliteStore, sqlite_path
from defense.throttle.store import OK, UNAVAILABLE, StoreError, StoreOptions
from defense.throttle.strategy import CONCURRENCY, SLIDING_WINDOW, TOKEN_BUCKET, Bucket, Plan

T0 = 1_000_000.0
TTL = 60.0
DEDUP = 300.0
# amounts tuple: (requests, prompt, completion, total, logprob_values, parallel)
REQ = (1, 10, 90, 100, 0, 1)


def plan(*, tokens=1000.0, requests=100.0, parallel=None, window=TOKEN_BUCKET, period=3600.0, shadow=False):
    b = [Bucket.make(key=f"t|req|{period}", algo=window, cap=requests, period=period, unit=0, limit="req",
                     unit_name="requests", scope="client"),
         Bucket.make(key=f"t|tok|{period}", algo=window, cap=tokens, period=period, unit=3, limit="tok",
                     unit_name="total_tokens", scope="client", shadow=shadow)]
    if parallel is not None:
        b.append(Bucket.make(key="t|par", algo=CONCURRENCY, cap=parallel, period=1.0, unit=5, limit="max_parallel",
                             unit_name="requests_in_flight", scope="client"))
    return Plan(tuple(b), "default", "g")


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else SqliteStore(str(tmp_path / "state.db"))
    s.configure(StoreOptions())
    yield s
    s.close()


def used(store, p, now=T0):
    return [round(u) for u, _, _ in store.status(p, now)]


def test_reserve_settle_refund_and_idempotency(store):
    p = plan()
    assert store.reserve("r1", p, REQ, T0, TTL)[0] == OK
    assert store.reserve("r1", p, REQ, T0, TTL)[0] == OK  # a retried Admit holds nothing more
    st = store.status(p, T0)
    assert round(st[1][1]) == 100 and round(st[1][0]) == 0  # reserved, not yet used
    assert store.settle("r1", p, (1, 10, 30, 40, 0, 0), T0, DEDUP) is True
    assert store.settle("r1", p, (1, 10, 30, 40, 0, 0), T0, DEDUP) is False  # charged once
    assert used(store, p) == [1, 40]
    assert [round(r) for _, r, _ in store.status(p, T0)] == [0, 0]


def test_throttles_with_retry_after_and_takes_nothing_on_refusal(store):
    p = plan(tokens=250.0)
    assert store.reserve("a", p, REQ, T0, TTL)[0] == OK
    assert store.reserve("b", p, REQ, T0, TTL)[0] == OK
    code, retry, _, _ = store.reserve("c", p, REQ, T0, TTL)
    assert code == 1  # the token limit refused; the request limit took nothing either
    assert retry == pytest.approx(50 / (250 / 3600), rel=1e-6)
    assert used(store, p)[0] + [round(r) for _, r, _ in store.status(p, T0)][0] == 2
    assert store.reserve("c", p, REQ, T0 + retry + 0.01, TTL)[0] == OK


def test_a_request_larger_than_the_limit_is_never_admitted(store):
    code, retry, _, _ = store.reserve("big", plan(tokens=50.0), REQ, T0, TTL)
    assert code == 1 and retry == float("inf")


def test_zero_cost_units_pass_a_bucket_that_is_over(store):
    p = plan(tokens=100.0)
    store.reserve("a", p, REQ, T0, TTL)
    store.settle("a", p, (1, 10, 200, 210, 0, 0), T0, DEDUP)  # used more than reserved: charged anyway
    assert used(store, p)[1] == 210
    assert store.reserve("b", p, (1, 0, 0, 0, 0, 1), T0, TTL)[0] == OK


def test_unknown_settle_charges_actuals(store):
    p = plan()
    assert store.settle("never-admitted", p, (1, 5, 5, 10, 0, 0), T0, DEDUP) is True
    assert used(store, p) == [1, 10]


def test_unsettled_reservations_expire(store):
    p = plan(tokens=150.0)
    assert store.reserve("a", p, REQ, T0, TTL)[0] == OK
    assert store.reserve("b", p, REQ, T0, TTL)[0] != OK
    # past the TTL the reservation is released (tokens drain too slowly to explain it: 150 per hour)
    assert store.reserve("b", p, REQ, T0 + TTL + 3, TTL)[0] == OK
    assert store.settle("a", p, (1, 10, 10, 20, 0, 0), T0 + TTL + 3, DEDUP) is True  # late: charged as unknown


def test_sliding_window_reservation_refunds_into_its_window(store):
    p = plan(window=SLIDING_WINDOW, period=100.0, tokens=1000.0)
    t = 90 * 100.0 + 95  # 5 s before a window boundary
    store.reserve("a", p, REQ, t, TTL)
    store.settle("a", p, (1, 10, 10, 20, 0, 0), t + 10, DEDUP)  # settled in the next window
    # 20 counted in the previous window, weighted by the 85% of it still ahead
    assert store.status(p, t + 20)[1][0] == pytest.approx(20 * 0.85, abs=0.5)


def test_shadow_limits_count_without_refusing(store):
    p = plan(tokens=150.0, shadow=True)
    assert store.reserve("a", p, REQ, T0, TTL)[3] is False
    code, _, _, over = store.reserve("b", p, REQ, T0, TTL)
    assert code == OK and over is True


def test_max_parallel(store):
    p = plan(parallel=2)
    assert store.reserve("a", p, REQ, T0, TTL)[0] == OK
    assert store.reserve("b", p, REQ, T0, TTL)[0] == OK
    code, retry, _, _ = store.reserve("c", p, REQ, T0, TTL)
    assert code == 2 and retry == 1.0
    store.settle("a", p, (1, 10, 10, 20, 0, 0), T0, DEDUP)
    assert store.reserve("c", p, REQ, T0, TTL)[0] == OK


# -- sqlite: several processes on one file (one SqliteStore each: separate connections) ----------------
def _two(tmp_path, **opts):
    a, b = SqliteStore(str(tmp_path / "s.db")), SqliteStore(str(tmp_path / "s.db"))
    for s in (a, b):
        s.configure(StoreOptions(**opts))
    return a, b


def test_sqlite_processes_never_overspend_together(tmp_path):
    a, b = _two(tmp_path)
    p = plan(tokens=2000.0, requests=10_000.0)
    admitted = 0
    for i in range(60):
        s = (a, b)[i % 2]
        if s.reserve(f"r{i}", p, REQ, T0, TTL)[0] == OK:
            admitted += 1
    assert admitted * 100 <= 2000
    # leases only ever hold back unused budget: close to the limit is still admitted
    assert admitted >= 18
    a.close()
    b.close()


def test_sqlite_kill_loses_no_settled_charge_and_restart_sees_it(tmp_path):
    a = SqliteStore(str(tmp_path / "s.db"))
    a.configure(StoreOptions())
    p = plan(tokens=100_000.0, requests=100_000.0)
    settled = 0
    for i in range(30):
        a.reserve(f"r{i}", p, REQ, T0, TTL)
        if i < 20:
            a.settle(f"r{i}", p, (1, 10, 30, 40, 0, 0), T0, DEDUP)
            settled += 40
    a._conn.close()  # killed: no close(), its leases are never handed back
    c = SqliteStore(str(tmp_path / "s.db"))
    tokens_used = c.status(p, T0)[1][0]
    assert tokens_used >= settled
    # and bounded: settled + what the ten open reservations held + one unused lease (16 requests' worth)
    assert tokens_used <= settled + 10 * 100 + 16 * 100
    # a retried Settle reaching the restarted process is charged once
    assert c.settle("r3", p, (1, 10, 30, 40, 0, 0), T0, DEDUP) is False
    c.close()


def test_sqlite_close_hands_leases_back(tmp_path):
    a, b = _two(tmp_path)
    p = plan(tokens=10_000.0)
    for i in range(5):
        a.reserve(f"r{i}", p, REQ, T0, TTL)
        a.settle(f"r{i}", p, (1, 10, 30, 40, 0, 0), T0, DEDUP)
    assert b.status(p, T0)[1][0] > 5 * 40  # a's unused lease counts as used while a runs
    a.close()
    assert b.status(p, T0)[1][0] == pytest.approx(5 * 40)
    b.close()


def test_sqlite_settle_elsewhere_charges_once(tmp_path):
    a, b = _two(tmp_path)
    p = plan()
    a.reserve("r", p, REQ, T0, TTL)
    assert b.settle("r", p, (1, 10, 30, 40, 0, 0), T0, DEDUP) is True  # admitted by a, settled by b
    assert a.settle("r", p, (1, 10, 30, 40, 0, 0), T0, DEDUP) is False  # the retry reaching a: released
    a.close()
    b.close()
    c = SqliteStore(str(tmp_path / "s.db"))
    assert c.status(p, T0)[1][0] == pytest.approx(40)
    c.close()


def test_sqlite_settle_marker_alone_still_dedups_both_ways(tmp_path):
    """The usual settle (this process holds the reservation, its leases absorb the usage) writes only the
    marker, in one statement: a retry elsewhere, before or after it, is still charged once."""
    a, b = _two(tmp_path)
    p = plan()
    use = (1, 10, 30, 40, 0, 0)
    for rid in ("warm", "r1", "r2"):
        a.reserve(rid, p, REQ, T0, TTL)
    assert a.settle("warm", p, use, T0, DEDUP) is True  # sets the marker generation: the next ones take the short path
    assert a.settle("r1", p, use, T0, DEDUP) is True
    assert b.settle("r1", p, use, T0, DEDUP) is False  # the retry reaching b
    assert b.settle("r2", p, use, T0, DEDUP) is True  # b first this time (charges the file)...
    assert a.settle("r2", p, use, T0, DEDUP) is False  # ...and a's short path sees its marker: released
    a.close()
    b.close()
    c = SqliteStore(str(tmp_path / "s.db"))
    assert c.status(p, T0)[1][0] == pytest.approx(3 * 40)  # warm, r1, r2: once each
    c.close()


@pytest.mark.parametrize("window", [TOKEN_BUCKET, SLIDING_WINDOW])
def test_sqlite_usage_above_the_reservation_is_leased_and_charged_in_full(tmp_path, window):
    """Answers larger than reserved (a tensor output whose size the metadata left open reserves nothing for
    it): every overshoot is charged, from a lease taken once rather than a transaction per settle, and in
    the lease's own window (a sliding window's lease and the reservation's window can differ)."""
    m = Metrics()
    a = SqliteStore(str(tmp_path / "s.db"), metrics=m)
    b = SqliteStore(str(tmp_path / "s.db"))
    for s in (a, b):
        s.configure(StoreOptions())
    # nothing refills in the test's time; a sliding window's period puts T0 on a window start that is not 0
    period = 1e5 if window == SLIDING_WINDOW else 1e9
    base = plan(tokens=100_000.0, requests=100_000.0, window=window, period=period)
    values = Bucket.make(key="t|lv", algo=window, cap=100_000.0, period=period, unit=4, limit="lv",
                         unit_name="logprob_values", scope="client")
    p = Plan((*base.buckets, values), "default", "g")
    commit, commits = a._commit, []
    a._commit = lambda: (commits.append(1), commit())
    for i in range(40):
        now = T0 + i * 0.01
        assert a.reserve(f"r{i}", p, REQ, now, TTL)[0] == OK  # REQ reserves no values
        assert a.settle(f"r{i}", p, (1, 10, 140, 150, 10, 0), now, DEDUP) is True  # 50 tokens, 10 values over
    granted = sample(m, "distillguard_state_store_events_total", backend="sqlite", event="lease_granted")
    assert granted <= 12 and len(commits) <= 12  # leases and their top-ups (16 requests' worth each), not
    # a transaction per settle
    a.close()
    now = T0 + 0.4
    assert [round(u, 2) for u, _, _ in b.status(p, now)] == [40, 40 * 150, 40 * 10]
    b.close()


def test_sqlite_overshoot_near_the_limit_is_still_charged(tmp_path):
    """No lease to take (the limit is near): the overshoot goes to the file in the settle's transaction."""
    a = SqliteStore(str(tmp_path / "s.db"))
    a.configure(StoreOptions())
    p = plan(tokens=300.0, period=1e9)
    assert a.reserve("r", p, REQ, T0, TTL)[0] == OK
    assert a.settle("r", p, (1, 10, 390, 400, 0, 0), T0, DEDUP) is True  # beyond the whole limit
    a.close()
    c = SqliteStore(str(tmp_path / "s.db"))
    assert c.status(p, T0)[1][0] == pytest.approx(400, abs=0.01)
    c.close()


def _markers(path):
    with sqlite3.connect(path) as c:
        return sum(c.execute(f"SELECT count(*) FROM dg_settled{i}").fetchone()[0] for i in (0, 1))


@pytest.mark.parametrize("gen_changes", [False, True])
def test_sqlite_private_ids_settle_without_a_marker(tmp_path, gen_changes):
    """An id minted by this process's own front (private) is settled only here: its settle charges like any
    other but writes no marker row, on the short path and on the transaction path (a new marker generation)."""
    a, b = _two(tmp_path)
    p = plan(period=1e9)  # nothing refills in the test's time
    use = (1, 10, 30, 40, 0, 0)
    a.reserve("warm", p, REQ, T0, TTL)
    assert a.settle("warm", p, use, T0, DEDUP) is True
    assert _markers(tmp_path / "s.db") == 1
    now = T0 + DEDUP if gen_changes else T0
    for i in range(3):
        assert a.reserve(f"p{i}", p, REQ, now, TTL, private=True)[0] == OK
        assert a.settle(f"p{i}", p, use, now, DEDUP) is True
    assert _markers(tmp_path / "s.db") == 1  # the public id's only (a rotation keeps the previous table)
    a.reserve("pub", p, REQ, now, TTL)
    assert a.settle("pub", p, use, now, DEDUP) is True
    assert _markers(tmp_path / "s.db") == 2  # public ids still leave theirs
    a.close()
    assert b.status(p, now)[1][0] == pytest.approx(5 * 40, abs=0.01)  # every settle charged, once
    b.close()


def test_sqlite_max_parallel_across_processes(tmp_path):
    a, b = _two(tmp_path)
    p = plan(parallel=3)
    ok = [s.reserve(f"r{i}", p, REQ, T0, TTL)[0] == OK for i, s in enumerate((a, b, a, b, a, b))]
    assert sum(ok) == 3
    a.close()  # a's slots (in flight or spare) go back when it stops
    assert b.reserve("late", p, REQ, T0 + 1, TTL)[0] == OK
    b.close()


def test_sqlite_settle_markers_rotate(tmp_path):
    a = SqliteStore(str(tmp_path / "s.db"))
    p = plan()
    a.reserve("r", p, REQ, T0, TTL)
    assert a.settle("r", p, REQ, T0, DEDUP) is True
    assert a.settle("r", p, REQ, T0 + DEDUP, DEDUP) is False  # remembered into the next generation
    assert a.settle("r", p, REQ, T0 + 3 * DEDUP, DEDUP) is True  # forgotten two generations on
    a.close()


@pytest.mark.parametrize("content, words", [
    (b"this is not a database at all" * 100, "is not a usable sqlite database"),
    (b"SQLite format 3\x00" + b"\xff" * 4000, "is not a usable sqlite database"),
])
def test_corrupt_sqlite_file_is_a_clear_error(tmp_path, content, words):
    path = tmp_path / "state.db"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        SqliteStore(str(path))
    assert words in str(e.value) and "move it aside" in str(e.value) and str(path) in str(e.value)


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as c:
        c.execute("create table users(id integer)")
    with pytest.raises(ConfigError, match="not a distillguard state store"):
        SqliteStore(str(path))


def test_sqlite_uri_paths():
    assert sqlite_path("sqlite:///.distillguard/state.db") == ".distillguard/state.db"
    assert sqlite_path("sqlite:////var/lib/dg/state.db") == "/var/lib/dg/state.db"
    with pytest.raises(ConfigError):
        sqlite_path("sqlite://state.db")


# -- outage policy ---------------------------------------------------------------------------------------
class Flaky(SharedStore):
    """A shared store whose backend is a MemoryStore that can be switched off."""

    backend = "flaky"

    def __init__(self, metrics):
        super().__init__(metrics=metrics)
        self.inner = MemoryStore()
        self.up = True
        self.calls = 0

    def _check(self):
        self.calls += 1
        if not self.up:
            raise StoreError("down")

    def _reserve(self, rkey, plan, amounts, now, ttl, private):
        self._check()
        return self.inner.reserve(rkey, plan, amounts, now, ttl, private=private)

    def _settle(self, rkey, plan, actuals, now, dedup_s):
        self._check()
        return self.inner.settle(rkey, plan, actuals, now, dedup_s)

    def _status(self, plan, now):
        self._check()
        return self.inner.status(plan, now)


@pytest.mark.parametrize("policy", ["local", "refuse"])
def test_outage_policy_is_applied_counted_and_recovers(policy):
    m = Metrics()
    s = Flaky(m)
    s.configure(StoreOptions(on_unavailable=policy, retry_s=5.0, fallback_share=0.5))
    p = plan(tokens=1000.0)
    assert s.reserve("before", p, REQ, T0, TTL)[0] == OK
    s.up = False
    code = s.reserve("during", p, REQ, T0 + 1, TTL)[0]
    assert code == (OK if policy == "local" else UNAVAILABLE)
    assert sample(m, "distillguard_state_store_fallback", backend="flaky") == 1
    assert sample(m, "distillguard_state_store_errors_total", backend="flaky", op="reserve") == 1
    calls = s.calls
    for i in range(20):  # inside retry_s: the store is not tried again, no timeout per request
        s.reserve(f"d{i}", p, REQ, T0 + 2, TTL)
    assert s.calls == calls
    if policy == "local":  # the local stand-in holds half of each amount
        assert sum(s.reserve(f"x{i}", p, REQ, T0 + 2, TTL)[0] == OK for i in range(10)) <= 5
    assert s.settle("before", p, (1, 10, 30, 40, 0, 0), T0 + 3, DEDUP) is True  # queued
    s.up = True
    assert s.reserve("after", p, REQ, T0 + 10, TTL)[0] == OK
    assert sample(m, "distillguard_state_store_fallback", backend="flaky") == 0
    assert s.inner.settle("before", p, (1, 10, 30, 40, 0, 0), T0 + 11, DEDUP) is False  # replayed, once
    assert sample(m, "distillguard_state_store_events_total", backend="flaky", event="settle_replayed") == 1
    if policy == "local":  # settled where it was reserved
        assert s.settle("during", p, (1, 10, 30, 40, 0, 0), T0 + 11, DEDUP) is True
        u, r, _ = s.inner.status(p, T0 + 11)[0]
        assert u + r == pytest.approx(2, abs=0.5)  # "before" and "after" only (less 11 s of drain)


def test_sqlite_upkeep_tick_returns_an_idle_process_leases(tmp_path, clock):
    a, b = _two(tmp_path)
    a.clock = clock
    p = plan(tokens=10_000.0)
    a.reserve("r", p, REQ, clock.now(), TTL)
    a.settle("r", p, (1, 10, 30, 40, 0, 0), clock.now(), DEDUP)
    assert b.status(p, clock.now())[1][0] > 40  # a's lease
    clock.advance(3.0)  # past lease_ttl_s, and a gets no more requests
    a._tick()  # what the event loop runs every half second in a sidecar
    assert b.status(p, clock.now())[1][0] == pytest.approx(40 - 3 * 10_000 / 3600, abs=0.5)  # less 3 s of drain
    a.close()
    b.close()


def _granted(m):
    return sample(m, "distillguard_state_store_events_total", backend="sqlite", event="lease_granted")


def test_sqlite_lease_in_use_stays_and_goes_home_lease_ttl_after_its_last_use(tmp_path, clock):
    """A client sending a request a second takes budget from the file once (its lease covers 16 requests),
    not every lease_ttl_s (2 s); idle, the lease goes back lease_ttl_s after its last use."""
    m = Metrics()
    a, b = SqliteStore(str(tmp_path / "s.db"), metrics=m), SqliteStore(str(tmp_path / "s.db"))
    for s in (a, b):
        s.configure(StoreOptions())
    a.clock = clock
    p = plan(tokens=100_000.0, requests=100_000.0, period=1e7)  # drains ~0.01 a second: counts stay put
    for i in range(10):
        assert a.reserve(f"r{i}", p, REQ, clock.now(), TTL)[0] == OK
        assert a.settle(f"r{i}", p, (1, 10, 30, 40, 0, 0), clock.now(), DEDUP) is True
        a._tick()
        clock.advance(1.0)
    assert _granted(m) == 2  # one transaction, both buckets: no renewal while in use
    last = clock.now() - 1.0
    clock.advance(0.9)  # 1.9 s after the last use: still a's
    a._tick()
    assert b.status(p, clock.now())[0][0] == pytest.approx(16 - 0.11, abs=0.02)  # the whole lease, less 11 s of drain
    clock.advance(0.2)  # past lease_ttl_s since `last`
    assert clock.now() - last > 2.0
    a._tick()
    assert b.status(p, clock.now())[0][0] == pytest.approx(10 - 0.11, abs=0.02)  # only the ten settled requests
    assert a._bal == {} and a._bal_q == []
    a.close()
    b.close()


@pytest.mark.parametrize(("window", "period", "grants"), [(TOKEN_BUCKET, 3600.0, 3), (SLIDING_WINDOW, 40.0, 4)])
def test_sqlite_lease_in_use_is_renewed_at_its_latest_expiry(tmp_path, clock, window, period, grants):
    """A lease in use still goes back to the file at most 8 x lease_ttl_s (16 s) after its grant, sooner for a
    window shorter than 64 s (a quarter of the period): the usage share read at the grant stays recent, and
    a sliding window's lease is spent in the window it was counted in or the next."""
    m = Metrics()
    a = SqliteStore(str(tmp_path / "s.db"), metrics=m)
    a.configure(StoreOptions(lease_requests=1000))  # the lease never runs out here: only its age renews it
    a.clock = clock
    p = plan(tokens=1e9, requests=1e9, window=window, period=period)
    for i in range(40):
        assert a.reserve(f"r{i}", p, REQ, clock.now(), TTL)[0] == OK
        a.settle(f"r{i}", p, (1, 10, 30, 40, 0, 0), clock.now(), DEDUP)
        a._tick()
        assert len(a._bal_q) <= 2 * len(a._bal)  # one heap entry per live lease, plus replaced ones not yet due
        clock.advance(1.0)
    assert _granted(m) == 2 * grants  # at 0 and 16 and 32 s; at 0, 10, 20 and 30 s
    a.close()


def _transactions(store):
    """Wrap store._grant: the list of (needed, topped-up-ahead) bucket limits of each lease transaction."""
    seen = []
    grant = store._grant

    def spy(buckets, amounts, need, now, soon=()):
        seen.append(({buckets[i].limit for i in need}, {buckets[i].limit for i in soon}))
        return grant(buckets, amounts, need, now, soon)

    store._grant = spy
    return seen


@pytest.mark.parametrize("ahead", [True, False])
def test_sqlite_a_lease_transaction_also_tops_up_leases_about_to_run_short(tmp_path, ahead):
    """The token lease holds 10 requests' worth, the request lease 16: without top-ups ahead each runs out on
    its own schedule (12 transactions in 80 requests, 4 of them for the request lease alone); with them, a
    transaction either lease needs also fills the other back to a lease's worth when it has under half a
    lease left: here every token transaction refills the request lease, which never needs one of its own."""
    s = SqliteStore(str(tmp_path / "s.db"))
    s.configure(StoreOptions())
    seen = _transactions(s)
    if not ahead:
        grant = s._grant
        s._grant = lambda buckets, amounts, need, now, soon=(): grant(buckets, amounts, need, now)
    p = plan(tokens=20_000.0, requests=100_000.0, period=1e9)  # no drain: only what is taken moves
    for i in range(80):
        assert s.reserve(f"r{i}", p, REQ, T0, TTL)[0] == OK
        assert s.settle(f"r{i}", p, REQ[:5] + (0,), T0, DEDUP) is True
    own = [need for need, _ in seen[1:] if need == {"req"}]  # request lease refills not paid by the token one
    if ahead:
        assert len(seen) == 8 and not own
        assert [soon for _, soon in seen] == [set()] + [{"req"}] * 7
    else:
        assert len(seen) == 12 and len(own) == 4
    s.close()
    assert used(s_ := SqliteStore(str(tmp_path / "s.db")), p) == [80, 8000]  # all charged, leases returned
    s_.close()


def test_sqlite_in_a_running_loop_leases_are_topped_up_off_the_admission_path(tmp_path, clock):
    """In the sidecar (a running event loop) an admission that leaves a lease under a quarter of a lease
    queues its top-up for the loop's next turn: after the first grant, no admission pays a transaction."""
    s = SqliteStore(str(tmp_path / "s.db"))
    s.configure(StoreOptions())
    s.clock = clock
    seen = _transactions(s)
    where = []
    reserve = s.reserve

    def spy(*args, **kwargs):
        n = len(seen)
        out = reserve(*args, **kwargs)
        where.extend(["admission"] * (len(seen) - n))
        return out

    s.reserve = spy
    p = plan(tokens=20_000.0, requests=100_000.0, period=1e9)

    async def serve():
        for i in range(80):
            assert s.reserve(f"r{i}", p, REQ, clock.now(), TTL)[0] == OK
            assert s.settle(f"r{i}", p, REQ[:5] + (0,), clock.now(), DEDUP) is True
            n = len(seen)
            await asyncio.sleep(0)  # the loop's next turn
            where.extend(["next turn"] * (len(seen) - n))

    asyncio.run(serve())
    assert where[0] == "admission" and set(where[1:]) == {"next turn"} and len(where) > 5
    assert all(not need for need, _ in seen[1:])  # top-ups only: nothing was short
    s.close()
    assert used(s_ := SqliteStore(str(tmp_path / "s.db")), p) == [80, 8000]
    s_.close()


def test_sqlite_a_top_up_ahead_the_file_has_no_room_for_never_refuses(tmp_path):
    """a's request lease holds 2 requests' worth, its token lease 16, so a's transactions are mostly for
    requests and top its token lease up on the way. Once b has taken every token left in the file, those
    top-ups find no room: they are skipped, a goes on admitting from the token lease it holds, and only
    when that is spent does the file's refusal stand."""
    a, b = _two(tmp_path)
    p = plan(tokens=100_000.0, requests=40.0, period=1e9)
    seen = _transactions(a)
    for i in range(6):
        assert a.reserve(f"a{i}", p, REQ, T0, TTL)[0] == OK
    for x in [2 ** k for k in range(17, -1, -1)]:  # b takes all the file's tokens, biggest pieces first
        b._blocked.clear()  # (a refusal would otherwise keep b from asking again for a while)
        while b.reserve(f"b{x}-{len(b._res)}", p, (0, 0, 0, x, 0, 0), T0, TTL)[0] == OK:
            pass
    left = a._bal[p.buckets[1].key][0]
    before = len(seen)
    admitted, code = 0, OK
    while code == OK:
        code = a.reserve(f"a-more{admitted}", p, REQ, T0, TTL)[0]
        admitted += code == OK
    assert code == 1  # the token limit refused...
    assert admitted == left // 100 > 2  # ...once a's own token lease was spent, and not before
    asked = [need for need, soon in seen[before:] if "tok" in soon]
    assert asked and all(need == {"req"} for need in asked)  # top-ups asked for on the way, no room: skipped
    a.close()
    b.close()


def test_redis_uri_parsing():
    from defense.throttle.resp import parse_uri

    e = parse_uri("rediss://user:p%40ss@cache.example:6380/2?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none")
    assert (e.host, e.port, e.db, e.username, e.password, e.tls, e.ca_certs, e.verify) == \
        ("cache.example", 6380, 2, "user", "p@ss", True, "/ca.pem", False)
    assert "p@ss" not in repr(e)
    assert parse_uri("redis://:secret@localhost").password == "secret"
    for bad, words in (("redis://", "no host"), ("redis://h:x/0", "must be numbers"),
                       ("redis://h/0?timeout=3", "unknown query arguments"),
                       ("redis://h/0?ssl_cert_reqs=maybe", "required or none")):
        with pytest.raises(ValueError, match=words):
            parse_uri(bad)
    from defense.throttle.redis import RedisStore

    with pytest.raises(ConfigError, match="invalid redis URI") as e:
        RedisStore("redis://:hunter2@h:port/0")
    assert "hunter2" not in str(e.value)


def test_a_plan_without_buckets(store):
    empty = Plan((), "default", "g")
    assert store.reserve("e", empty, REQ, T0, TTL)[0] == OK
    assert store.settle("e", empty, REQ, T0, DEDUP) is True
    assert store.settle("e", empty, REQ, T0, DEDUP) is False
    assert store.status(empty, T0) == []

"""Two processes sharing one sqlite budget file, driven by any interleaving of reservations and settles
(usage below, at and above what was reserved, releases, private ids, settles of unknown ids, retried
settles, time passing past lease TTLs): they never admit more requests together than the limit, and once
every request is settled and both have closed, the file holds exactly what was charged."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defense.throttle.sqlite import SqliteStore
from defense.throttle.store import OK, StoreOptions
from defense.throttle.strategy import SLIDING_WINDOW, TOKEN_BUCKET, Bucket, Plan

T0 = 1_000_000.0
TTL = 600.0  # reservations outlive the test: none expires
DEDUP = 900.0
PERIOD = 1e9  # no refill worth counting within a run
REQS, TOKS = 40, 3000


def _plan(window: str) -> Plan:
    return Plan((Bucket.make(key="f|req", algo=window, cap=REQS, period=PERIOD, unit=0, limit="req",
                             unit_name="requests", scope="client"),
                 Bucket.make(key="f|tok", algo=window, cap=TOKS, period=PERIOD, unit=3, limit="tok",
                             unit_name="total_tokens", scope="client")), "default", "g")


_OPS = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 1), st.integers(0, 160), st.booleans()),
    st.tuples(st.just("settle"), st.integers(0, 1), st.integers(0, 250), st.sampled_from(["ok", "ok", "release"])),
    st.tuples(st.just("unknown"), st.integers(0, 1), st.integers(0, 150), st.just("")),
    st.tuples(st.just("wait"), st.just(0), st.sampled_from([0.1, 0.5, 2.5, 5.0]), st.just("")),
)


@pytest.mark.parametrize("window", [TOKEN_BUCKET, SLIDING_WINDOW])
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(_OPS, min_size=5, max_size=80), opts=st.sampled_from([{}, {"lease_requests": 1},
                                                                          {"lease_requests": 4, "lease_ttl_s": 0.5}]))
def test_two_processes_never_overspend_and_the_file_holds_what_was_charged(tmp_path_factory, window, ops, opts):
    path = str(tmp_path_factory.mktemp("fuzz") / "s.db")
    procs = [SqliteStore(path), SqliteStore(path)]
    for s in procs:
        s.configure(StoreOptions(**opts))
    p = _plan(window)
    now = T0
    open_: dict[str, tuple[int, bool, int]] = {}  # rid -> (process, private, tokens reserved)
    settled_once: set[str] = set()
    holding = 0  # admitted requests not released
    charged_req = charged_tok = 0
    n = 0
    for op, who, amount, flag in ops:
        if op == "wait":
            now += amount
            continue
        n += 1
        if op == "reserve":
            rid = f"r{n}"
            code = procs[who].reserve(rid, p, (1, 0, amount, amount, 0, 1), now, TTL, private=flag)[0]
            if code == OK:
                open_[rid] = (who, flag, amount)
                holding += 1
                assert holding <= REQS  # both processes together, leases included
        elif op == "settle" and open_:
            rid = sorted(open_)[amount % len(open_)]
            owner, private, _ = open_.pop(rid)
            actual = (1, 0, amount, amount, 0, 0) if flag == "ok" else (0, 0, 0, 0, 0, 0)
            # a private id is settled by the process that minted it; any other may be settled by either
            first = procs[owner if private else who].settle(rid, p, actual, now, DEDUP)
            assert first
            settled_once.add(rid)
            charged_req += actual[0]
            charged_tok += actual[3]
            if flag != "ok":
                holding -= 1
            if not private:  # a retry reaching the other process is charged nothing more
                assert procs[1 - (owner if private else who)].settle(rid, p, actual, now, DEDUP) is False
        elif op == "unknown":  # admitted by a process that is gone: charged as reported, once
            rid = f"gone{n}"
            assert procs[who].settle(rid, p, (1, 0, amount, amount, 0, 0), now, DEDUP)
            charged_req += 1
            charged_tok += amount
    for rid, (owner, _, reserved) in sorted(open_.items()):
        procs[owner].settle(rid, p, (1, 0, reserved, reserved, 0, 0), now, DEDUP)
        charged_req += 1
        charged_tok += reserved
    for s in procs:
        s.close()
    reader = SqliteStore(path)
    (req_used, req_res, _), (tok_used, tok_res, _) = reader.status(p, now)
    reader.close()
    assert req_res == pytest.approx(0, abs=1e-6) and tok_res == pytest.approx(0, abs=1e-6)
    assert req_used == pytest.approx(charged_req, abs=0.01)
    assert tok_used == pytest.approx(charged_tok, abs=0.5)

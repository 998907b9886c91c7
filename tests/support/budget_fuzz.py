"""Budget stores driven by any interleaving of reservations and settles from two processes (usage below,
at and above what was reserved, releases, private ids, settles of unknown ids, retried settles, time passing
past lease TTLs), with what must hold throughout and at the end. Used for the sqlite and the Redis store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import strategies as st

from defense.throttle.store import OK, Store
from defense.throttle.strategy import Bucket, Plan

T0 = 1_800_000_000.0
TTL = 600.0  # reservations outlive a run: none expires
DEDUP = 900.0
PERIOD = 1e9  # no refill worth counting within a run
REQS, TOKS = 40, 3000


def fuzz_plan(window: str, ns: str = "f") -> Plan:
    return Plan((Bucket.make(key=f"{ns}|req", algo=window, cap=REQS, period=PERIOD, unit=0, limit="req",
                             unit_name="requests", scope="client"),
                 Bucket.make(key=f"{ns}|tok", algo=window, cap=TOKS, period=PERIOD, unit=3, limit="tok",
                             unit_name="total_tokens", scope="client")), "default", ns)


OPS = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 1), st.integers(0, 160), st.booleans()),
    st.tuples(st.just("settle"), st.integers(0, 1), st.integers(0, 250), st.sampled_from(["ok", "ok", "release"])),
    st.tuples(st.just("unknown"), st.integers(0, 1), st.integers(0, 150), st.just("")),
    st.tuples(st.just("wait"), st.just(0), st.sampled_from([0.1, 0.5, 2.5, 5.0]), st.just("")),
), min_size=5, max_size=80)


def drive(procs: Sequence[Store], p: Plan, ops: Sequence[tuple[str, int, Any, Any]],
          reader: Callable[[], Store]) -> None:
    """Run ``ops`` on the two stores, checking that together they never hold more requests than the limit;
    then settle what is open, close both, and check with ``reader`` (a fresh store on the same state) that
    nothing is reserved and exactly what was charged is used."""
    now = T0
    open_: dict[str, tuple[int, bool, int]] = {}  # rid -> (process, private, tokens reserved)
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
            if procs[who].reserve(rid, p, (1, 0, amount, amount, 0, 1), now, TTL, private=flag)[0] == OK:
                open_[rid] = (who, flag, amount)
                holding += 1
                assert holding <= REQS  # both processes together, leases included
        elif op == "settle" and open_:
            rid = sorted(open_)[amount % len(open_)]
            owner, private, _ = open_.pop(rid)
            actual = (1, 0, amount, amount, 0, 0) if flag == "ok" else (0, 0, 0, 0, 0, 0)
            by = owner if private else who  # a private id is settled where it was minted; others anywhere
            assert procs[by].settle(rid, p, actual, now, DEDUP)
            charged_req += actual[0]
            charged_tok += actual[3]
            if flag != "ok":
                holding -= 1
            if not private:  # a retry reaching the other process is charged nothing more
                assert procs[1 - by].settle(rid, p, actual, now, DEDUP) is False
        elif op == "unknown":  # admitted by a process that is gone: charged as reported, once
            assert procs[who].settle(f"gone{n}", p, (1, 0, amount, amount, 0, 0), now, DEDUP)
            charged_req += 1
            charged_tok += amount
    for rid, (owner, _, reserved) in sorted(open_.items()):
        procs[owner].settle(rid, p, (1, 0, reserved, reserved, 0, 0), now, DEDUP)
        charged_req += 1
        charged_tok += reserved
    for s in procs:
        s.close()
    r = reader()
    (req_used, req_res, _), (tok_used, tok_res, _) = r.status(p, now)
    r.close()
    assert req_res == pytest.approx(0, abs=1e-6) and tok_res == pytest.approx(0, abs=1e-6)
    assert req_used == pytest.approx(charged_req, abs=0.01)
    assert tok_used == pytest.approx(charged_tok, abs=0.5)

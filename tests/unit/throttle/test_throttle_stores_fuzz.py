"""Two processes sharing one sqlite budget file, driven by any interleaving of reservations and settles
(support.budget_fuzz): they never admit more requests together than the limit, and once every request is
settled and both have closed, the file holds exactly what was charged."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.budget_fuzz import OPS, drive, fuzz_plan

from defense.throttle.sqlite import SqliteStore
from defense.throttle.store import StoreOptions
from defense.throttle.strategy import SLIDING_WINDOW, TOKEN_BUCKET


@pytest.mark.parametrize("window", [TOKEN_BUCKET, SLIDING_WINDOW])
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=OPS, opts=st.sampled_from([{}, {"lease_requests": 1}, {"lease_requests": 4, "lease_ttl_s": 0.5}]))
def test_two_processes_never_overspend_and_the_file_holds_what_was_charged(tmp_path_factory, window, ops, opts):
    path = str(tmp_path_factory.mktemp("fuzz") / "s.db")
    procs = [SqliteStore(path), SqliteStore(path)]
    for s in procs:
        s.configure(StoreOptions(**opts))
    drive(procs, fuzz_plan(window), ops, lambda: SqliteStore(path))

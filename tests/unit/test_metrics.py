"""The hot-path metric families expose what prometheus_client's would: names, types, labels, buckets."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from defense.metrics import FastCounter, FastHistogram, Metrics

BOUNDS = (1e-4, 1e-3, 1e-2)


def _families(registry: CollectorRegistry) -> dict:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_histogram_matches_prometheus_clients_own():
    ours, ref = CollectorRegistry(), CollectorRegistry()
    h = FastHistogram("x_seconds", "doc", ["m"], ours, buckets=BOUNDS)
    r = Histogram("x_seconds", "doc", ["m"], registry=ref, buckets=BOUNDS)
    for v in (5e-5, 1e-4, 2e-4, 1e-3, 0.5, 0.0):  # bounds themselves count in their bucket (le)
        h.labels("a").observe(v)
        r.labels("a").observe(v)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in _families(ours)["x_seconds"].samples}
    want = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in _families(ref)["x_seconds"].samples
            if not s.name.endswith("_created")}
    assert got == want


def test_counter_exposition_and_errors():
    reg = CollectorRegistry()
    c = FastCounter("y_total", "doc", ["a", "b"], reg)
    c.labels("p", 1).inc()
    c.labels("p", "1").inc(2.5)  # label values are strings, as in prometheus_client
    assert reg.get_sample_value("y_total", {"a": "p", "b": "1"}) == 3.5
    fam = _families(reg)["y"]
    assert fam.type == "counter"
    with pytest.raises(ValueError, match="only go up"):
        c.labels("p", "1").inc(-1)
    with pytest.raises(ValueError, match="expected labels"):
        c.labels("p")


def test_concurrent_increments_are_not_lost():
    reg = CollectorRegistry()
    child = FastCounter("z_total", "doc", ["a"], reg).labels("x")

    def work():
        for _ in range(20_000):
            child.inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.get_sample_value("z_total", {"a": "x"}) == 80_000


def test_every_family_registers_once_and_scrapes():
    m = Metrics()
    m.rpc_duration.labels("Admit", "OK").observe(3e-5)
    m.requests.labels("allow", "false").inc()
    fams = _families(m.registry)
    assert fams["distillguard_rpc_duration_seconds"].type == "histogram"
    assert fams["distillguard_requests"].type == "counter"
    assert m.registry.get_sample_value("distillguard_rpc_duration_seconds_count", {"method": "Admit", "code": "OK"}) == 1

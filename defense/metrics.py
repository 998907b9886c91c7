"""Every Prometheus family distillguard exports, on an injected registry.

Labels are bounded: defense names and stages come from the config, decisions and results from enums.
Never a client id, tenant or request id: per-client detail goes to the audit log.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# 20 us .. 0.5 s: admission runs in tens of microseconds, a Protect of 256 x 20 in about a millisecond
_FAST_BUCKETS = (2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5)

PREFIX = "distillguard_"


class _CounterChild:
    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self.value += amount


class _HistogramChild:
    __slots__ = ("_bounds", "_lock", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._lock = threading.Lock()
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); the last is +Inf
        self.total = 0.0

    def observe(self, amount: float) -> None:
        i = bisect.bisect_left(self._bounds, amount)  # le semantics: a value equal to a bound counts in it
        with self._lock:
            self.counts[i] += 1
            self.total += amount


class _Family(Collector):
    """A labelled counter or histogram family on the hot path: ``labels(*values).inc()`` / ``.observe()``.

    prometheus_client's own families spend ~4 us per update in Python layers (exemplars, observability
    checks, value wrappers); an Admit makes a dozen updates. These keep a number (or bucket counts) per
    label set behind a lock and build the exposition only when scraped. Same names, types and labels.
    """

    _type = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self._name = name.removesuffix("_total") if self._type == "counter" else name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def _new_child(self) -> object:
        raise NotImplementedError

    def labels(self, *values: object) -> object:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {key}")
            with self._lock:
                child = self._children.setdefault(key, self._new_child())
        return child

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class FastCounter(_Family):
    _type = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def labels(self, *values: object) -> _CounterChild:
        return super().labels(*values)  # type: ignore[return-value]

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        for key, child in list(self._children.items()):
            fam.add_metric(key, child.value)  # type: ignore[attr-defined]
        yield fam


class FastHistogram(_Family):
    _type = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry, *,
                 buckets: Sequence[float]) -> None:
        self._bounds = tuple(float(b) for b in buckets)
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._bounds)

    def labels(self, *values: object) -> _HistogramChild:
        return super().labels(*values)  # type: ignore[return-value]

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        for key, child in list(self._children.items()):
            with child._lock:  # type: ignore[attr-defined]
                counts, total = list(child.counts), child.total  # type: ignore[attr-defined]
            cum, buckets = 0, []
            for bound, n in zip((*self._bounds, float("inf")), counts, strict=True):
                cum += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
            fam.add_metric(key, buckets, total)
        yield fam


class Metrics:
    """Holds the metric families; one instance per process, shared across config reloads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = FastCounter(
            PREFIX + "requests_total", "Admission decisions of the whole chain.", ["decision", "shadow"], r
        )
        self.defense_decisions = FastCounter(
            PREFIX + "defense_decisions_total",
            "Admission verdicts per defense; mode=shadow counts refusals that were let through.",
            ["defense", "decision", "mode"], r,
        )
        self.defense_duration = FastHistogram(
            PREFIX + "defense_duration_seconds", "Time spent in one defense call.", ["defense", "stage"],
            r, buckets=_FAST_BUCKETS,
        )
        self.defense_errors = FastCounter(
            PREFIX + "defense_errors_total", "Exceptions raised by a defense, by failure policy.",
            ["defense", "stage", "policy"], r,
        )
        self.shadow_effects = FastCounter(
            PREFIX + "shadow_effects_total",
            "Changes a shadow-mode defense would have made (refusals, rewrites, changed outputs).",
            ["defense", "stage"], r,
        )
        self.rewrites = FastCounter(
            PREFIX + "rewrites_total", "Request fields changed by admission defenses.", ["defense", "field"], r
        )
        self.values_changed = FastCounter(
            PREFIX + "response_values_changed_total", "Returned logprob or probability values changed by a defense.",
            ["defense"], r,
        )
        self.settles = FastCounter(
            PREFIX + "settles_total", "Settle calls by status; duplicate=true for retries charged once.",
            ["status", "duplicate"], r,
        )
        self.config_reloads = FastCounter(
            PREFIX + "config_reloads_total", "Config reload attempts; a failure keeps the last good config.",
            ["result"], r,
        )
        self.config_info = Gauge(
            PREFIX + "config_info", "The running config (1 for the active sha256).", ["sha256"], registry=r
        )
        self.build_info = Gauge(PREFIX + "build_info", "Version of distillguard running.", ["version"], registry=r)
        self.rpc_duration = FastHistogram(
            PREFIX + "rpc_duration_seconds", "Sidecar RPC handling time.", ["method", "code"],
            r, buckets=_FAST_BUCKETS,
        )
        self.upstream_early = FastCounter(
            PREFIX + "upstream_early_calls_total",
            "Upstream calls a front started while the request was still being admitted, by result: used (the "
            "request was admitted) or cancelled (refused, or invalid).", ["front", "result"], r,
        )
        self.store_errors = FastCounter(
            PREFIX + "state_store_errors_total", "Failed state store operations.", ["backend", "op"], r
        )
        self.store_fallback = Gauge(
            PREFIX + "state_store_fallback", "1 while the shared store is down and local limits are in force.",
            ["backend"], registry=r,
        )
        self.store_events = FastCounter(
            PREFIX + "state_store_events_total",
            "Budget store events: leases, expired reservations, settles of unknown or repeated requests, "
            "decisions taken while the shared store was down.", ["backend", "event"], r,
        )
        self.budget_events = FastCounter(
            PREFIX + "budget_events_total",
            "Budget defense events (too-large requests, shadow limits exceeded, unknown tiers, clients flagged).",
            ["defense", "event"], r,
        )
        self.suspicious_clients = Gauge(
            PREFIX + "suspicious_clients", "Clients whose suspicion score is at or above the flag (per process).",
            ["defense"], registry=r,
        )

    def set_config(self, sha256: str) -> None:
        self.config_info.clear()
        self.config_info.labels(sha256=sha256[:16] or "none").set(1)

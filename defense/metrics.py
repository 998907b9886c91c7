"""Every Prometheus family distillguard exports, on an injected registry.

Labels are bounded: defense names and stages come from the config, decisions and results from enums.
Never a client id, tenant or request id: per-client detail goes to the audit log.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 20 us .. 0.5 s: admission runs in tens of microseconds, a Protect of 256 x 20 in about a millisecond
_FAST_BUCKETS = (2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5)

PREFIX = "distillguard_"


class Metrics:
    """Holds the metric families; one instance per process, shared across config reloads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests_total", "Admission decisions of the whole chain.", ["decision", "shadow"], registry=r
        )
        self.defense_decisions = Counter(
            PREFIX + "defense_decisions_total",
            "Admission verdicts per defense; mode=shadow counts refusals that were let through.",
            ["defense", "decision", "mode"], registry=r,
        )
        self.defense_duration = Histogram(
            PREFIX + "defense_duration_seconds", "Time spent in one defense call.", ["defense", "stage"],
            buckets=_FAST_BUCKETS, registry=r,
        )
        self.defense_errors = Counter(
            PREFIX + "defense_errors_total", "Exceptions raised by a defense, by failure policy.",
            ["defense", "stage", "policy"], registry=r,
        )
        self.shadow_effects = Counter(
            PREFIX + "shadow_effects_total",
            "Changes a shadow-mode defense would have made (refusals, rewrites, changed outputs).",
            ["defense", "stage"], registry=r,
        )
        self.rewrites = Counter(
            PREFIX + "rewrites_total", "Request fields changed by admission defenses.", ["defense", "field"], registry=r
        )
        self.values_changed = Counter(
            PREFIX + "response_values_changed_total", "Returned logprob or probability values changed by a defense.",
            ["defense"], registry=r,
        )
        self.settles = Counter(
            PREFIX + "settles_total", "Settle calls by status; duplicate=true for retries charged once.",
            ["status", "duplicate"], registry=r,
        )
        self.config_reloads = Counter(
            PREFIX + "config_reloads_total", "Config reload attempts; a failure keeps the last good config.",
            ["result"], registry=r,
        )
        self.config_info = Gauge(
            PREFIX + "config_info", "The running config (1 for the active sha256).", ["sha256"], registry=r
        )
        self.build_info = Gauge(PREFIX + "build_info", "Version of distillguard running.", ["version"], registry=r)
        self.rpc_duration = Histogram(
            PREFIX + "rpc_duration_seconds", "Sidecar RPC handling time.", ["method", "code"],
            buckets=_FAST_BUCKETS, registry=r,
        )
        self.store_errors = Counter(
            PREFIX + "state_store_errors_total", "Failed state store operations.", ["backend", "op"], registry=r
        )
        self.store_fallback = Gauge(
            PREFIX + "state_store_fallback", "1 while the shared store is down and local limits are in force.",
            ["backend"], registry=r,
        )
        self.store_events = Counter(
            PREFIX + "state_store_events_total",
            "Budget store events: leases, expired reservations, settles of unknown or repeated requests, "
            "decisions taken while the shared store was down.", ["backend", "event"], registry=r,
        )
        self.budget_events = Counter(
            PREFIX + "budget_events_total",
            "Budget defense events (too-large requests, shadow limits exceeded, unknown tiers, clients flagged).",
            ["defense", "event"], registry=r,
        )
        self.suspicious_clients = Gauge(
            PREFIX + "suspicious_clients", "Clients whose suspicion score is at or above the flag (per process).",
            ["defense"], registry=r,
        )

    def set_config(self, sha256: str) -> None:
        self.config_info.clear()
        self.config_info.labels(sha256=sha256[:16] or "none").set(1)

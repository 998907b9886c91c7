"""Budget stores: the interface, the options they share, and building one from a state URI.

A store is shared by every budget defense of one runtime that names the same URI (same URI, same Metrics:
the sidecar keeps both across reloads), and it outlives config reloads (a reload builds new defenses
before closing the old ones, so the reference count never drops to zero): reservations admitted under the
old config settle under the new one, and memory:// state is not wiped by a reload.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..clock import Clock
from ..errors import ConfigError
from ..metrics import Metrics
from .strategy import Plan

# reserve() result codes (the first item of its tuple); a value >= 0 is the index of the bucket that refused
OK = -1
UNAVAILABLE = -2  # the shared store is down and the policy is to refuse


class StoreError(Exception):
    """A store operation failed (connection lost, database locked or corrupt)."""


@dataclass(frozen=True, slots=True)
class StoreOptions:
    on_unavailable: str = "local"  # "local" | "refuse"
    retry_s: float = 2.0
    fallback_share: float = 1.0
    lease_fraction: float = 0.05
    lease_requests: int = 16
    lease_ttl_s: float = 2.0
    timeout_s: float = 0.25
    holder_ttl_s: float = 600.0  # how long a killed process's in-flight slots stay counted (reservation TTL)
    dedup_s: float = 900.0  # how long a settled request is remembered (a redis record outlives its TTL by this)


Reserved = tuple[int, float, float, bool]  # (code, retry_after_s, fraction_used, shadow_limit_exceeded)


class Store(abc.ABC):
    """Atomic reserve/settle of a plan's buckets, idempotent on the reservation key."""

    backend: ClassVar[str]

    def __init__(self, *, metrics: Metrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.options = StoreOptions()
        self._events: dict[str, Any] = {}
        # per budget namespace: state that must outlive a config reload with the store (signals, pending)
        self.shared: dict[str, list[Any]] = {}
        self.clock: Clock | None = None

    def configure(self, options: StoreOptions) -> None:
        """The latest config's options win (a reload may change them)."""
        self.options = options

    def event(self, name: str, n: int = 1) -> None:
        c = self._events.get(name)
        if c is None:
            c = self._events[name] = self.metrics.store_events.labels(self.backend, name)
        c.inc(n)

    @abc.abstractmethod
    def reserve(self, rkey: str, plan: Plan, amounts: Sequence[int], now: float, ttl: float, *,
                private: bool = False) -> Reserved:
        """Take ``amounts[b.unit]`` from every bucket of the plan, or nothing. A known rkey is a retry:
        answered OK without taking again. ``private``: only this process will ever settle rkey, and at most
        once (its id was minted here), so its settle needs no marker for other processes."""

    @abc.abstractmethod
    def settle(self, rkey: str, plan: Plan, actuals: Sequence[int], now: float, dedup_s: float) -> bool:
        """Replace the reservation by the actuals; False when rkey was settled before (nothing charged).
        An unknown rkey (expired, or admitted by another process) is charged its actuals."""

    @abc.abstractmethod
    def status(self, plan: Plan, now: float) -> list[tuple[float, float, float]]:
        """Per bucket: (used, reserved, seconds until it frees budget). Changes nothing."""

    def close(self) -> None:  # noqa: B027 - stores without resources close nothing
        """Release connections; hand leased budget back."""


# -- building from a URI, shared per process --------------------------------------------------------
_lock = threading.Lock()
# (uri, id of the Metrics it reports to) -> [store, references]. A sidecar keeps one Metrics across reloads,
# so its reloads share the store; independent chains in one process (tests, experiments) each get their own
# (the store holds its Metrics, so the id cannot be reused while the entry lives)
_open: dict[tuple[str, int], list[Any]] = {}


def _build(uri: str, metrics: Metrics | None) -> Store:
    scheme = uri.partition("://")[0]
    builders: dict[str, Callable[[str, Metrics | None], Store]] = {
        "memory": _memory, "sqlite": _sqlite, "redis": _redis, "rediss": _redis,
    }
    try:
        build = builders[scheme]
    except KeyError:
        raise ConfigError(f"state.uri {uri!r}: unknown scheme {scheme!r}; known: {', '.join(builders)}") from None
    return build(uri, metrics)


def _memory(uri: str, metrics: Metrics | None) -> Store:
    from .memory import MemoryStore

    return MemoryStore(metrics=metrics)


def _sqlite(uri: str, metrics: Metrics | None) -> Store:
    from .sqlite import SqliteStore, sqlite_path

    return SqliteStore(sqlite_path(uri), metrics=metrics)


def _redis(uri: str, metrics: Metrics | None) -> Store:
    from .redis import RedisStore

    return RedisStore(uri, metrics=metrics)


def open_store(uri: str, options: StoreOptions, *, metrics: Metrics | None = None, clock: Clock | None = None) -> Store:
    """The process's store for ``uri`` (built on first use), configured with ``options``."""
    key = (uri, id(metrics))
    with _lock:
        entry = _open.get(key)
        if entry is None:
            entry = _open[key] = [_build(uri, metrics), 0]
        entry[1] += 1
        store: Store = entry[0]
    store.configure(options)
    if clock is not None:
        store.clock = clock
    return store


def release_store(store: Store) -> None:
    """Drop one reference; the last one closes the store."""
    with _lock:
        for key, entry in list(_open.items()):
            if entry[0] is store:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _open[key]
                break
        else:
            return
    store.close()

"""What every store shared between processes does when it fails: its configured policy, counted.

``on_unavailable: local`` answers from an in-process MemoryStore holding ``fallback_share`` of each
amount (LiteLLM's choice, and the design default: an outage must not become a denial of service);
``refuse`` throttles with Retry-After. Either way distillguard_state_store_fallback is 1 until the store
answers again, every failure counts in distillguard_state_store_errors_total, and the store is retried
only every ``retry_s`` so an outage costs one timeout per interval, not one per request.

Settles of reservations the shared store holds are queued while it is down and replayed when it is back;
the store's settle is idempotent on the request, so a replay never charges twice.
"""

from __future__ import annotations

import abc
import logging
from collections import deque
from collections.abc import Sequence

from ..metrics import Metrics
from .memory import MemoryStore
from .store import UNAVAILABLE, Reserved, Store, StoreError, StoreOptions
from .strategy import Plan

log = logging.getLogger("distillguard.budget")

_MAX_PENDING = 100_000  # settles remembered during an outage; beyond this the oldest are dropped (counted)
_REPLAY_PER_CALL = 256  # replayed per request once the store is back, so one request never waits long


class SharedStore(Store):
    def __init__(self, *, metrics: Metrics | None = None) -> None:
        super().__init__(metrics=metrics)
        self.fallback = MemoryStore(metrics=self.metrics)
        self.fallback.backend = f"{self.backend}_fallback"  # type: ignore[misc] # its own event label
        self._down_until = 0.0
        self._down = False
        self._pending: deque[tuple[str, Plan, Sequence[int], float, float]] = deque()
        self._gauge = self.metrics.store_fallback.labels(self.backend)
        self._gauge.set(0)
        self._errors: dict[str, object] = {}
        self._used_fallback = False  # skips the stand-in's lookups on every call until it has held something

    def configure(self, options: StoreOptions) -> None:
        super().configure(options)
        self.fallback.cap_scale = options.fallback_share

    @property
    def degraded(self) -> bool:
        return self._down

    # -- backend hooks ------------------------------------------------------------------------------
    @abc.abstractmethod
    def _reserve(self, rkey: str, plan: Plan, amounts: Sequence[int], now: float, ttl: float,
                 private: bool) -> Reserved: ...

    @abc.abstractmethod
    def _settle(self, rkey: str, plan: Plan, actuals: Sequence[int], now: float, dedup_s: float) -> bool: ...

    @abc.abstractmethod
    def _status(self, plan: Plan, now: float) -> list[tuple[float, float, float]]: ...

    # -- policy -------------------------------------------------------------------------------------
    def _failed(self, op: str, now: float, exc: BaseException) -> None:
        c = self._errors.get(op)
        if c is None:
            c = self._errors[op] = self.metrics.store_errors.labels(self.backend, op)
        c.inc()  # type: ignore[attr-defined]
        self._down_until = now + self.options.retry_s
        if not self._down:
            self._down = True
            self._gauge.set(1)
            # the cause only: a driver's message may quote a URI with its password
            log.error("budget store %s failed during %s (%s); %s for %.1f s", self.backend, op,
                      type(exc.__cause__ or exc).__name__,
                      "using local limits" if self.options.on_unavailable == "local" else "refusing requests",
                      self.options.retry_s)

    def _back(self, now: float) -> None:
        self._down = False
        self._gauge.set(0)
        log.warning("budget store %s answers again; replaying %d queued settles", self.backend, len(self._pending))

    def _replay(self) -> None:
        n = 0
        while self._pending and n < _REPLAY_PER_CALL:
            rkey, plan, actuals, at, dedup_s = self._pending[0]
            self._settle(rkey, plan, actuals, at, dedup_s)  # raises StoreError: stays queued
            self._pending.popleft()
            n += 1
        if n:
            self.event("settle_replayed", n)

    def _degraded_reserve(self, rkey: str, plan: Plan, amounts: Sequence[int], now: float, ttl: float) -> Reserved:
        if self.options.on_unavailable == "refuse":
            self.event("refused_unavailable")
            return UNAVAILABLE, max(self._down_until - now, 0.001), 0.0, False
        self.event("local_fallback")
        self._used_fallback = True
        return self.fallback.reserve(rkey, plan, amounts, now, ttl)

    def reserve(self, rkey: str, plan: Plan, amounts: Sequence[int], now: float, ttl: float, *,
                private: bool = False) -> Reserved:
        if now < self._down_until:
            return self._degraded_reserve(rkey, plan, amounts, now, ttl)
        if self._used_fallback and rkey in self.fallback:  # admitted locally in an outage, retried since
            return self.fallback.reserve(rkey, plan, amounts, now, ttl)
        try:
            r = self._reserve(rkey, plan, amounts, now, ttl, private)
            if self._down:
                self._back(now)
            if self._pending:
                self._replay()
        except StoreError as e:
            self._failed("reserve", now, e)
            return self._degraded_reserve(rkey, plan, amounts, now, ttl)
        return r

    def settle(self, rkey: str, plan: Plan, actuals: Sequence[int], now: float, dedup_s: float) -> bool:
        if self._used_fallback and rkey in self.fallback:  # reserved during an outage: settled there
            return self.fallback.settle(rkey, plan, actuals, now, dedup_s)
        if now >= self._down_until:
            try:
                first = self._settle(rkey, plan, actuals, now, dedup_s)
                if self._down:
                    self._back(now)
                if self._pending:
                    self._replay()
                return first
            except StoreError as e:
                self._failed("settle", now, e)
        if len(self._pending) >= _MAX_PENDING:
            self._pending.popleft()
            self.event("settle_dropped")
        self._pending.append((rkey, plan, actuals, now, dedup_s))
        self.event("settle_queued")
        return True  # charged once, when the store is back

    def status(self, plan: Plan, now: float) -> list[tuple[float, float, float]]:
        if now >= self._down_until:
            try:
                return self._status(plan, now)
            except StoreError as e:
                self._failed("status", now, e)
        return self.fallback.status(plan, now)

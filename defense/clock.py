"""Injectable time: defenses never call time.time() themselves (tests use FakeClock)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch (for expiries that cross processes)."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards (for durations)."""


class SystemClock:
    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when told to; wall and monotonic time advance together."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back, got advance({seconds})")
        self._now += seconds

    def set(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"a clock cannot go back from {self._now} to {t}")
        self._now = float(t)


SYSTEM_CLOCK = SystemClock()

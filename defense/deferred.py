"""Bookkeeping that must happen soon, but never before an answer is on its way: settles, and the chain's
metrics and ledger records (its ``bookkeeping``), which the servers queue here too, so that one loop
callback runs all that a turn queued.

A settle is a budget store write (a sqlite statement, a Redis round trip): the slowest step of a request
after the model itself. A front ``add``s the settle as it hands the last of the answer back; the event loop
runs it on a later turn (after ``max_delay_s``, 0 by default: the next turn), once grpc has the answer and
while the client reads it. Not while the model server works on the next request: where the model server
shares the CPUs (vLLM or Triton on CPU, Envoy beside them), work run during the upstream call slows that
call. Draining during the upstream call measured worse on the Envoy bench (x1.65-1.83 against x1.57-1.59
for the next turn, same session). ``max_pending`` bounds the queue, and ``drain`` at shutdown settles the
rest. A crash loses at most the queued settles, whose reservations then expire as any unsettled
reservation does (reservation_ttl_s).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

log = logging.getLogger("distillguard.deferred")


def soon(fn: Callable[[], object]) -> None:
    """Run ``fn`` on the running loop's next turn (after what the current callback hands over), or at once
    when there is no loop: the admission chain's ``bookkeeping`` in servers."""
    loop = asyncio.events._get_running_loop()
    if loop is None:
        fn()
    else:
        loop.call_soon(fn)


class Deferred:
    """A queue of zero-argument callables, run on the running event loop (or at once when there is none)."""

    def __init__(self, *, max_delay_s: float = 0.0, max_pending: int = 256) -> None:
        if max_delay_s < 0 or max_pending < 1:
            raise ValueError("max_delay_s must be >= 0 and max_pending >= 1")
        self.max_delay_s = max_delay_s
        self.max_pending = max_pending
        self._queue: deque[Callable[[], object]] = deque()
        self._timer: asyncio.Handle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, fn: Callable[[], object]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): nothing to wait for
            self._run(fn)
            return
        self._queue.append(fn)
        if len(self._queue) >= self.max_pending:
            self.drain()
        elif self._timer is None:
            self._schedule(loop)

    def hold(self, fn: Callable[[], object]) -> None:
        """Queue ``fn`` for the next drain without asking for one: work that can wait for its request's own
        ``add`` (its settle) or, for a request that will not settle, its front's ``kick``. A request then
        costs the loop one callback, run once its answer is out, instead of one per piece of bookkeeping,
        the first of them while the model server works on the request. A full queue drains at once, as
        with ``add``; with no loop, ``fn`` runs at once."""
        if asyncio.events._get_running_loop() is None:
            self._run(fn)
            return
        self._queue.append(fn)
        if len(self._queue) >= self.max_pending:
            self.drain()

    def kick(self) -> None:
        """Ask for a drain of what is queued (``hold``), as ``add`` would, adding nothing."""
        if self._queue and self._timer is None:
            loop = asyncio.events._get_running_loop()
            if loop is None:
                self.drain()
            else:
                self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        # the next turn needs no timer (call_later would make and heap one)
        self._timer = loop.call_later(self.max_delay_s, self.drain) if self.max_delay_s else loop.call_soon(self.drain)

    def drain(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            self._run(self._queue.popleft())

    @staticmethod
    def _run(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - one failed settle must not stop the others
            log.exception("deferred %r failed", fn)

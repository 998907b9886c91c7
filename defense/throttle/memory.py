"""In-process store (``memory://``): authoritative for one process, gone when it exits.

Also the local-limits fallback of the shared stores while they are unreachable. Everything is plain
lists and dicts under one lock: a reserve over four limits costs a few microseconds.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

from ..metrics import Metrics
from .store import OK, Reserved, Store
from .strategy import Plan, idle_after, new_state

_SWEEP_S = 1.0  # expired reservations are released at most this late
_PRUNE_S = 60.0  # idle counters (drained buckets, past windows) are looked for this often
_PRUNE_SLICE = 2000  # ... this many per sweep


class MemoryStore(Store):
    backend = "memory"

    def __init__(self, *, metrics: Metrics | None = None, cap_scale: float = 1.0) -> None:
        super().__init__(metrics=metrics)
        self.cap_scale = cap_scale  # < 1 when standing in for a store shared by several replicas
        # key -> [s0, s1, s2, reserved, bucket]: the strategy functions read the first four
        self._states: dict[str, list] = {}
        # rkey -> [expires, buckets, amounts, tags, fraction]
        self._res: dict[str, list] = {}
        self._settled: dict[str, float] = {}  # rkey -> until when a retried Settle is recognised
        # expiry queues in insertion order (one TTL per config, so nearly sorted): deque pops are O(1)
        # where popping a dict's first item slows down as deleted slots pile up in front
        self._res_q: deque[tuple[float, str]] = deque()
        self._settled_q: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self._next_prune = 0.0
        self._prune_keys: list[str] = []

    def __contains__(self, rkey: str) -> bool:
        """Held or settled here (a shared store's stand-in answers retries of what it took)."""
        return rkey in self._res or rkey in self._settled

    def reserve(self, rkey: str, plan: Plan, amounts: Sequence[int], now: float, ttl: float, *,
                private: bool = False) -> Reserved:
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            rec = self._res.get(rkey)
            if rec is not None:
                return OK, 0.0, rec[4], False
            if rkey in self._settled:  # an Admit retried after its Settle: nothing more to hold
                return OK, 0.0, 0.0, False
            states = self._states
            scale = self.cap_scale
            buckets = plan.buckets
            tags: list[float] = []
            frac = 0.0
            over = False
            for i, b in enumerate(buckets):
                s = states.get(b.key)
                if s is None:
                    s = states[b.key] = [*new_state(b.algo, b.period, now)[:4], b]
                a = amounts[b.unit]
                if not a:  # costs nothing here: fits even where the bucket is already over
                    tags.append(s[0])
                    continue
                cap = b.cap * scale
                u = b.take(s, cap, b.period, a, now, b.shadow)
                if u < 0:
                    self._undo(buckets, amounts, tags, now)
                    return i, -u, 0.0, False
                s[3] += a
                tags.append(s[0])
                if b.client_scope and u > frac * cap:
                    frac = u / cap
                if b.shadow and u > cap:
                    over = True
            self._res[rkey] = [now + ttl, buckets, amounts, tags, frac]
            self._res_q.append((now + ttl, rkey))
            return OK, 0.0, frac, over

    def _undo(self, buckets: Sequence, amounts: Sequence[int], tags: list[float], now: float) -> None:
        states, scale = self._states, self.cap_scale
        for j, tag in enumerate(tags):
            b = buckets[j]
            a = amounts[b.unit]
            if a:
                s = states[b.key]
                b.give(s, b.cap * scale, b.period, a, now, tag)
                s[3] -= a

    def settle(self, rkey: str, plan: Plan, actuals: Sequence[int], now: float, dedup_s: float) -> bool:
        with self._lock:
            if rkey in self._settled:
                self.event("settle_duplicate")
                return False
            rec = self._res.pop(rkey, None)
            states, scale = self._states, self.cap_scale
            if rec is None:
                # expired, or admitted elsewhere: charge what was used (its reservation is released there)
                self.event("settle_unknown")
                for b in plan.buckets:
                    a = actuals[b.unit]
                    if a:
                        s = states.get(b.key)
                        if s is None:
                            s = states[b.key] = [*new_state(b.algo, b.period, now)[:4], b]
                        b.take(s, b.cap * scale, b.period, a, now, True)
            else:
                self._apply(rec, actuals, now)
            self._settled[rkey] = until = now + dedup_s
            self._settled_q.append((until, rkey))
            return True

    def _apply(self, rec: list, actuals: Sequence[int] | None, now: float) -> None:
        """Turn a reservation into its actuals (None: release it all)."""
        _, buckets, amounts, tags, _ = rec
        states, scale = self._states, self.cap_scale
        for j, b in enumerate(buckets):
            r = amounts[b.unit]
            a = actuals[b.unit] if actuals is not None else 0
            s = states.get(b.key)
            if s is None:  # pruned: nothing held there any more
                continue
            s[3] -= r
            if r > a:
                b.give(s, b.cap * scale, b.period, r - a, now, tags[j])
            elif a > r:  # used more than reserved (a prompt longer than estimated): charged even over the limit
                b.take(s, b.cap * scale, b.period, a - r, now, True)

    def status(self, plan: Plan, now: float) -> list[tuple[float, float, float]]:
        out = []
        with self._lock:
            for b in plan.buckets:
                s = self._states.get(b.key)
                if s is None:
                    out.append((0.0, 0.0, 0.0))
                    continue
                cap = b.cap * self.cap_scale
                used = b.used(s, cap, b.period, now)
                out.append((max(used - s[3], 0.0), s[3], b.reset_in(s, cap, b.period, now)))
        return out

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_S
        q, res = self._res_q, self._res
        expired = 0
        while q and q[0][0] <= now:
            _, rkey = q.popleft()
            rec = res.get(rkey)
            if rec is not None and rec[0] <= now:
                del res[rkey]
                self._apply(rec, None, now)
                expired += 1
        if expired:
            self.event("reservation_expired", expired)
        sq, settled = self._settled_q, self._settled
        while sq and sq[0][0] <= now:
            _, rkey = sq.popleft()
            if settled.get(rkey, now + 1) <= now:
                del settled[rkey]
        # idle counters are dropped a slice at a time: a scan of every client at once would stall the loop
        if not self._prune_keys and now >= self._next_prune:
            self._next_prune = now + _PRUNE_S
            self._prune_keys = list(self._states)
        keys, states, scale = self._prune_keys, self._states, self.cap_scale
        for _ in range(min(len(keys), _PRUNE_SLICE)):
            k = keys.pop()
            s = states.get(k)
            if s is not None and s[3] <= 0 and idle_after(s[4].algo, s, s[4].cap * scale, s[4].period) < now:
                del states[k]

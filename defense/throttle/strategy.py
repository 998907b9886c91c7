"""Window arithmetic, separate from storage: pure functions over a bucket's state.

Every store keeps a bucket as four numbers ``[s0, s1, s2, reserved]`` and applies these functions to
them (the Redis store runs the same arithmetic in Lua, tested against this module):

- token bucket: ``[level, updated_at, 0]``; the level drains at ``amount / period`` per second and a
  request fits while level + cost <= amount (a GCRA-style bucket: one number per key, smooth refill);
- sliding window: ``[window_index, current, previous]``; the count is previous x (share of the current
  window still ahead) + current, the two-counter approximation Cloudflare and Kong use;
- concurrency: ``[in_flight, 0, 0]``; no time dependence, slots come back when requests settle.

``reserved`` is what admitted, unsettled requests hold (reported by GetBudget, never used for decisions).

``take`` returns the bucket's use after the take (>= 0) when it fits, or minus the seconds until it
would fit when it does not (-inf when it never can: the cost exceeds the whole amount). One float and no
tuple: this runs for every limit of every request.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

TOKEN_BUCKET, SLIDING_WINDOW, CONCURRENCY = 0, 1, 2
ALGORITHMS = {"token_bucket": TOKEN_BUCKET, "sliding_window": SLIDING_WINDOW}
_EPS = 1e-9  # float slack: a cost that exactly fills the bucket must fit after a drain computed in floats

State = list  # [s0, s1, s2, reserved]


# -- token bucket ---------------------------------------------------------------------------------
def _tb_drain(s: State, cap: float, period: float, now: float) -> float:
    dt = now - s[1]
    if dt > 0:  # a clock behind the stored time (another process, NTP step) drains nothing
        lvl = s[0] - dt * cap / period
        s[0] = lvl if lvl > 0 else 0.0
        s[1] = now
    return s[0]


def tb_take(s: State, cap: float, period: float, amount: float, now: float, force: bool) -> float:
    lvl = _tb_drain(s, cap, period, now)
    if lvl + amount <= cap + _EPS or force:
        s[0] = lvl = lvl + amount
        return lvl
    if amount > cap:
        return -math.inf
    return -(lvl + amount - cap) * period / cap


def tb_give(s: State, cap: float, period: float, amount: float, now: float, tag: float) -> None:
    lvl = _tb_drain(s, cap, period, now) - amount
    s[0] = lvl if lvl > 0 else 0.0


def tb_used(s: State, cap: float, period: float, now: float) -> float:
    dt = now - s[1]
    lvl = s[0] - dt * cap / period if dt > 0 else s[0]
    return lvl if lvl > 0 else 0.0


def tb_reset(s: State, cap: float, period: float, now: float) -> float:
    """Seconds until the bucket is empty again."""
    return tb_used(s, cap, period, now) * period / cap


# -- sliding window -------------------------------------------------------------------------------
def _sw_roll(s: State, period: float, now: float) -> float:
    """Move the counters to now's window; returns the current window's elapsed share (0..1)."""
    idx = now // period
    w = s[0]
    if idx > w:
        s[2] = s[1] if idx == w + 1 else 0.0
        s[1] = 0.0
        s[0] = w = idx
    # idx < w: this clock is behind the one that last wrote; keep counting in the newer window
    f = (now - w * period) / period
    return 0.0 if f < 0 else 1.0 if f > 1 else f


def sw_take(s: State, cap: float, period: float, amount: float, now: float, force: bool) -> float:
    f = _sw_roll(s, period, now)
    cur, prev = s[1], s[2]
    est = prev * (1.0 - f) + cur
    if est + amount <= cap + _EPS or force:
        s[1] = cur + amount
        return est + amount
    if amount > cap:
        return -math.inf
    if cur + amount <= cap:
        # fits once enough of the previous window has slid out: prev x (1 - f') <= cap - cur - amount
        need = 1.0 - (cap - cur - amount) / prev
        return -max(need - f, 0.0) * period - _EPS
    # fits only in the next window, once enough of this one has slid out: cur x (1 - f'') <= cap - amount
    need = 1.0 - (cap - amount) / cur
    return -((1.0 - f) + max(need, 0.0)) * period - _EPS


def sw_give(s: State, cap: float, period: float, amount: float, now: float, tag: float) -> None:
    """Refund into the window the amount was counted in (the current or the previous; older is gone)."""
    _sw_roll(s, period, now)
    if tag == s[0]:
        v = s[1] - amount
        s[1] = v if v > 0 else 0.0
    elif tag == s[0] - 1:
        v = s[2] - amount
        s[2] = v if v > 0 else 0.0


def sw_used(s: State, cap: float, period: float, now: float) -> float:
    idx = now // period
    w, cur, prev = s[0], s[1], s[2]
    if idx > w:
        prev = cur if idx == w + 1 else 0.0
        cur = 0.0
        w = idx
    f = min(max((now - w * period) / period, 0.0), 1.0)
    return prev * (1.0 - f) + cur


def sw_reset(s: State, cap: float, period: float, now: float) -> float:
    """Seconds until the current window ends (when its count starts sliding out)."""
    w = max(now // period, s[0])
    return max((w + 1) * period - now, 0.0)


# -- concurrency ----------------------------------------------------------------------------------
def cc_take(s: State, cap: float, period: float, amount: float, now: float, force: bool) -> float:
    # `period` of a concurrency bucket is the Retry-After to give: slots free when requests settle
    n = s[0] + amount
    if n <= cap + _EPS or force:
        s[0] = n
        return n
    return -math.inf if amount > cap else -period


def cc_give(s: State, cap: float, period: float, amount: float, now: float, tag: float) -> None:
    v = s[0] - amount
    s[0] = v if v > 0 else 0.0


def cc_used(s: State, cap: float, period: float, now: float) -> float:
    return s[0]


def cc_reset(s: State, cap: float, period: float, now: float) -> float:
    return 0.0


def new_state(algo: int, period: float, now: float) -> State:
    if algo == SLIDING_WINDOW:
        return [now // period, 0.0, 0.0, 0.0]
    if algo == TOKEN_BUCKET:
        return [0.0, now, 0.0, 0.0]
    return [0.0, 0.0, 0.0, 0.0]


def idle_after(algo: int, s: State, cap: float, period: float) -> float:
    """A time after which the state holds nothing worth keeping (a store may then delete it)."""
    if algo == TOKEN_BUCKET:
        return s[1] + s[0] * period / cap + 1.0
    if algo == SLIDING_WINDOW:
        return (s[0] + 2) * period + 1.0
    return math.inf if s[0] > 0 else 0.0


Take = Callable[[State, float, float, float, float, bool], float]
Give = Callable[[State, float, float, float, float, float], None]
Peek = Callable[[State, float, float, float], float]

_FUNCS: dict[int, tuple[Take, Give, Peek, Peek]] = {
    TOKEN_BUCKET: (tb_take, tb_give, tb_used, tb_reset),
    SLIDING_WINDOW: (sw_take, sw_give, sw_used, sw_reset),
    CONCURRENCY: (cc_take, cc_give, cc_used, cc_reset),
}


@dataclass(frozen=True, slots=True, eq=False)
class Bucket:
    """One counter a request is checked against: a limit applied to one scope (client, tenant, ...)."""

    key: str  # store key: namespace, limit, algorithm, period and scope id
    algo: int
    cap: float
    period: float  # window length; for CONCURRENCY the Retry-After to answer
    unit: int  # index into the request's amounts tuple
    limit: str  # the limit's name, for reasons and GetBudget
    unit_name: str
    scope: str
    shadow: bool = False
    client_scope: bool = False  # counts toward the fraction of the client's budget (strength)
    take: Take = tb_take
    give: Give = tb_give
    used: Peek = tb_used
    reset_in: Peek = tb_reset

    @classmethod
    def make(cls, *, key: str, algo: int, cap: float, period: float, unit: int, limit: str, unit_name: str,
             scope: str, shadow: bool = False) -> Bucket:
        take, give, used, reset = _FUNCS[algo]
        return cls(key, algo, float(cap), float(period), unit, limit, unit_name, scope, shadow,
                   scope == "client" and algo != CONCURRENCY, take, give, used, reset)


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """The buckets one request is checked against, resolved once per (tier, tenant, client, model).

    ``group`` names the set of keys a Redis Lua call may touch together (one hash slot in a cluster).
    Identity-hashed (eq=False): stores cache per-plan data keyed by the plan object.
    """

    buckets: tuple[Bucket, ...]
    tier: str
    group: str

"""The ``budget`` admission defense: reserve at Admit, settle actuals, raise strength with suspicion.

Admit reserves, per limit, what the request may use at most (prompt tokens, the clamped max_tokens
times n, the logprob values they imply, one request, one in-flight slot) in the store named by
``state.uri``; a limit that cannot take it throttles with Retry-After (a request larger than a limit's
whole amount is denied: waiting would not help). Settle replaces the reservation by the actual usage,
once per request id, across processes. Reservations never settled are released after
``reservation_ttl_s``.

The verdict's strength is the progressive response: the fraction of the client's budget in use and its
suspicion score (signals.py) each map to a multiplier through a configured curve, combined by max or
product, capped. Perturbation and watermark defenses read it from the request's profile.

The chain applies modes: in shadow mode the reservations and charges are made (the store counts real
use), and only the throttles are let through.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..base import AdmissionDefense, Deps, OnError
from ..errors import InvalidInput
from ..metrics import Metrics
from ..types import ALLOW, Cost, Decision, RequestContext, SettleStatus, Usage, Verdict
from .params import MAX_AMOUNT, PARALLEL_INDEX, SIGNALS, UNIT_INDEX, BudgetParams, TierSpec
from .signals import Observation, SuspicionTracker, observation
from .store import OK, UNAVAILABLE, Store, StoreOptions, open_store, release_store
from .strategy import ALGORITHMS, CONCURRENCY, Bucket, Plan

log = logging.getLogger("distillguard.budget")

_SAFE = re.compile(r"[A-Za-z0-9_.@:-]{1,80}")
_MAX_PLANS = 100_000  # resolved (tier, tenant, client, model) plans kept; cleared whole when full
_WARNED_MAX = 100  # distinct unknown tier labels logged (each is also counted)


def _part(s: str) -> str:
    """A scope id safe inside a store key: itself when plain, else a hash (no separators, braces, control bytes)."""
    if _SAFE.fullmatch(s):
        return s
    return "h" + hashlib.blake2b(s.encode(), digest_size=10).hexdigest()


def _short(s: str) -> str:
    return hashlib.blake2b(s.encode(), digest_size=6).hexdigest()


def _interp(points: tuple[tuple[float, float], ...], x: float) -> float:
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


@dataclass(frozen=True, slots=True)
class LimitState:
    name: str
    unit: str
    scope: str
    limit: int
    used: int
    reserved: int
    remaining: int
    reset_in_s: float
    shadow: bool


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """What GetBudget reports for one client."""

    tier: str
    limits: tuple[LimitState, ...]
    suspicion_score: float
    signals: Mapping[str, float] = field(default_factory=dict)
    strength: float = 1.0
    flagged: bool = False
    requests_observed: int = 0


class _Pending:
    """Admitted requests awaiting settle, for the signals (their prompts are needed then). Shared across
    config reloads through the store, like the tracker."""

    __slots__ = ("obs", "queue")

    def __init__(self) -> None:
        self.obs: dict[str, Observation] = {}
        self.queue: deque[tuple[float, str]] = deque()

    def expire(self, now: float) -> None:
        """Never settled: forget them with their reservations."""
        q, pending = self.queue, self.obs
        while q and q[0][0] <= now:
            pending.pop(q.popleft()[1], None)


class Budget(AdmissionDefense):
    Params = BudgetParams
    # a bug here must not take the service down; store outages have their own policy (on_store_unavailable)
    default_on_error = OnError.FAIL_OPEN

    def __init__(self, params: BudgetParams | None = None, *, deps: Deps | None = None) -> None:
        super().__init__(params, deps=deps)
        p: BudgetParams = self.params
        self.clock = self.deps.clock
        self.metrics: Metrics = self.deps.metrics if self.deps.metrics is not None else Metrics()
        self._ns = p.namespace
        self._ttl = p.reservation_ttl_s
        self._dedup = p.settle_dedup_s
        self._tiers: dict[str, TierSpec] = dict(p.tiers)
        self._tiers.setdefault(p.default_tier, TierSpec())
        scopes = {spec.scope for spec in p.limits.values()}
        # the widest scope decides which keys one Lua call touches together (a Redis Cluster hash slot)
        self._group = "all" if scopes & {"model", "global"} else "tenant" if "tenant" in scopes else "client"
        self._plans: dict[tuple[str, str, str, str | None], Plan] = {}
        self._warned: set[str] = set()
        self._events: dict[str, Any] = {}
        self._flag_gauge = self.metrics.suspicious_clients.labels(self._ns)
        c = p.strength
        self._usage_pts, self._susp_pts = c.usage, c.suspicion
        self._product = c.combine == "product"
        self._max_strength = c.max_strength
        # below both curves' first points the multiplier is 1: the common case skips interpolation
        self._usage_floor = c.usage[0][0] if c.usage[0][1] == 1.0 else -1.0
        self._susp_floor = c.suspicion[0][0] if c.suspicion[0][1] == 1.0 else -1.0
        options = StoreOptions(
            on_unavailable=p.on_store_unavailable, retry_s=p.store_retry_s, fallback_share=p.fallback_share,
            lease_fraction=p.lease_fraction, lease_requests=p.lease_requests, lease_ttl_s=p.lease_ttl_s,
            timeout_s=p.store_timeout_s, holder_ttl_s=p.reservation_ttl_s, dedup_s=p.settle_dedup_s)
        self.store: Store = open_store(self.deps.state_uri, options, metrics=self.metrics, clock=self.clock)
        shared = self.store.shared.setdefault(self._ns, [None, _Pending()])
        if shared[0] is None:
            shared[0] = SuspicionTracker(p.signals, name=self._ns)
        tracker: SuspicionTracker = shared[0]
        tracker.configure(p.signals)  # a reload's signal settings apply to the clients already tracked
        self.tracker = tracker
        self._clients = tracker._clients  # read on every admit: one lookup, no method call
        self._tier_label = p.tier_label
        self._verdicts: dict[float, Verdict] = {}
        self._pending: _Pending = shared[1]
        self._signals = p.signals.enabled
        self._closed = False

    # -- plans ----------------------------------------------------------------------------------------
    def _event(self, name: str) -> None:
        c = self._events.get(name)
        if c is None:
            c = self._events[name] = self.metrics.budget_events.labels(self._ns, name)
        c.inc()

    def _tier(self, tenant: str, client: str, label: str | None) -> str:
        p: BudgetParams = self.params
        t = p.clients.get(client) or p.tenants.get(tenant)
        if t is not None:
            return t
        if label:
            if label in self._tiers:
                return label
            self._event("unknown_tier")
            if label not in self._warned and len(self._warned) < _WARNED_MAX:
                self._warned.add(label)
                log.warning("budget %s: unknown tier label %r (known: %s); using tier %r", self._ns, label[:64],
                            ", ".join(sorted(self._tiers)), p.default_tier)
        return p.default_tier

    def _build(self, tenant: str, client: str, model: str, label: str | None) -> Plan:
        p: BudgetParams = self.params
        tier_name = self._tier(tenant, client, label)
        tier = self._tiers[tier_name]
        names = tier.limits if tier.limits is not None else tuple(p.limits)
        scope_ids = {"client": f"c/{_part(tenant)}/{_part(client)}", "tenant": f"t/{_part(tenant)}",
                     "model": f"m/{_part(model)}", "global": "g"}
        buckets = []
        for name in names:
            spec = p.limits[name]
            if spec.models and model not in spec.models:
                continue
            if spec.scope == "model" and not model:
                continue
            algo = ALGORITHMS[spec.window]
            key = f"{self._ns}|{name}|{spec.window}|{spec.period_s!r}|{scope_ids[spec.scope]}"
            buckets.append(Bucket.make(key=key, algo=algo, cap=tier.amounts.get(name, spec.amount),
                                       period=spec.period_s, unit=UNIT_INDEX[spec.unit], limit=name,
                                       unit_name=spec.unit, scope=spec.scope, shadow=spec.shadow))
        if tier.max_parallel is not None:
            buckets.append(Bucket.make(key=f"{self._ns}|max_parallel|{scope_ids['client']}", algo=CONCURRENCY,
                                       cap=tier.max_parallel, period=p.parallel_retry_s, unit=PARALLEL_INDEX,
                                       limit="max_parallel", unit_name="requests_in_flight", scope="client"))
        group = {"client": _short(f"{tenant}\x1f{client}"), "tenant": _short(tenant), "all": "all"}[self._group]
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        plan = Plan(tuple(buckets), tier_name, f"{self._ns}:{group}")
        return plan

    def _plan(self, ctx: RequestContext) -> Plan:
        label = ctx.labels.get(self._tier_label) if self._tier_label else None
        k = (ctx.tenant, ctx.client_id, ctx.model, label)
        plan = self._plans.get(k)
        if plan is None:
            plan = self._plans[k] = self._build(*k)
        return plan

    # -- admission ------------------------------------------------------------------------------------
    def _strength(self, frac: float, score: float) -> float:
        u = 1.0 if frac < self._usage_floor else _interp(self._usage_pts, frac)
        s = 1.0 if score < self._susp_floor else _interp(self._susp_pts, score)
        m = u * s if self._product else (u if u > s else s)
        return m if m < self._max_strength else self._max_strength

    def admit(self, ctx: RequestContext, cost: Cost) -> Verdict:
        # _plan inlined: this runs on every request, and a call costs as much as the lookup
        label = ctx.labels.get(self._tier_label) if self._tier_label else None
        plan = self._plans.get((ctx.tenant, ctx.client_id, ctx.model, label)) or self._plan(ctx)
        p_tok, c_tok, lv = cost.prompt_tokens, cost.completion_tokens, cost.logprob_values
        if p_tok + c_tok > MAX_AMOUNT or lv > MAX_AMOUNT:
            self._event("absurd_cost")
            raise InvalidInput(f"the request's cost ({p_tok} prompt + {c_tok} completion tokens, {lv} logprob "
                               f"values) is beyond any budget; check prompt_tokens, max_tokens and n")
        ck = f"{ctx.tenant}\x1f{ctx.client_id}"
        rkey = f"{ck}\x1f{ctx.request_id}"
        now = self.clock.now()
        code, retry, frac, over = self.store.reserve(rkey, plan, (1, p_tok, c_tok, p_tok + c_tok, lv, 1), now,
                                                     self._ttl, private=ctx.private_id)
        if code != OK:
            return self._refusal(plan, code, retry)
        if over:
            self._event("shadow_limit_exceeded")
        if self._signals:
            pending = self._pending
            if pending.queue and pending.queue[0][0] <= now:
                pending.expire(now)
            pending.obs[rkey] = observation(ctx)
            pending.queue.append((now + self._ttl, rkey))
        c = self._clients.get(ck)
        score = c.score if c is not None else 0.0
        if frac < self._usage_floor and score < self._susp_floor:  # the common case: base strength
            return ALLOW
        strength = round(self._strength(frac, score), 2)  # 0.01 steps: verdicts are reused, not rebuilt
        v = self._verdicts.get(strength)
        if v is None:
            v = self._verdicts[strength] = ALLOW if strength == 1.0 else Verdict(strength=strength)
        return v

    def _refusal(self, plan: Plan, code: int, retry: float) -> Verdict:
        if code == UNAVAILABLE:
            return Verdict(Decision.THROTTLE, reason="the budget store is unavailable; retry shortly",
                           reason_code="budget_store_unavailable", retry_after_s=round(retry, 3))
        b = plan.buckets[code]
        if retry == float("inf"):
            self._event("request_too_large")
            return Verdict(Decision.DENY, reason_code="budget_request_too_large",
                           reason=f"the request needs more {b.unit_name} than the {b.limit!r} limit allows in a "
                                  f"whole period ({int(b.cap)} per {b.period:g} s)")
        retry = round(retry + 0.0005, 3)  # rounded up to the millisecond: retrying at Retry-After fits
        if b.algo == CONCURRENCY:
            return Verdict(Decision.THROTTLE, reason_code="max_parallel", retry_after_s=retry,
                           reason=f"too many requests in flight (max_parallel {int(b.cap)})")
        return Verdict(Decision.THROTTLE, reason_code="budget_exceeded", retry_after_s=retry,
                       reason=f"over the {b.limit!r} budget ({int(b.cap)} {b.unit_name} per {b.period:g} s); "
                              f"retry after {retry:g} s")

    def settle(self, ctx: RequestContext, usage: Usage) -> None:
        plan = self._plan(ctx)
        status = usage.status
        refused = status is SettleStatus.REFUSED
        req = 0 if refused or status is SettleStatus.UPSTREAM_ERROR else 1  # a failed upstream is not the client's
        p_tok, c_tok, lv = usage.prompt_tokens, usage.completion_tokens, usage.logprob_values
        if p_tok + c_tok > MAX_AMOUNT or lv > MAX_AMOUNT:
            self._event("absurd_usage")  # charged at the ceiling: a front's bug must not poison a bucket forever
            p_tok, c_tok, lv = min(p_tok, MAX_AMOUNT), min(c_tok, MAX_AMOUNT), min(lv, MAX_AMOUNT)
        ck = f"{ctx.tenant}\x1f{ctx.client_id}"
        rkey = f"{ck}\x1f{ctx.request_id}"
        first = self.store.settle(rkey, plan, (req, p_tok, c_tok, p_tok + c_tok, lv, 0), self.clock.now(),
                                  self._dedup)
        admitted = self._pending.obs.pop(rkey, None)
        if admitted is not None and first and not refused and self._signals:
            t = self.tracker
            before = t.flagged
            t.observe(ck, admitted, usage)
            if t.flagged != before:
                self._flag_gauge.set(t.flagged)
                self._event("client_flagged" if t.flagged > before else "client_unflagged")

    # -- reads ----------------------------------------------------------------------------------------
    def budget_status(self, client_id: str, tenant: str = "default", model: str = "") -> BudgetStatus:
        """GetBudget: the client's limits as the store holds them, its signals and its strength now."""
        plan = self._build(tenant or "default", client_id, model, None)
        now = self.clock.now()
        states = self.store.status(plan, now)
        limits = []
        frac = 0.0
        for b, (used, reserved, reset) in zip(plan.buckets, states, strict=True):
            if b.client_scope:
                frac = max(frac, (used + reserved) / b.cap)
            limits.append(LimitState(b.limit, b.unit_name, b.scope, int(b.cap), round(used), round(reserved),
                                     max(round(b.cap - used - reserved), 0), round(reset, 3), b.shadow))
        c = self.tracker.get(f"{tenant or 'default'}\x1f{client_id}")
        score = c.score if c is not None else 0.0
        sig = c.signals() if c is not None else dict.fromkeys(SIGNALS, 0.0)
        return BudgetStatus(plan.tier, tuple(limits), score, sig, self._strength(frac, score),
                            bool(c and c.flagged), c.n if c is not None else 0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            release_store(self.store)

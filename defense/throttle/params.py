"""The ``budget`` defense's configuration, validated at construction.

Limits are named once and shared by tiers; a tier picks the limits that apply to its clients, may
override client-scope amounts, and sets a max-parallel cap. Names end up inside store keys, so they are
restricted to a safe alphabet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

Unit = Literal["requests", "prompt_tokens", "completion_tokens", "total_tokens", "logprob_values"]
Window = Literal["token_bucket", "sliding_window"]
Scope = Literal["client", "tenant", "model", "global"]

# index of each unit in the per-request amounts tuple the defense builds (see Budget._amounts)
UNIT_INDEX: Mapping[str, int] = MappingProxyType(
    {"requests": 0, "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "logprob_values": 4})
PARALLEL_INDEX = 5  # the in-flight slot a request holds until it settles

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_AMOUNT = 10**15  # far above any real budget; larger is a typo (and loses float precision)
SIGNALS = ("repeat", "template", "logit_bias_logprobs", "fixed_seed_n", "logprob_intensity")


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{kind} name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'")


@dataclass(frozen=True, slots=True)
class LimitSpec:
    unit: Unit
    amount: int  # allowed per period, in `unit`
    period_s: float  # the window's length: a token bucket refills `amount` over it
    window: Window = "token_bucket"  # smooth refill; sliding_window suits hour/day budgets
    scope: Scope = "client"  # whose use it counts: one client, a tenant, a model (everyone), everyone
    models: tuple[str, ...] = ()  # only requests for these models count; empty: every model
    shadow: bool = False  # counted and reported, never throttles

    def __post_init__(self) -> None:
        if not 1 <= self.amount <= MAX_AMOUNT:
            raise ValueError(f"amount must be in 1..{MAX_AMOUNT}, got {self.amount}")
        if not math.isfinite(self.period_s) or not 0.001 <= self.period_s <= 366 * 86400:
            raise ValueError(f"period_s must be in 0.001..{366 * 86400} seconds, got {self.period_s}")


@dataclass(frozen=True, slots=True)
class TierSpec:
    limits: tuple[str, ...] | None = None  # limit names; null: every configured limit
    amounts: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # client-scope overrides
    max_parallel: int | None = None  # in-flight requests per client, across processes sharing the store

    def __post_init__(self) -> None:
        if self.max_parallel is not None and not 1 <= self.max_parallel <= 1_000_000:
            raise ValueError(f"max_parallel must be in 1..1000000, got {self.max_parallel}")
        for name, v in self.amounts.items():
            if not 1 <= v <= MAX_AMOUNT:
                raise ValueError(f"amounts.{name} must be in 1..{MAX_AMOUNT}, got {v}")


def _check_curve(name: str, points: tuple[tuple[float, float], ...]) -> None:
    if not points:
        raise ValueError(f"strength.{name} needs at least one [x, multiplier] point")
    xs = [p[0] for p in points]
    if any(not math.isfinite(x) or x < 0 for x in xs) or xs != sorted(xs) or len(set(xs)) != len(xs):
        raise ValueError(f"strength.{name} x values must be finite, >= 0 and strictly increasing, got {xs}")
    for _, y in points:
        if not math.isfinite(y) or y < 1.0:
            # the chain keeps the highest strength any defense asks for: a value below 1 would do nothing
            raise ValueError(f"strength.{name} multipliers must be finite and >= 1, got {y}")


@dataclass(frozen=True, slots=True)
class StrengthCurve:
    """Progressive response: piecewise-linear multipliers, flat beyond the first and last points."""

    # fraction of the client's budget in use (the highest over its client-scope limits) -> multiplier
    usage: tuple[tuple[float, float], ...] = ((0.5, 1.0), (1.0, 2.0))
    # suspicion score (0..1) -> multiplier; 0.5 is where the default signals flag a client
    suspicion: tuple[tuple[float, float], ...] = ((0.25, 1.0), (0.5, 2.0), (1.0, 4.0))
    combine: Literal["max", "product"] = "product"
    max_strength: float = 8.0

    def __post_init__(self) -> None:
        _check_curve("usage", self.usage)
        _check_curve("suspicion", self.suspicion)
        if not math.isfinite(self.max_strength) or self.max_strength < 1.0:
            raise ValueError(f"strength.max_strength must be finite and >= 1, got {self.max_strength}")


def _default_weights() -> Mapping[str, float]:
    # a template sweep alone (0.65 x ~0.85) or constant repeats (0.5 x 1) reach the 0.5 flag; logprobs
    # alone (0.2) never do; logit_bias with logprobs (the logit-extraction probe) weighs the most
    return MappingProxyType({"repeat": 0.5, "template": 0.65, "logit_bias_logprobs": 0.6,
                             "fixed_seed_n": 0.3, "logprob_intensity": 0.2})


@dataclass(frozen=True, slots=True)
class SignalParams:
    enabled: bool = True
    weights: Mapping[str, float] = field(default_factory=_default_weights)
    flag_score: float = 0.5  # a client at or above this score is flagged (audit log, metric)
    unflag_margin: float = 0.1  # flagged until the score falls this far below flag_score (no flapping)
    min_requests: int = 20  # no score before this many settled requests: one odd request proves nothing
    alpha: float = 0.05  # weight of each request in the per-signal moving averages (~20-request memory)
    repeat_window: int = 256  # recent prompt digests remembered per client for exact repeats
    template_horizon: int = 128  # requests over which shared prompt-sketch values count as repetition
    sketch_size: int = 8  # bottom-k MinHash values per prompt (word trigrams)
    # a prompt's share of recurring sketch values maps to the template signal linearly from `low` (0: what
    # varied prompts share through common phrases) to `high` (1: a template with a varying slot)
    template_low: float = 0.2
    template_high: float = 0.7
    sketch_words: int = 160  # words of a prompt sketched (first 128 and last 32): bounds the cost
    intensity_k: int = 5  # logprob values per generated token at which intensity reaches 1
    max_clients: int = 100_000  # clients tracked per process; the least recently seen are dropped

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(SIGNALS)
        if unknown:
            raise ValueError(f"unknown signal weights {sorted(unknown)}; known: {', '.join(SIGNALS)}")
        for k, w in self.weights.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weights.{k} must be finite and >= 0, got {w}")
        if not 0 < self.flag_score <= 1:
            raise ValueError(f"flag_score must be in (0, 1], got {self.flag_score}")
        if not 0 <= self.unflag_margin < self.flag_score:
            raise ValueError(f"unflag_margin must be in [0, flag_score), got {self.unflag_margin}")
        if not 0 <= self.template_low < self.template_high <= 1:
            raise ValueError(f"need 0 <= template_low < template_high <= 1, got {self.template_low}, {self.template_high}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        for name in ("min_requests", "repeat_window", "template_horizon", "sketch_size", "sketch_words",
                     "intensity_k", "max_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sketch_words < 8:
            raise ValueError(f"sketch_words must be >= 8, got {self.sketch_words}")


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class BudgetParams:
    limits: Mapping[str, LimitSpec] = field(default_factory=lambda: MappingProxyType({}))
    tiers: Mapping[str, TierSpec] = field(default_factory=lambda: MappingProxyType({}))
    default_tier: str = "default"  # implicit (every limit, no parallel cap) when `tiers` does not name it
    clients: Mapping[str, str] = field(default_factory=_empty)  # client id (keyed hash) -> tier
    tenants: Mapping[str, str] = field(default_factory=_empty)  # tenant -> tier
    tier_label: str | None = None  # a ClientIdentity label naming the tier, set by a trusted front
    namespace: str = "budget"  # prefix of this defense's store keys: two budgets never share counters
    reservation_ttl_s: float = 600.0  # an admitted request never settled is released after this
    settle_dedup_s: float = 900.0  # a retried Settle within this is charged once, across processes
    on_store_unavailable: Literal["local", "refuse"] = "local"  # shared store down: local limits or 429
    store_retry_s: float = 2.0  # after a store failure, the shared store is tried again after this
    fallback_share: float = 1.0  # local limits during an outage, as a share of each amount (1/replicas)
    lease_fraction: float = 0.05  # sqlite: budget a process takes per store transaction, of each amount
    lease_requests: int = 16  # sqlite: ... and at most this many requests' worth (bounds what a kill -9 strands)
    lease_ttl_s: float = 2.0  # sqlite: leased budget goes back to the store once unused this long
    store_timeout_s: float = 0.25  # redis socket timeout; sqlite waits this long for the write lock x 8
    parallel_retry_s: float = 1.0  # Retry-After for a request over max_parallel (slots free on settle)
    strength: StrengthCurve = StrengthCurve()
    signals: SignalParams = SignalParams()

    def __post_init__(self) -> None:
        for name in self.limits:
            _check_name("limit", name)
        for name in self.tiers:
            _check_name("tier", name)
        _check_name("namespace", self.namespace)
        for tname, tier in self.tiers.items():
            names = tier.limits if tier.limits is not None else tuple(self.limits)
            for ln in names:
                if ln not in self.limits:
                    raise ValueError(f"tiers.{tname}.limits names unknown limit {ln!r}; "
                                     f"known: {', '.join(self.limits) or '(none)'}")
            for ln in tier.amounts:
                if ln not in names:
                    raise ValueError(f"tiers.{tname}.amounts.{ln} is not one of the tier's limits: {', '.join(names)}")
                if self.limits[ln].scope != "client":
                    # a tenant or global counter is shared by clients of every tier: one amount only
                    raise ValueError(f"tiers.{tname}.amounts.{ln}: only client-scope limits can be overridden "
                                     f"per tier ({ln} has scope {self.limits[ln].scope})")
        known = set(self.tiers) | {self.default_tier}
        if self.default_tier not in self.tiers:
            _check_name("tier", self.default_tier)
        for kind, table in (("clients", self.clients), ("tenants", self.tenants)):
            for who, tier in table.items():
                if tier not in known:
                    raise ValueError(f"{kind}.{who} names unknown tier {tier!r}; known: {', '.join(sorted(known))}")
        for name in ("reservation_ttl_s", "settle_dedup_s", "store_retry_s", "lease_ttl_s", "store_timeout_s",
                     "parallel_retry_s"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        if not 0 < self.fallback_share <= 1:
            raise ValueError(f"fallback_share must be in (0, 1], got {self.fallback_share}")
        if not 1 <= self.lease_requests <= 10_000:
            raise ValueError(f"lease_requests must be in 1..10000, got {self.lease_requests}")
        if not 0 < self.lease_fraction <= 0.5:
            raise ValueError(f"lease_fraction must be in (0, 0.5], got {self.lease_fraction}")

    def tier_names(self) -> list[str]:
        return sorted(set(self.tiers) | {self.default_tier})

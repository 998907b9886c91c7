"""Request rules: close the API features that leak the most per query, before the engine runs.

Full-vocabulary logprobs (top_logprobs=-1), logit_bias together with logprobs (the logit-extraction
probe: bias one token, read how every logprob moves), prompt logprobs and echo (logprobs of text the
attacker chose), and raw logits outputs. Each is refused, stripped or allowed per config; the defaults
are the safe choice. A refusal is a deny decision with a reason (HTTP 400 at a front), not an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from .base import AdmissionDefense, Deps, OnError
from .types import ALLOW, Cost, Decision, RequestContext, Rewrites, Verdict

Action = Literal["strip", "deny", "allow"]


@dataclass(frozen=True, slots=True)
class TierRules:
    """A tier's own caps; a field left out keeps the defense-wide value."""

    max_top_logprobs: int | None = None
    max_n: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_caps(self.max_top_logprobs, self.max_n, self.max_tokens)


def _check_caps(top: int | None, n: int | None, tokens: int | None) -> None:
    if top is not None and not 0 <= top <= 1000:
        raise ValueError(f"max_top_logprobs must be in 0..1000, got {top}")
    if n is not None and n < 1:
        raise ValueError(f"max_n must be >= 1, got {n}")
    if tokens is not None and tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {tokens}")


@dataclass(frozen=True, slots=True)
class RequestRulesParams:
    max_top_logprobs: int = 5  # OpenAI allows 20; 5 keeps the answer useful and quarters what each position leaks
    over_cap: Literal["clamp", "deny"] = "clamp"
    allow_all_logprobs: bool = False  # top_logprobs=-1 returns the whole distribution: refused unless allowed
    logit_bias_with_logprobs: Action = "strip"  # strip drops the logit_bias, keeps the logprobs
    prompt_logprobs: Action = "strip"
    echo_with_logprobs: Action = "strip"
    raw_logits_outputs: Action = "strip"
    max_n: int | None = None  # cap on choices per request
    max_tokens: int | None = None  # cap on completion length
    # per-tier caps, chosen by the request label ``tier_label`` (a front sets it, e.g. from a header)
    tiers: Mapping[str, TierRules] = field(default_factory=lambda: MappingProxyType({}))
    tier_label: str = "tier"
    # a client whose profile strength is raised (budget use, suspicion) sees max_top_logprobs / strength
    # alternatives, at least one: fewer values per query before any hard stop. Always a clamp, never a deny.
    shrink_with_strength: bool = True

    def __post_init__(self) -> None:
        _check_caps(self.max_top_logprobs, self.max_n, self.max_tokens)
        if not self.tier_label:
            raise ValueError("tier_label must not be empty")


def _deny(code: str, reason: str) -> Verdict:
    return Verdict(Decision.DENY, reason=reason, reason_code=code)


class RequestRules(AdmissionDefense):
    Params = RequestRulesParams
    default_on_error = OnError.FAIL_CLOSED  # pure and cheap: a failure is a bug, and passing would open the leak

    def __init__(self, params: RequestRulesParams | None = None, *, deps: Deps | None = None) -> None:
        super().__init__(params, deps=deps)
        self._verdicts: dict[tuple[tuple[str, object], ...], Verdict] = {}

    def caps(self, ctx: RequestContext) -> tuple[int, int | None, int | None, int]:
        """(max_top_logprobs, max_n, max_tokens, the cap before strength) for this request's tier."""
        p: RequestRulesParams = self.params
        top, max_n, max_tokens = p.max_top_logprobs, p.max_n, p.max_tokens
        if p.tiers:
            tier = p.tiers.get(ctx.labels.get(p.tier_label, ""))
            if tier is not None:
                top = tier.max_top_logprobs if tier.max_top_logprobs is not None else top
                max_n = tier.max_n if tier.max_n is not None else max_n
                max_tokens = tier.max_tokens if tier.max_tokens is not None else max_tokens
        configured = top
        if p.shrink_with_strength and ctx.strength > 1.0 and top > 1:
            top = max(1, math.floor(top / ctx.strength))
        return top, max_n, max_tokens, configured

    uses_cost = False  # caps and strips; the budget prices the request

    def admit(self, ctx: RequestContext, cost: Cost) -> Verdict:
        p: RequestRulesParams = self.params
        rw: dict[str, object] = {}
        logprobs = ctx.wants_logprobs
        cap, max_n, max_tokens, configured = self.caps(ctx)
        if ctx.top_logprobs == -1:
            if not p.allow_all_logprobs:
                return _deny("top_logprobs_all", "top_logprobs=-1 (every token's logprob) is not allowed")
        elif ctx.top_logprobs > cap:
            if p.over_cap == "deny" and ctx.top_logprobs > configured:
                return _deny("top_logprobs_over_cap",
                             f"top_logprobs must be <= {configured}, got {ctx.top_logprobs}")
            rw["top_logprobs"] = cap
        if logprobs and ctx.logit_bias_entries and p.logit_bias_with_logprobs != "allow":
            if p.logit_bias_with_logprobs == "deny":
                return _deny("logit_bias_with_logprobs", "logit_bias cannot be combined with logprobs")
            rw["drop_logit_bias"] = True
        if ctx.prompt_logprobs and p.prompt_logprobs != "allow":
            if p.prompt_logprobs == "deny":
                return _deny("prompt_logprobs", "prompt logprobs are not available")
            rw["drop_prompt_logprobs"] = True
        if ctx.echo and logprobs and p.echo_with_logprobs != "allow":
            if p.echo_with_logprobs == "deny":
                return _deny("echo_with_logprobs", "echo cannot be combined with logprobs")
            rw["drop_echo"] = True
        if ctx.raw_logits_outputs and p.raw_logits_outputs != "allow":
            if p.raw_logits_outputs == "deny":
                return _deny("raw_logits_outputs",
                             f"raw logits outputs are not available: {', '.join(ctx.raw_logits_outputs)}")
            rw["strip_outputs"] = tuple(ctx.raw_logits_outputs)
        if max_n is not None and ctx.n > max_n:
            rw["n"] = max_n
        if max_tokens is not None and (ctx.max_tokens is None or ctx.max_tokens > max_tokens):
            rw["max_tokens"] = max_tokens
        if not rw:
            return ALLOW
        key = tuple(rw.items())  # a handful of shapes in practice (clamp k, drop logit_bias, ...): built once
        v = self._verdicts.get(key)
        if v is None:
            if len(self._verdicts) > 256:
                self._verdicts.clear()
            v = self._verdicts[key] = Verdict(rewrites=Rewrites(**rw))  # type: ignore[arg-type]
        return v

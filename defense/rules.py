"""Request rules: close the API features that leak the most per query, before the engine runs.

Full-vocabulary logprobs (top_logprobs=-1), logit_bias together with logprobs (the logit-extraction
probe: bias one token, read how every logprob moves), prompt logprobs and echo (logprobs of text the
attacker chose), and raw logits outputs. Each is refused, stripped or allowed per config; the defaults
are the safe choice. A refusal is a deny decision with a reason (HTTP 400 at a front), not an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import AdmissionDefense, OnError
from .types import ALLOW, Cost, Decision, RequestContext, Rewrites, Verdict

Action = Literal["strip", "deny", "allow"]


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

    def __post_init__(self) -> None:
        if not 0 <= self.max_top_logprobs <= 1000:
            raise ValueError(f"max_top_logprobs must be in 0..1000, got {self.max_top_logprobs}")
        if self.max_n is not None and self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def _deny(code: str, reason: str) -> Verdict:
    return Verdict(Decision.DENY, reason=reason, reason_code=code)


class RequestRules(AdmissionDefense):
    Params = RequestRulesParams
    default_on_error = OnError.FAIL_CLOSED  # pure and cheap: a failure is a bug, and passing would open the leak

    def admit(self, ctx: RequestContext, cost: Cost) -> Verdict:
        p: RequestRulesParams = self.params
        rw: dict[str, object] = {}
        logprobs = ctx.wants_logprobs
        if ctx.top_logprobs == -1:
            if not p.allow_all_logprobs:
                return _deny("top_logprobs_all", "top_logprobs=-1 (every token's logprob) is not allowed")
        elif ctx.top_logprobs > p.max_top_logprobs:
            if p.over_cap == "deny":
                return _deny("top_logprobs_over_cap",
                             f"top_logprobs must be <= {p.max_top_logprobs}, got {ctx.top_logprobs}")
            rw["top_logprobs"] = p.max_top_logprobs
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
        if p.max_n is not None and ctx.n > p.max_n:
            rw["n"] = p.max_n
        if p.max_tokens is not None and (ctx.max_tokens is None or ctx.max_tokens > p.max_tokens):
            rw["max_tokens"] = p.max_tokens
        return Verdict(rewrites=Rewrites(**rw)) if rw else ALLOW  # type: ignore[arg-type]

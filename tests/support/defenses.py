"""Small defenses used by the tests to observe the chain's behaviour."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from defense.base import AdmissionDefense, ResponseDefense
from defense.types import ALLOW, Cost, Decision, LogprobBatch, RequestContext, Rewrites, Usage, Verdict

CALLS: list[tuple[str, str]] = []  # (defense name, event), appended in call order


@dataclass(frozen=True, slots=True)
class RecorderParams:
    tag: str = "r"
    decision: str = "allow"  # allow | deny | throttle | raise
    cap_top_logprobs: int | None = None
    strength: float = 1.0


class Recorder(AdmissionDefense):
    Params = RecorderParams

    def admit(self, ctx: RequestContext, cost: Cost) -> Verdict:
        p = self.params
        CALLS.append((p.tag, f"admit top_logprobs={ctx.top_logprobs}"))
        if p.decision == "raise":
            raise RuntimeError("recorder asked to fail")
        if p.decision in ("deny", "throttle"):
            return Verdict(Decision(p.decision), reason=f"{p.tag} refuses", reason_code=p.tag, retry_after_s=1.5)
        if p.cap_top_logprobs is not None and ctx.top_logprobs > p.cap_top_logprobs:
            return Verdict(rewrites=Rewrites(top_logprobs=p.cap_top_logprobs), strength=p.strength)
        return Verdict(strength=p.strength) if p.strength != 1.0 else ALLOW

    def settle(self, ctx: RequestContext, usage: Usage) -> None:
        CALLS.append((self.params.tag, f"settle {usage.status.value} {usage.completion_tokens}"))


SWITCH: dict[str, object] = {"decision": "allow", "block_s": 0.0, "on_admit": None}


class Switch(AdmissionDefense):
    """Decides what ``SWITCH`` says at each admit (tests flip it between calls), after blocking its
    thread for ``block_s`` and calling ``on_admit`` (to look at what else happened meanwhile)."""

    def admit(self, ctx: RequestContext, cost: Cost) -> Verdict:
        import time

        time.sleep(float(SWITCH["block_s"]))  # type: ignore[arg-type]
        if SWITCH["on_admit"] is not None:
            SWITCH["on_admit"]()  # type: ignore[operator]
        decision = SWITCH["decision"]
        CALLS.append(("switch", f"admit {decision}"))
        if decision == "allow":
            return ALLOW
        return Verdict(Decision(decision), reason="switch refuses", reason_code="switch", retry_after_s=1.0)


@dataclass(frozen=True, slots=True)
class ShiftParams:
    tag: str = "s"
    fail: bool = False


class Shift(ResponseDefense):
    """Moves mass from the top alternative to the second (keeps the total), or raises."""

    Params = ShiftParams

    def apply(self, batch: LogprobBatch, ctx: RequestContext) -> LogprobBatch:
        CALLS.append((self.params.tag, "apply"))
        if self.params.fail:
            raise RuntimeError("shift asked to fail")
        p = np.exp(batch.values.astype(np.float64))
        moved = 0.1 * p[:, 0]
        p[:, 0] -= moved
        p[:, 1] += moved
        return replace(batch, values=np.log(p).astype(np.float32))

    def prime(self, ctx: RequestContext) -> None:
        CALLS.append((self.params.tag, "prime"))
        if self.params.fail:
            raise RuntimeError("shift asked to fail")


class NotADefense:
    Params = RecorderParams

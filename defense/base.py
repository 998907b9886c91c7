"""The three defense interfaces, their modes and failure policies.

A defense is constructed from its validated ``Params`` and shared dependencies (``Deps``); the chain,
not the defense, applies its mode (enforce / shadow / off) and its failure policy, so every defense
gets shadow mode and fail-open/fail-closed for free.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from .clock import SYSTEM_CLOCK, Clock
from .types import Cost, LogprobBatch, RequestContext, Usage, Verdict

if TYPE_CHECKING:  # torch is only needed by sampling defenses, at call time
    import numpy as np
    import torch

    from .keys import KeyRing
    from .metrics import Metrics


class Mode(StrEnum):
    ENFORCE = "enforce"  # decisions and changes take effect
    SHADOW = "shadow"  # computed and counted, nothing changed: how a new defense is rolled out
    OFF = "off"  # not called at all


class OnError(StrEnum):
    FAIL_OPEN = "fail_open"  # pass the request or output through unchanged, count, log
    FAIL_CLOSED = "fail_closed"  # refuse with an error status


@dataclass(frozen=True, slots=True)
class Deps:
    """What the chain hands every defense at construction."""

    keys: KeyRing | None = None
    clock: Clock = SYSTEM_CLOCK
    metrics: Metrics | None = None
    state_uri: str = "memory://"
    extra: dict[str, Any] = field(default_factory=dict)

    def require_keys(self, who: str) -> KeyRing:
        if self.keys is None:
            raise ValueError(f"{who} needs a key file (set keys.file in the config or DISTILLGUARD_KEYS)")
        return self.keys


@dataclass(frozen=True, slots=True)
class NoParams:
    """For defenses without parameters."""


class Defense(abc.ABC):  # noqa: B024 - abstract through its three subclasses
    """Shared by all three kinds: validated params, and a lifecycle."""

    #: the dataclass its ``params:`` config block is validated against
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None, *, deps: Deps | None = None) -> None:
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"{type(self).__name__} expects {self.Params.__qualname__}, got {type(self.params).__name__}")
        self.deps = deps if deps is not None else Deps()

    def close(self) -> None:  # noqa: B027 - optional hook, like OpenTelemetry's shutdown
        """Release resources (connections, threads). Called once when the chain is replaced or stops."""


class AdmissionDefense(Defense):
    """Runs once per request before it reaches the engine: decide, clamp, reserve."""

    # False for a defense that never reads ``cost`` (the chain then skips estimating it for that defense)
    uses_cost: bool = True

    @abc.abstractmethod
    def admit(self, ctx: RequestContext, cost: Cost) -> Verdict:
        """Decide on the request. A refusal is a ``Verdict`` (throttle or deny), never an exception."""

    def settle(self, ctx: RequestContext, usage: Usage) -> None:  # noqa: B027 - stateless defenses settle nothing
        """Charge actual usage and release what ``admit`` reserved. Must be idempotent on request_id."""


class SamplingDefense(Defense):
    """Runs inside the engine's sampler on every decode step: no I/O, vectorized over the batch."""

    @abc.abstractmethod
    def process_logits(
        self, logits: torch.Tensor, prefixes: Sequence[Sequence[int]], ctxs: Sequence[RequestContext]
    ) -> torch.Tensor:
        """logits: [B, V] float32 (pre-temperature); prefixes: B token-id sequences; returns [B, V].

        Returns a new tensor unless the adapter states the engine allows in-place writes.
        """

    def is_argmax_invariant(self) -> bool:
        """True when the defense never changes which token has the highest logit (greedy is untouched)."""
        return False


class ResponseDefense(Defense):
    """Runs on what the engine returns (top-k logprobs, probability vectors). Pure."""

    @abc.abstractmethod
    def apply(self, batch: LogprobBatch, ctx: RequestContext) -> LogprobBatch:
        """Return a new batch; never mutate ``batch``."""

    def apply_counted(self, batch: LogprobBatch, ctx: RequestContext) -> tuple[LogprobBatch, int | None]:
        """``apply``, and how many values it changed when the defense counted them on the way (the chain
        counts them itself on None)."""
        return self.apply(batch, ctx), None

    def apply_dense(self, values: np.ndarray, ctx: RequestContext) -> tuple[np.ndarray, int] | None:
        """``apply_counted`` on dense probability vectors, given as their values alone ([P, C] float32, C >= 1,
        column j is class j; no sampled token, raw mode, position 0): (new values, values changed), without a
        batch on either side. None (the default): this defense takes the batch (the chain builds it)."""
        return None

    def prime(self, ctx: RequestContext) -> None:
        """Work ``apply`` needs that depends on the request alone (a keyed seed), done ahead: fronts call the
        chain's ``prime`` while the model computes the answer, so its protect is shorter. Optional; a
        failure here is ignored (``apply`` meets it again, under the chain's failure policy)."""


DEFENSE_KINDS: tuple[type[Defense], ...] = (AdmissionDefense, SamplingDefense, ResponseDefense)

"""DefenseChain: runs the configured defenses in config order with their modes and failure policies.

The chain decides; fronts and the sidecar only translate. It is immutable: a config reload builds a
new chain and swaps it in, so a request never sees half of one config and half of another.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .base import AdmissionDefense, Defense, Deps, Mode, OnError, ResponseDefense, SamplingDefense
from .canonical import context_digest
from .clock import SYSTEM_CLOCK, Clock
from .config import IdentitySettings, LoadedConfig
from .errors import DefenseFailure, InvalidInput
from .metrics import Metrics
from .perturbation import kernels
from .types import (
    NO_REWRITES,
    Cost,
    Decision,
    LogprobBatch,
    OutputKind,
    Prompt,
    RequestContext,
    Rewrites,
    SettleStatus,
    Usage,
    Verdict,
    dense_ids,
    evolve,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("distillguard.chain")

_LOGPROB_SLACK = 1e-4  # engines return log-softmax values that can round a hair above 0
_PROB_SUM_TOL = 1e-3  # float32 probability vectors from a softmax sum to 1 within this


_DEFAULT_IDENTITY = IdentitySettings()


@dataclass(frozen=True, slots=True)
class ChainEntry:
    name: str
    defense: Defense
    mode: Mode = Mode.ENFORCE
    on_error: OnError = OnError.FAIL_OPEN


class Step(NamedTuple):
    """What one defense did to one request (for the demo, audit logs and tests). A named tuple: made for
    every defense on every request, at half a frozen dataclass's cost."""

    defense: str
    mode: Mode
    verdict: Verdict | None = None
    error: str = ""  # the exception type when it raised
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Admission:
    decision: Decision
    ctx: RequestContext  # the request after rewrites, with its context digest and strength
    reason: str = ""
    reason_code: str = ""
    retry_after_s: float = 0.0
    reservation_id: str = ""
    rewrites: Rewrites = Rewrites()
    shadow: bool = False  # a shadow-mode defense would have refused
    decided_by: str = ""
    steps: tuple[Step, ...] = ()
    # for a private id (RequestContext.private_id) only, which the ledger does not keep: what its settle
    # needs, carried by the admission instead (DefenseChain.settle)
    ticket: Ticket | None = field(default=None, repr=False, compare=False)

    @property
    def allowed(self) -> bool:
        return not self.decision.refuses


class Ticket:
    """A private id's admission as its settle needs it: the chain that admitted it, the admission defenses
    that answered, and whether it was settled (a second settle is a retry, charged once)."""

    __slots__ = ("chain", "admitted_by", "settled")

    def __init__(self, chain: DefenseChain, admitted_by: tuple[int, ...]) -> None:
        self.chain = chain
        self.admitted_by = admitted_by
        self.settled = False


@dataclass(frozen=True, slots=True)
class Protected:
    batch: LogprobBatch
    applied: tuple[str, ...] = ()  # defenses that changed the output (enforce mode)
    steps: tuple[Step, ...] = ()


@dataclass(slots=True)
class _Record:
    """An admission as the ledger keeps it: its context without the prompt or input (the digest stays), so
    100k remembered requests hold neither their prompts' memory nor objects for the collector to walk,
    and its other fields as a tuple in Admission's order (no second Admission built per request)."""

    ctx: RequestContext
    fields: tuple[Any, ...]  # Admission's fields after ctx
    expires: float
    admitted_by: tuple[int, ...] = ()
    settled: bool = False

    @property
    def admission(self) -> Admission:
        """The remembered admission (a retried Admit gets it back; settle needs identity, model, digest)."""
        return Admission(self.fields[0], self.ctx, *self.fields[1:])


@dataclass(slots=True)
class AdmissionLedger:
    """Recent admissions by (tenant, client, request_id): makes Admit and Settle idempotent on retries.

    Bounded (LRU) and time-limited; the durable idempotency of charges lives in the budget store, so a
    retry that reaches another replica or a restarted sidecar is still charged once.
    """

    max_entries: int = 100_000
    ttl_s: float = 3600.0
    records: OrderedDict[tuple[str, str, str], _Record] = field(default_factory=OrderedDict)

    def get(self, key: tuple[str, str, str], now: float) -> _Record | None:
        rec = self.records.get(key)
        if rec is None:
            return None
        if rec.expires < now:
            del self.records[key]
            return None
        self.records.move_to_end(key)
        return rec

    def put(self, key: tuple[str, str, str], rec: _Record) -> None:
        records = self.records
        if key in records:
            records.move_to_end(key)
        records[key] = rec  # a new key goes to the end
        while len(records) > self.max_entries:
            records.popitem(last=False)


def _key(ctx: RequestContext) -> tuple[str, str, str]:
    return (ctx.tenant, ctx.client_id, ctx.request_id)


def check_values(batch: LogprobBatch) -> None:
    """Refuse a batch no engine could have produced, rather than return a silently wrong distribution."""
    v = batch.values
    if kernels.ENABLED:
        if batch.kind is OutputKind.TOP_LOGPROBS:
            _check_top_fused(batch)
            return
        if batch.token_ids.shape[1] == 0:  # dense probability vectors: every slot present
            _check_probs_fused(batch)
            return
    present = batch.present
    vals = v[present]
    if batch.kind is OutputKind.TOP_LOGPROBS:
        # -inf is a legitimate logprob (probability 0); NaN and +inf are not. The max finds both (NaN
        # propagates through it): one reduction instead of two scans
        top = float(vals.max()) if vals.size else 0.0
        if math.isnan(top) or top == math.inf:
            raise InvalidInput("logprobs contain NaN or +infinity")
        if top > _LOGPROB_SLACK:
            raise InvalidInput(f"logprobs must be <= 0, got {top:.6g}")
        ids = batch.token_ids
        # present is ids >= 0 here (token_ids has the values' shape): no negative id can be present
        if ids.shape[1] > 1:
            # a position listing a token twice: k larger than the vocabulary, or a broken front
            s = np.sort(np.where(present, ids, -1 - np.arange(ids.shape[1])), axis=1)
            dup = s[:, 1:] == s[:, :-1]
            if dup.any():
                row = int(np.argmax(dup.any(axis=1)))
                raise InvalidInput(f"position {row} lists token id {int(s[row, 1:][dup[row]][0])} more than once "
                                   f"(k larger than the vocabulary?)")
        # a top-k's total probability cannot exceed 1
        total = np.where(present, np.exp(np.minimum(v, 0.0)), 0.0).sum(axis=1)
        if total.size and float(total.max()) > 1.0 + _PROB_SUM_TOL:
            raise InvalidInput(f"a position's top-k probabilities sum to {float(total.max()):.6g} > 1")
    else:
        if not np.isfinite(vals).all():
            raise InvalidInput("probabilities contain NaN or infinity")
        if vals.size and float(vals.min()) < 0:
            raise InvalidInput(f"probabilities must be >= 0, got {float(vals.min()):.6g}")
        sums = v.sum(axis=1)
        if sums.size and float(np.abs(sums - 1.0).max()) > _PROB_SUM_TOL:
            raise InvalidInput(f"each probability vector must sum to 1, got a sum of {float(sums[np.argmax(np.abs(sums - 1))]):.6g}")


def _check_top_fused(batch: LogprobBatch) -> None:
    """check_values' top-k rules in one compiled pass; the same errors, worded the same."""
    code, row, value, token = kernels.check_top(batch.values, batch.token_ids, _LOGPROB_SLACK, _PROB_SUM_TOL)
    if code == kernels.OK:
        return
    if code == kernels.NOT_FINITE:
        raise InvalidInput("logprobs contain NaN or +infinity")
    if code == kernels.ABOVE_ZERO:
        raise InvalidInput(f"logprobs must be <= 0, got {value:.6g}")
    if code == kernels.DUPLICATE:
        raise InvalidInput(f"position {row} lists token id {token} more than once (k larger than the vocabulary?)")
    raise InvalidInput(f"a position's top-k probabilities sum to {value:.6g} > 1")


def _check_probs_fused(batch: LogprobBatch) -> None:
    _check_probs_values(batch.values)


def _check_probs_values(values: np.ndarray) -> None:
    """check_values' rules for dense probability vectors [P, C], in one compiled pass."""
    code, row, value = kernels.check_probs(values, _PROB_SUM_TOL)
    if code == kernels.OK:
        return
    if code == kernels.NOT_FINITE:
        raise InvalidInput("probabilities contain NaN or infinity")
    if code == kernels.NEGATIVE:
        raise InvalidInput(f"probabilities must be >= 0, got {value:.6g}")
    raise InvalidInput(f"each probability vector must sum to 1, got a sum of {value:.6g}")


class DefenseChain:
    """A list of defenses that is itself a defense of all three kinds (config order)."""

    def __init__(
        self,
        entries: Sequence[ChainEntry],
        *,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        identity: IdentitySettings = _DEFAULT_IDENTITY,
        ledger: AdmissionLedger | None = None,
        bookkeeping: Callable[[Callable[[], object]], object] | None = None,
    ) -> None:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"defense names must be unique, got {names}")
        self.entries = tuple(entries)
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self.identity = identity
        live = [(i, e) for i, e in enumerate(self.entries) if e.mode is not Mode.OFF]
        self.admission = tuple((i, e) for i, e in live if isinstance(e.defense, AdmissionDefense))
        self.sampling = tuple((i, e) for i, e in live if isinstance(e.defense, SamplingDefense))
        self.response = tuple((i, e) for i, e in live if isinstance(e.defense, ResponseDefense))
        # shared across config reloads so a retried Admit or Settle stays idempotent through a reload
        self.ledger = ledger if ledger is not None else AdmissionLedger()
        # where an Admit's bookkeeping runs once its decision is made (metrics, the ledger's record), and a
        # Protect's (its timers and changed-value counters): None runs it inline; a host serving on an event
        # loop passes defense.deferred.soon or a Deferred's add, which run it on the loop's next turn, after
        # the answer is handed over (a retried Admit that races it is admitted again, which the budget store
        # absorbs: its reservations are idempotent on the request id)
        self.bookkeeping = bookkeeping
        # label children bound once: a labels() lookup per call would cost more than a cheap defense
        m = self.metrics
        self._timers = {(e.name, s): m.defense_duration.labels(e.name, s)
                        for e in self.entries for s in ("admit", "settle", "protect", "sample")}
        self._decisions = {(e.name, d.value, e.mode.value): m.defense_decisions.labels(e.name, d.value, e.mode.value)
                           for e in self.entries for d in Decision}
        self._requests = {(d, shadow): m.requests.labels(d.value, "true" if shadow else "false")
                          for d in Decision for shadow in (False, True)}
        # per admission entry: its admit timer and its decision counters by Decision (no key tuples per call)
        self._admit_metrics = {i: (self._timers[(e.name, "admit")],
                                   {d: self._decisions[(e.name, d.value, e.mode.value)] for d in Decision})
                               for i, e in self.admission}
        self._settles = {(st, dup): m.settles.labels(st.value, dup) for st in SettleStatus for dup in ("true", "false")}
        # admission defenses with a settle of their own: a stateless one (the base class's no-op) is skipped
        self._settling = frozenset(i for i, e in self.admission
                                   if type(e.defense).settle is not AdmissionDefense.settle)
        self._rewrite_counters: dict[tuple[str, str], Any] = {}
        self._changed_counters: dict[str, Any] = {}  # values_changed by defense, bound at first use
        self._fields_seen: dict[int, tuple[Rewrites, list[str]]] = {}
        self._closed = False

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, loaded: LoadedConfig, *, deps: Deps, **kwargs: Any) -> DefenseChain:
        """Build every defense; if one fails to build, those already built are closed and the error raised."""
        entries: list[ChainEntry] = []
        try:
            for b in loaded.defenses:
                entries.append(ChainEntry(b.name, b.cls(b.params, deps=deps), b.mode, b.on_error))
        except BaseException:
            for e in entries:
                _close_quietly(e)
            raise
        metrics = deps.metrics if deps.metrics is not None else kwargs.pop("metrics", None)
        return cls(entries, metrics=metrics, clock=deps.clock, identity=loaded.config.identity, **kwargs)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def sampling_defenses(self) -> tuple[SamplingDefense, ...]:
        return tuple(e.defense for _, e in self.sampling if e.mode is Mode.ENFORCE)  # type: ignore[misc]

    def _changed_fields(self, rw: Rewrites) -> list[str]:
        # defenses reuse their verdicts for common rewrites (request rules' clamps): name their fields once
        if len(self._fields_seen) > 1024:
            self._fields_seen.clear()
        hit = self._fields_seen.get(id(rw))
        if hit is not None and hit[0] is rw:
            return hit[1]
        out = _changed_fields(rw)
        self._fields_seen[id(rw)] = (rw, out)
        return out

    def _rewrite_counter(self, name: str, field_name: str) -> Any:
        c = self._rewrite_counters.get((name, field_name))
        if c is None:
            c = self._rewrite_counters[(name, field_name)] = self.metrics.rewrites.labels(name, field_name)
        return c

    # -- admission ------------------------------------------------------------------------------
    def prepare(self, ctx: RequestContext) -> RequestContext:
        """Fill what the chain derives from a request: its context digest (fronts that compute it, skip this)."""
        if ctx.context_digest:
            return ctx
        return evolve(ctx, context_digest=context_digest(ctx.model, ctx.prompt),
                      received_at=ctx.received_at or self.clock.now())

    def estimate(self, ctx: RequestContext) -> Cost:
        return Cost.estimate(ctx, chars_per_token=self.identity.chars_per_token,
                             default_max_tokens=self.identity.default_max_tokens)

    def admit(self, ctx: RequestContext) -> Admission:
        """Run admission defenses in order; the first enforced refusal decides. Idempotent on request_id."""
        now = self.clock.now()
        key = _key(ctx)
        if not ctx.private_id:  # a private id is new by construction: no retry can bring it again
            rec = self.ledger.get(key, now)
            if rec is not None:
                return rec.admission
        ctx = self.prepare(ctx)
        m = self.metrics
        steps: list[Step] = []
        admitted: list[int] = []
        rewrites = NO_REWRITES
        strength = ctx.strength
        shadow = False
        reservation = ""
        refusal: tuple[str, Verdict] | None = None
        cost: Cost | None = None
        costed: RequestContext | None = None
        for idx, e in self.admission:
            d: AdmissionDefense = e.defense  # type: ignore[assignment]
            t0 = self.clock.monotonic()
            if not d.uses_cost:
                priced = _UNPRICED
            else:
                if cost is None or ctx is not costed:  # once per Admit unless a rewrite changed the request
                    cost, costed = self.estimate(ctx), ctx
                priced = cost
            try:
                verdict = d.admit(ctx, priced)
            except InvalidInput:
                self._release(ctx, admitted)
                raise
            except Exception as exc:  # noqa: BLE001 - the policy decides what a failure means
                dt = self.clock.monotonic() - t0
                self._timers[(e.name, "admit")].observe(dt)
                steps.append(Step(e.name, e.mode, error=type(exc).__name__, seconds=dt))
                if self._failed(e, "admit", exc, ctx):
                    self._release(ctx, admitted)
                    raise DefenseFailure(e.name, "admit", exc) from exc
                continue
            dt = self.clock.monotonic() - t0
            steps.append(Step(e.name, e.mode, verdict, "", dt))
            admitted.append(idx)
            if e.mode is Mode.SHADOW:
                if verdict.decision.refuses or not verdict.rewrites.empty or verdict.strength != 1.0:
                    m.shadow_effects.labels(e.name, "admit").inc()
                    shadow = shadow or verdict.decision.refuses
                continue
            if verdict.decision.refuses:
                refusal = (e.name, verdict)
                break
            rw = verdict.rewrites
            if rw is not NO_REWRITES and not rw.empty:
                rewrites = rw if rewrites is NO_REWRITES else rewrites.merge(rw)
                ctx = rw.apply(ctx)
            if verdict.strength > strength:  # later defenses (request rules' caps) see the raised strength
                strength = verdict.strength
                ctx = evolve(ctx, strength=strength)
            reservation = reservation or verdict.reservation_id
        # Admission's fields after ctx, in order: the result and the ledger's record share them
        if refusal is not None:
            name, v = refusal
            self._release(ctx, [i for i in admitted if self.entries[i].name != name])
            fields = (v.decision, v.reason, v.reason_code, v.retry_after_s, "", NO_REWRITES, shadow, name,
                      tuple(steps))
        else:
            ctx = evolve(ctx, strength=strength) if strength != ctx.strength else ctx
            fields = (Decision.ALLOW if rewrites.empty else Decision.ALLOW_MODIFIED, "", "", 0.0,
                      reservation or _reservation_id(ctx), rewrites, shadow, "", tuple(steps))
        result = Admission(fields[0], ctx, *fields[1:]) if not ctx.private_id else \
            Admission(fields[0], ctx, *fields[1:], ticket=Ticket(self, tuple(admitted)))
        if self.bookkeeping is None:
            self._book(key, ctx, fields, admitted, now)
        else:
            self.bookkeeping(functools.partial(self._book, key, ctx, fields, admitted, now))
        return result

    def _book(self, key: tuple[str, str, str], ctx: RequestContext, fields: tuple[Any, ...], admitted: list[int],
              now: float) -> None:
        """An Admit's metrics and ledger record (see ``bookkeeping``): timers and decisions per defense that
        answered (its steps, in ``admitted``'s order), rewrites per field, the request's outcome."""
        entries = self.entries
        for idx, step in zip(admitted, [s for s in fields[8] if not s.error], strict=True):
            timer, decisions = self._admit_metrics[idx]
            timer.observe(step.seconds)
            verdict: Verdict = step.verdict  # type: ignore[assignment]
            decisions[verdict.decision].inc()
            rw = verdict.rewrites
            if rw is not NO_REWRITES and step.mode is not Mode.SHADOW and not verdict.decision.refuses and not rw.empty:
                for fname in self._changed_fields(rw):
                    self._rewrite_counter(entries[idx].name, fname).inc()
        self._requests[(fields[0], fields[6])].inc()
        if not ctx.private_id:  # a private id is settled by its front with the Admission in hand
            self.ledger.put(key, _Record(_slim(ctx), fields, now + self.ledger.ttl_s, tuple(admitted),
                                         settled=fields[0].refuses))

    def settle(self, ctx: RequestContext, usage: Usage, admission: Admission | None = None) -> bool:
        """Charge actual usage to every admission defense. Returns False for a retry (charged once).

        A private id (``RequestContext.private_id``) is not in the ledger (nothing can retry its Admit, and
        100k remembered requests cost memory and the collector's time): its front passes the ``admission``
        Admit returned, which carries what the settle needs."""
        if ctx.private_id:
            t = admission.ticket if admission is not None else None
            if t is None:
                raise ValueError(f"request {ctx.request_id!r} has a private id: settle it with the Admission "
                                 "that Admit returned")
            if t.settled or admission.decision.refuses:  # type: ignore[union-attr] - a refusal was released at Admit
                self._settles[(usage.status, "true")].inc()
                return False
            t.settled = True
            self._settles[(usage.status, "false")].inc()
            # admitted before a reload: every admission defense of this chain settles it (as an unknown id)
            self._settle(admission.ctx, usage,  # type: ignore[union-attr]
                         t.admitted_by if t.chain is self else tuple(i for i, _ in self.admission))
            return True
        now = self.clock.now()
        rec = self.ledger.get(_key(ctx), now)
        if rec is not None and rec.settled:
            self._settles[(usage.status, "true")].inc()
            return False
        if rec is not None:
            rec.settled = True
            ctx = rec.ctx
            targets = rec.admitted_by
        else:  # admitted by another replica or before a restart: stores settle idempotently on request_id
            targets = tuple(i for i, _ in self.admission)
        self._settles[(usage.status, "false")].inc()
        self._settle(ctx, usage, targets)
        return True

    def _release(self, ctx: RequestContext, indices: Sequence[int]) -> None:
        if indices:
            self._settle(ctx, Usage(status=SettleStatus.REFUSED), indices)

    def _settle(self, ctx: RequestContext, usage: Usage, indices: Sequence[int]) -> None:
        failure: DefenseFailure | None = None
        settling = self._settling
        for idx in indices:
            if idx not in settling:
                continue
            e = self.entries[idx]
            t0 = self.clock.monotonic()
            try:
                e.defense.settle(ctx, usage)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - every defense gets its settle even if one fails
                if self._failed(e, "settle", exc, ctx) and failure is None:
                    failure = DefenseFailure(e.name, "settle", exc)
            finally:
                self._timers[(e.name, "settle")].observe(self.clock.monotonic() - t0)
        if failure is not None:
            raise failure

    # -- response -------------------------------------------------------------------------------
    def prime(self, ctx: RequestContext) -> None:
        """Let the response defenses do ahead what depends on the request alone (``ResponseDefense.prime``):
        a front calls this once the request is on its way upstream, with the admitted context. Errors are
        left for ``protect``, where each defense's failure policy decides."""
        for _, e in self.response:
            try:
                e.defense.prime(ctx)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001, S110 - protect meets it again and counts it there
                pass

    def protect(self, batch: LogprobBatch, ctx: RequestContext) -> Protected:
        """Fold the response defenses over what the engine returned, in config order."""
        check_values(batch)
        ctx = self.prepare(ctx)
        applied: list[str] = []
        steps: list[Step] = []
        counts: list[int] = []  # values each defense that answered changed, in steps' order
        current = batch
        for _, e in self.response:
            d: ResponseDefense = e.defense  # type: ignore[assignment]
            t0 = self.clock.monotonic()
            try:
                out, changed = d.apply_counted(current, ctx)
            except InvalidInput:
                raise
            except Exception as exc:  # noqa: BLE001
                self._protect_failed(e, exc, t0, steps, ctx)
                continue
            dt = self.clock.monotonic() - t0
            steps.append(Step(e.name, e.mode, seconds=dt))
            if changed is None:
                changed = _n_changed(current, out)
            if changed and e.mode is not Mode.SHADOW:
                applied.append(e.name)
                current = out
            counts.append(changed)
        self._protected(steps, counts)
        return Protected(current, tuple(applied), tuple(steps))

    def protect_dense(self, values: np.ndarray, ctx: RequestContext) -> np.ndarray:
        """``protect`` for dense probability vectors given as values ([P, C] float32, C >= 1, column j is class
        j; no sampled token, raw mode, position 0), returning the values: the same checks, defenses in
        order, failure policy and metrics, without a batch or a Protected around a defense that takes the
        values directly (``apply_dense``); any other gets the batch ``protect`` would give it."""
        if kernels.ENABLED:
            _check_probs_values(values)
        else:
            check_values(LogprobBatch.shaped(values, dense_ids(values.shape[0]), OutputKind.PROBABILITIES))
        ctx = self.prepare(ctx)
        steps: list[Step] = []
        counts: list[int] = []
        current = values
        for _, e in self.response:
            d: ResponseDefense = e.defense  # type: ignore[assignment]
            t0 = self.clock.monotonic()
            try:
                r = d.apply_dense(current, ctx)
                if r is None:
                    b = LogprobBatch.shaped(current, dense_ids(current.shape[0]), OutputKind.PROBABILITIES)
                    out_b, n = d.apply_counted(b, ctx)
                    r = out_b.values, _n_changed(b, out_b) if n is None else n
            except InvalidInput:
                raise
            except Exception as exc:  # noqa: BLE001
                self._protect_failed(e, exc, t0, steps, ctx)
                continue
            steps.append(Step(e.name, e.mode, seconds=self.clock.monotonic() - t0))
            out, changed = r
            if changed and e.mode is not Mode.SHADOW:
                current = out
            counts.append(changed)
        self._protected(steps, counts)
        return current

    def _protect_failed(self, e: ChainEntry, exc: Exception, t0: float, steps: list[Step],
                        ctx: RequestContext) -> None:
        """A response defense raised: timed and counted; raises DefenseFailure when its policy fails closed."""
        dt = self.clock.monotonic() - t0
        self._timers[(e.name, "protect")].observe(dt)
        steps.append(Step(e.name, e.mode, error=type(exc).__name__, seconds=dt))
        if self._failed(e, "protect", exc, ctx):
            raise DefenseFailure(e.name, "protect", exc) from exc

    def _protected(self, steps: list[Step], counts: list[int]) -> None:
        if self.bookkeeping is None:
            self._book_protect(steps, counts)
        else:  # like an Admit's: once the answer is on its way
            self.bookkeeping(functools.partial(self._book_protect, steps, counts))

    def _book_protect(self, steps: list[Step], counts: list[int]) -> None:
        """A Protect's metrics: each defense's time, and the values it changed (or would have, in shadow)."""
        for step, changed in zip([s for s in steps if not s.error], counts, strict=True):
            self._timers[(step.defense, "protect")].observe(step.seconds)
            if not changed:
                continue
            if step.mode is Mode.SHADOW:
                self.metrics.shadow_effects.labels(step.defense, "protect").inc()
            else:
                c = self._changed_counters.get(step.defense)
                if c is None:
                    c = self._changed_counters[step.defense] = self.metrics.values_changed.labels(step.defense)
                c.inc(changed)

    # -- sampling -------------------------------------------------------------------------------
    def process_logits(
        self, logits: torch.Tensor, prefixes: Sequence[Sequence[int]], ctxs: Sequence[RequestContext]
    ) -> torch.Tensor:
        """logits: [B, V] float32 -> [B, V]; sampling defenses in order. Runs on the engine's thread."""
        current = logits
        for _, e in self.sampling:
            d: SamplingDefense = e.defense  # type: ignore[assignment]
            t0 = self.clock.monotonic()
            try:
                out = d.process_logits(current, prefixes, ctxs)
            except Exception as exc:  # noqa: BLE001
                if self._failed(e, "sample", exc, None):
                    raise DefenseFailure(e.name, "sample", exc) from exc
                continue
            finally:
                self._timers[(e.name, "sample")].observe(self.clock.monotonic() - t0)
            if e.mode is Mode.SHADOW:
                self.metrics.shadow_effects.labels(e.name, "sample").inc()
                continue
            current = out
        return current

    def is_argmax_invariant(self) -> bool:
        return all(e.defense.is_argmax_invariant() for _, e in self.sampling  # type: ignore[attr-defined]
                   if e.mode is Mode.ENFORCE)

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for e in self.entries:
            _close_quietly(e)

    def __enter__(self) -> DefenseChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _failed(self, e: ChainEntry, stage: str, exc: BaseException, ctx: RequestContext | None) -> bool:
        """Count and log a defense failure; True when the policy is fail-closed."""
        closed = e.on_error is OnError.FAIL_CLOSED and e.mode is Mode.ENFORCE
        policy = "fail_closed" if closed else "fail_open"
        self.metrics.defense_errors.labels(e.name, stage, policy).inc()
        # the type only, and the request id: a defense's message could quote request content
        log.warning("defense %r raised %s during %s (request %s); %s", e.name, type(exc).__name__, stage,
                    ctx.request_id if ctx else "-", policy)
        return closed


def _close_quietly(e: ChainEntry) -> None:
    try:
        e.defense.close()
    except Exception as exc:  # noqa: BLE001 - one defense's close must not stop the others'
        log.warning("defense %r raised %s on close", e.name, type(exc).__name__)


def _changed_fields(rw: Rewrites) -> list[str]:
    out = [f for f in ("top_logprobs", "max_tokens", "n") if getattr(rw, f) is not None]
    out += [f for f in ("drop_logit_bias", "drop_prompt_logprobs", "drop_echo") if getattr(rw, f)]
    if rw.strip_outputs:
        out.append("strip_outputs")
    return out


def _n_changed(a: LogprobBatch, b: LogprobBatch) -> int:
    if a is b:
        return 0
    if a.values.shape != b.values.shape:
        return int(max(a.values.size, b.values.size))
    n = int(np.count_nonzero(a.values != b.values))
    if a.token_ids is not b.token_ids and a.token_ids.shape == b.token_ids.shape:  # shifts keep the ids' array
        n += int(np.count_nonzero(a.token_ids != b.token_ids))
    return n


_NO_PROMPT = Prompt()
_UNPRICED = Cost()  # what a defense with ``uses_cost = False`` is handed: never read


def _slim(ctx: RequestContext) -> RequestContext:
    """The context as the ledger keeps it: without the prompt or input (its digest stays)."""
    if ctx.prompt is _NO_PROMPT and ctx.input_values is None:
        return ctx
    return evolve(ctx, prompt=_NO_PROMPT, input_values=None)


def _reservation_id(ctx: RequestContext) -> str:
    """Deterministic in the request's identity, so a retried Admit on any replica names the same reservation."""
    h = hashlib.sha256("\0".join((ctx.tenant, ctx.client_id, ctx.request_id)).encode()).hexdigest()
    return "rsv_" + h[:24]


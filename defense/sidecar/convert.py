"""proto <-> defense.types: the only place that knows both. Shared by the servicer and the client.

Malformed messages raise InvalidInput, which the servicer maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from ..canonical import context_digest
from ..chain import Admission
from ..errors import InvalidInput
from ..profile import SignedProfile
from ..types import (
    Api,
    ChatMessage,
    Decision,
    Detection,
    LogprobBatch,
    LogprobsMode,
    OutputKind,
    Prompt,
    RequestContext,
    Rewrites,
    SettleStatus,
    Usage,
)
from ._proto.distillguard.v1 import defense_pb2 as pb

if TYPE_CHECKING:
    from ..throttle.budget import BudgetStatus

MAX_VALUES = 4_000_000  # positions x k; far beyond any real response (128k positions x 20 is 2.6 M)
MAX_PROMPT_CHARS = 8_000_000
DIGEST_BYTES = 32

API_FROM_PB = {pb.API_UNSPECIFIED: Api.IN_PROCESS, pb.OPENAI_COMPLETIONS: Api.OPENAI_COMPLETIONS,
               pb.OPENAI_CHAT: Api.OPENAI_CHAT, pb.KSERVE_V2: Api.KSERVE_V2, pb.IN_PROCESS: Api.IN_PROCESS}
API_TO_PB = {v: k for k, v in API_FROM_PB.items() if k != pb.API_UNSPECIFIED}
DECISION_TO_PB = {Decision.ALLOW: pb.DECISION_ALLOW, Decision.ALLOW_MODIFIED: pb.DECISION_ALLOW_MODIFIED,
                  Decision.THROTTLE: pb.DECISION_THROTTLE, Decision.DENY: pb.DECISION_DENY}
DECISION_FROM_PB = {v: k for k, v in DECISION_TO_PB.items()}
MODE_FROM_PB = {pb.LOGPROBS_MODE_UNSPECIFIED: LogprobsMode.RAW, pb.LOGPROBS_MODE_RAW: LogprobsMode.RAW,
                pb.LOGPROBS_MODE_PROCESSED: LogprobsMode.PROCESSED}
MODE_TO_PB = {LogprobsMode.RAW: pb.LOGPROBS_MODE_RAW, LogprobsMode.PROCESSED: pb.LOGPROBS_MODE_PROCESSED}
KIND_FROM_PB = {pb.OUTPUT_KIND_UNSPECIFIED: OutputKind.TOP_LOGPROBS, pb.OUTPUT_KIND_TOP_LOGPROBS: OutputKind.TOP_LOGPROBS,
                pb.OUTPUT_KIND_PROBABILITIES: OutputKind.PROBABILITIES}
KIND_TO_PB = {OutputKind.TOP_LOGPROBS: pb.OUTPUT_KIND_TOP_LOGPROBS, OutputKind.PROBABILITIES: pb.OUTPUT_KIND_PROBABILITIES}
STATUS_FROM_PB = {pb.SETTLE_STATUS_UNSPECIFIED: SettleStatus.OK, pb.SETTLE_STATUS_OK: SettleStatus.OK,
                  pb.SETTLE_STATUS_CLIENT_ABORT: SettleStatus.CLIENT_ABORT,
                  pb.SETTLE_STATUS_UPSTREAM_ERROR: SettleStatus.UPSTREAM_ERROR}
STATUS_TO_PB = {v: k for k, v in STATUS_FROM_PB.items() if k != pb.SETTLE_STATUS_UNSPECIFIED}


def _enum(table: Mapping[int, object], value: int, field: str) -> object:
    try:
        return table[value]
    except KeyError:
        raise InvalidInput(f"{field}: unknown enum value {value}") from None


_NO_LABELS: Mapping[str, str] = MappingProxyType({})


def _labels(identity: pb.ClientIdentity) -> Mapping[str, str]:
    return MappingProxyType(dict(identity.labels)) if identity.labels else _NO_LABELS


def _identity(identity: pb.ClientIdentity) -> tuple[str, str]:
    if not identity.client_id:
        raise InvalidInput("identity.client_id is required (fronts send the keyed hash of the API key)")
    if len(identity.client_id) > 256 or len(identity.tenant) > 256:
        raise InvalidInput("identity.client_id and identity.tenant are at most 256 characters")
    return identity.client_id, identity.tenant or "default"


# -- prompt ---------------------------------------------------------------------------------------
def prompt_from_pb(msg: pb.Prompt) -> Prompt:
    which = msg.WhichOneof("content")
    if which is None:
        return Prompt()
    if which == "text":
        text = msg.text  # each read of a string field builds a new str
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidInput(f"prompt.text is longer than {MAX_PROMPT_CHARS} characters")
        return Prompt(text=text)
    if which == "chat":
        return Prompt(chat=tuple(ChatMessage(m.role, m.content) for m in msg.chat.messages))
    if which == "token_ids":
        return Prompt(token_ids=tuple(msg.token_ids.ids))
    return Prompt(tensor_bytes=msg.tensor_bytes)


def prompt_to_pb(prompt: Prompt, out: pb.Prompt) -> None:
    if prompt.text is not None:
        out.text = prompt.text
    elif prompt.chat is not None:
        out.chat.messages.extend(pb.ChatMessage(role=m.role, content=m.content) for m in prompt.chat)
    elif prompt.token_ids is not None:
        out.token_ids.ids.extend(prompt.token_ids)
    elif prompt.tensor_bytes is not None:
        out.tensor_bytes = prompt.tensor_bytes


# -- admit ----------------------------------------------------------------------------------------
def ctx_from_admit(msg: pb.AdmitRequest, *, received_at: float = 0.0) -> RequestContext:
    """The request as the chain sees it, with its context digest computed once, here."""
    identity = msg.identity
    client_id, tenant = _identity(identity)
    temperature = msg.temperature if msg.HasField("temperature") else None
    if temperature is not None and not math.isfinite(temperature):
        raise InvalidInput(f"temperature must be finite, got {temperature}")
    prompt = prompt_from_pb(msg.prompt)
    return RequestContext(
        request_id=msg.request_id,
        client_id=client_id,
        tenant=tenant,
        model=msg.model,
        api=_enum(API_FROM_PB, msg.api, "api"),  # type: ignore[arg-type]
        prompt=prompt,
        context_digest=context_digest(msg.model, prompt),
        received_at=received_at,
        prompt_tokens=msg.prompt_tokens if msg.HasField("prompt_tokens") else None,
        max_tokens=msg.max_tokens or None,
        n=msg.n or 1,
        temperature=temperature,
        seed=msg.seed if msg.HasField("seed") else None,
        stream=msg.stream,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        logit_bias_entries=msg.logit_bias_entries,
        prompt_logprobs=msg.prompt_logprobs,
        echo=msg.echo,
        raw_logits_outputs=tuple(msg.raw_logits_outputs),
        labels=_labels(identity),
    )


def admit_request(ctx: RequestContext) -> pb.AdmitRequest:
    msg = pb.AdmitRequest(
        request_id=ctx.request_id, model=ctx.model, api=API_TO_PB[ctx.api], max_tokens=ctx.max_tokens or 0,
        n=ctx.n, stream=ctx.stream, logprobs=ctx.logprobs, top_logprobs=ctx.top_logprobs,
        logit_bias_entries=ctx.logit_bias_entries, prompt_logprobs=ctx.prompt_logprobs, echo=ctx.echo,
        raw_logits_outputs=list(ctx.raw_logits_outputs),
    )
    msg.identity.client_id = ctx.client_id
    msg.identity.tenant = ctx.tenant
    msg.identity.labels.update(ctx.labels)
    prompt_to_pb(ctx.prompt, msg.prompt)
    if ctx.prompt_tokens is not None:
        msg.prompt_tokens = ctx.prompt_tokens
    if ctx.temperature is not None:
        msg.temperature = ctx.temperature
    if ctx.seed is not None:
        msg.seed = ctx.seed
    return msg


def rewrites_to_pb(rw: Rewrites, out: pb.Rewrites) -> None:
    if rw.top_logprobs is not None:
        out.top_logprobs = rw.top_logprobs
    if rw.max_tokens is not None:
        out.max_tokens = rw.max_tokens
    if rw.n is not None:
        out.n = rw.n
    out.drop_logit_bias = rw.drop_logit_bias
    out.drop_prompt_logprobs = rw.drop_prompt_logprobs
    out.drop_echo = rw.drop_echo
    out.strip_outputs.extend(rw.strip_outputs)


def rewrites_from_pb(msg: pb.Rewrites) -> Rewrites:
    return Rewrites(
        top_logprobs=msg.top_logprobs if msg.HasField("top_logprobs") else None,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        n=msg.n if msg.HasField("n") else None,
        drop_logit_bias=msg.drop_logit_bias, drop_prompt_logprobs=msg.drop_prompt_logprobs,
        drop_echo=msg.drop_echo, strip_outputs=tuple(msg.strip_outputs),
    )


def admit_response(adm: Admission, profile: SignedProfile | None) -> pb.AdmitResponse:
    out = pb.AdmitResponse(
        decision=DECISION_TO_PB[adm.decision], shadow=adm.shadow, reason=adm.reason, reason_code=adm.reason_code,
        retry_after_s=adm.retry_after_s, reservation_id=adm.reservation_id, context_digest=adm.ctx.context_digest,
        strength=adm.ctx.strength,
    )
    if not adm.rewrites.empty:
        rewrites_to_pb(adm.rewrites, out.rewrites)
    if profile is not None:
        profile_to_pb(profile, out.profile)
    return out


def profile_to_pb(p: SignedProfile, out: pb.SignedProfile) -> None:
    out.payload, out.signature, out.key_id, out.expires_at_ms = p.payload, p.signature, p.key_id, p.expires_at_ms


def profile_from_pb(msg: pb.SignedProfile) -> SignedProfile | None:
    if not msg.signature:
        return None
    return SignedProfile(msg.payload, msg.signature, msg.key_id, msg.expires_at_ms)


# -- protect --------------------------------------------------------------------------------------
def batch_from_protect(msg: pb.ProtectRequest) -> LogprobBatch:
    kind = _enum(KIND_FROM_PB, msg.kind, "kind")
    p, k = msg.positions, msg.k
    if p < 0 or k < 0 or k < 1 and p > 0:  # k = -1 with no positions once reached reshape(0, -1)
        raise InvalidInput(f"positions must be >= 0 and k >= 1, got positions={p} k={k}")
    if p * k > MAX_VALUES:
        raise InvalidInput(f"positions x k = {p * k} is more than {MAX_VALUES} values")
    if len(msg.values) != p * k:
        raise InvalidInput(f"values has {len(msg.values)} entries, expected positions x k = {p} x {k}")
    values = np.asarray(msg.values, dtype=np.float32).reshape(p, k)
    if len(msg.token_ids) == p * k:
        ids = np.asarray(msg.token_ids, dtype=np.int64).reshape(p, k)
    elif len(msg.token_ids) == 0 and kind is OutputKind.PROBABILITIES:
        ids = np.empty((p, 0), dtype=np.int64)
    else:
        raise InvalidInput(f"token_ids has {len(msg.token_ids)} entries, expected positions x k = {p} x {k}")
    sampled_ids = sampled_vals = None
    if len(msg.sampled_token_ids):
        if len(msg.sampled_token_ids) != p:
            raise InvalidInput(f"sampled_token_ids has {len(msg.sampled_token_ids)} entries, expected {p}")
        sampled_ids = np.asarray(msg.sampled_token_ids, dtype=np.int64)
    if len(msg.sampled_values):
        if len(msg.sampled_values) != p:
            raise InvalidInput(f"sampled_values has {len(msg.sampled_values)} entries, expected {p}")
        sampled_vals = np.asarray(msg.sampled_values, dtype=np.float32)
    temperature = msg.temperature if msg.HasField("temperature") else 1.0
    return LogprobBatch(values=values, token_ids=ids, kind=kind, sampled_token_ids=sampled_ids,  # type: ignore[arg-type]
                        sampled_values=sampled_vals, temperature=temperature, position_offset=msg.position_offset,
                        logprobs_mode=_enum(MODE_FROM_PB, msg.logprobs_mode, "logprobs_mode"))  # type: ignore[arg-type]


def ctx_from_protect(msg: pb.ProtectRequest, *, strength: float) -> RequestContext:
    if len(msg.context_digest) != DIGEST_BYTES:
        raise InvalidInput(f"context_digest must be the {DIGEST_BYTES}-byte digest Admit returned, "
                           f"got {len(msg.context_digest)} bytes")
    client_id = msg.identity.client_id or "unknown"
    return RequestContext(request_id=msg.request_id or "protect", client_id=client_id,
                          tenant=msg.identity.tenant or "default", model=msg.model,
                          context_digest=msg.context_digest, strength=strength,
                          temperature=msg.temperature if msg.HasField("temperature") else None)


def protect_request(batch: LogprobBatch, *, request_id: str, model: str, context_digest: bytes,
                    client_id: str = "", tenant: str = "", profile: SignedProfile | None = None) -> pb.ProtectRequest:
    p, k = batch.values.shape
    msg = pb.ProtectRequest(
        request_id=request_id, model=model, context_digest=context_digest, temperature=batch.temperature,
        logprobs_mode=MODE_TO_PB[batch.logprobs_mode], kind=KIND_TO_PB[batch.kind], positions=p, k=k,
        values=batch.values.ravel().tolist(), token_ids=batch.token_ids.ravel().tolist(),
        position_offset=batch.position_offset,
    )
    if batch.sampled_token_ids is not None:
        msg.sampled_token_ids.extend(batch.sampled_token_ids.tolist())
    if batch.sampled_values is not None:
        msg.sampled_values.extend(batch.sampled_values.tolist())
    if client_id:
        msg.identity.client_id = client_id
        msg.identity.tenant = tenant
    if profile is not None:
        profile_to_pb(profile, msg.profile)
    return msg


def protect_response(batch: LogprobBatch, applied: tuple[str, ...]) -> pb.ProtectResponse:
    p, k = batch.values.shape
    out = pb.ProtectResponse(positions=p, k=k, values=batch.values.ravel().tolist(),
                             token_ids=batch.token_ids.ravel().tolist(), applied=list(applied))
    if batch.sampled_token_ids is not None:
        out.sampled_token_ids.extend(batch.sampled_token_ids.tolist())
    if batch.sampled_values is not None:
        out.sampled_values.extend(batch.sampled_values.tolist())
    return out


def batch_from_protect_response(msg: pb.ProtectResponse, like: LogprobBatch) -> LogprobBatch:
    p, k = msg.positions, msg.k
    ids = (np.asarray(msg.token_ids, dtype=np.int64).reshape(p, k) if len(msg.token_ids)
           else np.empty((p, 0), dtype=np.int64))
    return LogprobBatch(
        values=np.asarray(msg.values, dtype=np.float32).reshape(p, k), token_ids=ids, kind=like.kind,
        sampled_token_ids=np.asarray(msg.sampled_token_ids, dtype=np.int64) if len(msg.sampled_token_ids) else None,
        sampled_values=np.asarray(msg.sampled_values, dtype=np.float32) if len(msg.sampled_values) else None,
        temperature=like.temperature, logprobs_mode=like.logprobs_mode, position_offset=like.position_offset,
    )


# -- settle ---------------------------------------------------------------------------------------
def settle_from_pb(msg: pb.SettleRequest) -> tuple[RequestContext, Usage]:
    client_id, tenant = _identity(msg.identity)
    u = msg.usage
    ctx = RequestContext(request_id=msg.request_id, client_id=client_id, tenant=tenant, model=msg.model)
    usage = Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                  logprob_values=u.logprob_values, status=_enum(STATUS_FROM_PB, msg.status, "status"))  # type: ignore[arg-type]
    return ctx, usage


def settle_request(ctx: RequestContext, usage: Usage, *, reservation_id: str = "") -> pb.SettleRequest:
    msg = pb.SettleRequest(request_id=ctx.request_id, reservation_id=reservation_id, model=ctx.model,
                           status=STATUS_TO_PB.get(usage.status, pb.SETTLE_STATUS_OK))
    msg.identity.client_id = ctx.client_id
    msg.identity.tenant = ctx.tenant
    msg.usage.prompt_tokens = usage.prompt_tokens
    msg.usage.completion_tokens = usage.completion_tokens
    msg.usage.logprob_values = usage.logprob_values
    return msg


# -- detect ---------------------------------------------------------------------------------------
MAX_DETECT_TOKENS = 10_000_000  # a 10^6-token radioactivity test fits ten times over


def sequences_from_detect(msg: pb.DetectRequest) -> list[np.ndarray]:
    if not msg.sequences:
        raise InvalidInput("sequences is empty: send at least one token sequence")
    total = sum(len(s.token_ids) for s in msg.sequences)
    if total > MAX_DETECT_TOKENS:
        raise InvalidInput(f"{total} token ids is more than one Detect takes ({MAX_DETECT_TOKENS})")
    return [np.asarray(s.token_ids, dtype=np.int64) for s in msg.sequences]


def detection_to_pb(d: Detection, out: pb.Detection) -> None:
    out.key_id, out.tokens_scored, out.z, out.log10_p = d.key_id, d.tokens_scored, d.z, d.log10_p
    out.detected, out.scheme = d.detected, d.scheme


def detect_response(results: Sequence[Detection], combined: Detection) -> pb.DetectResponse:
    out = pb.DetectResponse()
    for d in results:
        detection_to_pb(d, out.results.add())
    detection_to_pb(combined, out.combined)
    return out


# -- budget ---------------------------------------------------------------------------------------
def budget_query(msg: pb.GetBudgetRequest) -> tuple[str, str]:
    if not msg.client_id:
        raise InvalidInput("client_id is required (the keyed hash a front sends as identity.client_id)")
    if len(msg.client_id) > 256 or len(msg.tenant) > 256:
        raise InvalidInput("client_id and tenant are at most 256 characters")
    return msg.client_id, msg.tenant or "default"


def budget_response(status: BudgetStatus) -> pb.GetBudgetResponse:
    out = pb.GetBudgetResponse(suspicion_score=status.suspicion_score, strength=status.strength, tier=status.tier)
    out.signals.update(status.signals)
    for lim in status.limits:
        out.limits.add(name=lim.name, unit=lim.unit, scope=lim.scope, limit=lim.limit, used=lim.used,
                       reserved=lim.reserved, remaining=lim.remaining, reset_in_s=lim.reset_in_s, shadow=lim.shadow)
    return out

"""Typed sidecar client, sync and async, with per-call deadlines and the Contracts' fail-open policy.

Fail-open (when configured) passes a request only when the sidecar is unreachable or too slow
(UNAVAILABLE, DEADLINE_EXCEEDED): every other status is raised, and a throttle or deny decision is a
decision, never a reason to pass. A passed call is marked ``failed_open`` so fronts can count it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from defense.errors import DistillGuardError
from defense.profile import SignedProfile
from defense.sidecar import convert
from defense.sidecar._proto.distillguard.v1 import defense_pb2 as pb
from defense.sidecar._proto.distillguard.v1 import defense_pb2_grpc as pb_grpc
from defense.types import Decision, Detection, LogprobBatch, RequestContext, Rewrites, Usage

log = logging.getLogger("distillguard.client")

FAIL_OPEN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class SidecarError(DistillGuardError):
    """The sidecar answered with an error status (or was unreachable with fail-open off)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"sidecar {code.name}: {details}")


@dataclass(frozen=True, slots=True)
class AdmitResult:
    decision: Decision
    shadow: bool = False
    reason: str = ""
    reason_code: str = ""
    retry_after_s: float = 0.0
    reservation_id: str = ""
    rewrites: Rewrites = Rewrites()
    context_digest: bytes = b""
    profile: SignedProfile | None = None
    strength: float = 1.0
    failed_open: bool = False

    @property
    def allowed(self) -> bool:
        return not self.decision.refuses


@dataclass(frozen=True, slots=True)
class ProtectResult:
    batch: LogprobBatch
    applied: tuple[str, ...] = ()
    failed_open: bool = False


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: str  # the CA that signed the sidecar's certificate
    cert_file: str | None = None  # client certificate, for mutual TLS
    key_file: str | None = None
    server_name: str | None = None  # override the name checked against the certificate


def _admit_result(msg: pb.AdmitResponse) -> AdmitResult:
    return AdmitResult(
        decision=convert.DECISION_FROM_PB.get(msg.decision, Decision.DENY), shadow=msg.shadow, reason=msg.reason,
        reason_code=msg.reason_code, retry_after_s=msg.retry_after_s, reservation_id=msg.reservation_id,
        rewrites=convert.rewrites_from_pb(msg.rewrites), context_digest=msg.context_digest,
        profile=convert.profile_from_pb(msg.profile), strength=msg.strength or 1.0,
    )


def _detections(msg: pb.DetectResponse) -> list[Detection]:
    return [Detection(d.key_id, d.tokens_scored, d.z, d.log10_p, d.detected, d.scheme) for d in msg.results]


def _channel_args(max_message_bytes: int, tls: TlsConfig | None) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)]
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def _credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    def read(p: str | None) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return grpc.ssl_channel_credentials(read(tls.ca_file), read(tls.key_file), read(tls.cert_file))


class _Base:
    def __init__(self, target: str, *, timeout_s: float = 0.5, fail_open: bool = False,
                 admin_token: str | None = None, tls: TlsConfig | None = None,
                 max_message_bytes: int = 4 * 1024 * 1024) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.target = target
        self.timeout_s = timeout_s
        self.fail_open = fail_open
        self._admin_md = (("authorization", f"Bearer {admin_token}"),) if admin_token else None
        self._tls = tls
        self._opts = _channel_args(max_message_bytes, tls)

    def _passes(self, e: grpc.RpcError, method: str) -> bool:
        code = e.code()
        if self.fail_open and code in FAIL_OPEN_CODES:
            log.warning("sidecar %s %s: failing open", method, code.name)
            return True
        return False


class SidecarClient(_Base):
    """Blocking client (thread-safe: one channel, shared)."""

    def __init__(self, target: str, **kw: object) -> None:
        super().__init__(target, **kw)  # type: ignore[arg-type]
        self._channel = (grpc.secure_channel(target, _credentials(self._tls), options=self._opts) if self._tls
                         else grpc.insecure_channel(target, options=self._opts))
        self._stub = pb_grpc.DefenseServiceStub(self._channel)

    def _call(self, method: str, request: object, timeout_s: float | None, metadata: object = None) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            if self._passes(e, method):
                return None
            raise SidecarError(e.code(), e.details() or "") from None

    def admit(self, ctx: RequestContext, *, timeout_s: float | None = None) -> AdmitResult:
        msg = self._call("Admit", convert.admit_request(ctx), timeout_s)
        return AdmitResult(Decision.ALLOW, failed_open=True) if msg is None else _admit_result(msg)  # type: ignore[arg-type]

    def protect(self, batch: LogprobBatch, *, request_id: str, model: str, context_digest: bytes,
                client_id: str = "", tenant: str = "", profile: SignedProfile | None = None,
                timeout_s: float | None = None) -> ProtectResult:
        req = convert.protect_request(batch, request_id=request_id, model=model, context_digest=context_digest,
                                      client_id=client_id, tenant=tenant, profile=profile)
        msg = self._call("Protect", req, timeout_s)
        if msg is None:
            return ProtectResult(batch, failed_open=True)
        return ProtectResult(convert.batch_from_protect_response(msg, batch), tuple(msg.applied))  # type: ignore[attr-defined]

    def settle(self, ctx: RequestContext, usage: Usage, *, reservation_id: str = "",
               timeout_s: float | None = None) -> bool:
        """True when this call charged the usage; False for a retry already charged (or a fail-open pass)."""
        msg = self._call("Settle", convert.settle_request(ctx, usage, reservation_id=reservation_id), timeout_s)
        return False if msg is None else not msg.already_settled  # type: ignore[attr-defined]

    def detect(self, sequences: list[list[int]], *, key_ids: list[str] | None = None,
               timeout_s: float | None = None) -> list[Detection]:
        req = pb.DetectRequest(sequences=[pb.TokenSequence(token_ids=s) for s in sequences], key_ids=key_ids or [])
        msg = self._call("Detect", req, timeout_s)
        return [] if msg is None else _detections(msg)  # type: ignore[arg-type]

    def get_budget(self, client_id: str, *, tenant: str = "", model: str = "",
                   timeout_s: float | None = None) -> pb.GetBudgetResponse:
        req = pb.GetBudgetRequest(client_id=client_id, tenant=tenant, model=model)
        return self._call("GetBudget", req, timeout_s, self._admin_md)  # type: ignore[return-value]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSidecarClient(_Base):
    """asyncio client (grpc.aio); create it inside the running loop."""

    def __init__(self, target: str, **kw: object) -> None:
        super().__init__(target, **kw)  # type: ignore[arg-type]
        self._channel = (grpc.aio.secure_channel(target, _credentials(self._tls), options=self._opts) if self._tls
                         else grpc.aio.insecure_channel(target, options=self._opts))
        self._stub = pb_grpc.DefenseServiceStub(self._channel)

    async def _call(self, method: str, request: object, timeout_s: float | None, metadata: object = None) -> object:
        try:
            return await getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            if self._passes(e, method):
                return None
            raise SidecarError(e.code(), e.details() or "") from None

    async def admit(self, ctx: RequestContext, *, timeout_s: float | None = None) -> AdmitResult:
        msg = await self._call("Admit", convert.admit_request(ctx), timeout_s)
        return AdmitResult(Decision.ALLOW, failed_open=True) if msg is None else _admit_result(msg)  # type: ignore[arg-type]

    async def protect(self, batch: LogprobBatch, *, request_id: str, model: str, context_digest: bytes,
                      client_id: str = "", tenant: str = "", profile: SignedProfile | None = None,
                      timeout_s: float | None = None) -> ProtectResult:
        req = convert.protect_request(batch, request_id=request_id, model=model, context_digest=context_digest,
                                      client_id=client_id, tenant=tenant, profile=profile)
        msg = await self._call("Protect", req, timeout_s)
        if msg is None:
            return ProtectResult(batch, failed_open=True)
        return ProtectResult(convert.batch_from_protect_response(msg, batch), tuple(msg.applied))  # type: ignore[attr-defined]

    async def settle(self, ctx: RequestContext, usage: Usage, *, reservation_id: str = "",
                     timeout_s: float | None = None) -> bool:
        msg = await self._call("Settle", convert.settle_request(ctx, usage, reservation_id=reservation_id), timeout_s)
        return False if msg is None else not msg.already_settled  # type: ignore[attr-defined]

    async def detect(self, sequences: list[list[int]], *, key_ids: list[str] | None = None,
                     timeout_s: float | None = None) -> list[Detection]:
        req = pb.DetectRequest(sequences=[pb.TokenSequence(token_ids=s) for s in sequences], key_ids=key_ids or [])
        msg = await self._call("Detect", req, timeout_s)
        return [] if msg is None else _detections(msg)  # type: ignore[arg-type]

    async def get_budget(self, client_id: str, *, tenant: str = "", model: str = "",
                         timeout_s: float | None = None) -> pb.GetBudgetResponse:
        req = pb.GetBudgetRequest(client_id=client_id, tenant=tenant, model=model)
        return await self._call("GetBudget", req, timeout_s, self._admin_md)  # type: ignore[return-value]

    async def close(self) -> None:
        await self._channel.close()

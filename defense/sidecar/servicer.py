"""DefenseService: each handler is proto -> types, one call into the chain, types -> proto.

Error statuses mean faults only: INVALID_ARGUMENT for malformed messages, INTERNAL for a fail-closed
defense that failed (a fail-open client must not pass such a request), UNAUTHENTICATED for admin calls
without the admin token. Throttles and refusals are decisions inside an OK answer.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from ..errors import DefenseFailure, InvalidInput
from ..profile import DEFAULT_PROFILE, Profile, sign_profile, verify_profile
from ..runtime import Runtime
from . import convert
from ._proto.distillguard.v1 import defense_pb2 as pb
from ._proto.distillguard.v1 import defense_pb2_grpc as pb_grpc

log = logging.getLogger("distillguard.sidecar")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DefenseService"].full_name


class RuntimeHolder:
    """The live runtime; a config reload replaces it in one assignment."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime


class DefenseServicer(pb_grpc.DefenseServiceServicer):
    def __init__(self, holder: RuntimeHolder, *, admin_token: str | None = None) -> None:
        self.holder = holder
        self._admin_token = admin_token.encode() if admin_token else None
        self._metrics = holder.runtime.deps.metrics
        assert self._metrics is not None  # noqa: S101 - build_runtime always sets it
        h = self._metrics.rpc_duration
        self._ok_timers = {m: h.labels(m, "OK") for m in ("Admit", "Protect", "Settle", "Detect", "GetBudget")}
        self._admit_ok = self._ok_timers["Admit"]

    # -- plumbing -------------------------------------------------------------------------------
    async def _run(self, method: str, context: grpc.aio.ServicerContext, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - mapped to a status by _fail
            await self._fail(method, context, e, t0)
        self._ok_timers[method].observe(time.perf_counter() - t0)
        return out

    async def _fail(self, method: str, context: grpc.aio.ServicerContext, e: Exception, t0: float) -> None:
        """Count and answer a failed call: INVALID_ARGUMENT for bad input, INTERNAL otherwise. Raises."""
        if isinstance(e, InvalidInput):
            code, status, message = "INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT, str(e)
        elif isinstance(e, DefenseFailure):
            code, status, message = "INTERNAL", grpc.StatusCode.INTERNAL, str(e)
        else:  # a bug must answer INTERNAL, never kill the server
            log.error("%s failed with %s", method, type(e).__name__, exc_info=e)
            code, status, message = "INTERNAL", grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})"
        self._metrics.rpc_duration.labels(method, code).observe(time.perf_counter() - t0)  # type: ignore[union-attr]
        await context.abort(status, message)

    async def _require_admin(self, context: grpc.aio.ServicerContext) -> None:
        if self._admin_token is None:
            return
        md = dict(context.invocation_metadata() or ())
        auth = md.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._admin_token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin RPCs need 'authorization: Bearer <admin token>'")

    # -- RPCs -----------------------------------------------------------------------------------
    def _admit(self, request: pb.AdmitRequest) -> pb.AdmitResponse:
        rt = self.holder.runtime
        adm = rt.chain.admit(convert.ctx_from_admit(request, received_at=rt.deps.clock.now()))
        signed = None
        if adm.allowed and rt.keys is not None:
            profile = Profile(strength=adm.ctx.strength) if adm.ctx.strength != 1.0 else DEFAULT_PROFILE
            signed = sign_profile(profile, adm.ctx.request_id, keys=rt.keys, now=rt.deps.clock.now(),
                                  ttl_s=rt.loaded.config.profile.ttl_s)
        return convert.admit_response(adm, signed)

    async def Admit(self, request: pb.AdmitRequest, context: grpc.aio.ServicerContext) -> pb.AdmitResponse:  # noqa: N802
        # the hottest RPC: no closure, no wrapper coroutine on the way to the chain
        t0 = time.perf_counter()
        try:
            out = self._admit(request)
        except Exception as e:  # noqa: BLE001 - mapped to a status by _fail
            await self._fail("Admit", context, e, t0)
        self._admit_ok.observe(time.perf_counter() - t0)
        return out

    async def Protect(self, request: pb.ProtectRequest, context: grpc.aio.ServicerContext) -> pb.ProtectResponse:  # noqa: N802
        def protect() -> pb.ProtectResponse:
            rt = self.holder.runtime
            batch = convert.batch_from_protect(request)
            profile = None
            signed = convert.profile_from_pb(request.profile)
            if signed is not None and rt.keys is not None:
                profile = verify_profile(signed, request.request_id, keys=rt.keys, now=rt.deps.clock.now())
            strength = (profile or DEFAULT_PROFILE).strength
            out = rt.chain.protect(batch, convert.ctx_from_protect(request, strength=strength))
            return convert.protect_response(out.batch, out.applied)

        return await self._run("Protect", context, protect)

    async def Settle(self, request: pb.SettleRequest, context: grpc.aio.ServicerContext) -> pb.SettleResponse:  # noqa: N802
        def settle() -> pb.SettleResponse:
            ctx, usage = convert.settle_from_pb(request)
            first = self.holder.runtime.chain.settle(ctx, usage)
            out = pb.SettleResponse(already_settled=not first)
            if first:
                out.charged.prompt_tokens = usage.prompt_tokens
                out.charged.completion_tokens = usage.completion_tokens
                out.charged.logprob_values = usage.logprob_values
            return out

        return await self._run("Settle", context, settle)

    async def Detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> pb.DetectResponse:  # noqa: N802
        from ..watermark.select import configured_watermarks, watermark_for

        entries = self.holder.runtime.chain.entries  # one runtime for the whole call, even across a reload
        if not configured_watermarks(entries):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "Detect needs a watermark defense in the config (type: watermark or watermark_gumbel)")

        def detect() -> pb.DetectResponse:
            wm = watermark_for(entries, request.scheme)
            assert wm is not None  # noqa: S101 - checked above on the same entries
            report = wm.detector().detect_many(convert.sequences_from_detect(request),
                                               key_ids=list(request.key_ids) or None)
            return convert.detect_response(report.results, report.combined)

        return await self._run("Detect", context, detect)

    async def GetBudget(self, request: pb.GetBudgetRequest, context: grpc.aio.ServicerContext) -> pb.GetBudgetResponse:  # noqa: N802
        await self._require_admin(context)
        # duck-typed: any admission defense that reports budgets (the built-in one is `budget`)
        budget = next((e.defense for _, e in self.holder.runtime.chain.admission
                       if hasattr(e.defense, "budget_status")), None)
        if budget is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "GetBudget needs a budget defense in the config (type: budget)")

        def get_budget() -> pb.GetBudgetResponse:
            client_id, tenant = convert.budget_query(request)
            return convert.budget_response(budget.budget_status(client_id, tenant, request.model))

        return await self._run("GetBudget", context, get_budget)


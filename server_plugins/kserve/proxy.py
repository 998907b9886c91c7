"""The KServe v2 (Triton GRPCInferenceService) proxy: Admit, Protect and Settle around every inference.

Handlers work on bytes (no gRPC (de)serializers), so what needs no change is forwarded without a copy:
- ModelInfer / ModelStreamInfer: checked against the model's metadata (names, datatypes, shapes, sizes),
  admitted by the chain (the client is a keyed hash of its bearer token, the tenant a header), forwarded
  to Triton, then each declared probability or logprob output is perturbed, stripped and undeclared
  outputs are removed, and usage is settled. An upstream failure settles as upstream_error (the
  reservation is released) and answers UNAVAILABLE; a client that goes away settles as client_abort.
- shared-memory RPCs are refused: outputs written to shared memory would never pass through the proxy.
- every other RPC (health, metadata, config, statistics, repository, trace and log settings) passes through.

The chain decides, this module translates: proto -> RequestContext / LogprobBatch, one call, -> proto.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError as _DecodeError
from tritonclient.grpc import service_pb2 as pb

from defense.canonical import context_digest
from defense.chain import Admission, DefenseChain
from defense.clock import SYSTEM_CLOCK, Clock
from defense.deferred import Deferred
from defense.errors import DefenseFailure, InvalidInput
from defense.identity import identify
from defense.sidecar.servicer import RuntimeHolder
from defense.types import (
    Api,
    LogprobBatch,
    OutputKind,
    Prompt,
    RequestContext,
    SettleStatus,
    Usage,
    dense_ids,
    evolve,
)

from . import tensors
from .settings import ModelSpec, ProxySettings
from .status import Refusal, refusal, upstream_refusal

log = logging.getLogger("distillguard.kserve")

SERVICE = "inference.GRPCInferenceService"
INTERCEPTED = ("ModelInfer", "ModelStreamInfer")
SHARED_MEMORY_RPCS = frozenset({
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
})
# per-tensor parameters that move outputs out of the response (shared memory) or turn probabilities into
# strings the proxy would not recognize as probabilities (Triton's classification extension)
_BYPASS_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification")
_BYPASS_WORDS = (b"shared_memory_", b"classification")
# a request whose bytes hold one of these is admitted before it is sent: outputs that could bypass the
# proxy, and sequence (stateful model) parameters, whose state a refused request must never advance
_EARLY_BLOCKERS = (*_BYPASS_WORDS, b"sequence_")
_MAX_TRACKED = 100_000  # clients whose last request was admitted, remembered for early forwarding
_MAX_PLANS = 1024  # request structures remembered (each model and batch size makes one)
_MAX_WHOS = 4096  # callers' metadata remembered with the identity it gives
_FINAL = "triton_final_response"


@dataclass(slots=True)
class Prepared:
    """A request that passed the checks and was admitted, with what its response needs."""

    adm: Admission
    spec: ModelSpec
    upstream: bytes  # the request as Triton gets it
    # each batch row's context (its own digest, and its input values when a defense reads them) when the
    # batch holds more than one row: a row's noise is keyed by that row's input alone
    rows: list[RequestContext] | None
    asked: frozenset[str]  # outputs the client named; empty: all it may have
    client_id: str = ""  # the id the client gave (streams replace it upstream with a unique one)
    settled: bool = False
    plan: _Plan | None = None  # what the request's structure decided (None: a stream's, not kept)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a request's structure (model, version, inputs' names, datatypes and shapes, outputs asked)
    decides, once it was checked against the model's metadata: requests alike differ only in their data."""

    meta: tensors.ModelMeta  # the metadata it was checked against (a refreshed one is checked anew)
    layout: tensors.Layout | None  # None: not reusable (typed contents or BYTES inputs), checked each time
    batch: int
    asked: frozenset[str]  # outputs the client named
    withheld: tuple[str, ...]  # named, but not returned by this proxy: not asked of Triton
    logprobs: bool  # a protected output is returned
    raw_logits: tuple[str, ...]  # named outputs that are stripped
    expected: int | None  # probability / logprob values returned (see _expected_values)


_DROP, _KEEP, _PROTECT = "drop", "keep", "protect"


@dataclass(frozen=True, slots=True)
class _Out:
    """What the proxy does with one output of a response (KServeProxy._outputs)."""

    what: str  # _DROP: not returned; _KEEP: returned as it is; _PROTECT: perturbed
    kind: OutputKind | None = None  # for a float output to protect
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    n: int = 0  # values, by the declared shape
    nbytes: int = 0  # raw bytes, by the declared shape and datatype
    # FP32 with the dimensions the config asks for: raw bytes in, raw bytes out (KServeProxy._protect_f32)
    direct: bool = False


@dataclass(frozen=True, slots=True)
class _Ask:
    """A request's bytes before its one input tensor, and what they decided (KServeProxy._ask_shape)."""

    head: bytes
    request: Any  # the request they were learnt from, without its tensor: names, shapes, outputs, id
    plan: _Plan
    early: bool  # nothing in them stops early forwarding (no bypass or sequence parameter)


@dataclass(frozen=True, slots=True)
class _Answer:
    """An answer's bytes before its one protected tensor, and what to do with the tensor (_answer_shape)."""

    spec: ModelSpec
    head: bytes
    act: _Out


def _structure(request: Any) -> tuple[Any, ...]:
    inputs, outputs = request.inputs, request.outputs
    if len(inputs) == 1 and len(outputs) <= 1:  # the usual request, the same key without generator frames
        t = inputs[0]
        return (request.model_name, request.model_version, ((t.name, t.datatype, tuple(t.shape)),),
                (outputs[0].name,) if outputs else ())
    return (request.model_name, request.model_version, tuple((t.name, t.datatype, tuple(t.shape)) for t in inputs),
            tuple(o.name for o in outputs))


def _output_structure(response: Any) -> tuple[Any, ...]:
    outputs = response.outputs
    if len(outputs) == 1:  # the usual answer, the same key without a generator frame
        o = outputs[0]
        return ((o.name, o.datatype, tuple(o.shape)),)
    return tuple((o.name, o.datatype, tuple(o.shape)) for o in outputs)


class KServeProxy:
    """Handlers for one upstream; the chain comes from ``holder`` at each call, so a reload takes effect."""

    def __init__(self, settings: ProxySettings, holder: RuntimeHolder, *, clock: Clock = SYSTEM_CLOCK,
                 deferred: Deferred | None = None) -> None:
        self.settings = settings
        self.holder = holder
        self.clock = clock
        self._meta: dict[tuple[str, str], tuple[float, tensors.ModelMeta]] = {}
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[str, Any] = {}
        self._ids: dict[int, np.ndarray] = {}  # class-index arrays for dense logprob vectors, by width
        m = holder.runtime.deps.metrics
        assert m is not None  # noqa: S101 - build_runtime always sets it
        self._metrics = m
        self._forward_keys = frozenset(k.lower() for k in settings.forward_metadata)
        self._returned = {name: spec.returned for name, spec in settings.models.items()}  # outputs a client may get
        # request ids for the chain: a random per-process prefix and a counter (unique across replicas and
        # restarts, and a tenth of uuid4's cost)
        self._id_prefix = f"kserve-{uuid.uuid4().hex[:16]}-"
        self._seq = itertools.count()
        self._ok_infer = m.rpc_duration.labels("kserve.ModelInfer", "OK")  # bound once: a lookup per call costs
        # early forwarding (settings.early_forward): clients whose last request was admitted, each with its
        # calls forwarded before admission and not yet answered
        self._admitted: dict[str, int] = {}
        self._early_used = m.upstream_early.labels("kserve", "used")
        self._early_cancelled = m.upstream_early.labels("kserve", "cancelled")
        # settles of answered requests, run on the loop's next turn once the call is over (defense.deferred);
        # the server hands the chain's bookkeeping the same queue's ``hold``: a request's Admit and Protect
        # records wait for its settle, and one loop callback runs all three once the answer is out
        self.deferred = deferred if deferred is not None else Deferred()
        self._plans: dict[tuple[Any, ...], _Plan] = {}  # by request structure (_structure)
        self._out_plans: dict[tuple[Any, ...], tuple[ModelSpec, tuple[_Out, ...]]] = {}  # see _outputs
        self._answers: dict[tuple[Any, ...], _Answer] = {}  # by (spec, outputs asked): see _answer_shape
        self._asks: dict[int, _Ask] = {}  # by the request's length: see _ask_shape
        # (client, tenant) by the call's whole metadata, for the runtime that identified them (_who)
        self._whos: tuple[Any, dict[tuple[Any, ...], tuple[str, str]]] = (None, {})
        self._reads: tuple[DefenseChain | None, bool] = (None, False)  # does the chain read input values

    # -- wiring ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Open the upstream channel (inside the running event loop)."""
        n = self.settings.max_message_bytes
        self._channel = grpc.aio.insecure_channel(
            self.settings.upstream,
            options=[("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)])
        for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            path = f"/{SERVICE}/{method.name}"
            stream = method.name == "ModelStreamInfer"
            self._calls[method.name] = (self._channel.stream_stream(path) if stream
                                        else self._channel.unary_unary(path))

    async def close(self) -> None:
        self.deferred.drain()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        if self._channel is None:
            self.open()
        handlers: dict[str, grpc.RpcMethodHandler] = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.model_stream_infer),
        }
        for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            if method.name in INTERCEPTED:
                continue
            fn = self._refuse_shared_memory(method.name) if method.name in SHARED_MEMORY_RPCS \
                else self._passthrough(method.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(fn)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    # -- plumbing -------------------------------------------------------------------------------
    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        left = context.time_remaining()
        return min(self.settings.upstream_timeout_s, left) if left is not None else self.settings.upstream_timeout_s

    def _forward(self, md: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...] | None:
        if not self._forward_keys:
            return None
        return tuple((k, v) for k, v in md if k in self._forward_keys) or None

    def _observe(self, method: str, code: str, t0: float) -> None:
        self._metrics.rpc_duration.labels(f"kserve.{method}", code).observe(time.perf_counter() - t0)

    def _passthrough(self, method: str) -> Callable[..., Any]:
        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            t0 = time.perf_counter()
            try:
                out = await self._calls[method](request, timeout=self._timeout(context),
                                                metadata=self._forward(context.invocation_metadata() or ()))
            except grpc.aio.AioRpcError as e:
                r = upstream_refusal(e, self.settings.upstream)
                self._observe(method, r.code.name, t0)
                await context.abort(r.code, r.message)
            self._observe(method, "OK", t0)
            return out

        return handler

    def _refuse_shared_memory(self, method: str) -> Callable[..., Any]:
        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{method} is not available through the distillguard proxy: outputs written to "
                                "shared memory would bypass output protection")
            raise AssertionError("unreachable")  # abort raises

        return handler

    # -- metadata -------------------------------------------------------------------------------
    async def metadata(self, model: str, version: str, context: grpc.aio.ServicerContext) -> tensors.ModelMeta:
        key = (model, version)
        now = self.clock.monotonic()
        hit = self._meta.get(key)
        if hit is not None and now - hit[0] < self.settings.metadata_ttl_s:
            return hit[1]
        req = pb.ModelMetadataRequest(name=model, version=version)
        try:
            raw = await self._calls["ModelMetadata"](req.SerializeToString(), timeout=self._timeout(context))
        except grpc.aio.AioRpcError as e:
            raise upstream_refusal(e, self.settings.upstream) from None
        meta = tensors.ModelMeta.from_pb(pb.ModelMetadataResponse.FromString(raw))
        spec = self.settings.models[model]
        for name in sorted(spec.protected):
            out = meta.outputs.get(name)
            if out is not None and out.datatype not in tensors.FLOAT_TYPES:
                raise Refusal(grpc.StatusCode.INTERNAL,
                              f"proxy config: output {name!r} of model {model!r} is declared a probability or "
                              f"logprob output, but Triton says it is {out.datatype}")
        undeclared = sorted(set(meta.outputs) - spec.returned - set(spec.strip))
        if undeclared and hit is None:
            log.warning("model %r has outputs the proxy config does not declare; they are stripped: %s",
                        model, ", ".join(undeclared))
        self._meta[key] = (now, meta)
        return meta

    # -- admission ------------------------------------------------------------------------------
    def _who(self, md: Sequence[tuple[str, Any]]) -> tuple[str, str]:
        """(client, tenant): the client is the keyed hash of its bearer token, the tenant a header."""
        rt = self.holder.runtime
        whos = self._whos
        if whos[0] is not rt:  # a reload may bring other keys or identity settings
            whos = self._whos = (rt, {})
        hit = whos[1].get(md) if type(md) is tuple else None  # a client sends the same metadata each call
        if hit is not None:
            return hit
        ident = rt.chain.identity
        if rt.keys is None:
            return "anonymous", ident.default_tenant
        headers = {k: v for k, v in md if isinstance(v, str)}
        who = identify(headers, rt.keys, tenant_header=ident.tenant_header, default_tenant=ident.default_tenant)
        if type(md) is tuple:
            if len(whos[1]) >= _MAX_WHOS:
                whos[1].clear()
            whos[1][md] = who
        return who

    def _forward_early(self, request: Any, raw: bytes, md: Sequence[tuple[str, Any]], client: str,
                       context: grpc.aio.ServicerContext, ask: _Ask | None = None) -> Any:
        """Start the upstream call before admission when it is safe to (``settings.early_forward``): the
        client's last request was admitted, it has fewer early calls in flight than the cap, and Triton
        would get exactly these bytes after admission. Returns the call, or None."""
        s = self.settings
        if not s.early_forward:
            return None
        n = self._admitted.get(client)
        if n is None or n >= s.early_forward_max_in_flight:
            return None
        if ask is not None:  # a request shaped like one checked before: its head was scanned then
            if not ask.early:
                return None
        else:
            returned = self._returned.get(request.model_name)
            if returned is None or len(raw) > s.max_input_bytes or _blocks_early(raw):
                return None
            for o in request.outputs:
                if o.name not in returned:  # a withheld output: Triton gets a rewritten request
                    return None
        self._admitted[client] = n + 1
        return self._calls["ModelInfer"](raw, timeout=self._timeout(context), metadata=self._forward(md))

    def _early_over(self, client: str) -> None:
        n = self._admitted.get(client)
        if n:
            self._admitted[client] = n - 1

    def _remember(self, client: str, admitted: bool) -> None:
        """Early forwarding is for clients whose last request was admitted."""
        if not admitted:
            self._admitted.pop(client, None)
        elif client not in self._admitted:
            if len(self._admitted) >= _MAX_TRACKED:
                self._admitted.clear()
            self._admitted[client] = 0

    async def prepare(self, request: Any, raw: bytes | None, md: Sequence[tuple[str, Any]],
                      context: grpc.aio.ServicerContext, *, upstream_id: str | None = None,
                      who: tuple[str, str] | None = None, ask: _Ask | None = None) -> Prepared:
        """Check the request, admit it, and build what goes upstream. Raises Refusal or InvalidInput.

        ``ask``: ``raw`` has the bytes of a request checked before but for its input tensor, which comes last
        (_ask_shape); ``request`` is that request without its tensor, so the tensor is read from ``raw``."""
        if ask is not None:
            meta = self._meta.get((ask.request.model_name, ask.request.model_version))
            if meta is not None and meta[1] is ask.plan.meta and \
                    self.clock.monotonic() - meta[0] < self.settings.metadata_ttl_s:
                return self._admit(ask.request, raw, [raw[len(ask.head):]],  # type: ignore[index]
                                   self.settings.models[ask.request.model_name], ask.plan, md, upstream_id, who)
            request = pb.ModelInferRequest.FromString(raw)  # metadata to refresh: checked in full
        model = request.model_name
        spec = self.settings.models.get(model)
        if spec is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND,
                          f"model {model!r} is not served through this proxy; models: {', '.join(self.settings.models)}")
        # a parameter's name is in the message's bytes as it is: most requests skip the per-tensor look
        named = raw is None or _names_bypass(raw)
        for t in (*request.inputs, *request.outputs) if named else ():
            for p in _BYPASS_PARAMS if t.parameters else ():
                if p in t.parameters:
                    raise InvalidInput(f"tensor {t.name!r} has parameter {p!r}, which is not supported through the "
                                       "distillguard proxy: outputs must come back in the response, as tensors")
        meta = await self.metadata(model, request.model_version, context)
        # a request shaped like one checked before (same model, inputs and outputs asked) is checked by its
        # data's sizes; any other is checked in full, and its plan kept for the next like it
        key = None if named else _structure(request)
        plan = self._plans.get(key) if key is not None else None
        data = plan.layout.data(request) if plan is not None and plan.meta is meta else None  # type: ignore[union-attr]
        if data is None:
            plan, data = self._plan(request, meta, spec)
            if key is not None and plan.layout is not None:
                if len(self._plans) >= _MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = plan
        return self._admit(request, raw, data, spec, plan, md, upstream_id, who)

    def _admit(self, request: Any, raw: bytes | None, data: list[bytes], spec: ModelSpec, plan: _Plan,
               md: Sequence[tuple[str, Any]], upstream_id: str | None, who: tuple[str, str] | None) -> Prepared:
        """prepare's admission, for a request that passed the checks (``data``: its inputs' bytes)."""
        model = request.model_name
        batch = plan.batch
        chain = self.holder.runtime.chain
        client, tenant = who if who is not None else self._who(md)
        layout = plan.layout
        prompt = Prompt(tensor_bytes=layout.canonical(data) if layout is not None
                        else tensors.canonical_request(request, data))
        values, row_values = self._input_values(request, data, batch if spec.batched else 1, chain)
        ctx = RequestContext(
            # never the client's own id: a reused id would hit the chain's idempotency ledger and be
            # admitted (and charged) once for many requests
            request_id=f"{self._id_prefix}{next(self._seq)}", client_id=client, tenant=tenant, model=model,
            api=Api.KSERVE_V2, prompt=prompt, private_id=True,  # settled by this proxy only, once (Prepared.settled)
            context_digest=context_digest(model, prompt),  # the chain would derive it, at the cost of a copy
            max_tokens=0,  # nothing is generated: a classifier reserves no completion tokens
            logprobs=plan.logprobs,
            raw_logits_outputs=plan.raw_logits,
            received_at=self.clock.now(),
            input_values=values,
            output_values=plan.expected,
        )
        rows = None  # computed before admission: nothing after it may fail and leave a reservation held
        if spec.batched and batch > 1:
            canon = layout.rows(data) if layout is not None else tensors.canonical_rows(request, data, batch)
            rows = [context_digest(model, Prompt(tensor_bytes=b)) for b in canon]
        adm = chain.admit(ctx)
        if self.settings.early_forward:  # off: nothing to remember per client
            self._remember(client, adm.allowed)
        if not adm.allowed:
            raise refusal(adm, chain)
        row_ctxs = None if rows is None else [
            evolve(adm.ctx, context_digest=digest, input_values=row_values[b] if row_values else None)
            for b, digest in enumerate(rows)]
        if plan.logprobs:  # the response defenses' keyed seeds, ahead of the answer (Triton may be at work)
            for c in row_ctxs or (adm.ctx,):
                chain.prime(c)
        if plan.withheld or upstream_id is not None:
            # Triton need not compute what is never returned; a stream's requests get unique ids upstream
            up = pb.ModelInferRequest()
            up.CopyFrom(request)
            if plan.withheld:
                keep = [o for o in request.outputs if o.name in spec.returned]
                del up.outputs[:]
                up.outputs.extend(keep)
            if upstream_id is not None:
                up.id = upstream_id
            upstream = up.SerializeToString()
        else:
            upstream = raw if raw is not None else request.SerializeToString()
        return Prepared(adm, spec, upstream, row_ctxs, plan.asked, client_id=request.id, plan=plan)

    def _plan(self, request: Any, meta: tensors.ModelMeta, spec: ModelSpec) -> tuple[_Plan, list[bytes]]:
        """Check a request in full against the model's metadata and the proxy config (raises InvalidInput or
        Refusal); returns what its structure decides, and its inputs' bytes."""
        model = request.model_name
        data = tensors.input_data(request)
        batch = tensors.check_inputs(request, data, meta, max_input_bytes=self.settings.max_input_bytes,
                                     batched=spec.batched)
        asked = tuple(o.name for o in request.outputs)
        for name in asked:
            if name not in meta.outputs:
                raise InvalidInput(f"model {model!r} has no output {name!r}; outputs: {', '.join(meta.outputs)}")
        withheld = tuple(n for n in asked if n not in spec.returned)
        if asked and len(withheld) == len(asked):
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"output(s) {', '.join(withheld)} of model {model!r} are not available through this proxy")
        return _Plan(meta, tensors.Layout.of(request, batch), batch, frozenset(asked), withheld,
                     logprobs=bool(spec.protected & (set(asked) if asked else set(meta.outputs))),
                     raw_logits=tuple(n for n in asked if n in spec.strip),
                     expected=_expected_values(spec, meta, asked, batch)), data

    def _input_values(self, request: Any, data: Sequence[bytes], batch: int,
                      chain: DefenseChain) -> tuple[bytes | None, list[bytes] | None]:
        """The input as float32 bytes (and per batch row) for a model with one floating-point input, when a
        response defense reads it (the targeted defense's OOD detector or classifier proxy); else None."""
        if len(data) != 1 or request.inputs[0].datatype not in tensors.FLOAT_TYPES:
            return None, None
        reads = self._reads
        if reads[0] is not chain:  # once per chain (a reload brings a new one)
            reads = self._reads = (chain, any(getattr(e.defense, "reads_input_values", False)
                                              for _, e in chain.response))
        if not reads[1]:
            return None, None
        dtype = tensors.DTYPES[request.inputs[0].datatype].numpy
        x = np.frombuffer(data[0], dtype=dtype).astype("<f4")
        return x.tobytes(), [r.tobytes() for r in x.reshape(max(batch, 1), -1)]

    def _settle_done(self, prep: Prepared, values: int, context: grpc.aio.ServicerContext) -> None:
        """The call is over: settle as delivered or as client_abort, soon (``self.deferred``)."""
        try:
            cancelled = context.cancelled()
        except Exception:  # noqa: BLE001 - a context without the call's state: treat as delivered
            cancelled = False
        status = SettleStatus.CLIENT_ABORT if cancelled else SettleStatus.OK
        self.deferred.add(functools.partial(self.settle, prep, status, values))

    def settle(self, prep: Prepared, status: SettleStatus, values: int = 0) -> None:
        if prep.settled:
            return
        prep.settled = True
        chain = self.holder.runtime.chain
        # the prompt's tokens are priced here, once the answer is out (settles run off the request's path)
        usage = Usage(prompt_tokens=chain.estimate(prep.adm.ctx).prompt_tokens if status is SettleStatus.OK else 0,
                      logprob_values=values, status=status)
        try:
            chain.settle(prep.adm.ctx, usage, prep.adm)
        except DefenseFailure as e:  # the answer is already decided; the chain counted the failure
            log.warning("settle failed for %s: %s", prep.adm.ctx.request_id, e)

    # -- response -------------------------------------------------------------------------------
    def _class_ids(self, k: int) -> np.ndarray:
        ids = self._ids.get(k)
        if ids is None:
            ids = self._ids[k] = np.arange(k, dtype=np.int64)
        return ids

    def _protect(self, values: np.ndarray, kind: OutputKind, ctx: RequestContext, chain: DefenseChain, *,
                 shaped: bool = False) -> np.ndarray:
        # values: [P, C] float32 -> [P, C] float32; shaped: C >= 1 is known (the batch needs no re-validation)
        if kind is OutputKind.PROBABILITIES and (shaped or values.shape[1] or not values.shape[0]):
            return chain.protect_dense(values, ctx)  # dense vectors: no batch around them
        ids = (dense_ids(values.shape[0]) if kind is OutputKind.PROBABILITIES
               else np.broadcast_to(self._class_ids(values.shape[1]), values.shape))
        batch = LogprobBatch.shaped(values, ids, kind) if shaped else LogprobBatch(values=values, token_ids=ids, kind=kind)
        return chain.protect(batch, ctx).batch.values

    def _outputs(self, response: Any, prep: Prepared, raw: bool) -> tuple[_Out, ...]:
        """What to do with each output of a response, by its outputs' names, datatypes and shapes (cached)."""
        spec = prep.spec
        key = (id(spec), prep.asked, raw, _output_structure(response))
        hit = self._out_plans.get(key)
        if hit is not None and hit[0] is spec:
            return hit[1]
        plan = []
        for out in response.outputs:
            name = out.name
            if name not in spec.returned or (prep.asked and name not in prep.asked):
                plan.append(_Out(_DROP))
                continue
            if name not in spec.protected:
                plan.append(_Out(_KEEP))
                continue
            shape = tuple(out.shape)
            n = tensors.n_elements(shape)
            dt = tensors.DTYPES.get(out.datatype)
            if out.datatype not in tensors.FLOAT_TYPES or dt is None:
                plan.append(_Out(_PROTECT, n=n))  # not a float: _protect_one says why
                continue
            kind = OutputKind.PROBABILITIES if name in spec.probabilities else OutputKind.TOP_LOGPROBS
            direct = out.datatype == "FP32" and len(shape) >= (2 if spec.batched else 1) and n > 0
            plan.append(_Out(_PROTECT, kind, dt.numpy, shape, n, n * dt.itemsize, direct))
        if len(self._out_plans) >= _MAX_PLANS:
            self._out_plans.clear()
        self._out_plans[key] = (spec, out_plan := tuple(plan))
        return out_plan

    def protect_response(self, response: Any, prep: Prepared, *, where: str) -> int:
        """Perturb declared outputs and drop the rest, in place; returns the number of values returned."""
        chain = self.holder.runtime.chain
        perturb = bool(chain.response)  # no response defense configured: strip only, decode nothing
        n_out = len(response.outputs)
        raw = len(response.raw_output_contents) == n_out and n_out > 0
        drop: list[int] = []
        returned = 0
        for i, act in enumerate(self._outputs(response, prep, raw)):
            if act.what is _PROTECT:
                if not perturb:
                    returned += act.n
                    continue
                data = response.raw_output_contents[i] if raw else None
                if act.direct and prep.rows is None and len(data) == act.nbytes:  # type: ignore[arg-type]
                    response.raw_output_contents[i] = self._protect_f32(data, act, prep, chain)  # type: ignore[arg-type]
                    returned += act.n
                    continue
                if act.kind is not None and data is not None and len(data) == act.nbytes:
                    arr = np.frombuffer(data, dtype=act.dtype).reshape(act.shape)  # type: ignore[arg-type]
                else:  # typed contents, or something to refuse: in full, with its error message
                    out = response.outputs[i]
                    arr = tensors.output_array(out, data, f"output {out.name!r} of model {response.model_name!r} "
                                                          f"({where})")
                returned += self._protect_one(response, i, arr, act, prep, chain, raw, where)
            elif act.what is _DROP:
                drop.append(i)
        for i in reversed(drop):
            del response.outputs[i]
            if raw:
                del response.raw_output_contents[i]
        return returned

    def _ask_shape(self, request: Any, raw: bytes, prep: Prepared) -> None:
        """Remember what a request's bytes before its input tensor decided, when it is the usual request: one
        input, as raw bytes, keyed by one context, all its outputs returned. The raw contents are the
        message's last field, so a request with the same bytes before them has the same model, id, inputs'
        names, datatypes and shapes, outputs and parameters (the scans for bypass and sequence parameters
        looked at these bytes), and a tensor of the same size: its checks and plan are this one's."""
        plan = prep.plan
        contents = request.raw_input_contents
        if plan is None or plan.layout is None or plan.withheld or prep.rows is not None or len(contents) != 1 \
                or len(request.inputs) != 1:
            return
        data = contents[0]
        head = raw[:len(raw) - len(data)]
        if not head.endswith(_last_field(7, len(data))) or not raw.endswith(data) or _names_bypass(head):
            return
        shape = pb.ModelInferRequest()
        shape.CopyFrom(request)
        del shape.raw_input_contents[:]  # never read a learnt request's tensor for a new one's
        if len(self._asks) >= _MAX_PLANS:
            self._asks.clear()
        self._asks[len(raw)] = _Ask(head, shape, plan, early=not _blocks_early(head))

    def _answer_shape(self, out: bytes, response: Any, prep: Prepared) -> tuple[tuple[Any, ...], _Answer] | None:
        """What the next answers shaped like this one can reuse (_answer_alike), when it is the usual answer:
        one FP32 output to protect, as raw bytes, for a request keyed by one context. The raw contents are the
        message's last field, so every byte of the answer but the tensor's (its names, datatype, shape, the
        field's header) comes before them, and an answer with the same bytes there has the same structure."""
        contents = response.raw_output_contents
        if prep.rows is not None or len(contents) != 1 or len(response.outputs) != 1:
            return None
        act = self._outputs(response, prep, True)[0]
        data = contents[0]
        head = out[:len(out) - len(data)]
        if act.what is not _PROTECT or not act.direct or len(data) != act.nbytes or not out.endswith(data) \
                or not head.endswith(_last_field(6, len(data))):
            return None
        if len(self._answers) >= _MAX_PLANS:
            self._answers.clear()
        return (id(prep.spec), prep.asked), _Answer(prep.spec, head, act)

    def _answer_alike(self, out: bytes, prep: Prepared) -> tuple[bytes, int] | None:
        """(the answer to return, values returned) for an answer whose bytes before its tensor are those of
        one answered in full before (_answer_shape): the tensor is protected where it lies, with no decode or
        re-encode of the message; None: the full path."""
        hit = self._answers.get((id(prep.spec), prep.asked))
        if hit is None or hit.spec is not prep.spec or prep.rows is not None:
            return None
        head, act = hit.head, hit.act
        if len(out) != len(head) + act.nbytes or not out.startswith(head):
            return None
        chain = self.holder.runtime.chain
        if not chain.response:  # no response defense: returned as it came
            return out, act.n
        return head + self._protect_f32(memoryview(out)[len(head):], act, prep, chain), act.n

    def _protect_f32(self, data: bytes | memoryview, act: _Out, prep: Prepared, chain: DefenseChain) -> bytes:
        """The usual output (FP32 raw bytes, one context for all its rows) the short way: one copy in, the
        chain's float32 result out as bytes; what _protect_one does, with fewer array steps on the answer's
        path."""
        work = np.frombuffer(bytearray(data), np.float32).reshape(-1, act.shape[-1])  # a writeable copy
        new = self._protect(work, act.kind, prep.adm.ctx, chain, shaped=True)  # type: ignore[arg-type]
        return (new if new.dtype == np.float32 else new.astype(np.float32)).tobytes()  # C order, as it came

    def _protect_one(self, response: Any, i: int, arr: np.ndarray, act: _Out, prep: Prepared, chain: DefenseChain,
                     raw: bool, where: str) -> int:
        spec = prep.spec
        if arr.ndim < (2 if spec.batched else 1):
            out = response.outputs[i]
            raise InvalidInput(f"output {out.name!r} of model {response.model_name!r} ({where}) has shape "
                               f"{list(arr.shape)}: a probability or logprob output needs "
                               f"[{'batch, ' if spec.batched else ''}..., classes]")
        kind = act.kind or OutputKind.TOP_LOGPROBS  # a kind is known for every float output
        work = arr.astype(np.float32)
        if arr.dtype == np.float16 and kind is OutputKind.PROBABILITIES:
            work = work / work.sum(axis=-1, keepdims=True)  # fp16 rounding can leave a sum 1e-3 off one
        classes = work.shape[-1]
        if prep.rows is None:
            new = self._protect(work.reshape(-1, classes), kind, prep.adm.ctx, chain).reshape(work.shape)
        else:
            if work.shape[0] != len(prep.rows):  # every row of the answer gets its own row's noise, or none
                out = response.outputs[i]
                raise InvalidInput(f"output {out.name!r} of model {response.model_name!r} ({where}) has "
                                   f"{work.shape[0]} rows for a batch of {len(prep.rows)}")
            # one chain call per batch row: each row's noise is keyed by that row's own input bytes, so
            # the same input gets the same answer alone or in any batch (the loop is over rows, not values)
            new = np.empty_like(work)
            for b, ctx in enumerate(prep.rows):
                new[b] = self._protect(work[b].reshape(-1, classes), kind, ctx, chain).reshape(work.shape[1:])
        tensors.set_output(response, i, new, raw=raw)
        return int(new.size)

    # -- ModelInfer -----------------------------------------------------------------------------
    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        t0 = time.perf_counter()
        prep: Prepared | None = None
        err: Refusal | None = None
        early: Any = None
        who = ("", "")
        try:
            ask = self._asks.get(len(raw))  # a request shaped like one checked before: its checks are done
            if ask is not None and raw.startswith(ask.head):
                request = ask.request
            else:
                ask = None
                request = pb.ModelInferRequest.FromString(raw)
            md = context.invocation_metadata() or ()
            who = self._who(md)
            early = self._forward_early(request, raw, md, who[0], context, ask)
            if early is not None:
                await asyncio.sleep(0)  # the call's task sends the request: Triton works while this one is admitted
            try:
                prep = await self.prepare(request, raw, md, context, who=who, ask=ask)
            except BaseException:
                if early is not None:
                    early.cancel()
                    self._early_cancelled.inc()
                raise
            if ask is None or prep.plan is not ask.plan:  # new, or checked anew against refreshed metadata
                self._ask_shape(pb.ModelInferRequest.FromString(raw) if ask is not None else request, raw, prep)
            try:
                if early is not None:
                    self._early_used.inc()
                    call = early
                else:
                    call = self._calls["ModelInfer"](prep.upstream, timeout=self._timeout(context),
                                                     metadata=self._forward(md))
                out = await call
            except grpc.aio.AioRpcError as e:
                self.settle(prep, SettleStatus.UPSTREAM_ERROR)
                raise upstream_refusal(e, self.settings.upstream) from None
            try:
                fast = self._answer_alike(out, prep)
                if fast is not None:
                    body, values = fast
                else:
                    response = pb.ModelInferResponse.FromString(out)
                    learnt = self._answer_shape(out, response, prep)  # before protect changes the tensor
                    values = self.protect_response(response, prep, where="ModelInfer")
                    body = response.SerializeToString()
                    if learnt is not None:
                        self._answers[learnt[0]] = learnt[1]
            except InvalidInput as e:  # Triton's answer does not fit the config: not the client's fault
                self.settle(prep, SettleStatus.UPSTREAM_ERROR)
                raise Refusal(grpc.StatusCode.INTERNAL, f"cannot protect the response: {e}") from None
            # settled once the answer is on its way, off the request's latency path (the budget's store
            # write is the slowest step of a request); a client gone by then settles as client_abort
            context.add_done_callback(functools.partial(self._settle_done, prep, values))
            self._ok_infer.observe(time.perf_counter() - t0)
            return body
        except asyncio.CancelledError:
            if prep is not None:
                self.settle(prep, SettleStatus.CLIENT_ABORT)
            self.deferred.kick()  # no settle follows: the held bookkeeping runs now
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status, never a dead handler
            if prep is not None and not prep.settled:
                self.settle(prep, SettleStatus.UPSTREAM_ERROR)
            self.deferred.kick()
            err = _as_refusal(e)
        finally:
            if early is not None:
                self._early_over(who[0])
        self._observe("ModelInfer", err.code.name, t0)
        await context.abort(err.code, err.message, trailing_metadata=err.trailers)
        raise AssertionError("unreachable")  # abort raises

    # -- ModelStreamInfer -----------------------------------------------------------------------
    async def model_stream_infer(self, requests: AsyncIterator[bytes],
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """One upstream stream per client stream. A refused request gets a response with ``error_message``
        (as Triton reports per-request errors on a stream) and the stream goes on."""
        md = context.invocation_metadata() or ()
        call = self._calls["ModelStreamInfer"](metadata=self._forward(md))
        pending: dict[str, Prepared] = {}
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def pump_requests() -> None:
            try:
                async for raw in requests:
                    try:
                        request = pb.ModelInferRequest.FromString(raw)
                    except _DecodeError as e:  # answered like any refused request: the stream goes on
                        await queue.put(_stream_error(pb.ModelInferRequest(), f"INVALID_ARGUMENT: not a valid "
                                                                               f"ModelInferRequest: {e}"))
                        continue
                    uid = "dg-" + uuid.uuid4().hex
                    try:
                        prep = await self.prepare(request, raw, md, context, upstream_id=uid)
                    except Exception as e:  # noqa: BLE001 - a refused request must not end the stream
                        r = _as_refusal(e)
                        await queue.put(_stream_error(request, f"{r.code.name}: {r.message}"))
                        continue
                    pending[uid] = prep
                    await call.write(prep.upstream)
                await call.done_writing()
            except grpc.aio.AioRpcError:
                pass  # the upstream side ends too; pump_responses reports it

        async def pump_responses() -> None:
            try:
                async for out in call:
                    msg = pb.ModelStreamInferResponse.FromString(out)
                    uid = msg.infer_response.id
                    prep = pending.get(uid)
                    if prep is None:  # not ours to map back: never pass on an unprotected answer
                        await queue.put(pb.ModelStreamInferResponse(
                            error_message=msg.error_message or "response without a known request id").SerializeToString())
                        continue
                    msg.infer_response.id = prep.client_id
                    final = _is_final(msg.infer_response)
                    if msg.error_message:
                        if final:
                            self.settle(pending.pop(uid), SettleStatus.UPSTREAM_ERROR)
                        await queue.put(msg.SerializeToString())
                        continue
                    try:
                        values = self.protect_response(msg.infer_response, prep, where="ModelStreamInfer")
                    except Exception as e:  # noqa: BLE001
                        self.settle(pending.pop(uid, prep), SettleStatus.UPSTREAM_ERROR)
                        r = _as_refusal(e)
                        await queue.put(_stream_error(msg.infer_response, f"{r.code.name}: cannot protect the "
                                                                          f"response: {r.message}"))
                        continue
                    if final:
                        self.settle(pending.pop(uid), SettleStatus.OK, values)
                    await queue.put(msg.SerializeToString())
            finally:
                await queue.put(None)

        sender = asyncio.create_task(pump_requests())
        receiver = asyncio.create_task(pump_responses())
        failure: Refusal | None = None
        try:
            while (item := await queue.get()) is not None:
                yield item
                self.deferred.kick()  # a stream's settles run inline: its held bookkeeping runs after each answer
            try:
                await receiver
            except grpc.aio.AioRpcError as e:
                failure = upstream_refusal(e, self.settings.upstream)
        finally:
            self.deferred.kick()
            sender.cancel()
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await sender
            status = SettleStatus.UPSTREAM_ERROR if failure is not None else SettleStatus.CLIENT_ABORT
            for prep in pending.values():
                self.settle(prep, status)
            call.cancel()
        if failure is not None:
            await context.abort(failure.code, failure.message)


def _last_field(number: int, size: int) -> bytes:
    """The wire header of a length-delimited protobuf field (its tag, then its size as a varint)."""
    out = bytearray([number << 3 | 2])
    while size >= 0x80:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out)


def _names_bypass(raw: bytes) -> bool:
    """Whether the bytes hold a _BYPASS_WORDS word (spelled out: a genexpr over them costs twice as much)."""
    return b"shared_memory_" in raw or b"classification" in raw


def _blocks_early(raw: bytes) -> bool:
    """Whether the bytes hold an _EARLY_BLOCKERS word."""
    return _names_bypass(raw) or b"sequence_" in raw


def _as_refusal(e: BaseException) -> Refusal:
    if isinstance(e, Refusal):
        return e
    if isinstance(e, InvalidInput):
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, DefenseFailure):
        return Refusal(grpc.StatusCode.INTERNAL, str(e))
    if isinstance(e, grpc.aio.AioRpcError):
        return Refusal(e.code(), e.details() or e.code().name)
    if isinstance(e, _DecodeError):
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid ModelInferRequest: {e}")
    log.exception("KServe proxy failed with %s", type(e).__name__, exc_info=e)
    return Refusal(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})")


def _expected_values(spec: ModelSpec, meta: tensors.ModelMeta, asked: Sequence[str], batch: int) -> int | None:
    """Probability / logprob values the answer will return (the budget reserves them), from the metadata's
    output shapes; None when a shape leaves a size open beyond the batch dimension."""
    total = 0
    for name in asked or meta.outputs:
        if name not in spec.protected or name not in spec.returned:
            continue
        shape = list(meta.outputs[name].shape)
        if spec.batched and shape:
            shape[0] = batch
        if any(d < 0 for d in shape):
            return None
        total += math.prod(shape)
    return total


def _stream_error(request: Any, message: str) -> bytes:
    resp = pb.ModelStreamInferResponse(error_message=message)
    resp.infer_response.id = request.id
    resp.infer_response.model_name = request.model_name
    resp.infer_response.model_version = request.model_version
    return resp.SerializeToString()


def _is_final(response: Any) -> bool:
    """Whether a stream response ends its request (decoupled models flag the last one; others send one)."""
    p = response.parameters.get(_FINAL)
    return True if p is None else bool(p.bool_param)


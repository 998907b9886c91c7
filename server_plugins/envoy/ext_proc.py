"""Envoy External Processing (ext_proc v3) server for OpenAI-compatible engines, hosted by the sidecar.

One gRPC stream per HTTP request; each message is translated to a call on the shared front logic
(``server_plugins.openai.Exchange``), which decides. The filter config this expects (examples/envoy.yaml):
request headers SEND and body BUFFERED, response headers SEND and body BUFFERED, trailers SKIP, and
``allow_mode_override: true``, which lets the server switch a streamed (SSE) answer to STREAMED and turn
processing off for passed paths and upstream errors, so they cost no more messages.

- a refusal is an ``immediate_response`` (400/403/404/413/429 with OpenAI's error body);
- the rewritten request body and its content-length go back in the request body response;
- a buffered response's content-length is set to the rewritten body's length in the body response (Envoy
  keeps the header in BUFFERED mode and holds the headers until then); a streamed one's is removed;
- a stream that ends before the response did (the client went away, Envoy reset it) settles as
  CLIENT_ABORT in ``finally``, and an upstream error (non-2xx) settles at once as UPSTREAM_ERROR;
- a complete answer settles through ``defense.deferred``: queued as its last part is handed back (grpc may
  close the stream generator right after that) and run on the loop's next turn, off the client's path.

The chain runs in this process, on the event loop, as the sidecar's own RPCs do: no second hop.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from defense.deferred import Deferred
from defense.runtime import Runtime
from defense.types import SettleStatus
from server_plugins.openai import Exchange, Forward, Guard, Reply, ResponsePlan, error_reply

from ._proto import ext_proc_pb2 as pb

try:  # Envoy's messages read from their bytes in C (built at install when a compiler is there)
    from . import _wire
except ImportError:  # pragma: no cover - an install without a C compiler
    _wire = None

log = logging.getLogger("distillguard.envoy")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
Mode = pb.ProcessingMode

# a passed request: no body to Envoy's server, no response messages at all
_PASS_ALL = pb.ProcessingMode(request_body_mode=Mode.NONE, response_header_mode=Mode.SKIP,
                              response_body_mode=Mode.NONE, request_trailer_mode=Mode.SKIP,
                              response_trailer_mode=Mode.SKIP)
_NO_BODY = pb.ProcessingMode(response_body_mode=Mode.NONE, response_trailer_mode=Mode.SKIP)
_STREAMED = pb.ProcessingMode(response_body_mode=Mode.STREAMED, response_trailer_mode=Mode.SKIP)


def headers_of(m: pb.HeaderMap) -> dict[str, str]:
    """Lower-case name -> value; a repeated header joined with ','. Envoy 1.40 fills raw_value."""
    out: dict[str, str] = {}
    for h in m.headers:
        k = h.key.lower()
        raw = h.raw_value
        v = raw.decode("latin-1") if raw else h.value
        if k in out:
            v = f"{out[k]},{v}"
        out[k] = v
    return out


# what ``read_request`` answers: the number of the ProcessingRequest oneof field that is set (0: none)
GOT_REQUEST_HEADERS, GOT_RESPONSE_HEADERS, GOT_REQUEST_BODY, GOT_RESPONSE_BODY, GOT_REQUEST_TRAILERS, \
    GOT_RESPONSE_TRAILERS = range(2, 8)
_ONEOF = {f.name: f.number for f in pb.ProcessingRequest.DESCRIPTOR.oneofs_by_name["request"].fields}


def read_request_pb(data: bytes) -> tuple[int, dict[str, str] | bytes | None, bool]:
    """A ProcessingRequest's bytes -> (oneof field number, headers dict or body bytes or None, end_of_stream),
    with protobuf's parser; ``_wire.read`` answers the same from the bytes directly."""
    msg = pb.ProcessingRequest.FromString(data)
    which = msg.WhichOneof("request")
    if which is None:
        return 0, None, False
    part = getattr(msg, which)
    kind = _ONEOF[which]
    if kind <= GOT_RESPONSE_HEADERS:
        return kind, headers_of(part.headers), part.end_of_stream
    if kind <= GOT_RESPONSE_BODY:
        return kind, part.body, part.end_of_stream
    return kind, None, False


read_request = _wire.read if _wire is not None else read_request_pb


def _mutation(set_headers: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> pb.HeaderMutation:
    over = pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    return pb.HeaderMutation(
        set_headers=[pb.HeaderValueOption(header=pb.HeaderValue(key=k, raw_value=v.encode("latin-1")),
                                          append_action=over) for k, v in set_headers],
        remove_headers=list(remove))


def immediate(reply: Reply, details: str = "distillguard") -> pb.ProcessingResponse:
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=pb.HttpStatus(code=reply.status), headers=_mutation(reply.headers, ()), body=reply.body,
        details=details))


# -- body responses on the wire ---------------------------------------------------------------------
# The body responses (the rewritten request, each protected answer) are written as protobuf wire bytes here
# rather than built as message objects and serialized: the same bytes (tests hold them to
# SerializeToString), for a tenth of the cost in Python and less again in C (``_wire.body_response``).
# Field numbers from ext_proc.proto: ProcessingResponse request_body 3 / response_body 4 -> BodyResponse
# response 1 -> CommonResponse header_mutation 2, body_mutation 3 -> BodyMutation body 1 | clear_body 2;
# HeaderMutation set_headers 1, remove_headers 2; HeaderValueOption header 1, append_action 3; HeaderValue
# key 1, raw_value 3.
REQUEST_BODY, RESPONSE_BODY = 3, 4
_OVERWRITE = b"\x18\x02"  # append_action (field 3, varint) = OVERWRITE_IF_EXISTS_OR_ADD
_CLEAR_BODY = b"\x10\x01"  # clear_body (field 2, varint) = true


_SHORT = [bytes((n,)) for n in range(0x80)]  # the one-byte varints


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SHORT[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (number < 16: a one-byte tag)."""
    return _SHORT[number << 3 | 2] + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=256)  # most headers repeat (content-type, a few lengths); a request id does not
def _set_header(k: str, v: str) -> bytes:
    """HeaderMutation.set_headers entry: HeaderValueOption{header: HeaderValue{key, raw_value}, OVERWRITE}."""
    kb, vb = k.encode(), v.encode("latin-1")
    hv = ((b"\x0a" + _varint(len(kb)) + kb if kb else b"")  # key (1), raw_value (3); proto3 omits empty ones
          + (b"\x1a" + _varint(len(vb)) + vb if vb else b""))
    option = b"\x0a" + _varint(len(hv)) + hv + _OVERWRITE  # header (1), append_action (3)
    return b"\x0a" + _varint(len(option)) + option  # set_headers (1)


def _header_mutation(set_headers: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> bytes:
    parts = [_set_header(k, v) for k, v in set_headers]
    parts += [_field(2, k.encode()) for k in remove]
    return b"".join(parts)


def body_response_py(which: int, data: bytes, set_headers: tuple[tuple[str, str], ...] = (),
                     remove: tuple[str, ...] = ()) -> bytes:
    """``body_response`` in Python (``_wire.body_response`` writes the same bytes in C). The nested lengths
    are worked out first, so the body is copied once, into the result."""
    hm = _field(2, _header_mutation(set_headers, remove)) if set_headers or remove else b""  # header_mutation (2)
    inner = b"\x0a" + _varint(len(data)) if data else _CLEAR_BODY  # BodyMutation: body (1) | clear_body (2)
    size = len(inner) + len(data)
    mutation = b"\x1a" + _varint(size)  # CommonResponse.body_mutation (3)
    size += len(hm) + len(mutation)
    response = b"\x0a" + _varint(size)  # BodyResponse.response (1)
    size += len(response)
    return b"".join((_SHORT[which << 3 | 2], _varint(size), response, hm, mutation, inner, data))


_write_body = _wire.body_response if _wire is not None else body_response_py


def body_response(which: int, data: bytes, *, set_headers: tuple[tuple[str, str], ...] = (),
                  remove: tuple[str, ...] = ()) -> bytes:
    """A serialized ProcessingResponse whose request_body (``REQUEST_BODY``) or response_body
    (``RESPONSE_BODY``) replaces the body with ``data`` (clears it when empty) and changes these headers."""
    return _write_body(which, data, set_headers, remove)


# the answers that never change, serialized once: the headers that go on untouched
_REQUEST_HEADERS_OK = pb.ProcessingResponse(request_headers=pb.HeadersResponse()).SerializeToString()
_RESPONSE_HEADERS_OK = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()


def _serialize(response: pb.ProcessingResponse | bytes) -> bytes:
    return response if response.__class__ is bytes else response.SerializeToString()  # type: ignore[union-attr]


class ExtProcServicer:
    def __init__(self, guard: Guard, deferred: Deferred | None = None) -> None:
        self.guard = guard
        # settles of answered exchanges: run on the loop's next turn, once the answer is handed back
        self.deferred = deferred if deferred is not None else Deferred()

    async def process(self, requests: AsyncIterator[tuple[int, dict[str, str] | bytes | None, bool]],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse | bytes]:
        """Envoy's messages in, as ``read_request`` reads them; answers out: ProcessingResponse messages, or
        the body responses already serialized (bytes), which the handler's serializer passes through."""
        ex: Exchange | None = None
        plan: ResponsePlan | None = None
        try:
            async for kind, payload, end in requests:
                if kind == GOT_REQUEST_HEADERS:
                    h: dict[str, str] = payload  # type: ignore[assignment]
                    ex = self.guard.start(h.get(":method", ""), h.get(":path", "/"), h)
                    if ex.action == "pass":
                        yield pb.ProcessingResponse(request_headers=pb.HeadersResponse(), mode_override=_PASS_ALL)
                    elif ex.action == "reply":
                        yield immediate(ex.reply)  # type: ignore[arg-type]
                    elif end:
                        yield immediate(error_reply(400, "the request has no body; send a JSON object", code="no_body"))
                    else:
                        yield _REQUEST_HEADERS_OK
                        # grpc resumes this generator once the answer is written: Envoy sends the body
                        # meanwhile, and what the body does not change is ready when it comes
                        ex.prepare()
                elif kind == GOT_REQUEST_BODY:
                    if ex is None or ex.action != "guard":
                        yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                        continue
                    if not end:
                        # BUFFERED delivers the whole body in one message; a partial one means the body was
                        # over Envoy's buffer limit (BUFFERED_PARTIAL) or the filter is misconfigured
                        yield immediate(error_reply(413, "the request body is too large to check",
                                                    code="request_too_large"))
                        continue
                    out = ex.request(payload)  # type: ignore[arg-type]
                    if isinstance(out, Forward):
                        yield _write_body(REQUEST_BODY, out.body, out.set_headers, out.remove_headers)
                        ex.forwarded()  # resumed once the answer is written: the engine works meanwhile
                    else:
                        yield immediate(out)
                elif kind == GOT_RESPONSE_HEADERS:
                    h = payload  # type: ignore[assignment]
                    if ex is None:
                        yield pb.ProcessingResponse(response_headers=pb.HeadersResponse(), mode_override=_NO_BODY)
                        continue
                    try:
                        status = int(h.get(":status", "0"))
                    except ValueError:
                        status = 0
                    plan = ex.response_start(status, h)
                    if plan.mode == "buffer" and not (plan.set_headers or plan.remove_headers or end):
                        yield _RESPONSE_HEADERS_OK  # the usual answer: its body comes next, buffered
                        continue
                    resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                    if plan.set_headers or plan.remove_headers:
                        resp.response_headers.response.header_mutation.CopyFrom(
                            _mutation(plan.set_headers, plan.remove_headers))
                    if plan.mode == "pass" or end:
                        resp.mode_override.CopyFrom(_NO_BODY)
                        if end and plan.mode != "pass":
                            ex.finish(SettleStatus.OK)  # a 2xx without a body: nothing returned to protect
                    elif plan.mode == "stream":
                        resp.mode_override.CopyFrom(_STREAMED)
                    yield resp
                elif kind == GOT_RESPONSE_BODY:
                    if ex is None or plan is None or plan.mode == "pass":
                        answer = pb.ProcessingResponse(response_body=pb.BodyResponse())
                    elif plan.mode == "stream":
                        chunk = ex.response_chunk(payload, end)  # type: ignore[arg-type]
                        answer = _write_body(RESPONSE_BODY, chunk, (), ())
                    else:
                        result = ex.response_body(payload)  # type: ignore[arg-type]
                        if isinstance(result, Reply):
                            answer = immediate(result, "distillguard_unprotected_response")
                        else:
                            # BUFFERED with headers SENT: Envoy kept content-length and holds the headers
                            # until now; it must match the new body (Envoy refuses a mismatch)
                            answer = _write_body(RESPONSE_BODY, result, (("content-length", str(len(result))),), ())
                    if ex is not None and ex.complete and not ex.settled:
                        # settle soon, off this and the next request's path. Queued before the answer is
                        # handed over: once Envoy has the last body it may close the stream, and grpc then
                        # closes this generator at the yield, so code after it would never run
                        self.deferred.add(ex.finish)
                    yield answer
                elif kind == GOT_REQUEST_TRAILERS:
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == GOT_RESPONSE_TRAILERS:
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                else:  # a message kind this subset does not know: answering nothing would stall Envoy
                    log.warning("ext_proc: unexpected message (request field %d); failing the stream", kind)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"unexpected ext_proc message (request field {kind})")
        finally:
            # the stream ended: Envoy finished, or the client or Envoy reset it mid-way (grpc cancels us)
            if ex is not None and not ex.settled and not ex.complete:
                ex.finish(SettleStatus.CLIENT_ABORT if ex.status else SettleStatus.UPSTREAM_ERROR)


def ext_proc_handler(runtime: Callable[[], Runtime], deferred: Deferred | None = None) -> grpc.GenericRpcHandler:
    servicer = ExtProcServicer(Guard(runtime), deferred)
    method = grpc.stream_stream_rpc_method_handler(servicer.process,
                                                   request_deserializer=read_request,
                                                   response_serializer=_serialize)
    return grpc.method_handlers_generic_handler(SERVICE, {"Process": method})


def add_ext_proc(server: grpc.aio.Server, runtime: Callable[[], Runtime], deferred: Deferred | None = None) -> None:
    """Serve Envoy's ExternalProcessor on ``server``, deciding with the live ``runtime()`` of each request;
    ``deferred`` (drained by the host at shutdown) takes the settles of answered exchanges."""
    server.add_generic_rpc_handlers((ext_proc_handler(runtime, deferred),))

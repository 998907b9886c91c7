"""One HTTP request through an OpenAI-compatible front: Admit, rewrite, Protect, Settle (sans I/O).

Paths: POST /v1/completions and /v1/chat/completions are guarded. ``front.pass_paths`` (models, health)
pass untouched. Any other path is refused with 404 by default (``front.unknown_paths: refuse``), because an
engine exposes more ways to generate than the two guarded ones (vLLM: /v1/responses, /invocations, ...);
``pass`` forwards them untouched instead. Paths are matched after percent-decoding and dot-segment
removal, so ``/v1/%63ompletions`` is the guarded path, not an unknown one.

Refusals (Contracts): a request-rule refusal is 400 invalid_request_error, a throttle is 429 with
Retry-After and RateLimit headers, any other deny is 403. A body that is not JSON is 400; a body over
``front.max_body_bytes`` is 413. A defense that fails closed, or an engine answer whose logprobs cannot be
read, is refused rather than passed unprotected (502; in a stream, an error event and the end).

Settle runs exactly once per admitted request (``finish``): with the engine's reported usage (or a count of
what was returned, when it reports none) once the front has sent the whole protected answer, with
UPSTREAM_ERROR at once on a non-2xx answer or one that cannot be checked, and with CLIENT_ABORT and the
usage seen so far when the front is closed before the answer ended.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from defense.chain import Admission
from defense.errors import DefenseFailure, InvalidInput
from defense.identity import bearer_token, client_id_from_token
from defense.profile import DEFAULT_PROFILE, Profile, encode_for_engine, sign_profile
from defense.rules import RequestRules
from defense.runtime import Runtime
from defense.types import Api, Decision, LogprobBatch, SettleStatus, Usage

from . import jsonx
from . import logprobs as lpmod
from .replies import Reply, error_reply, throttle_reply
from .request import BadRequest, OpenAIRequest, parse_request, rewrite_body
from .sse import BodyCodec, SSERewriter, UnsupportedEncoding, supported_encoding

log = logging.getLogger("distillguard.front")

GUARDED: Mapping[str, Api] = {"/v1/completions": Api.OPENAI_COMPLETIONS, "/v1/chat/completions": Api.OPENAI_CHAT}
# deny reason codes that describe the request, not the client (Contracts: 400, not 403)
_REQUEST_CODES = frozenset({"top_logprobs_all", "top_logprobs_over_cap", "logit_bias_with_logprobs", "prompt_logprobs",
                            "echo_with_logprobs", "raw_logits_outputs", "budget_request_too_large"})
MAX_RESPONSE_BYTES = 64 << 20  # a buffered (decoded) engine answer above this is refused, not held
RID_HEADER = "x-distillguard-request-id"
_PRESIGNED_FOR_S = 1.0  # a profile signed at the headers is used if the body comes within this
_STRENGTHS_MAX = 8192  # clients whose last strength a Guard remembers; it starts over when full


@functools.lru_cache(maxsize=256)
def _engine_encodings(accept: str) -> str:
    """The client's accept-encoding, kept to what this front can decode again (clients send few variants)."""
    keep = [e.strip() for e in accept.split(",") if supported_encoding(e.split(";")[0].strip().lower()) and e.strip()]
    return ", ".join(keep) or "identity"


def normalize_path(raw: str) -> str:
    """The path an ASGI app would route: query dropped, percent-decoded, dot segments and // removed."""
    path = unquote(raw.split("?", 1)[0].split("#", 1)[0])
    norm = posixpath.normpath("/" + path.lstrip("/")) if path else "/"
    return "/" if norm in (".", "//") else norm.replace("//", "/")


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request on with this body and these header changes."""

    body: bytes
    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResponsePlan:
    mode: str  # "buffer": give the whole body to response_body(); "stream": chunks to response_chunk(); "pass"
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()


PASS = ResponsePlan("pass")


class Guard:
    """The front over a live runtime; ``runtime`` is a callable so a config reload applies to new requests."""

    def __init__(self, runtime: Runtime | Callable[[], Runtime]) -> None:
        self._runtime = runtime if callable(runtime) else (lambda: runtime)
        if self._runtime().keys is None:
            raise ValueError("an HTTP front needs the key file: client ids are keyed hashes of API keys")
        # each client's strength at its last admission: the profile an Exchange signs ahead (``prepare``)
        self._strengths: dict[str, float] = {}

    def start(self, method: str, path: str, headers: Mapping[str, str]) -> Exchange:
        """Headers are lower-case names; a repeated header joined with ','."""
        return Exchange(self._runtime(), method.upper(), path, headers, strengths=self._strengths)


class Exchange:
    """One request's state. ``action`` after construction: "guard" (send the body to ``request``), "pass"
    (forward untouched, nothing more to do) or "reply" (send ``reply`` instead of forwarding)."""

    # one per HTTP request: slots make it smaller and quicker to fill than a dict
    __slots__ = ("rt", "front", "reply", "adm", "req", "request_id", "settled", "complete", "status", "headers",
                 "path", "api", "action", "_strengths", "_usage", "_counted", "_offsets", "_sse", "_codec",
                 "_broken", "_ident", "_presigned")

    def __init__(self, rt: Runtime, method: str, raw_path: str, headers: Mapping[str, str], *,
                 strengths: dict[str, float] | None = None) -> None:
        self.rt = rt
        self._strengths = strengths if strengths is not None else {}
        self.front = rt.loaded.config.front
        self.reply: Reply | None = None
        self.adm: Admission | None = None
        self.req: OpenAIRequest | None = None
        # never the client's (a reused id would replay an admission); 128 random bits, safe across forks
        self.request_id = "dg-" + os.urandom(16).hex()
        self.settled = False
        self.complete = False  # the whole answer was protected and handed to the front
        self.status = 0
        self._usage: dict[str, int] = {}
        self._counted = [0, 0, 0]  # completion tokens, logprob values, characters of text (streams)
        self._offsets: dict[int, int] = {}
        self._sse: SSERewriter | None = None
        self._codec: BodyCodec | None = None
        self._broken = False
        self.headers = headers
        path = raw_path if raw_path in GUARDED else normalize_path(raw_path)  # the usual case is already normal
        self.path = path
        self._ident: tuple[str, str] | None = None
        self._presigned: tuple[float, float, dict[str, str]] | None = None  # strength, signed at, xargs
        self.api = GUARDED.get(path)
        if self.api is None:
            if self._passes(path) or self.front.unknown_paths == "pass":
                self.action = "pass"
            else:
                self.action = "reply"
                self.reply = error_reply(404, f"{path} is not served through this front (guarded: "
                                              f"{', '.join(GUARDED)})", code="unknown_path")
            return
        if method == "OPTIONS":  # CORS preflight: no body, nothing generated
            self.action = "pass"
            return
        if method != "POST":
            self.action = "reply"
            self.reply = error_reply(405, f"{path} takes POST", code="method_not_allowed")
            return
        enc = headers.get("content-encoding", "").strip().lower()
        if enc not in ("", "identity"):
            self.action = "reply"
            self.reply = error_reply(415, f"request content-encoding {enc!r} is not accepted; send plain JSON",
                                     code="unsupported_encoding")
            return
        self.action = "guard"

    def _passes(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.front.pass_paths)

    # -- request --------------------------------------------------------------------------------
    def request(self, body: bytes) -> Reply | Forward:
        """Admit the request body; the reply to send instead, or the rewritten request to forward."""
        assert self.action == "guard" and self.api is not None  # noqa: S101 - fronts check action first
        if self.adm is not None:  # one body per exchange: a second is never admitted (and charged) again
            return self._refuse(error_reply(400, "this request already had its body", code="duplicate_body"))
        if len(body) > self.front.max_body_bytes:
            return self._refuse(error_reply(413, f"the request body is larger than {self.front.max_body_bytes} bytes",
                                            code="request_too_large"))
        try:
            req = parse_request(self.api, body)
        except BadRequest as e:
            return self._refuse(error_reply(400, e.message, param=e.param, code=e.code))
        rt = self.rt
        ident = rt.loaded.config.identity
        client, tenant = self._ident or self._identify()
        try:
            ctx = req.context(request_id=self.request_id, client_id=client, tenant=tenant,
                              received_at=rt.deps.clock.now(), private_id=True)  # minted here, settled here
            adm = rt.chain.admit(ctx)
        except InvalidInput as e:
            return self._refuse(error_reply(400, str(e), code="invalid_request"))
        except DefenseFailure as e:
            log.warning("admit failed closed for %s: %s", self.request_id, e)
            return self._refuse(error_reply(503, "the request could not be checked; retry shortly",
                                            type="server_error", code="defense_unavailable"))
        if not adm.allowed:
            return self._refuse(self._refusal(adm))
        self.req, self.adm = req, adm
        xargs = {}
        if rt.keys is not None:
            pre, strength = self._presigned, adm.ctx.strength
            # the profile signed ahead, unless admission changed the strength or the body was slow to come
            fresh = pre is not None and pre[0] == strength and rt.deps.clock.now() - pre[1] < _PRESIGNED_FOR_S
            xargs = pre[2] if fresh else self._signed_xargs(strength)  # type: ignore[index]
            if pre is not None and pre[0] != strength:
                if len(self._strengths) >= _STRENGTHS_MAX:
                    self._strengths.clear()
                self._strengths[client] = strength
        new = rewrite_body(req, adm.rewrites, xargs=xargs, client_xargs=self.front.client_xargs,
                           default_max_tokens=ident.default_max_tokens)
        return Forward(new, (("content-type", "application/json"), ("content-length", str(len(new))),
                             ("accept-encoding", _engine_encodings(self.headers.get("accept-encoding", ""))),
                             (RID_HEADER, self.request_id)))

    def forwarded(self) -> None:
        """The admitted request is on its way upstream: what the answer's protect needs that depends on the
        request alone (the keyed seeds) is done now, while the engine works, not once its answer is back."""
        if self.adm is not None and self.adm.ctx.wants_logprobs:
            self.rt.chain.prime(self.adm.ctx)

    def prepare(self) -> None:
        """Work the request body does not change, done ahead: the client's identity and the profile signed
        for an unchanged strength. A front with a wait between headers and body (Envoy's ext_proc, once it
        has answered the headers) calls this there; ``request`` does it itself otherwise."""
        if self.action != "guard" or self._ident is not None:
            return
        self._ident = self._identify()
        if self.rt.keys is not None:  # signed for the strength this client was last admitted at
            strength = self._strengths.get(self._ident[0], 1.0)
            self._presigned = (strength, self.rt.deps.clock.now(), self._signed_xargs(strength))

    def _signed_xargs(self, strength: float) -> dict[str, str]:
        rt = self.rt
        profile = Profile(strength=strength) if strength != 1.0 else DEFAULT_PROFILE
        signed = sign_profile(profile, self.request_id, keys=rt.keys,  # type: ignore[arg-type]
                              now=rt.deps.clock.now(), ttl_s=rt.loaded.config.profile.ttl_s)
        # the engine plugin verifies the signature over this request id, so it travels with it
        return {**encode_for_engine(signed), "dg_rid": self.request_id}

    def _identify(self) -> tuple[str, str]:
        ident = self.rt.loaded.config.identity
        client_header, default_tenant = ident.client_header.lower(), ident.default_tenant
        raw = self.headers.get(client_header)
        token = bearer_token(raw) if client_header == "authorization" else (raw or "").strip() or None
        client = client_id_from_token(token, self.rt.keys) if token else "anonymous"  # type: ignore[arg-type]
        tenant = (self.headers.get(ident.tenant_header.lower()) or default_tenant).strip()[:64] or default_tenant
        return client, tenant

    def _refusal(self, adm: Admission) -> Reply:
        if adm.decision is Decision.THROTTLE:
            return throttle_reply(adm.reason, code=adm.reason_code, retry_after_s=adm.retry_after_s)
        entry = next((e for e in self.rt.chain.entries if e.name == adm.decided_by), None)
        if adm.reason_code in _REQUEST_CODES or (entry is not None and isinstance(entry.defense, RequestRules)):
            return error_reply(400, adm.reason or "the request is not allowed", code=adm.reason_code or None)
        return error_reply(403, adm.reason or "this client may not use this model now", type="permission_error",
                           code=adm.reason_code or "refused")

    def _refuse(self, reply: Reply) -> Reply:
        self.action = "reply"
        self.reply = reply
        return reply

    # -- response -------------------------------------------------------------------------------
    def response_start(self, status: int, headers: Mapping[str, str]) -> ResponsePlan:
        """The engine's status and headers: how its body must be handled."""
        self.status = status
        if self.adm is None:
            return PASS
        if not 200 <= status < 300:
            self.finish(SettleStatus.UPSTREAM_ERROR)
            return PASS
        try:
            self._codec = BodyCodec(headers.get("content-encoding", ""), max_decoded=MAX_RESPONSE_BYTES)
        except UnsupportedEncoding:
            self._codec = None  # refused when the body comes: the client must not get it unprotected
        ctype = headers.get("content-type", "").lower()
        if ctype.startswith("text/event-stream"):
            self._sse = SSERewriter(self._rewrite_event)
            return ResponsePlan("stream", remove_headers=("content-length",))
        # a buffered body's new length is known once it is rewritten: fronts set content-length then (Envoy's
        # ext_proc keeps the header in BUFFERED mode and checks it), and the client gets no chunked framing
        return ResponsePlan("buffer")

    def response_body(self, body: bytes) -> bytes | Reply:
        """A whole buffered body: the protected body (same encoding), or a reply that replaces the response."""
        if self.adm is None or self.settled:
            return body
        try:
            if self._codec is None:
                raise UnsupportedEncoding("the engine's content-encoding is not supported")
            data = self._codec.decode(body)
            scanned = lpmod.scan(self.api, data)  # type: ignore[arg-type]
            if scanned is not None:  # the usual shape, read and rewritten in place (no document built)
                out = self._codec.encode(self._protect_scanned(scanned), final=True)
                usage = scanned.usage
            else:
                doc = jsonx.loads(data or b"null")
                if not isinstance(doc, dict):
                    raise lpmod.UpstreamFormatError("the engine's answer is not a JSON object")
                self._protect_doc(doc)
                out = self._codec.encode(jsonx.dumps(doc), final=True)
                usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
        except (ValueError, InvalidInput, DefenseFailure) as e:  # JSON, format, encoding and defense failures
            log.warning("response of %s not protected (%s: %s); refused", self.request_id, type(e).__name__, e)
            self.finish(SettleStatus.UPSTREAM_ERROR)
            return error_reply(502, "the model server's answer could not be checked", type="server_error",
                               code="unprotected_response")
        self._usage = {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
        self.complete = True  # the front settles (finish) once the body is on its way: off the client's path
        return out

    def response_chunk(self, chunk: bytes, end: bool) -> bytes:
        """One piece of a streamed body, rewritten; events split across pieces come out whole."""
        if self.adm is None:
            return chunk
        if self._broken:  # the stream was already ended with an error event
            return b""
        try:
            if self._codec is None:
                raise UnsupportedEncoding("the engine's content-encoding is not supported")
            assert self._sse is not None  # noqa: S101 - response_start chose "stream"
            text = self._sse.feed(self._codec.decode(chunk))
            if end:
                text += self._sse.close()
            out = self._codec.encode(text, final=end) if text or end else b""
        except (ValueError, InvalidInput, DefenseFailure) as e:
            log.warning("stream of %s not protected (%s: %s); ended", self.request_id, type(e).__name__, e)
            self._broken = True
            self.finish(SettleStatus.UPSTREAM_ERROR)
            err = {"error": {"message": "the model server's answer could not be checked", "type": "server_error",
                             "code": "unprotected_response"}}
            text = b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"
            # the body's encoding cannot be trusted here: a plain error event is still readable by most clients
            return text if self._codec is None or self._codec.identity else self._codec.encode(text, final=True)
        if end:
            self.complete = True
        return out

    def _rewrite_event(self, data: bytes) -> bytes | None:
        doc = jsonx.loads(data)
        if not isinstance(doc, dict):
            raise lpmod.UpstreamFormatError("a streamed event is not a JSON object")
        usage = doc.get("usage")
        if isinstance(usage, dict):
            self._usage = {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
            if not doc.get("choices") and not (self.req and self.req.include_usage):
                return None  # the usage-only chunk the front asked for; the client did not
            if not (self.req and self.req.include_usage):
                doc["usage"] = None
        self._protect_doc(doc, stream=True)
        return jsonx.dumps(doc)

    def _protect_doc(self, doc: dict[str, Any], *, stream: bool = False) -> None:
        choices = doc.get("choices") or []
        if not isinstance(choices, list):
            raise lpmod.UpstreamFormatError("choices must be a list")
        api = self.api
        assert api is not None  # noqa: S101 - only admitted exchanges get here
        for c in choices:
            if not isinstance(c, dict):
                raise lpmod.UpstreamFormatError("each choice must be an object")
            idx = c.get("index", 0)
            idx = idx if isinstance(idx, int) else 0
            self._count_text(c, api)
            pos = lpmod.read(api, c.get("logprobs"))
            if pos is None:
                continue
            offset = self._offsets.get(idx, 0) if stream else 0
            self._offsets[idx] = offset + pos.n_positions
            out = self._protect_positions(pos, offset)
            lpmod.write(pos, out.values, out.sampled_values)

    def _protect_scanned(self, scanned: lpmod.Scanned) -> bytes:
        protected: list[tuple[Any, Any] | None] = []
        for pos, chars in zip(scanned.positions, scanned.chars, strict=True):
            self._counted[2] += chars
            if pos is None:
                protected.append(None)
                continue
            out = self._protect_positions(pos, 0)
            protected.append((out.values, out.sampled_values))
        return scanned.write(protected)

    def _protect_positions(self, pos: lpmod.Positions, offset: int) -> LogprobBatch:
        adm = self.adm
        assert adm is not None  # noqa: S101 - only admitted exchanges get here
        self._counted[0] += pos.n_positions
        self._counted[1] += pos.disclosed
        temperature = adm.ctx.temperature if adm.ctx.temperature is not None else 1.0
        known = pos.n_sampled > 0
        batch = LogprobBatch(values=pos.values, token_ids=pos.token_ids,
                             sampled_token_ids=pos.sampled_ids if known else None,
                             sampled_values=pos.sampled_values if known else None,
                             temperature=temperature, logprobs_mode=self.front.engine_logprobs_mode,
                             position_offset=offset)
        return self.rt.chain.protect(batch, adm.ctx).batch

    def _count_text(self, choice: dict[str, Any], api: Api) -> None:
        if api is Api.OPENAI_CHAT:
            part = choice.get("delta") or choice.get("message") or {}
            text = part.get("content") if isinstance(part, dict) else None
        else:
            text = choice.get("text")
        if isinstance(text, str):
            self._counted[2] += len(text)

    # -- settle ---------------------------------------------------------------------------------
    def usage(self, status: SettleStatus) -> Usage:
        """The engine's reported usage; else what the front counted (positions, or characters / 4)."""
        adm = self.adm
        assert adm is not None  # noqa: S101
        ident = self.rt.loaded.config.identity
        prompt = self._usage.get("prompt_tokens")
        if prompt is None:  # the engine read the prompt once it answered 2xx, even if the client left early
            answered = 200 <= self.status < 300 and status is not SettleStatus.UPSTREAM_ERROR
            prompt = math.ceil(adm.ctx.prompt.n_chars / ident.chars_per_token) if answered else 0
        completion = self._usage.get("completion_tokens")
        if completion is None:
            completion = self._counted[0] or math.ceil(self._counted[2] / ident.chars_per_token)
        return Usage(prompt_tokens=max(0, prompt), completion_tokens=max(0, completion),
                     logprob_values=self._counted[1], status=status)

    def finish(self, status: SettleStatus = SettleStatus.CLIENT_ABORT) -> None:
        """Settle once; later calls do nothing. Fronts call it after sending the last of the answer, and on
        close with the status they saw; once the answer is complete it settles OK whatever ``status`` says."""
        if self.settled or self.adm is None:
            return
        if self.complete:
            status = SettleStatus.OK
        self.settled = True
        try:
            self.rt.chain.settle(self.adm.ctx, self.usage(status), self.adm)
        except Exception as e:  # noqa: BLE001 - a failed settle is logged; the reservation expires on its own
            log.warning("settle of %s failed: %s: %s", self.request_id, type(e).__name__, e)

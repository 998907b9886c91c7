"""OpenAI request bodies: parse what admission needs, and rewrite the body the engine will get.

The body is always re-serialized from what was parsed here, so the engine never sees a byte the front
did not read (no parser differentials: duplicate keys, NaN literals, odd encodings). Fields that decide
what a client learns (n, max_tokens, logprobs, top_logprobs, logit_bias, echo, prompt_logprobs) are
type-checked strictly: a value this front cannot read is refused, never guessed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from defense.canonical import context_digest
from defense.types import Api, ChatMessage, Prompt, RequestContext, Rewrites

from . import jsonx

INT32_MAX = 2**31 - 1


class BadRequest(Exception):
    """The body cannot be admitted as sent: a front answers 400 invalid_request_error."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    api: Api
    body: dict[str, Any]  # the parsed body; rewrite_body() copies before changing it
    model: str
    prompt: Prompt
    stream: bool = False
    include_usage: bool = False  # the client itself asked for the final usage chunk
    max_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias_entries: int = 0
    prompt_logprobs: bool = False
    echo: bool = False

    def context(self, *, request_id: str, client_id: str, tenant: str, received_at: float = 0.0,
                private_id: bool = False) -> RequestContext:
        """The request as admission sees it, with its context digest (so the chain need not copy it to add one).
        ``private_id``: the front minted request_id and settles it itself (RequestContext.private_id)."""
        return RequestContext(
            request_id=request_id, client_id=client_id, tenant=tenant, model=self.model, api=self.api,
            prompt=self.prompt, max_tokens=self.max_tokens, n=self.n, temperature=self.temperature, seed=self.seed,
            stream=self.stream, logprobs=self.logprobs, top_logprobs=self.top_logprobs,
            logit_bias_entries=self.logit_bias_entries, prompt_logprobs=self.prompt_logprobs, echo=self.echo,
            context_digest=context_digest(self.model, self.prompt), received_at=received_at, private_id=private_id,
        )


def _int(body: dict[str, Any], name: str, *, low: int, default: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):  # bool is an int in Python; true is not a count
        raise BadRequest(f"{name} must be an integer, got {json.dumps(v)[:40]}", param=name)
    if not low <= v <= INT32_MAX:
        raise BadRequest(f"{name} must be in {low}..{INT32_MAX}, got {v}", param=name)
    return v


def _bool(body: dict[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BadRequest(f"{name} must be true or false, got {json.dumps(v)[:40]}", param=name)
    return v


def _float(body: dict[str, Any], name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise BadRequest(f"{name} must be a number >= 0, got {json.dumps(v)[:40]}", param=name)
    return float(v)


def _completion_prompt(body: dict[str, Any]) -> Prompt:
    if "prompt_embeds" in body:
        # embeddings bypass the canonical prompt that keys the noise, and the budget's prompt estimate
        raise BadRequest("prompt_embeds is not accepted through this front; send the prompt text",
                         param="prompt_embeds")
    p = body.get("prompt")
    if isinstance(p, str):
        return Prompt(text=p)
    if isinstance(p, list) and p:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return Prompt(token_ids=tuple(p))
        if len(p) == 1:
            one = p[0]
            if isinstance(one, str):
                return Prompt(text=one)
            if isinstance(one, list) and one and all(isinstance(t, int) and not isinstance(t, bool) for t in one):
                return Prompt(token_ids=tuple(one))
        if len(p) > 1 and all(isinstance(x, str | list) for x in p):
            # each prompt keys its own noise and budget estimate; a batch would share one
            raise BadRequest("send one prompt per request: batched prompts are not accepted through this front",
                             param="prompt", code="batched_prompts")
    raise BadRequest("prompt must be a string, a list of token ids, or a one-element list of either", param="prompt")


def _content_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise BadRequest(f"messages[{i}].content parts must be objects", param="messages")
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:  # images, audio, ...: keyed by their exact JSON, so a different image keys different noise
                parts.append(json.dumps(part, sort_keys=True, separators=(",", ":")))
        return "\n".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string, a list of parts, or null", param="messages")


def _chat_prompt(body: dict[str, Any]) -> Prompt:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role", param="messages")
        out.append(ChatMessage(m["role"], _content_text(m.get("content"), i)))
    return Prompt(chat=tuple(out))


def parse_request(api: Api, raw: bytes) -> OpenAIRequest:
    """Parse a /v1/completions or /v1/chat/completions body; BadRequest names what is wrong."""
    try:
        body = jsonx.loads(raw)
    except jsonx.JSONError as e:
        raise BadRequest(f"the body is not valid JSON: {str(e)[:80]}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        # the model keys the perturbation: a request without one would key differently from a named one
        raise BadRequest("model is required (a string)", param="model")
    chat = api is Api.OPENAI_CHAT
    prompt = _chat_prompt(body) if chat else _completion_prompt(body)
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object", param="stream_options")
    include_usage = bool(stream and opts and opts.get("include_usage") is True)
    if chat:
        logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", low=-1, default=0)
        max_tokens = _int(body, "max_completion_tokens", low=0)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", low=0)
    else:
        lp = _int(body, "logprobs", low=-1)
        logprobs, top = lp is not None, lp or 0
        max_tokens = _int(body, "max_tokens", low=0)
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise BadRequest("logit_bias must be an object of token id to bias", param="logit_bias")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer", param="seed")
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise BadRequest("vllm_xargs must be an object", param="vllm_xargs")
    return OpenAIRequest(
        api=api, body=body, model=model, prompt=prompt, stream=stream, include_usage=include_usage,
        max_tokens=max_tokens, n=_int(body, "n", low=1, default=1), temperature=_float(body, "temperature"),  # type: ignore[arg-type]
        seed=seed, logprobs=logprobs, top_logprobs=top, logit_bias_entries=len(bias or ()),  # type: ignore[arg-type]
        prompt_logprobs=_asks(body.get("prompt_logprobs")), echo=_bool(body, "echo"),
    )


def _asks(v: Any) -> bool:
    # vLLM's prompt_logprobs=0 still returns each prompt token's logprob: only null and false ask nothing
    return v is not None and v is not False


def _clamp(v: Any, cap: int) -> int:
    return cap if v == -1 or v > cap else v  # -1 asks for every alternative: above any cap


def rewrite_body(req: OpenAIRequest, rw: Rewrites, *, xargs: dict[str, str], client_xargs: tuple[str, ...],
                 default_max_tokens: int) -> bytes:
    """The body the engine gets: the admission's rewrites applied, max_tokens filled in, our signed profile
    as the only dg_* vllm_xargs, the usage chunk asked for when streaming; serialized compactly."""
    body = dict(req.body)
    chat = req.api is Api.OPENAI_CHAT
    lp_field = "top_logprobs" if chat else "logprobs"
    if rw.top_logprobs is not None and body.get(lp_field) is not None:
        body[lp_field] = _clamp(body[lp_field], rw.top_logprobs)
    # the budget reserved this many tokens; an engine left to its default could generate more
    cap = rw.max_tokens if rw.max_tokens is not None else req.max_tokens
    if cap is None:
        cap = default_max_tokens
    for f in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",):
        if body.get(f) is not None or (f == "max_tokens" and body.get("max_completion_tokens") is None):
            body[f] = cap
    if rw.n is not None:
        body["n"] = rw.n
        if isinstance(body.get("best_of"), int) and body["best_of"] > rw.n:
            body["best_of"] = rw.n
    if rw.drop_logit_bias:
        body.pop("logit_bias", None)
    if rw.drop_prompt_logprobs:
        body.pop("prompt_logprobs", None)
    if rw.drop_echo:
        body.pop("echo", None)
    if req.stream:
        # the engine's own token counts settle the budget; the front drops the chunk if the client did not ask
        opts = body.get("stream_options") or {}
        body["stream_options"] = {**opts, "include_usage": True}
    given = body.get("vllm_xargs") or {}
    kept = {k: v for k, v in given.items() if k in client_xargs}
    kept.update(xargs)
    if kept:
        body["vllm_xargs"] = kept
    else:
        body.pop("vllm_xargs", None)
    return jsonx.dumps(body)

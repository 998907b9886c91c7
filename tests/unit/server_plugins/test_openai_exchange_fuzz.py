"""The front's exchange on arbitrary input: whatever the client sends and whatever the engine answers, the
exchange forwards, refuses with a reason, or replaces the answer with an error; it never raises, never
passes on an answer it could not check, and settles every request it admitted exactly once."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import defenses as recorder
from support.openai_answers import AUTH, completion_answer, completion_stream, make_runtime

from defense.types import SettleStatus
from server_plugins.openai import Forward, Guard, Reply

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([10**30, -(10**30)]),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                       max_leaves=6)
_KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "n",
         "stream", "stream_options", "temperature", "logit_bias", "echo", "prompt_logprobs", "seed", "vllm_xargs",
         "best_of", "user"]


@st.composite
def _bodies(draw: st.DrawFn, path: str) -> bytes:
    """A good request for ``path`` with some fields replaced by anything, some removed, or anything at all."""
    kind = draw(st.sampled_from(["request"] * 6 + ["json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    if kind == "json":
        return json.dumps(draw(_VALUES)).encode()
    chat = path.endswith("chat/completions")
    doc: dict = {"model": "tiny", "max_tokens": draw(st.integers(1, 16)), "stream": draw(st.booleans())}
    if chat:
        doc |= {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 5}
    else:
        doc |= {"prompt": draw(st.text(max_size=30)), "logprobs": draw(st.integers(0, 5))}
    for key in draw(st.lists(st.sampled_from(_KEYS), max_size=3, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            doc.pop(key, None)
        else:
            doc[key] = draw(_VALUES)
    # NaN and Infinity as Python's json writes them: not JSON, and a parser may still take them
    return json.dumps(doc).encode()


def _chat_form(doc: dict) -> dict:
    """completion_answer's positions as a chat answer (logprobs.content)."""
    lp = doc["choices"][0]["logprobs"]
    content = [{"token": t, "logprob": v, "bytes": None,
                "top_logprobs": [{"token": a, "logprob": b, "bytes": None} for a, b in top.items()]}
               for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)]
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "tiny", "usage": doc["usage"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": doc["choices"][0]["text"]},
                         "logprobs": {"content": content}, "finish_reason": "length"}]}


@st.composite
def _answers(draw: st.DrawFn, chat: bool) -> bytes:
    """What the engine sends back: a real answer, one with a value replaced, or anything."""
    kind = draw(st.sampled_from(["real", "mutated", "mutated", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80))
    doc = completion_answer(seed=draw(st.integers(0, 3)))
    if chat:
        doc = _chat_form(doc)
    if kind == "mutated":
        lp = doc["choices"][0]["logprobs"]
        fields = ["content"] if chat else ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
        items = lp[draw(st.sampled_from(fields))]
        i = draw(st.integers(0, len(items) - 1))
        if isinstance(items[i], dict) and draw(st.booleans()):  # one value inside a position
            entry = items[i]
            if chat and draw(st.booleans()):
                entry = entry["top_logprobs"][0]
            key = draw(st.sampled_from([*entry, "extra"]))
            entry[key] = draw(_VALUES)
        else:
            items[i] = draw(_VALUES)
    return json.dumps(doc).encode()


def _returned_values(doc: dict) -> list:
    """Every logprob value an answer hands the client, in either API's shape."""
    out = []
    for choice in doc.get("choices") or []:
        lp = choice.get("logprobs") or {}
        out += [v for top in lp.get("top_logprobs") or [] if top for v in top.values()]
        out += [v for v in lp.get("token_logprobs") or [] if v is not None]
        for entry in lp.get("content") or []:
            out += [entry["logprob"], *(a["logprob"] for a in entry.get("top_logprobs") or [])]
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(["/v1/completions", "/v1/chat/completions"]).flatmap(
    lambda path: st.tuples(st.just(path), _bodies(path), _answers(path.endswith("chat/completions")),
                           st.integers(1, 40))), min_size=1, max_size=6))
def test_any_request_and_any_answer_end_in_a_reasoned_status_and_one_settle(exchanges):
    recorder.CALLS.clear()
    rt = make_runtime({"type": "support.defenses:Recorder", "params": {"tag": "f"}},
                      {"type": "request_rules"}, {"type": "keyed_noise"})
    for path, body, answer, cut in exchanges:
        ex = Guard(rt).start("POST", path, AUTH)
        out = ex.request(body)
        if isinstance(out, Reply):
            assert 400 <= out.status < 500, (out.status, out.body, body)
            assert json.loads(out.body)["error"]["message"]
            continue
        assert isinstance(out, Forward)
        stream = ex.req is not None and ex.req.stream
        if stream:
            ex.response_start(200, {"content-type": "text/event-stream"})
            data = completion_stream() if answer.startswith(b"{") else answer
            pieces = [data[i:i + cut] for i in range(0, len(data), cut)] or [b""]
            text = b"".join(ex.response_chunk(p, i == len(pieces) - 1) for i, p in enumerate(pieces))
            assert isinstance(text, bytes)
        else:
            ex.response_start(200, {"content-type": "application/json"})
            result = ex.response_body(answer)
            if isinstance(result, Reply):
                assert result.status == 502 and b"unprotected_response" in result.body
            else:
                # what the client gets is JSON whose every logprob value went through the checks
                for v in _returned_values(json.loads(result)):
                    assert type(v) in (int, float) and v <= 0 and not math.isnan(v), v
        ex.finish(SettleStatus.OK)
        ex.finish(SettleStatus.CLIENT_ABORT)  # a second finish does nothing
    events = [e.split()[0] for t, e in recorder.CALLS if t == "f"]
    assert events.count("admit") == events.count("settle")

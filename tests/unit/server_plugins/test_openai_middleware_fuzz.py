"""The ASGI middleware around an app that answers anything: any status, content type and encoding, its body
in pieces of any size, or an exception before or after it started answering. The client always gets an
answer (a status), the logprob values it gets were checked, and each admitted request is settled once."""

from __future__ import annotations

import asyncio
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import defenses as recorder
from support.asgi import call
from support.openai_answers import AUTH, completion_answer, completion_stream, make_runtime, req

from server_plugins.openai.middleware import DistillGuardMiddleware


@st.composite
def _apps(draw: st.DrawFn):
    stream = draw(st.booleans())
    body = completion_stream() if stream else json.dumps(completion_answer()).encode()
    if not draw(st.integers(0, 3)):
        body = draw(st.binary(max_size=60))
    status = draw(st.sampled_from([200, 200, 200, 400, 429, 500]))
    ctype = b"text/event-stream" if stream else draw(st.sampled_from([b"application/json", b"text/plain"]))
    encoding = draw(st.sampled_from([None, None, b"gzip", b"br"]))
    pieces = draw(st.integers(1, 4))
    fail = draw(st.sampled_from([None, None, None, "before", "after start", "mid body"]))

    async def app(scope, receive, send):
        msg = await receive()
        assert msg["type"] == "http.request"
        if fail == "before":
            raise RuntimeError("the app failed")
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        if encoding:
            headers.append((b"content-encoding", encoding))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if fail == "after start":
            raise RuntimeError("the app failed")
        step = max(1, len(body) // pieces)
        parts = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
        for i, part in enumerate(parts):
            if fail == "mid body" and i == len(parts) // 2:
                raise RuntimeError("the app failed")
            await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})

    return stream, app


def _values(doc):
    out = []
    for choice in doc.get("choices") or [] if isinstance(doc, dict) else []:
        lp = choice.get("logprobs") or {}
        out += [v for top in lp.get("top_logprobs") or [] if top for v in top.values()]
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(_apps(), st.booleans())
def test_any_app_answer_reaches_the_client_checked_and_settled(app, good_request):
    stream, inner = app
    recorder.CALLS.clear()
    rt = make_runtime({"type": "support.defenses:Recorder", "params": {"tag": "m"}}, {"type": "keyed_noise"})
    mw = DistillGuardMiddleware(inner, runtime=rt)
    body = req(stream=stream) if good_request else b"{not json"
    try:
        answer = asyncio.run(call(mw, "POST", "/v1/completions", body, headers=AUTH))
    except RuntimeError as e:  # the app failed after the answer started: the server ends the connection
        assert str(e) == "the app failed"
    else:
        assert answer.status > 0
        if answer.status == 200 and not stream and answer.headers.get("content-type") == "application/json":
            try:
                doc = json.loads(answer.body)
            except ValueError:
                doc = None
            for v in _values(doc):
                assert type(v) in (int, float) and v <= 0 and not math.isnan(v)
    events = [e.split()[0] for t, e in recorder.CALLS if t == "m"]
    assert events.count("admit") == events.count("settle")

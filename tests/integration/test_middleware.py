"""The ASGI middleware in front of the transformers OpenAI server, without Envoy: in-process and over HTTP.

It does what the ext_proc front does (admit, throttle, rewrite, perturb buffered and streamed answers,
settle, also on aborts and upstream errors), inside the server's own process as vLLM's ``--middleware``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
from support.asgi import call as asgi_call
from support.asgi import sse_events
from support.openai_stack import (
    ModelServer,
    auth,
    call,
    engine_config,
    front_config,
    key,
    stream_tops,
    tiny_model,
    tops,
)

from defense.identity import client_id_from_token
from defense.runtime import build_runtime
from server_plugins.openai.middleware import DistillGuardMiddleware
from server_plugins.transformers.server import create_app

pytestmark = pytest.mark.integration
PROMPT = "Bob lives in a small town near the river. He works as a"
MIDDLEWARE = "server_plugins.openai.middleware.DistillGuardMiddleware"


class Local:
    def __init__(self, tmp):
        self.tmp = tmp
        self.config = front_config(tmp, ext_proc=False)
        self.model = tiny_model(tmp / "tiny")
        self.base = create_app(str(self.model), served_model_name="tiny",
                               config=str(engine_config(tmp, tmp / "keys.yaml")))
        self.runtime = build_runtime(self.config)
        self.app = DistillGuardMiddleware(self.base, runtime=self.runtime)

    def run(self, app, method, path, body=None, **kw):
        return asyncio.run(asgi_call(app, method, path, body, **kw))

    def settles(self, status):
        v = self.runtime.deps.metrics.registry.get_sample_value("distillguard_settles_total",
                                                                 {"status": status, "duplicate": "false"})
        return v or 0.0

    def budget(self, token):
        budget = next(e.defense for _, e in self.runtime.chain.admission if hasattr(e.defense, "budget_status"))
        status = budget.budget_status(client_id_from_token(token, self.runtime.keys))
        return {lim.name: lim for lim in status.limits}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    s = Local(tmp_path_factory.mktemp("middleware"))
    yield s
    s.runtime.chain.close()






def completion(**kw):
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 5, **kw}




def test_buffered_answer_is_perturbed_and_stable(local):
    t = key()
    clean = local.run(local.base, "POST", "/v1/completions", completion()).json()
    a = local.run(local.app, "POST", "/v1/completions", completion(), headers=auth(t))
    b = local.run(local.app, "POST", "/v1/completions", completion(), headers=auth(t))
    assert a.status == 200 and int(a.headers["content-length"]) == len(a.body)
    assert a.headers["x-distillguard-profile"] == "signed"
    c, n = np.array([[v for _, v in r[:5]] for r in tops(clean)]), np.array([[v for _, v in r[:5]] for r in tops(a.json())])
    assert not np.allclose(c, n) and (c.argmax(1) == n.argmax(1)).all()
    assert tops(a.json()) == tops(b.json())


def test_stream_matches_buffered_and_settles(local):
    t = key()
    before = local.settles("ok")
    buffered = local.run(local.app, "POST", "/v1/completions", completion(), headers=auth(t)).json()
    streamed = local.run(local.app, "POST", "/v1/completions", completion(stream=True), headers=auth(t))
    assert "content-length" not in streamed.headers
    events = sse_events(streamed.body)
    rows = stream_tops(events[:-1])
    assert rows == tops(buffered) and events[-1] == "[DONE]"
    assert local.settles("ok") == before + 2
    lim = local.budget(t)["tokens_per_day"]
    assert lim.used == 2 * buffered["usage"]["total_tokens"] and lim.reserved == 0


def test_throttle_and_refusals(local):
    t = key()
    codes = []
    while 429 not in codes and len(codes) < 12:  # 6 per minute; a refill on a slow machine may let one more in
        codes.append(local.run(local.app, "POST", "/v1/completions", completion(max_tokens=1), headers=auth(t)).status)
    assert codes[:6] == [200] * 6 and codes[-1] == 429
    r = local.run(local.app, "POST", "/v1/completions", completion(), headers=auth(t))
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1
    assert local.run(local.app, "POST", "/v1/completions", b"{", headers=auth(key())).status == 400
    assert local.run(local.app, "POST", "/v1/completions", completion(logprobs=-1), headers=auth(key())).status == 400
    assert local.run(local.app, "POST", "/v1/responses", {"input": "x"}).status == 404
    assert local.run(local.app, "GET", "/v1/models").status == 200


def test_client_abort_mid_stream_settles(local):
    t = key()
    before = local.settles("client_abort")
    r = local.run(local.app, "POST", "/v1/completions", completion(stream=True, max_tokens=64, temperature=1.0),
                  headers=auth(t), leave_after_chunks=2)
    assert r.status == 200 and len(r.chunks) == 2
    assert local.settles("client_abort") == before + 1
    assert local.budget(t)["tokens_per_day"].reserved == 0


def test_upstream_error_and_a_failing_app(local):
    before = local.settles("upstream_error")
    r = local.run(local.app, "POST", "/v1/completions", completion(model="nope"), headers=auth(key()))
    assert r.status == 404 and local.settles("upstream_error") == before + 1

    async def broken(scope, receive, send):
        await receive()
        raise RuntimeError("engine crashed")

    app = DistillGuardMiddleware(broken, runtime=local.runtime)
    r = local.run(app, "POST", "/v1/completions", completion(), headers=auth(key()))
    assert r.status == 502 and r.json()["error"]["code"] == "upstream_error"
    assert local.settles("upstream_error") == before + 2


def test_middleware_imports_without_vllm_or_starlette():
    code = ("import sys, server_plugins.openai.middleware as m; "
            "assert not {'vllm', 'starlette', 'fastapi', 'torch'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_over_http_as_vllms_middleware_flag(local, tmp_path):
    """The server's --middleware takes the class vLLM's would; the config comes from DISTILLGUARD_CONFIG."""
    server = ModelServer(local.model, tmp_path / "server.log", middleware=(MIDDLEWARE,),
                         env={"DISTILLGUARD_CONFIG": str(local.config)})
    try:
        clean = local.run(local.base, "POST", "/v1/completions", completion()).json()
        r = call("POST", server.url + "/v1/completions", completion(), headers=auth(key()))
        assert r.status == 200 and tops(r.json()) != tops(clean)
        assert [[k for k, _ in row] for row in tops(r.json())] == [[k for k, _ in row] for row in tops(clean)]
        s = call("POST", server.url + "/v1/chat/completions",
                 {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
                  "stream": True, "logprobs": True, "top_logprobs": 3}, headers=auth(key()))
        assert s.status == 200 and sse_events(s.body)[-1] == "[DONE]"
        bad = call("POST", server.url + "/v1/completions", completion(logprobs=-1), headers=auth(key()))
        assert bad.status == 400 and json.loads(bad.body)["error"]["code"] == "top_logprobs_all"
    finally:
        server.stop()

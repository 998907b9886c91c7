"""server_plugins.transformers.server, in process: the OpenAI shapes, streaming, gzip, the signed profile,
and the chain's sampling defenses (the watermark) applied in the decoder."""

from __future__ import annotations

import asyncio
import gzip
import json

import numpy as np
import pytest
from support.asgi import call, sse_events
from support.openai_stack import tiny_model

from defense.profile import Profile, encode_for_engine, sign_profile
from defense.runtime import build_runtime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def engine_cfg(tmp_path_factory):
    from defense.keys import write_new_key_file

    tmp = tmp_path_factory.mktemp("engine")
    write_new_key_file(tmp / "keys.yaml")
    path = tmp / "engine.yaml"
    path.write_text(json.dumps({"version": 1, "state": {"uri": "memory://"}, "keys": {"file": str(tmp / "keys.yaml")},
                                "defenses": [{"type": "watermark", "params": {"delta": 6.0}}]}))
    return path


@pytest.fixture(scope="module")
def app(model, engine_cfg):
    from server_plugins.transformers.server import create_app

    return create_app(str(model), served_model_name="tiny", config=str(engine_cfg), gzip=True)


@pytest.fixture(scope="module")
def plain(model):
    from server_plugins.transformers.server import create_app

    return create_app(str(model), served_model_name="tiny")


def run(app, method, path, body=None, **kw):
    return asyncio.run(call(app, method, path, body, **kw))


def test_completion_shape_logprobs_and_usage(plain):
    r = run(plain, "POST", "/v1/completions", {"model": "tiny", "prompt": "Alice lives in", "max_tokens": 5,
                                               "temperature": 0, "logprobs": 3})
    doc = r.json()
    assert r.status == 200 and doc["object"] == "text_completion"
    (choice,) = doc["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == doc["usage"]["completion_tokens"]
    assert all(3 <= len(d) <= 4 for d in lp["top_logprobs"]) and choice["text"] == "".join(lp["tokens"])
    assert doc["usage"]["total_tokens"] == doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]
    assert r.headers["x-distillguard-profile"] == "default"


def test_n_choices_and_seeds(plain):
    body = {"model": "tiny", "prompt": "Bob", "max_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7}
    a, b = run(plain, "POST", "/v1/completions", body).json(), run(plain, "POST", "/v1/completions", body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]


def test_chat_stream_with_usage(plain):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}
    r = run(plain, "POST", "/v1/chat/completions", body)
    events = sse_events(r.body)
    assert r.headers["content-type"] == "text/event-stream" and events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    assert events[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    steps = [e for e in events[1:-3] if e["choices"][0]["logprobs"]]
    assert all(len(e["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2 for e in steps)


def test_gzip_when_asked(app):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 3}
    r = run(app, "POST", "/v1/completions", body, headers={"accept-encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and json.loads(gzip.decompress(r.body))["choices"]
    s = run(app, "POST", "/v1/completions", {**body, "stream": True}, headers={"accept-encoding": "gzip"})
    assert sse_events(gzip.decompress(s.body))[-1] == "[DONE]"


@pytest.mark.parametrize("body, status", [
    (b"nope", 400), ({"model": "other", "prompt": "x"}, 404), ({"model": "tiny", "prompt": "x " * 400}, 400),
    ({"model": "tiny", "prompt": 3}, 400), ({"model": "tiny", "prompt": "x", "logprobs": 21}, 400),
])
def test_bad_requests(plain, body, status):
    assert run(plain, "POST", "/v1/completions", body).status == status


def test_routes(plain):
    assert run(plain, "GET", "/v1/models").json()["data"][0]["id"] == "tiny"
    assert run(plain, "GET", "/health").status == 200
    assert run(plain, "POST", "/v1/embeddings", {}).status == 404


def _xargs(rt, *, rid="dg-1", now_offset=0.0, strength=2.0):
    signed = sign_profile(Profile(strength=strength), rid, keys=rt.keys, now=rt.deps.clock.now() + now_offset, ttl_s=60)
    return {**encode_for_engine(signed), "dg_rid": rid}


def test_the_signed_profile_is_verified(app, engine_cfg):
    rt = build_runtime(engine_cfg)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}

    def profile(xargs):
        return run(app, "POST", "/v1/completions", {**body, "vllm_xargs": xargs}).headers["x-distillguard-profile"]

    assert profile(_xargs(rt)) == "signed"
    assert profile(_xargs(rt, now_offset=-3600)) == "default"  # expired
    forged = _xargs(rt)
    forged["dg_profile"] = Profile(strength=0.0).payload().hex()
    assert profile(forged) == "default"
    assert profile({**_xargs(rt), "dg_rid": "another"}) == "default"  # bound to another request
    assert profile({"dg_sig": "00"}) == "default"


def test_the_configured_watermark_runs_in_the_decoder(model, engine_cfg):
    from defense.models import load_model
    from server_plugins.transformers.engine import Engine

    rt = build_runtime(engine_cfg)
    m, tok = load_model(model)
    wm = rt.chain.sampling_defenses()[0]

    def generate(chain):
        engine = Engine(m, tok, chain=chain)
        from defense.types import RequestContext

        ctx = RequestContext(request_id="r", client_id="engine", model="tiny")
        steps = list(engine.steps(engine.encode("Alice lives in"), n=1, max_tokens=48, temperature=1.0, top_k=0,
                                  seed=3, ctxs=[ctx]))
        return np.array([s.token_ids[0] for s in steps])

    marked, clean = generate(rt.chain), generate(None)
    detector = wm.detector()
    assert detector.detect_many([marked]).combined.detected
    assert not detector.detect_many([clean]).combined.detected

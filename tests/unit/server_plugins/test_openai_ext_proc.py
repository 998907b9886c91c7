"""The ext_proc servicer driven with Envoy's messages directly: what it answers to each, and when it settles."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import defenses as recorder
from support.ext_proc import protobuf_body_response
from support.openai_answers import AUTH, completion_answer, completion_stream, make_runtime, req

from defense.types import SettleStatus
from server_plugins.envoy._proto import ext_proc_pb2 as pb
from server_plugins.envoy.ext_proc import (
    REQUEST_BODY,
    RESPONSE_BODY,
    ExtProcServicer,
    _serialize,
    body_response,
    headers_of,
    read_request,
    read_request_pb,
)
from server_plugins.openai import Guard

Mode = pb.ProcessingMode


def hmap(**h: str) -> pb.HeaderMap:
    return pb.HeaderMap(headers=[pb.HeaderValue(key=k.replace("_", "-").replace("pseudo-", ":"),
                                                raw_value=v.encode()) for k, v in h.items()])


def request_headers(method="POST", path="/v1/completions", end=False, **extra):
    h = hmap(pseudo_method=method, pseudo_path=path, authorization=AUTH["authorization"], **extra)
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=h, end_of_stream=end))


def request_body(data: bytes):
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=True))


def response_headers(status="200", ctype="application/json"):
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hmap(pseudo_status=status,
                                                                             content_type=ctype)))


def response_body(data: bytes, end=True):
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end))


class Ctx:
    async def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")


def run(rt, messages, reader=read_request):
    servicer = ExtProcServicer(Guard(rt))

    async def go():
        async def stream():
            for m in messages:
                yield reader(m.SerializeToString())  # what grpc hands the handler

        return [as_message(r) async for r in servicer.process(stream(), Ctx())]

    return asyncio.run(go())


def as_message(r):
    """What Envoy reads: the servicer yields messages, or body responses already serialized."""
    return pb.ProcessingResponse.FromString(_serialize(r))


def test_headers_are_read_from_raw_values():
    assert headers_of(hmap(a="1", b="2")) == {"a": "1", "b": "2"}
    m = pb.HeaderMap(headers=[pb.HeaderValue(key="X", value="old"), pb.HeaderValue(key="x", raw_value=b"new")])
    assert headers_of(m) == {"x": "old,new"}


def test_a_passed_path_turns_processing_off():
    (r,) = run(make_runtime(), [request_headers("GET", "/v1/models", end=True)])
    assert r.WhichOneof("response") == "request_headers"
    assert r.mode_override.response_header_mode == Mode.SKIP and r.mode_override.request_body_mode == Mode.NONE


def test_refusals_are_immediate_responses():
    (r,) = run(make_runtime(), [request_headers(path="/v1/responses")])
    assert r.immediate_response.status.code == 404
    assert json.loads(r.immediate_response.body)["error"]["code"] == "unknown_path"
    (r,) = run(make_runtime(), [request_headers(end=True)])
    assert r.immediate_response.status.code == 400
    _, r = run(make_runtime(), [request_headers(), request_body(b"{oops")])
    assert r.immediate_response.status.code == 400
    # a partial body (over Envoy's buffer limit): refused, never admitted on what came so far
    partial = pb.ProcessingRequest(request_body=pb.HttpBody(body=req()[:20], end_of_stream=False))
    rt = make_runtime()
    admitted: list = []
    admit = rt.chain.admit
    rt.chain.admit = lambda ctx: (admitted.append(ctx), admit(ctx))[1]
    _, r = run(rt, [request_headers(), partial])
    assert r.immediate_response.status.code == 413
    assert not admitted  # no Admit ran
    _, r = run(rt, [request_headers(), request_body(req())])
    assert r.WhichOneof("response") == "request_body" and len(admitted) == 1  # a whole one did


@pytest.mark.parametrize("reader", [read_request, read_request_pb], ids=["c", "protobuf"])
def test_a_buffered_exchange(reader):
    answer = json.dumps(completion_answer()).encode()
    rs = run(make_runtime(), [request_headers(), request_body(req()), response_headers(), response_body(answer)],
             reader)
    assert [r.WhichOneof("response") for r in rs] == ["request_headers", "request_body", "response_headers",
                                                      "response_body"]
    body = rs[1].request_body.response
    sent = {h.header.key: h.header.raw_value.decode() for h in body.header_mutation.set_headers}
    assert sent["content-length"] == str(len(body.body_mutation.body))
    assert "dg_sig" in json.loads(body.body_mutation.body)["vllm_xargs"]
    assert not rs[2].response_headers.response.header_mutation.remove_headers  # content-length stays...
    assert not rs[2].HasField("mode_override")  # stays BUFFERED
    resp = rs[3].response_body.response
    set_resp = {h.header.key: h.header.raw_value.decode() for h in resp.header_mutation.set_headers}
    assert set_resp["content-length"] == str(len(resp.body_mutation.body))  # ...and matches the new body
    out = json.loads(resp.body_mutation.body)
    assert out["choices"][0]["logprobs"] != completion_answer()["choices"][0]["logprobs"]


def test_the_keyed_seed_is_primed_once_the_request_body_is_answered():
    """The request's keyed seed is computed as soon as the rewritten body is handed to Envoy (while the
    engine works), not when the answer comes."""
    rt = make_runtime()
    noise = next(e.defense for _, e in rt.chain.response if type(e.defense).__name__ == "KeyedNoise")
    seen: list[int] = []
    start = rt.chain.protect
    rt.chain.protect = lambda b, ctx: (seen.append(len(noise._seeds)), start(b, ctx))[1]
    rs = run(rt, [request_headers(), request_body(req())])
    assert rs[1].WhichOneof("response") == "request_body" and len(noise._seeds) == 1 and seen == []
    answer = json.dumps(completion_answer()).encode()
    run(rt, [request_headers(), request_body(req(prompt="another")), response_headers(), response_body(answer)])
    assert seen == [2]  # protect found the second request's seed already there


def test_an_sse_answer_switches_to_streamed():
    stream = completion_stream()
    half = len(stream) // 2
    rs = run(make_runtime(), [request_headers(), request_body(req(stream=True)),
                              response_headers(ctype="text/event-stream"),
                              response_body(stream[:half], end=False), response_body(stream[half:], end=True)])
    assert rs[2].mode_override.response_body_mode == Mode.STREAMED
    out = b"".join(r.response_body.response.body_mutation.body for r in rs[3:])
    assert out.endswith(b"data: [DONE]\n\n") and out.count(b"top_logprobs") == 8


def _recorder_runtime():
    recorder.CALLS.clear()
    return make_runtime({"type": "support.defenses:Recorder", "params": {"tag": "b"}}, {"type": "keyed_noise"})


def test_a_second_request_body_is_refused_not_admitted_again():
    """Envoy sends one buffered body; were a second to come on the same stream, it must not be admitted (and
    reserved) a second time while only the first is ever settled."""
    rs = run(_recorder_runtime(), [request_headers(), request_body(req()), request_body(req())])
    assert rs[2].immediate_response.status.code == 400 and b"duplicate_body" in rs[2].immediate_response.body
    events = [e.split()[0] for _, e in recorder.CALLS]
    assert events == ["admit", "settle"]


def test_upstream_error_stops_processing_and_settles():
    rs = run(_recorder_runtime(), [request_headers(), request_body(req()), response_headers(status="500")])
    assert rs[2].mode_override.response_body_mode == Mode.NONE
    assert [e for _, e in recorder.CALLS if e.startswith("settle")] == ["settle upstream_error 0"]


def test_a_stream_that_ends_early_settles_as_client_abort():
    stream = completion_stream()
    run(_recorder_runtime(), [request_headers(), request_body(req(stream=True)),
                              response_headers(ctype="text/event-stream"), response_body(stream[:300], end=False)])
    (event,) = [e for _, e in recorder.CALLS if e.startswith("settle")]
    assert event.startswith(f"settle {SettleStatus.CLIENT_ABORT.value}")
    run(_recorder_runtime(), [request_headers(), request_body(req())])  # no answer at all
    assert [e for _, e in recorder.CALLS if e.startswith("settle")] == ["settle upstream_error 0"]



@pytest.mark.parametrize("streamed", [False, True])
def test_a_complete_answer_settles_even_when_the_stream_is_closed_at_its_last_yield(streamed):
    """Once Envoy has the last body it may end the stream, and grpc closes the handler's generator where it
    waits (at that yield): the settle must already be queued, or the reservation stays held until it expires."""
    if streamed:
        messages = [request_headers(), request_body(req(stream=True)), response_headers(ctype="text/event-stream"),
                    response_body(completion_stream(), end=True)]
    else:
        messages = [request_headers(), request_body(req()), response_headers(),
                    response_body(json.dumps(completion_answer()).encode())]
    servicer = ExtProcServicer(Guard(_recorder_runtime()))

    async def go():
        async def feed():
            for m in messages:
                yield read_request(m.SerializeToString())

        gen = servicer.process(feed(), Ctx())
        answers = [as_message(await gen.__anext__()) for _ in messages]
        await gen.aclose()  # what grpc does once the call is over
        await asyncio.sleep(0.05)  # past the deferred queue's timer
        return answers[-1]

    assert asyncio.run(go()).WhichOneof("response") == "response_body"
    assert [e.split()[:2] for _, e in recorder.CALLS if e.startswith("settle")] == [["settle", "ok"]]


@pytest.mark.parametrize("which", [REQUEST_BODY, RESPONSE_BODY])
@pytest.mark.parametrize("data", [b"", b"x", b'{"a": 1}' * 40, bytes(range(256)) * 600])
@pytest.mark.parametrize("headers", [((), ()), ((("content-length", "12"),), ()),
                                     ((("content-type", "application/json"), ("x-caf\u00e9", "d\u00e9j\u00e0 vu"),
                                       ("x-distillguard-request-id", "dg-" + "ab" * 16)), ("content-length",)),
                                     ((), ("content-length", "etag")),
                                     ((("x-long", "v" * 300), ("k" * 130, ""), ("accept-encoding", "")), ())])
def test_body_responses_are_the_bytes_protobuf_writes(which, data, headers):
    set_headers, remove = headers
    want = protobuf_body_response(which, data, set_headers, remove)
    got = body_response(which, data, set_headers=set_headers, remove=remove)
    assert got == want.SerializeToString()
    assert pb.ProcessingResponse.FromString(got) == want


# -- any sequence of messages --------------------------------------------------------------------------------
_PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "", "/v1/completions?x=1"])
_TYPES = st.sampled_from(["application/json", "text/event-stream", "text/plain", ""])


@st.composite
def _messages(draw: st.DrawFn) -> list[pb.ProcessingRequest]:
    """Envoy's usual four (five when streamed) messages, then some removed, repeated, swapped or replaced."""
    stream = draw(st.booleans())
    body = req(stream=stream) if draw(st.integers(0, 3)) else draw(st.binary(max_size=40))
    answer = completion_stream() if stream else json.dumps(completion_answer()).encode()
    if not draw(st.integers(0, 3)):
        answer = draw(st.binary(max_size=60))
    cut = draw(st.integers(1, max(1, len(answer))))
    msgs = [request_headers(method=draw(st.sampled_from(["POST", "GET", "PUT"])), path=draw(_PATHS),
                            end=not draw(st.integers(0, 5))),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=bool(draw(st.integers(0, 5))))),
            pb.ProcessingRequest(response_headers=pb.HttpHeaders(
                headers=hmap(pseudo_status=draw(st.sampled_from(["200", "200", "429", "500", "abc", ""])),
                             content_type="text/event-stream" if stream else draw(_TYPES),
                             content_encoding=draw(st.sampled_from(["", "", "gzip", "br"]))),
                end_of_stream=not draw(st.integers(0, 5)))),
            response_body(answer[:cut], end=cut >= len(answer))]
    if cut < len(answer):
        msgs.append(response_body(answer[cut:], end=True))
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(msgs) - 1))
        how = draw(st.sampled_from(["drop", "repeat", "swap", "trailers"]))
        if how == "drop" and len(msgs) > 1:
            del msgs[i]
        elif how == "repeat":
            msgs.insert(i, msgs[i])
        elif how == "swap" and i + 1 < len(msgs):
            msgs[i], msgs[i + 1] = msgs[i + 1], msgs[i]
        elif how == "trailers":
            msgs.insert(i, pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    return msgs


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_messages(), min_size=1, max_size=4))
def test_any_message_sequence_gets_one_answer_each_and_settles_what_it_admitted(streams):
    """Whatever Envoy sends, in whatever order, the servicer answers every message (Envoy waits for each
    answer), never fails the stream, and every request it admitted is settled once the stream ends."""
    rt = _recorder_runtime()
    servicer = ExtProcServicer(Guard(rt))

    async def go(messages):
        async def stream():
            for m in messages:
                yield read_request(m.SerializeToString())

        return [as_message(r) async for r in servicer.process(stream(), Ctx())]

    for messages in streams:
        recorder.CALLS.clear()
        answers = asyncio.run(go(messages))
        assert len(answers) == len(messages)
        servicer.deferred.drain()
        events = [e.split()[0] for t, e in recorder.CALLS if t == "b"]
        assert events.count("admit") == events.count("settle"), [w.WhichOneof("request") for w in messages]

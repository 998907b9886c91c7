"""The proxy's handlers in-process, against a scripted fake Triton: status mapping, output handling, settles."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import defenses as support_defenses
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from defense.config import parse_config
from defense.keys import KeyRing
from defense.metrics import Metrics
from defense.runtime import build_runtime
from defense.sidecar.servicer import RuntimeHolder
from server_plugins.kserve.proxy import KServeProxy
from server_plugins.kserve.settings import parse_settings

PROBS = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], np.float32)


class FakeTriton(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[pb.ModelInferRequest] = []
        self.fail: grpc.StatusCode | None = None
        self.respond: Callable[[pb.ModelInferRequest], pb.ModelInferResponse] = self.default
        self.drop_output = ""  # an output the model's metadata leaves out

    @staticmethod
    def default(req: pb.ModelInferRequest) -> pb.ModelInferResponse:
        resp = pb.ModelInferResponse(model_name=req.model_name, id=req.id)
        for name, dtype, arr in (("probs", "FP32", PROBS), ("logits", "FP32", np.log(PROBS)),
                                 ("half", "FP16", PROBS.astype(np.float16)), ("extra", "INT32", np.ones(2, np.int32))):
            resp.outputs.add(name=name, datatype=dtype, shape=list(arr.shape))
            resp.raw_output_contents.append(arr.tobytes())
        return resp

    async def ModelMetadata(self, request, context):  # noqa: N802
        meta = pb.ModelMetadataResponse(name=request.name, versions=["1"])
        if request.name == "txt":  # a text model: rows of two BYTES elements
            meta.inputs.add(name="t", datatype="BYTES", shape=[-1, 2])
        else:
            meta.inputs.add(name="x", datatype="FP32", shape=[-1, 2])
        for name, dtype in (("probs", "FP32"), ("logits", "FP32"), ("half", "FP16"), ("extra", "INT32")):
            if name != self.drop_output:
                meta.outputs.add(name=name, datatype=dtype, shape=[-1, -1])
        return meta

    async def ModelInfer(self, request, context):  # noqa: N802
        self.requests.append(request)
        if self.fail is not None:
            await context.abort(self.fail, "scripted failure")
        return self.respond(request)

    async def ModelStreamInfer(self, request_iterator, context):  # noqa: N802
        async for request in request_iterator:
            self.requests.append(request)
            yield pb.ModelStreamInferResponse(infer_response=self.respond(request))


def x_request(rows: int = 2, **kw: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mlp", **kw)
    req.inputs.add(name="x", datatype="FP32", shape=[rows, 2])
    req.raw_input_contents.append(np.arange(rows * 2, dtype=np.float32).tobytes())
    return req


def run(defenses: list[dict], body: Callable[..., Any], *, models: dict | None = None,
        setup: Callable[[KServeProxy], None] | None = None, settings: dict | None = None) -> None:
    async def main() -> None:
        fake = FakeTriton()
        upstream = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(fake, upstream)
        port = upstream.add_insecure_port("127.0.0.1:0")
        await upstream.start()
        loaded = parse_config({"version": 1, "state": {"uri": "memory://"}, "defenses": defenses})
        holder = RuntimeHolder(build_runtime(loaded=loaded, keys=KeyRing.generate(), metrics=Metrics()))
        proxy = KServeProxy(parse_settings({"upstream": f"127.0.0.1:{port}", **(settings or {}), "models": models or {
            "mlp": {"probabilities": ["probs", "half"], "strip": ["logits"], "batched": False}}}), holder)
        if setup is not None:
            setup(proxy)
        server = grpc.aio.server()
        proxy.add_to_server(server)
        pport = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{pport}") as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                stub.channel = ch  # for calls with raw bytes
                await body(stub, fake)
        finally:
            await server.stop(0)
            await proxy.close()
            await upstream.stop(0)
            holder.runtime.chain.close()

    support_defenses.CALLS.clear()
    asyncio.run(main())


RECORDER = {"type": "support.defenses:Recorder", "params": {"tag": "rec"}}
NOISE = {"type": "keyed_noise", "params": {"sigma": 0.5}}
BEARER = (("authorization", "Bearer t0k3n"),)


def test_expected_values_come_from_the_metadata_shapes():
    from server_plugins.kserve.proxy import _expected_values
    from server_plugins.kserve.tensors import ModelMeta

    meta_pb = pb.ModelMetadataResponse(name="mlp")
    meta_pb.outputs.add(name="probs", datatype="FP32", shape=[-1, 10])
    meta_pb.outputs.add(name="open", datatype="FP32", shape=[-1, -1])
    meta_pb.outputs.add(name="label", datatype="INT32", shape=[-1, 1])
    meta = ModelMeta.from_pb(meta_pb)
    batched = parse_settings({"upstream": "x:1", "models": {"mlp": {"probabilities": ["probs", "open"],
                                                                    "passthrough": ["label"]}}}).models["mlp"]
    assert _expected_values(batched, meta, ["probs", "label"], 4) == 40  # only protected outputs count
    assert _expected_values(batched, meta, ["open"], 4) is None  # a size Triton leaves open
    assert _expected_values(batched, meta, [], 2) is None  # nothing asked: every output, "open" included


def test_a_settle_runs_once_the_answer_is_out_or_at_shutdown():
    """The settle of an answered request runs after the call is over, never on its path; one still queued
    at shutdown runs then."""
    async def body(stub, fake):
        await stub.ModelInfer(x_request(), metadata=BEARER)
        await asyncio.sleep(0.05)
        assert [c for _, c in support_defenses.CALLS] == ["admit top_logprobs=0", "settle ok 0"]

    seen = []

    def spy(proxy):
        chain = proxy.holder.runtime.chain
        admit = chain.admit
        chain.admit = lambda ctx: (seen.append(ctx), admit(ctx))[1]

    run([RECORDER], body, setup=spy)
    # the proxy mints each request's id and settles it once itself: a shared store keeps no marker for it
    assert [c.private_id for c in seen] == [True]

    async def queued(stub, fake):
        await stub.ModelInfer(x_request(), metadata=BEARER)
        await asyncio.sleep(0.05)
        assert [c for _, c in support_defenses.CALLS] == ["admit top_logprobs=0"]  # answered, not yet settled

    def slow_timer(proxy):
        proxy.deferred.max_delay_s = 60  # nothing drains before shutdown

    support_defenses.CALLS.clear()
    run([RECORDER], queued, setup=slow_timer)
    assert [c for _, c in support_defenses.CALLS] == ["admit top_logprobs=0", "settle ok 0"]  # at shutdown


def test_declared_outputs_are_perturbed_in_their_own_dtype_and_the_rest_stripped():
    async def body(stub, fake):
        resp = await stub.ModelInfer(x_request(), metadata=BEARER)
        names = [o.name for o in resp.outputs]
        assert names == ["probs", "half"]  # logits (strip) and extra (undeclared) never leave
        assert len(resp.raw_output_contents) == 2
        probs = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 3)
        half = np.frombuffer(resp.raw_output_contents[1], np.float16).reshape(2, 3)
        assert np.abs(probs - PROBS).max() > 1e-3
        np.testing.assert_array_equal(probs.argmax(1), PROBS.argmax(1))
        np.testing.assert_allclose(half.astype(np.float32), probs, atol=2e-3)  # the same noise, fp16 rounding
        assert fake.requests[0].SerializeToString() == x_request().SerializeToString()  # forwarded untouched

    run([RECORDER, NOISE], body)
    assert ("rec", "settle ok 0") in support_defenses.CALLS


def test_refusals_map_to_status_codes_with_retry_info():
    async def throttled(stub, fake):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(x_request(), metadata=BEARER)
        e = ei.value
        assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "rec refuses" in e.details()
        md = dict(e.trailing_metadata())
        assert md["retry-after"] == "2"  # the recorder's 1.5 s, rounded up
        info = error_details_pb2.RetryInfo()
        status_pb2.Status.FromString(md["grpc-status-details-bin"]).details[0].Unpack(info)
        assert info.retry_delay.ToNanoseconds() == 1_500_000_000
        assert not fake.requests  # never reached Triton

    run([{"type": "support.defenses:Recorder", "params": {"tag": "rec", "decision": "throttle"}}], throttled)

    async def denied(stub, fake):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(x_request())
        assert ei.value.code() is grpc.StatusCode.PERMISSION_DENIED

    run([{"type": "support.defenses:Recorder", "params": {"tag": "rec", "decision": "deny"}}], denied)

    async def rules(stub, fake):
        req = x_request()
        req.outputs.add(name="logits")
        req.outputs.add(name="probs")
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(req)
        assert ei.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "logits" in ei.value.details()

    run([{"type": "request_rules", "params": {"raw_logits_outputs": "deny"}}], rules)


def test_withheld_outputs_are_not_asked_of_triton():
    async def body(stub, fake):
        req = x_request()
        req.outputs.add(name="logits")
        req.outputs.add(name="probs")
        resp = await stub.ModelInfer(req)
        assert [o.name for o in fake.requests[0].outputs] == ["probs"]
        assert [o.name for o in resp.outputs] == ["probs"]

    run([RECORDER], body)


def test_upstream_errors_pass_their_code_and_release_the_reservation():
    async def body(stub, fake):
        fake.fail = grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(x_request())
        assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "scripted failure" in ei.value.details()

    run([RECORDER], body)
    assert ("rec", "settle upstream_error 0") in support_defenses.CALLS


def test_a_response_that_does_not_fit_the_config_is_internal_and_settled():
    async def body(stub, fake):
        def not_normalized(req):
            resp = FakeTriton.default(req)
            resp.raw_output_contents[0] = (PROBS * 3).tobytes()  # "probabilities" that sum to 3
            return resp

        fake.respond = not_normalized
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(x_request())
        assert ei.value.code() is grpc.StatusCode.INTERNAL and "sum to 1" in ei.value.details()

    run([RECORDER, NOISE], body)
    assert ("rec", "settle upstream_error 0") in support_defenses.CALLS



def _probs_only(probs: np.ndarray = PROBS, extra: bool = False) -> Callable[[pb.ModelInferRequest], Any]:
    """A Triton answer with the asked probabilities alone (the usual answer), or an extra output beside."""
    def respond(req):
        resp = pb.ModelInferResponse(model_name=req.model_name, id=req.id)
        resp.outputs.add(name="probs", datatype="FP32", shape=list(probs.shape))
        resp.raw_output_contents.append(probs.tobytes())
        if extra:
            resp.outputs.add(name="extra", datatype="INT32", shape=[2])
            resp.raw_output_contents.append(np.ones(2, np.int32).tobytes())
        return resp

    return respond


def _probs_of(raw: bytes) -> np.ndarray:
    resp = pb.ModelInferResponse.FromString(raw)
    assert [o.name for o in resp.outputs] == ["probs"]
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(resp.outputs[0].shape))


def _raw_infer(stub):
    return stub.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")


def test_an_answer_shaped_like_the_last_is_protected_where_it_lies_and_alike():
    """The usual answer (one FP32 probability output) is protected in full once; the next ones with the same
    bytes around the tensor are protected in place, with no decode and re-encode: the same noise for the
    same input, a new answer's noise for a new input, and a changed answer takes the full path again."""
    taken: list[bool] = []

    def spy(proxy):
        alike = proxy._answer_alike
        proxy._answer_alike = lambda out, prep: (lambda r: (taken.append(r is not None), r)[1])(alike(out, prep))

    async def body(stub, fake):
        infer = _raw_infer(stub)
        ask = x_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")])
        fake.respond = _probs_only()
        first = _probs_of(await infer(ask.SerializeToString(), metadata=BEARER))
        second = _probs_of(await infer(ask.SerializeToString(), metadata=BEARER))
        assert taken == [False, True]
        np.testing.assert_array_equal(first, second)  # keyed: the same input, the same noise either way
        assert not np.array_equal(first, PROBS) and (first.argmax(1) == PROBS.argmax(1)).all()
        np.testing.assert_allclose(first.sum(1), 1.0, atol=1e-5)
        other = x_request(outputs=ask.outputs)
        other.raw_input_contents[0] = np.full(4, 7, np.float32).tobytes()
        assert not np.array_equal(_probs_of(await infer(other.SerializeToString(), metadata=BEARER)), first)
        assert taken[-1] is True
        fake.respond = _probs_only(PROBS[:1])  # another shape: the full path, and it is learnt in turn
        one = _probs_of(await infer(ask.SerializeToString(), metadata=BEARER))
        assert one.shape == (1, 3) and taken[-1] is False
        fake.respond = _probs_only(extra=True)  # an output the client did not ask for: dropped in full
        assert _probs_of(await infer(ask.SerializeToString(), metadata=BEARER)).shape == (2, 3)
        assert taken[-1] is False

    run([RECORDER, NOISE], body, setup=spy, models={"mlp": {"probabilities": ["probs"], "batched": False}})
    assert [c for _, c in support_defenses.CALLS].count("settle ok 0") == 5


@pytest.mark.parametrize("ttl", [300.0, 0.0])
def test_a_request_shaped_like_one_checked_before_is_admitted_from_its_bytes_alike(ttl):
    """A request whose bytes before its input tensor match a request checked before skips the decode and
    the checks (the tensor is the message's last field): its own tensor goes upstream and keys its noise,
    as in full; another id or expired metadata takes the full path."""
    asks: list[bool] = []
    state: dict[str, Any] = {}

    def spy(proxy):
        state["proxy"] = proxy
        prepare = proxy.prepare

        async def spied(*a, **kw):
            asks.append(kw.get("ask") is not None)
            return await prepare(*a, **kw)

        proxy.prepare = spied

    def with_data(values, **kw):
        req = x_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")], **kw)
        req.raw_input_contents[0] = np.asarray(values, np.float32).tobytes()
        return req.SerializeToString()

    async def body(stub, fake):
        infer = _raw_infer(stub)
        fake.respond = _probs_only()
        await infer(with_data([0, 1, 2, 3]), metadata=BEARER)
        alike = await infer(with_data([4, 5, 6, 7]), metadata=BEARER)
        assert np.frombuffer(fake.requests[-1].raw_input_contents[0], np.float32).tolist() == [4, 5, 6, 7]
        assert asks == [False, True]
        learnt = next(iter(state["proxy"]._asks.values()))
        assert len(learnt.request.raw_input_contents) == 0  # a learnt request's tensor is never at hand
        state["proxy"]._asks.clear()
        full = await infer(with_data([4, 5, 6, 7]), metadata=BEARER)
        assert asks[-1] is False and alike == full  # the same checks, digest and noise as in full
        await infer(with_data([4, 5, 6, 7], id="mine"), metadata=BEARER)
        assert asks[-1] is False  # another id: other bytes before the tensor
        await infer(with_data([1, 1, 1, 1]), metadata=BEARER)
        assert asks[-1] is True
        proxy = state["proxy"]
        # learnt against the metadata in use (with a TTL of 0, fetched anew for each request and learnt again)
        assert next(iter(proxy._asks.values())).plan.meta is proxy._meta[("mlp", "")][1]

    run([RECORDER, NOISE], body, setup=spy, models={"mlp": {"probabilities": ["probs"], "batched": False}},
        settings={"metadata_ttl_s": ttl})  # 0: each request checked against metadata fetched anew
    assert [c for _, c in support_defenses.CALLS].count("settle ok 0") == 5


def test_an_answer_alike_that_does_not_fit_the_config_is_internal_and_settled():
    async def body(stub, fake):
        infer = _raw_infer(stub)
        ask = x_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")])
        fake.respond = _probs_only()
        await infer(ask.SerializeToString(), metadata=BEARER)  # learnt
        fake.respond = _probs_only(np.where(PROBS > 0.5, np.nan, PROBS).astype(np.float32))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await infer(ask.SerializeToString(), metadata=BEARER)
        assert ei.value.code() is grpc.StatusCode.INTERNAL and "NaN" in ei.value.details()

    run([RECORDER, NOISE], body, models={"mlp": {"probabilities": ["probs"], "batched": False}})
    settles = sorted(c for _, c in support_defenses.CALLS if c.startswith("settle"))
    assert settles == ["settle ok 0", "settle upstream_error 0"]


def test_without_a_response_defense_an_answer_alike_goes_back_as_it_came():
    async def body(stub, fake):
        infer = _raw_infer(stub)
        ask = x_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")])
        fake.respond = _probs_only()
        for _ in range(2):
            raw = await infer(ask.SerializeToString(), metadata=BEARER)
            assert raw == _probs_only()(ask).SerializeToString()

    run([RECORDER], body, models={"mlp": {"probabilities": ["probs"], "batched": False}})


@pytest.mark.parametrize("rows", [1, 3])
def test_an_answer_whose_rows_do_not_match_the_batch_is_internal_and_settled(rows):
    """Each batch row is protected with its own row's context: an answer with another number of rows has
    no context for some row (with more rows than the batch, the extra ones once went back unwritten)."""
    async def body(stub, fake):
        def other_rows(req):
            resp = FakeTriton.default(req)
            probs = np.tile(PROBS[:1], (rows, 1))
            resp.outputs[0].shape[:] = list(probs.shape)
            resp.raw_output_contents[0] = probs.tobytes()
            return resp

        fake.respond = other_rows
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(x_request(rows=2))
        assert ei.value.code() is grpc.StatusCode.INTERNAL
        assert f"output 'probs' of model 'mlp' (ModelInfer) has {rows} rows for a batch of 2" in ei.value.details()

    run([RECORDER, NOISE], body, models={"mlp": {"probabilities": ["probs"], "strip": ["logits"], "batched": True}})
    assert ("rec", "settle upstream_error 0") in support_defenses.CALLS

def test_requests_alike_are_checked_by_their_sizes_and_answered_the_same():
    """The second request of a structure reuses the first one's checks (a plan): it gets the same noise as
    the first, a bad size after it is still refused with the full reason, and so is an output Triton no
    longer has once the metadata is refreshed."""
    async def body(stub, fake):
        first = await stub.ModelInfer(x_request(), metadata=BEARER)
        again = await stub.ModelInfer(x_request(), metadata=BEARER)
        assert first.raw_output_contents[0] == again.raw_output_contents[0]
        short = x_request()
        short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(short, metadata=BEARER)
        assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "carries 12 bytes, but shape [2, 2] of FP32 needs 16" in ei.value.details()
        ask = x_request()
        ask.outputs.add(name="extra")
        ask.outputs.add(name="probs")
        await stub.ModelInfer(ask, metadata=BEARER)
        fake.drop_output = "extra"  # Triton's model changed: its next metadata lacks the output
        await asyncio.sleep(0.06)  # past metadata_ttl_s
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(ask, metadata=BEARER)
        assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "has no output 'extra'" in ei.value.details()

    def short_ttl(proxy):
        proxy.settings = dataclasses.replace(proxy.settings, metadata_ttl_s=0.05)

    run([RECORDER, NOISE], body, setup=short_ttl,
        models={"mlp": {"probabilities": ["probs"], "passthrough": ["extra"], "batched": False}})
    assert [c for _, c in support_defenses.CALLS].count("settle ok 0") == 3  # the refused ones never admitted


def test_a_non_float_probability_output_is_a_config_error():
    async def body(stub, fake):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(x_request())
        assert ei.value.code() is grpc.StatusCode.INTERNAL and "Triton says it is INT32" in ei.value.details()

    run([RECORDER], body, models={"mlp": {"probabilities": ["extra"]}})
    assert not support_defenses.CALLS  # refused before admission


def test_malformed_bytes_and_shared_memory_parameters_are_invalid_argument():
    async def body(stub, fake):
        req = x_request()
        req.inputs[0].parameters["shared_memory_region"].string_param = "region0"
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(req)
        assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "shared_memory_region" in ei.value.details()
        req = x_request()
        req.outputs.add(name="probs").parameters["classification"].int64_param = 3
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(req)
        assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "'classification'" in ei.value.details()
        # the words in the data alone (a tensor's bytes) are no parameter: the request is served
        req = x_request()
        req.id = "classification shared_memory_region"
        await stub.ModelInfer(req)

    async def garbage(stub, fake):
        call = stub.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call(b"\xff\xff\xff")
        assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "not a valid ModelInferRequest" in ei.value.details()

    run([RECORDER], body)
    run([RECORDER], garbage)
    assert not support_defenses.CALLS


def test_targeted_misinformation_reads_each_rows_input_behind_the_proxy(tmp_path):
    from defense.perturbation.ood import InputDensity

    det = InputDensity.fit(np.random.default_rng(0).normal(size=(2000, 2)) * 0.1, quantile=0.999).save(
        tmp_path / "density.npz")
    am = {"type": "targeted", "params": {"epsilon": 0.1, "gate": {"detector": str(det), "misinform": True,
                                                                  "nu": 50.0}}}

    async def body(stub, fake):
        req = pb.ModelInferRequest(model_name="mlp")
        req.inputs.add(name="x", datatype="FP32", shape=[2, 2])
        req.raw_input_contents.append(np.array([[0.0, 0.05], [30.0, -30.0]], np.float32).tobytes())  # in, out
        resp = await stub.ModelInfer(req, metadata=BEARER)
        probs = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 3)
        assert probs[0].argmax() == PROBS[0].argmax()  # in distribution: the true answer, argmax kept
        assert probs[1].argmax() == PROBS[1].argmin()  # flagged by the detector: misinformation
        np.testing.assert_allclose(np.sort(probs[1]), np.sort(PROBS[1]), atol=1e-5)

    run([am], body, models={"mlp": {"probabilities": ["probs"], "strip": ["logits"], "batched": True}})


class ThreadedTriton(pb_grpc.GRPCInferenceServiceServicer):
    """A fake Triton on its own threads (a sync gRPC server), so it answers while the proxy's loop is busy."""

    def __init__(self) -> None:
        self.requests: list[pb.ModelInferRequest] = []
        self.delay_s = 0.0

    def ModelMetadata(self, request, context):  # noqa: N802
        meta = pb.ModelMetadataResponse(name=request.name, versions=["1"])
        meta.inputs.add(name="x", datatype="FP32", shape=[-1, 2])
        meta.outputs.add(name="probs", datatype="FP32", shape=[-1, 3])
        meta.outputs.add(name="logits", datatype="FP32", shape=[-1, 3])
        return meta

    def ModelInfer(self, request, context):  # noqa: N802
        self.requests.append(request)
        time.sleep(self.delay_s)
        resp = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        resp.outputs.add(name="probs", datatype="FP32", shape=[2, 3])
        resp.raw_output_contents.append(PROBS.tobytes())
        return resp


def early_forwarding(steps: Callable[..., Any], **settings: Any) -> tuple[ThreadedTriton, Metrics]:
    """Run ``steps(call, fake)`` against a proxy whose only defense is support.defenses:Switch, in front of a
    threaded fake Triton; returns the fake and the proxy's metrics."""
    from concurrent.futures import ThreadPoolExecutor

    fake = ThreadedTriton()
    upstream = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(fake, upstream)
    port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()
    metrics = Metrics()

    async def main() -> None:
        loaded = parse_config({"version": 1, "state": {"uri": "memory://"},
                               "defenses": [{"type": "support.defenses:Switch"}]})
        holder = RuntimeHolder(build_runtime(loaded=loaded, keys=KeyRing.generate(), metrics=metrics))
        proxy = KServeProxy(parse_settings({"upstream": f"127.0.0.1:{port}", "models": {
            "mlp": {"probabilities": ["probs"], "strip": ["logits"], "batched": False}},
            "early_forward": True, **settings}), holder)
        server = grpc.aio.server()
        proxy.add_to_server(server)
        pport = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{pport}") as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)

                async def call(req: pb.ModelInferRequest | None = None, token: str = "t0k3n") -> pb.ModelInferResponse:
                    return await stub.ModelInfer(req or x_request(), metadata=(("authorization", f"Bearer {token}"),))

                await steps(call, fake)
        finally:
            await server.stop(0)
            await proxy.close()
            holder.runtime.chain.close()

    support_defenses.SWITCH.update(decision="allow", block_s=0.0, on_admit=None)
    try:
        asyncio.run(main())
    finally:
        support_defenses.SWITCH.update(decision="allow", block_s=0.0, on_admit=None)
        upstream.stop(0)
    return fake, metrics


def _early(metrics: Metrics, result: str) -> float:
    return metrics.upstream_early.labels("kserve", result).value


def test_an_admitted_clients_next_request_reaches_triton_while_it_is_admitted():
    """Early forwarding overlaps admission with Triton's work, for a client whose last request was admitted;
    a refused one's answer never leaves the proxy, and the client's next request waits for admission."""
    seen: list[int] = []

    async def steps(call, fake):
        support_defenses.SWITCH.update(block_s=0.3, on_admit=lambda: seen.append(len(fake.requests)))
        await call()  # a client the proxy has not seen admitted: admitted first, then sent
        assert seen == [0] and len(fake.requests) == 1
        resp = await call()  # admitted last time: sent at once, received by Triton during the 0.3 s admit
        assert seen == [0, 2] and resp.outputs[0].name == "probs"
        await call(token="someone-else")  # another client's history is its own
        assert seen[-1] == 2 and len(fake.requests) == 3
        support_defenses.SWITCH["decision"] = "throttle"
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call()  # forwarded early, refused: the call upstream is cancelled, nothing is answered
        assert ei.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "switch refuses" in ei.value.details()
        assert seen[-1] == 4
        support_defenses.SWITCH["decision"] = "allow"
        await call()  # refused last time: admitted before it is sent again
        assert seen[-1] == 4 and len(fake.requests) == 5
        await call()
        assert seen[-1] == 6

    fake, metrics = early_forwarding(steps)
    assert (_early(metrics, "used"), _early(metrics, "cancelled")) == (2, 1)
    assert parse_settings({"models": {"mlp": {"probabilities": ["probs"]}}}).early_forward is True  # the default


def test_early_forwarding_skips_what_admission_must_see_first_and_can_be_turned_off():
    async def risky(call, fake):
        seen: list[int] = []
        support_defenses.SWITCH.update(block_s=0.2, on_admit=lambda: seen.append(len(fake.requests)))
        await call()
        seq = x_request()
        seq.parameters["sequence_id"].int64_param = 7  # a stateful model's sequence: never advanced early
        await call(seq)
        withheld = x_request()
        withheld.outputs.add(name="logits")  # not returned: Triton gets a rewritten request, after admission
        withheld.outputs.add(name="probs")
        await call(withheld)
        assert seen == [0, 1, 2]
        support_defenses.SWITCH["decision"] = "deny"
        with pytest.raises(grpc.aio.AioRpcError):
            await call(seq)
        assert len(fake.requests) == 3  # the refused one never reached Triton

    _, metrics = early_forwarding(risky)
    assert (_early(metrics, "used"), _early(metrics, "cancelled")) == (0, 0)

    async def off(call, fake):
        seen: list[int] = []
        support_defenses.SWITCH.update(block_s=0.1, on_admit=lambda: seen.append(len(fake.requests)))
        for _ in range(3):
            await call()
        assert seen == [0, 1, 2]

    _, metrics = early_forwarding(off, early_forward=False)
    assert _early(metrics, "used") == 0


def test_early_calls_in_flight_are_capped_per_client():
    async def steps(call, fake):
        await call()  # admitted: the client may go early from now on
        fake.delay_s = 0.3  # Triton is slow: the four calls are all in flight at once
        await asyncio.gather(*(call() for _ in range(4)))
        assert len(fake.requests) == 5

    _, metrics = early_forwarding(steps, early_forward_max_in_flight=2)
    assert _early(metrics, "used") == 2  # the other two were admitted first


@pytest.mark.parametrize("batched", [False, True])
def test_the_keyed_seeds_are_primed_before_the_answer_comes(batched):
    """Admission primes the response defenses (each batch row's own digest), so the answer's protect finds
    its keyed seeds computed; the noise is the same as without priming."""
    events: list[tuple[str, bytes]] = []
    noise: list[Any] = []

    def spy(proxy):
        chain = proxy.holder.runtime.chain
        noise.append(chain.response[0][1].defense)
        prime, protect, dense = chain.prime, chain.protect, chain.protect_dense
        chain.prime = lambda ctx: (events.append(("prime", ctx.context_digest)), prime(ctx))[1]
        chain.protect = lambda b, ctx: (events.append(("protect", ctx.context_digest)), protect(b, ctx))[1]
        # probability vectors take the values-only Protect
        chain.protect_dense = lambda v, ctx: (events.append(("protect", ctx.context_digest)), dense(v, ctx))[1]

    async def body(stub, fake):
        await stub.ModelInfer(x_request(), metadata=BEARER)

    run([NOISE], body, setup=spy, models={"mlp": {"probabilities": ["probs"], "strip": ["logits"],
                                                  "batched": batched}})
    rows = 2 if batched else 1
    primed = [d for what, d in events[:rows] if what == "prime"]
    assert len(set(primed)) == rows and len(events) == 2 * rows  # every prime comes before the first protect
    assert sorted(d for what, d in events[rows:] if what == "protect") == sorted(primed)
    assert {d for _, d in noise[0]._seeds} == set(primed)


# -- any request at all -------------------------------------------------------------------------------------
_NAMES = st.sampled_from(["x", "y", "", "probs"])
_DTYPES = st.sampled_from(["FP32", "FP16", "FP64", "INT64", "INT8", "BOOL", "BYTES", "fp32", "BF16", "XYZ", ""])
_SHAPES = st.lists(st.integers(-2, 5), max_size=3)
_OUTPUTS = st.sampled_from(["probs", "logits", "half", "extra", "nope", ""])


@st.composite
def _odd_requests(draw: st.DrawFn) -> bytes:
    """A request the proxy may well refuse: x_request with its fields changed, extra or missing tensors,
    typed contents, parameters, and sometimes its bytes damaged."""
    req = x_request(rows=draw(st.integers(1, 3)), id=draw(st.text(max_size=4)))
    if draw(st.booleans()):
        req.model_name = draw(st.sampled_from(["mlp", "nope", ""]))
    for _ in range(draw(st.integers(0, 2))):
        req.inputs.add(name=draw(_NAMES), datatype=draw(_DTYPES), shape=draw(_SHAPES))
        req.raw_input_contents.append(draw(st.binary(max_size=40)))
    if draw(st.booleans()):
        t = req.inputs[draw(st.integers(0, len(req.inputs) - 1))]
        t.datatype = draw(_DTYPES)
        t.shape[:] = draw(_SHAPES)
    shape = draw(st.sampled_from(["as is", "fewer contents", "typed", "both"]))
    if shape == "fewer contents":
        del req.raw_input_contents[-1]
    elif shape in ("typed", "both"):
        if shape == "typed":
            del req.raw_input_contents[:]
        req.inputs[0].contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
    for _ in range(draw(st.integers(0, 3))):
        o = req.outputs.add(name=draw(_OUTPUTS))
        if draw(st.booleans()):
            p = draw(st.sampled_from(["classification", "binary_data", "shared_memory_region", "other"]))
            o.parameters[p].int64_param = draw(st.integers(-1, 5))
    if draw(st.booleans()):
        req.parameters[draw(st.sampled_from(["sequence_id", "priority", "timeout", "z"]))].int64_param = \
            draw(st.integers(-5, 5))
    if draw(st.integers(0, 3)) == 0:  # the text model: BYTES rows, framed well or not
        req = pb.ModelInferRequest(model_name="txt", id=req.id)
        rows = draw(st.integers(1, 3))
        n = 2 * rows if draw(st.integers(0, 2)) else draw(st.integers(0, 2 * rows + 1))
        elements = draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n))
        data = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
        if not draw(st.integers(0, 3)):
            data = data[:draw(st.integers(0, len(data)))]
        req.inputs.add(name="t", datatype=draw(st.sampled_from(["BYTES", "BYTES", "FP32"])), shape=[rows, 2])
        if draw(st.booleans()):
            req.raw_input_contents.append(data)
        else:
            req.inputs[0].contents.bytes_contents.extend(elements)
        req.outputs.add(name=draw(_OUTPUTS))
    raw = bytearray(req.SerializeToString())
    damage = draw(st.sampled_from(["none", "none", "flip", "cut"]))
    if damage == "flip" and raw:
        for i in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=3)):
            raw[i] ^= draw(st.integers(1, 255))
    elif damage == "cut":
        del raw[draw(st.integers(0, len(raw))):]
    return bytes(raw)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_odd_requests(), min_size=12, max_size=24), st.booleans())
def test_any_request_gets_a_reasoned_status_and_every_admitted_one_settles_once(raws, batched):
    """Whatever bytes come, the proxy answers, or refuses with a status that says why (never an internal
    error from a failed assumption of its own), and every request it admitted is settled exactly once."""
    async def body(stub, fake):
        call = stub.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for raw in raws:
            try:
                await call(raw, metadata=BEARER, timeout=10)
            except grpc.aio.AioRpcError as e:
                details = e.details() or ""
                # the client's fault (a stripped output asked for: PERMISSION_DENIED), or Triton's answer
                assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL), (e.code(), details, raw)
                assert details and not details.startswith("internal error"), (e.code(), details, raw)
                if e.code() is grpc.StatusCode.INTERNAL:  # only Triton's answer not fitting the config
                    assert details.startswith("cannot protect the response"), (details, raw)

    run([RECORDER, NOISE], body,
        models={"mlp": {"probabilities": ["probs", "half"], "strip": ["logits"], "batched": batched},
                "txt": {"probabilities": ["probs"], "strip": ["logits"], "batched": batched}})
    events = [c.split()[0] for tag, c in support_defenses.CALLS if tag == "rec"]
    assert events.count("admit") == events.count("settle")



@st.composite
def _usual_requests(draw: st.DrawFn) -> bytes:
    """The request a client sends over and over: one FP32 input, the probabilities asked, ids from few."""
    rows = draw(st.integers(1, 3))
    req = x_request(rows=rows, id=draw(st.sampled_from(["", "", "a"])),
                    outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")])
    req.raw_input_contents[0] = np.asarray(draw(st.lists(st.floats(-4, 4, width=32), min_size=2 * rows,
                                                         max_size=2 * rows)), np.float32).tobytes()
    return req.SerializeToString()


def _asked_only(req: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """FakeTriton's answer with only the outputs the request names (all of them when it names none)."""
    full = FakeTriton.default(req)
    names = {o.name for o in req.outputs}
    resp = pb.ModelInferResponse(model_name=full.model_name, id=full.id)
    for out, data in zip(full.outputs, full.raw_output_contents, strict=True):
        if not names or out.name in names:
            resp.outputs.add().CopyFrom(out)
            resp.raw_output_contents.append(data)
    return resp


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(_odd_requests(), _usual_requests()), min_size=8, max_size=16), st.booleans())
def test_requests_and_answers_alike_get_what_the_full_path_gives(raws, batched):
    """Whatever came before, a request (and its answer) taken by its bytes alike gets the outcome the full
    decode and checks give it: the same answer bytes, or the same refusal."""
    proxies: list[KServeProxy] = []

    async def outcome(call, raw):
        try:
            return "ok", await call(raw, metadata=BEARER, timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()

    async def body(stub, fake):
        fake.respond = _asked_only
        call = stub.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for raw in raws:
            got = [await outcome(call, raw), await outcome(call, raw)]  # the second finds the first learnt
            proxies[0]._asks.clear()
            proxies[0]._answers.clear()
            full = await outcome(call, raw)
            assert got == [full, full], raw

    run([NOISE], body, setup=proxies.append,
        models={"mlp": {"probabilities": ["probs", "half"], "strip": ["logits"], "batched": batched},
                "txt": {"probabilities": ["probs"], "strip": ["logits"], "batched": batched}})


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_odd_requests(), min_size=12, max_size=24), st.booleans())
def test_a_stream_of_any_requests_answers_each_and_settles_every_admitted_one(raws, batched):
    """On ModelStreamInfer a request the proxy refuses gets a response with error_message and the stream goes
    on: one response per request, the stream ends as the client ends it, and every admitted request settles."""
    got: list[pb.ModelStreamInferResponse] = []

    async def body(stub, fake):
        call = stub.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        stream = call(metadata=BEARER, timeout=20)
        for raw in raws:
            await stream.write(raw)
        await stream.done_writing()
        async for out in stream:
            got.append(pb.ModelStreamInferResponse.FromString(out))
        assert await stream.code() is grpc.StatusCode.OK

    run([RECORDER, NOISE], body,
        models={"mlp": {"probabilities": ["probs", "half"], "strip": ["logits"], "batched": batched},
                "txt": {"probabilities": ["probs"], "strip": ["logits"], "batched": batched}})
    assert len(got) == len(raws)
    for r in got:
        assert "internal error" not in r.error_message, r.error_message
        if not r.error_message:
            assert "logits" not in [o.name for o in r.infer_response.outputs]
    events = [c.split()[0] for tag, c in support_defenses.CALLS if tag == "rec"]
    assert events.count("admit") == events.count("settle")


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_word_scans_match_their_word_lists(head, tail):
    from server_plugins.kserve import proxy

    for words, scan in ((proxy._BYPASS_WORDS, proxy._names_bypass), (proxy._EARLY_BLOCKERS, proxy._blocks_early)):
        for w in words:
            assert scan(head + w + tail)
        assert scan(head + tail) == any(w in head + tail for w in words)


def test_identity_is_remembered_by_the_callers_metadata_until_a_reload():
    """The same metadata gives the same (client, tenant) without a new keyed hash; other tokens or tenants
    give theirs; a reloaded runtime (other keys) identifies anew."""
    def mk_runtime():
        loaded = parse_config({"version": 1, "state": {"uri": "memory://"}, "defenses": []})
        return build_runtime(loaded=loaded, keys=KeyRing.generate(), metrics=Metrics())

    holder = RuntimeHolder(mk_runtime())
    proxy = KServeProxy(parse_settings({"upstream": "127.0.0.1:1", "models": {"mlp": {"probabilities": ["p"]}}}),
                        holder)
    a = (("authorization", "Bearer token-a"), ("user-agent", "grpc-python"))
    b = (("authorization", "Bearer token-b"), ("user-agent", "grpc-python"))
    t = (("authorization", "Bearer token-a"), ("x-distillguard-tenant", "acme"))
    first = proxy._who(a)
    assert first[0].startswith("c_") and proxy._who(tuple(a)) == first
    assert proxy._who(b)[0] not in (first[0], "anonymous") and proxy._who(list(a)) == first
    assert proxy._who(t) == (first[0], "acme") and proxy._who(()) == ("anonymous", "default")
    holder.runtime.chain.close()
    holder.runtime = mk_runtime()
    again = proxy._who(a)
    assert again[0].startswith("c_") and again != first  # another key file: another id for the same token
    holder.runtime.chain.close()

"""The sidecar's RPCs on arbitrary messages: every field of each request drawn from its type (NaN and
infinite floats, unknown enum numbers, empty and odd strings), plus Protect requests whose arrays have the
declared shape. Each call answers, or aborts with INVALID_ARGUMENT or a defense's INTERNAL that says why;
never with "internal error", which is what a failed assumption of the servicer's own becomes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defense.config import parse_config
from defense.keys import KeyRing
from defense.metrics import Metrics
from defense.runtime import build_runtime
from defense.sidecar._proto.distillguard.v1 import defense_pb2 as pb
from defense.sidecar.servicer import DefenseServicer, RuntimeHolder

_FLOATS = st.one_of(st.floats(-20, 20), st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e300]))
_SCALAR = {
    F.TYPE_DOUBLE: _FLOATS, F.TYPE_FLOAT: _FLOATS.map(lambda x: x if abs(x) < 3e38 or x != x else float("inf")),
    F.TYPE_INT64: st.integers(-(2**63), 2**63 - 1) | st.integers(-3, 50), F.TYPE_SINT64: st.integers(-3, 50),
    F.TYPE_INT32: st.integers(-(2**31), 2**31 - 1) | st.integers(-3, 50), F.TYPE_SINT32: st.integers(-3, 50),
    F.TYPE_UINT64: st.integers(0, 2**64 - 1) | st.integers(0, 50), F.TYPE_UINT32: st.integers(0, 2**32 - 1),
    F.TYPE_FIXED64: st.integers(0, 50), F.TYPE_FIXED32: st.integers(0, 50), F.TYPE_SFIXED64: st.integers(-3, 50),
    F.TYPE_SFIXED32: st.integers(-3, 50), F.TYPE_BOOL: st.booleans(),
    F.TYPE_STRING: st.sampled_from(["", "tiny", "default", " ", "x" * 300]) | st.text(max_size=8),
    F.TYPE_BYTES: st.binary(max_size=40),
}


def _repeated(field: Any) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED


def _value(field: Any, depth: int) -> st.SearchStrategy:
    if field.type == F.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1)
    if field.type == F.TYPE_ENUM:  # a known value, or a number the enum does not name (open enums keep it)
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-2, 40)
    return _SCALAR[field.type]


@st.composite
def _fill(draw: st.DrawFn, descriptor: Any, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in descriptor.fields:
        if depth > 3 or not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            k, v = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            out[field.name] = draw(st.dictionaries(_value(k, depth), _value(v, depth), max_size=3))
        elif _repeated(field):
            out[field.name] = draw(st.lists(_value(field, depth), max_size=4))
        else:
            out[field.name] = draw(_value(field, depth))
    return out


def _message(descriptor: Any, depth: int = 0) -> st.SearchStrategy:
    return _fill(descriptor, depth).map(lambda kw: _build(descriptor, kw))


def _build(descriptor: Any, kw: dict[str, Any]) -> Any:
    msg = pb.DESCRIPTOR.message_types_by_name.get(descriptor.name)
    cls = type(pb.__dict__[descriptor.name]()) if msg is descriptor else None
    if cls is None:  # a message of another file (google.protobuf's): built through its own class
        from google.protobuf import message_factory

        cls = message_factory.GetMessageClass(descriptor)
    out = cls()
    for name, value in kw.items():
        field = descriptor.fields_by_name[name]
        target = getattr(out, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if field.message_type.fields_by_name["value"].message_type is not None:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif _repeated(field):
            if field.type == F.TYPE_MESSAGE:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif field.type == F.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(out, name, value)
    return out


@st.composite
def _shaped_protect(draw: st.DrawFn) -> Any:
    """A Protect request whose arrays have the shape it declares (so it reaches the defenses)."""
    req = draw(_message(pb.ProtectRequest.DESCRIPTOR))
    if draw(st.integers(0, 3)):  # mostly the fields a front sends, so that the values reach the defenses
        req.kind = draw(st.sampled_from([v.number for v in pb.ProtectRequest.DESCRIPTOR.fields_by_name["kind"].enum_type.values]))
        req.logprobs_mode = draw(st.sampled_from(
            [v.number for v in pb.ProtectRequest.DESCRIPTOR.fields_by_name["logprobs_mode"].enum_type.values]))
        req.ClearField("temperature")
        req.position_offset = draw(st.integers(0, 100))
    p, k = draw(st.integers(0, 4)), draw(st.integers(1, 4) | st.just(0))
    req.positions, req.k = p, k
    del req.values[:], req.token_ids[:], req.sampled_values[:], req.sampled_token_ids[:]
    values = st.floats(-30, 0, width=32) if draw(st.integers(0, 2)) else st.floats(-30, 0, width=32) | _FLOATS
    req.values.extend(draw(st.lists(values, min_size=p * k, max_size=p * k)))
    req.token_ids.extend(draw(st.lists(st.integers(-1, 60), min_size=p * k, max_size=p * k)))
    if draw(st.booleans()):
        req.sampled_values.extend(draw(st.lists(st.floats(-30, 0, width=32), min_size=p, max_size=p)))
        req.sampled_token_ids.extend(draw(st.lists(st.integers(-1, 60), min_size=p, max_size=p)))
    if draw(st.integers(0, 3)):
        req.context_digest = draw(st.binary(min_size=32, max_size=32))
    return req


@st.composite
def _identified(draw: st.DrawFn, cls: Any) -> Any:
    """An Admit or Settle request with the ids a front always sends, the rest drawn."""
    req = draw(_message(cls.DESCRIPTOR))
    req.request_id = req.request_id or draw(st.sampled_from(["r1", "r2", "r3"]))
    req.identity.client_id = req.identity.client_id or "c_1"
    return req


@st.composite
def _detect(draw: st.DrawFn) -> Any:
    req = draw(_message(pb.DetectRequest.DESCRIPTOR))
    req.scheme = draw(st.sampled_from(["", req.scheme]))
    for _ in range(draw(st.integers(1, 3))):
        req.sequences.add().token_ids.extend(draw(st.lists(st.integers(-5, 2000), min_size=0, max_size=60)))
    return req


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code, self.message = code, message


class _Context:
    def invocation_metadata(self) -> tuple:
        return ()

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise _Aborted(code, message)


_CALLS = st.one_of(
    st.tuples(st.just("Admit"), _message(pb.AdmitRequest.DESCRIPTOR) | _identified(pb.AdmitRequest)),
    st.tuples(st.just("Protect"), _message(pb.ProtectRequest.DESCRIPTOR) | _shaped_protect()),
    st.tuples(st.just("Settle"), _message(pb.SettleRequest.DESCRIPTOR) | _identified(pb.SettleRequest)),
    st.tuples(st.just("Detect"), _message(pb.DetectRequest.DESCRIPTOR) | _detect()),
    st.tuples(st.just("GetBudget"), _message(pb.GetBudgetRequest.DESCRIPTOR)),
)


@pytest.fixture(scope="module")
def servicer():
    doc = {"state": {"uri": "memory://"}, "defenses": [
        {"type": "request_rules"},
        {"type": "budget", "params": {"limits": {"rpm": {"amount": 1000, "period_s": 60, "unit": "requests"}}}},
        {"type": "keyed_noise"}, {"type": "watermark"}]}
    rt = build_runtime(loaded=parse_config(doc), keys=KeyRing.generate(), metrics=Metrics())
    yield DefenseServicer(RuntimeHolder(rt))
    rt.chain.close()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_CALLS, min_size=1, max_size=5))
def test_any_request_is_answered_or_refused_with_a_reason(servicer, calls):
    async def go() -> None:
        for method, request in calls:
            try:
                await getattr(servicer, method)(request, _Context())
            except _Aborted as e:
                assert e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.INTERNAL), (method, e.code, e.message)
                assert e.message and not e.message.startswith("internal error"), (method, e.message, request)

    asyncio.run(go())

"""KServe v2 tensors: input checks with clear messages, canonical bytes, output decode and re-encode."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from defense.errors import InvalidInput
from server_plugins.kserve import tensors
from server_plugins.kserve.tensors import ModelMeta, TensorSpec

META = ModelMeta({"x": TensorSpec("FP32", (-1, 4)), "s": TensorSpec("BYTES", (-1, 1))},
                 {"probs": TensorSpec("FP32", (-1, 3))})


def request(x: np.ndarray, *, raw: bool = True, strings: list[bytes] | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mlp")
    t = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    if strings is not None:
        s = req.inputs.add(name="s", datatype="BYTES", shape=[len(strings), 1])
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
        if strings is not None:
            req.raw_input_contents.append(b"".join(struct.pack("<I", len(v)) + v for v in strings))
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
        if strings is not None:
            s.contents.bytes_contents.extend(strings)
    return req


def check(req, **kw):
    kw.setdefault("max_input_bytes", 1 << 20)
    kw.setdefault("batched", True)
    return tensors.check_inputs(req, tensors.input_data(req), META, **kw)


def test_raw_and_typed_contents_are_the_same_canonical_bytes():
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
    strings = [b"alpha", b""]
    a, b = request(x, strings=strings), request(x, raw=False, strings=strings)
    assert tensors.input_data(a) == tensors.input_data(b)
    assert tensors.canonical_request(a, tensors.input_data(a)) == tensors.canonical_request(b, tensors.input_data(b))
    assert check(a) == 2


def test_a_row_frames_like_the_same_input_sent_alone():
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    strings = [b"a", b"bb", b"ccc"]
    req = request(x, strings=strings)
    rows = tensors.canonical_rows(req, tensors.input_data(req), 3)
    for i in range(3):
        alone = request(x[i:i + 1], strings=[strings[i]])
        assert rows[i] == tensors.canonical_request(alone, tensors.input_data(alone))
    assert len(set(rows)) == 3


def test_inputs_are_framed_so_names_and_shapes_matter():
    x = np.zeros((1, 4), np.float32)
    a = request(x)
    b = request(x.reshape(1, 4))
    b.inputs[0].shape[:] = [2, 2]
    assert tensors.canonical_request(a, tensors.input_data(a)) != tensors.canonical_request(b, tensors.input_data(b))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "must be FP32, got FP64"),
    (lambda r: r.inputs[0].shape.__setitem__(1, 5), "must have shape [-1, 4] (-1: any size), got [2, 5]"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 3), "carries 32 bytes, but shape [3, 4] of FP32 needs 48"),
    (lambda r: setattr(r.inputs[0], "name", "y"), "has no input 'y'; inputs: x, s"),
    (lambda r: r.raw_input_contents.append(b"x"), "either every input travels in raw_input_contents or none"),
    (lambda r: r.inputs[0].shape.__setitem__(0, -2), "dimensions must be >= 0"),
])
def test_malformed_inputs_are_refused_with_the_reason(mutate, message):
    req = request(np.zeros((2, 4), np.float32))
    mutate(req)
    with pytest.raises(InvalidInput) as ei:
        check(req)
    assert message in str(ei.value)


def test_size_batch_and_bytes_checks():
    req = request(np.zeros((2, 4), np.float32))
    with pytest.raises(InvalidInput, match="hold 32 bytes, more than the proxy's max_input_bytes 16"):
        check(req, max_input_bytes=16)
    both = request(np.zeros((2, 4), np.float32), strings=[b"a", b"b", b"c"])
    both.inputs[1].shape[:] = [3, 1]
    with pytest.raises(InvalidInput, match="disagree on the batch size: 2 and 3"):
        check(both)
    broken = request(np.zeros((1, 4), np.float32), strings=[b"abc"])
    broken.raw_input_contents[1] = struct.pack("<I", 10) + b"abc"
    with pytest.raises(InvalidInput, match="runs past the end"):
        check(broken)
    empty = pb.ModelInferRequest(model_name="mlp")
    with pytest.raises(InvalidInput, match="needs at least one input"):
        check(empty)


def test_output_decode_and_encode_keep_dtype_shape_and_form():
    for raw in (True, False):
        resp = pb.ModelInferResponse(model_name="mlp")
        out = resp.outputs.add(name="probs", datatype="FP32", shape=[2, 3])
        p = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], np.float32)
        if raw:
            resp.raw_output_contents.append(p.tobytes())
        else:
            out.contents.fp32_contents.extend(p.ravel().tolist())
        arr = tensors.output_array(out, resp.raw_output_contents[0] if raw else None, "probs")
        np.testing.assert_array_equal(arr, p)
        tensors.set_output(resp, 0, p[::-1], raw=raw)
        again = tensors.output_array(resp.outputs[0], resp.raw_output_contents[0] if raw else None, "probs")
        np.testing.assert_array_equal(again, p[::-1])
    label = pb.ModelInferResponse().outputs.add(name="label", datatype="INT64", shape=[1])
    with pytest.raises(InvalidInput, match="must be one of FP16, FP32, FP64"):
        tensors.output_array(label, b"\0" * 8, "label")


def test_a_layout_frames_like_the_full_canonical_bytes():
    """A Layout (what a checked request's structure fixes) gives the same canonical bytes, whole and per
    row, as framing the request from scratch; inputs arrive out of name order on purpose."""
    rng = np.random.default_rng(1)
    req = pb.ModelInferRequest(model_name="mlp")
    arrays = {"z": rng.normal(size=(3, 2)).astype(np.float32), "a": rng.integers(0, 9, (3, 5)).astype(np.int64),
              "m": rng.normal(size=(3, 1, 2)).astype(np.float16)}
    for (name, arr), dtype in zip(arrays.items(), ("FP32", "INT64", "FP16"), strict=True):
        req.inputs.add(name=name, datatype=dtype, shape=list(arr.shape))
        req.raw_input_contents.append(arr.tobytes())
    layout = tensors.Layout.of(req, 3)
    data = layout.data(req)
    assert data == tensors.input_data(req)
    assert layout.canonical(data) == tensors.canonical_request(req, data)
    assert layout.rows(data) == tensors.canonical_rows(req, data, 3)
    single = request(np.ones((2, 4), np.float32))
    one = tensors.Layout.of(single, 2)
    assert one.canonical(one.data(single)) == tensors.canonical_request(single, tensors.input_data(single))
    # data of another size does not fit: the request is checked in full (and refused there)
    single.raw_input_contents[0] = b"\0" * 4
    assert one.data(single) is None
    # forms whose sizes depend on the data, or on typed contents, have no layout
    assert tensors.Layout.of(request(np.ones((1, 4), np.float32), strings=[b"a"]), 1) is None
    assert tensors.Layout.of(request(np.ones((1, 4), np.float32), raw=False), 1) is None

"""Open Inference Protocol v2 tensors: sizes, checks against the model's metadata, canonical bytes.

A tensor travels either in ``raw_input_contents`` / ``raw_output_contents`` (little-endian bytes, what
tritonclient sends) or in typed ``contents`` lists. Both forms of the same tensor give the same canonical
bytes, so they key the same perturbation noise.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from defense.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class DType:
    itemsize: int  # 0: variable (BYTES)
    numpy: str | None  # little-endian numpy dtype, None where numpy has none (BF16, BYTES)
    contents: str | None  # the InferTensorContents field that carries it, None: raw bytes only


DTYPES: Mapping[str, DType] = MappingProxyType({
    "BOOL": DType(1, "|b1", "bool_contents"),
    "UINT8": DType(1, "|u1", "uint_contents"),
    "UINT16": DType(2, "<u2", "uint_contents"),
    "UINT32": DType(4, "<u4", "uint_contents"),
    "UINT64": DType(8, "<u8", "uint64_contents"),
    "INT8": DType(1, "|i1", "int_contents"),
    "INT16": DType(2, "<i2", "int_contents"),
    "INT32": DType(4, "<i4", "int_contents"),
    "INT64": DType(8, "<i8", "int64_contents"),
    "FP16": DType(2, "<f2", None),
    "FP32": DType(4, "<f4", "fp32_contents"),
    "FP64": DType(8, "<f8", "fp64_contents"),
    "BF16": DType(2, None, None),
    "BYTES": DType(0, None, "bytes_contents"),
})
FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})  # what a probability or logprob output may be


@dataclass(frozen=True, slots=True)
class TensorSpec:
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True, slots=True)
class ModelMeta:
    """A model's inputs and outputs as Triton's ModelMetadata declares them."""

    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]

    @classmethod
    def from_pb(cls, resp: Any) -> ModelMeta:
        def specs(items: Any) -> Mapping[str, TensorSpec]:
            return MappingProxyType({t.name: TensorSpec(t.datatype, tuple(t.shape)) for t in items})

        return cls(specs(resp.inputs), specs(resp.outputs))


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def n_elements(shape: Sequence[int]) -> int:
    return math.prod(shape)


def bytes_offsets(data: bytes, where: str) -> list[int]:
    """Start offsets of each BYTES element (4-byte little-endian length, then the bytes), plus the end."""
    offsets = [0]
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise InvalidInput(f"{where}: BYTES data ends inside an element's length prefix")
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4 + n
        if pos > len(data):
            raise InvalidInput(f"{where}: a BYTES element runs past the end of the data")
        offsets.append(pos)
    return offsets


def contents_bytes(contents: Any, datatype: str, where: str) -> bytes:
    """Typed ``contents`` lists -> the raw little-endian bytes the same tensor has in raw form."""
    dt = DTYPES.get(datatype)
    if dt is None:  # read before check_inputs, which words the same refusal for raw contents
        raise InvalidInput(f"{where} has unknown datatype {datatype!r}; known: {', '.join(DTYPES)}")
    if dt.contents is None:
        raise InvalidInput(f"{where}: {datatype} tensors travel only in raw contents")
    values = getattr(contents, dt.contents)
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values)
    return np.asarray(values).astype(dt.numpy).tobytes()


def input_data(request: Any) -> list[bytes]:
    """Each input's bytes, in request order, whichever form the request used."""
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(request.inputs):
            raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
                               "either every input travels in raw_input_contents or none does")
        return list(raw)
    return [contents_bytes(t.contents, t.datatype, f"input {t.name!r}") for t in request.inputs]


class _Where:
    """``input 'x' of model 'm'``, formatted when an error message needs it (every request passes here)."""

    __slots__ = ("name", "model")

    def __init__(self, name: str, model: str) -> None:
        self.name, self.model = name, model

    def __str__(self) -> str:
        return f"input {self.name!r} of model {self.model!r}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def check_inputs(request: Any, data: Sequence[bytes], meta: ModelMeta, *, max_input_bytes: int,
                 batched: bool) -> int:
    """Refuse inputs the model cannot take (names, datatypes, shapes, byte counts, total size).

    Returns the batch size (1 for a model that is not batched).
    """
    model = request.model_name
    total = sum(len(d) for d in data)
    if total > max_input_bytes:
        raise InvalidInput(f"input tensors of model {model!r} hold {total} bytes, more than the proxy's "
                           f"max_input_bytes {max_input_bytes}")
    if not request.inputs:
        raise InvalidInput(f"a request for model {model!r} needs at least one input; "
                           f"inputs: {', '.join(meta.inputs) or '(none)'}")
    seen: set[str] = set()
    batch: int | None = None
    for t, d in zip(request.inputs, data, strict=True):
        where = _Where(t.name, model)  # formatted only for an error message
        if t.name in seen:
            raise InvalidInput(f"{where} is given twice")
        seen.add(t.name)
        spec = meta.inputs.get(t.name)
        if spec is None:
            raise InvalidInput(f"model {model!r} has no input {t.name!r}; inputs: {', '.join(meta.inputs)}")
        if t.datatype != spec.datatype:
            raise InvalidInput(f"{where} must be {spec.datatype}, got {t.datatype or '(none)'}")
        shape = tuple(t.shape)
        if any(s < 0 for s in shape):
            raise InvalidInput(f"{where} has shape {_fmt(shape)}: dimensions must be >= 0")
        if len(shape) != len(spec.shape) or any(w != -1 and w != s for w, s in zip(spec.shape, shape, strict=True)):
            raise InvalidInput(f"{where} must have shape {_fmt(spec.shape)} (-1: any size), got {_fmt(shape)}")
        n = n_elements(shape)
        dt = DTYPES.get(t.datatype)
        if dt is None:
            raise InvalidInput(f"{where} has unknown datatype {t.datatype!r}; known: {', '.join(DTYPES)}")
        if dt.itemsize:
            if len(d) != n * dt.itemsize:
                raise InvalidInput(f"{where} carries {len(d)} bytes, but shape {_fmt(shape)} of {t.datatype} "
                                   f"needs {n * dt.itemsize}")
        elif len(bytes_offsets(d, where)) - 1 != n:
            raise InvalidInput(f"{where} carries {len(bytes_offsets(d, where)) - 1} BYTES elements, but shape "
                               f"{_fmt(shape)} needs {n}")
        if batched:
            if not shape:
                raise InvalidInput(f"{where} is a scalar, but model {model!r} is batched: the first dimension "
                                   "is the batch")
            if batch is not None and shape[0] != batch:
                raise InvalidInput(f"inputs of model {model!r} disagree on the batch size: {batch} and {shape[0]}")
            batch = shape[0]
    return batch if batched and batch is not None else 1


def frame_head(name: str, datatype: str, shape: Sequence[int], nbytes: int) -> bytes:
    """What precedes a tensor's data in its canonical frame: name, datatype and shape, each length-framed,
    then the data's length."""
    out = bytearray()
    for field in (name.encode(), datatype.encode(), struct.pack(f"<{len(shape)}q", *shape)):
        out += struct.pack("<Q", len(field))
        out += field
    out += struct.pack("<Q", nbytes)
    return bytes(out)


def _frame(parts: Sequence[tuple[str, str, Sequence[int], bytes]]) -> bytes:
    """Inputs sorted by name, each field length-framed, so no two different requests share bytes."""
    out = bytearray()
    for name, datatype, shape, data in sorted(parts, key=lambda p: p[0]):
        out += frame_head(name, datatype, shape, len(data))
        out += data
    return bytes(out)


def canonical_request(request: Any, data: Sequence[bytes]) -> bytes:
    """The canonical bytes of a whole request's inputs (name, datatype, shape, data of each)."""
    return _frame([(t.name, t.datatype, tuple(t.shape), d) for t, d in zip(request.inputs, data, strict=True)])


def canonical_rows(request: Any, data: Sequence[bytes], batch: int) -> list[bytes]:
    """Canonical bytes of each batch row alone: row i of a batch frames exactly like the same input sent
    by itself (batch 1), so batch companions and positions cannot vary its noise."""
    per_input: list[tuple[str, str, tuple[int, ...], list[bytes]]] = []
    for t, d in zip(request.inputs, data, strict=True):
        shape = (1, *tuple(t.shape)[1:])
        if DTYPES[t.datatype].itemsize:
            step = len(d) // batch if batch else 0
            rows = [d[i * step:(i + 1) * step] for i in range(batch)]
        else:
            offsets = bytes_offsets(d, f"input {t.name!r}")
            per_row = n_elements(shape)
            rows = [d[offsets[i * per_row]:offsets[(i + 1) * per_row]] for i in range(batch)]
        per_input.append((t.name, t.datatype, shape, rows))
    return [_frame([(name, dtype, shape, rows[i]) for name, dtype, shape, rows in per_input]) for i in range(batch)]


def output_array(output: Any, raw: bytes | None, where: str) -> np.ndarray:
    """A float output tensor as a numpy array of its own dtype and shape."""
    if output.datatype not in FLOAT_TYPES:
        raise InvalidInput(f"{where} is {output.datatype}, but a probability or logprob output must be one of "
                           f"{', '.join(sorted(FLOAT_TYPES))}")
    dt = DTYPES[output.datatype]
    shape = tuple(output.shape)
    if raw is not None:
        arr = np.frombuffer(raw, dtype=dt.numpy)
    else:
        arr = np.asarray(getattr(output.contents, dt.contents), dtype=dt.numpy)  # type: ignore[arg-type]
    if arr.size != n_elements(shape):
        raise InvalidInput(f"{where} has {arr.size} values for shape {_fmt(shape)}")
    return arr.reshape(shape)


def set_output(response: Any, index: int, values: np.ndarray, *, raw: bool) -> None:
    """Write ``values`` back into output ``index`` in the form the response came in."""
    out = response.outputs[index]
    dt = DTYPES[out.datatype]
    arr = np.ascontiguousarray(values, dtype=dt.numpy)
    if raw:
        response.raw_output_contents[index] = arr.tobytes()
    else:
        field = getattr(out.contents, dt.contents)  # type: ignore[arg-type]
        del field[:]
        field.extend(arr.ravel().tolist())


@dataclass(frozen=True, slots=True)
class Layout:
    """The inputs of a request that passed ``check_inputs``, as far as they do not depend on the data: each
    input's byte count and canonical frame head. Requests with the same inputs (names, datatypes, shapes)
    in raw form share a layout, and checking one of them is checking that its data has these sizes."""

    sizes: tuple[int, ...]  # each input's byte count, in request order
    order: tuple[int, ...]  # input indices in canonical (name) order
    heads: tuple[bytes, ...]  # each input's frame head, in canonical order
    row_heads: tuple[bytes, ...]  # the same for one batch row (shape [1, ...])
    batch: int

    @classmethod
    def of(cls, request: Any, batch: int) -> Layout | None:
        """The layout of a checked request in raw form; None for a form it does not cover (typed contents,
        BYTES tensors, whose sizes depend on the data)."""
        if len(request.raw_input_contents) != len(request.inputs):
            return None
        sizes, specs = [], []
        for t in request.inputs:
            itemsize = DTYPES[t.datatype].itemsize
            if not itemsize:
                return None
            shape = tuple(t.shape)
            sizes.append(n_elements(shape) * itemsize)
            specs.append((t.name, t.datatype, shape))
        order = tuple(sorted(range(len(specs)), key=lambda i: specs[i][0]))
        heads = tuple(frame_head(*specs[i], sizes[i]) for i in order)
        rows = tuple(frame_head(specs[i][0], specs[i][1], (1, *specs[i][2][1:]), sizes[i] // max(batch, 1))
                     for i in order) if batch > 1 else ()
        return cls(tuple(sizes), order, heads, rows, batch)

    def data(self, request: Any) -> list[bytes] | None:
        """The request's input bytes when they have this layout's sizes; None otherwise (check it in full)."""
        raw = request.raw_input_contents
        sizes = self.sizes
        if len(raw) != len(sizes):
            return None
        data = list(raw)
        for d, n in zip(data, sizes, strict=True):
            if len(d) != n:
                return None
        return data

    def canonical(self, data: Sequence[bytes]) -> bytes:
        """What ``canonical_request`` gives for these inputs."""
        if len(data) == 1:
            return self.heads[0] + data[0]
        return b"".join(x for i, h in zip(self.order, self.heads, strict=True) for x in (h, data[i]))

    def rows(self, data: Sequence[bytes]) -> list[bytes]:
        """What ``canonical_rows`` gives for these inputs."""
        steps = [self.sizes[i] // self.batch for i in self.order]
        return [b"".join(x for i, h, s in zip(self.order, self.row_heads, steps, strict=True)
                         for x in (h, data[i][r * s:(r + 1) * s])) for r in range(self.batch)]

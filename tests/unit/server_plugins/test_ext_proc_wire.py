"""The C reader of Envoy's ext_proc messages (_wire) against protobuf's parser (read_request_pb): the same
answer for any ProcessingRequest, merged and unknown fields included, and an error wherever protobuf has one.
And the C writer of the body responses (_wire.body_response) against protobuf's serializer and the Python
writer (body_response_py)."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.ext_proc import protobuf_body_response

from server_plugins.envoy import ext_proc
from server_plugins.envoy._proto import ext_proc_pb2 as pb
from server_plugins.envoy.ext_proc import read_request_pb

_wire = pytest.importorskip("server_plugins.envoy._wire", reason="the C reader is not built")

names = st.one_of(st.sampled_from([":path", ":Method", "Content-Type", "authorization", "x-request-id", ""]),
                  st.text(max_size=12))
header = st.tuples(names, st.one_of(st.text(max_size=20), st.none()), st.binary(max_size=20))


def header_value(key: str, value: str | None, raw: bytes) -> pb.HeaderValue:
    return pb.HeaderValue(key=key, value=value or "", raw_value=raw if value is None else b"")


headers_msg = st.builds(lambda hs, end: pb.HttpHeaders(headers=pb.HeaderMap(headers=[header_value(*h) for h in hs]),
                                                       end_of_stream=end),
                        st.lists(header, max_size=8), st.booleans())
body_msg = st.builds(lambda b, end: pb.HttpBody(body=b, end_of_stream=end), st.binary(max_size=300), st.booleans())
trailers_msg = st.builds(lambda hs: pb.HttpTrailers(trailers=pb.HeaderMap(headers=[header_value(*h) for h in hs])),
                         st.lists(header, max_size=3))
request = st.one_of(
    st.builds(lambda m: pb.ProcessingRequest(request_headers=m), headers_msg),
    st.builds(lambda m: pb.ProcessingRequest(response_headers=m), headers_msg),
    st.builds(lambda m: pb.ProcessingRequest(request_body=m), body_msg),
    st.builds(lambda m: pb.ProcessingRequest(response_body=m), body_msg),
    st.builds(lambda m: pb.ProcessingRequest(request_trailers=m), trailers_msg),
    st.builds(lambda m: pb.ProcessingRequest(response_trailers=m), trailers_msg),
    st.builds(lambda o: pb.ProcessingRequest(observability_mode=o), st.booleans()),
)
# fields this subset of the proto does not know (metadata_context 8, attributes 9, protocol_config 11, and
# some never defined), of every wire type protobuf still uses: both readers must skip them
unknown = st.sampled_from([b"\x42\x03abc", b"\x4a\x00", b"\x5a\x02\x08\x01", b"\xa0\x06\x96\x01",
                           b"\xa9\x06" + bytes(8), b"\xb5\x06" + bytes(4), b"\xf8\xff\xff\xff\x0f\x01"])


def both(data: bytes):
    try:
        want = read_request_pb(data)
    except DecodeError:
        with pytest.raises(ValueError, match="malformed ext_proc message|codec can't decode"):
            _wire.read(data)
        return None
    got = _wire.read(data)
    assert got == want
    assert type(got[1]) is type(want[1])
    return got


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(request.map(pb.ProcessingRequest.SerializeToString), unknown), min_size=0, max_size=4))
def test_the_c_reader_answers_as_protobuf_does(parts):
    """Each part alone, and all of them in a row: a message that sets a oneof field twice merges the two
    (headers appended, a body's last value wins) and one that sets another member drops the first."""
    for p in parts:
        both(p)
    both(b"".join(parts))


def test_headers_as_envoy_sends_them():
    m = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=pb.HeaderMap(headers=[
        pb.HeaderValue(key=":Path", raw_value=b"/v1/completions"), pb.HeaderValue(key="X-Tag", raw_value=b"a"),
        pb.HeaderValue(key="x-tag", raw_value=b"caf\xe9"), pb.HeaderValue(key="x-empty"),
        pb.HeaderValue(key="x-both", value="text", raw_value=b"raw")]), end_of_stream=True))
    assert _wire.read(m.SerializeToString()) == (
        2, {":path": "/v1/completions", "x-tag": "a,caf\u00e9", "x-empty": "", "x-both": "raw"}, True)
    assert _wire.read(b"") == (0, None, False)
    assert _wire.read(pb.ProcessingRequest(response_body=pb.HttpBody()).SerializeToString()) == (5, b"", False)
    assert _wire.read(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()).SerializeToString()) == (6, None, False)


@given(request.map(pb.ProcessingRequest.SerializeToString), st.data())
@settings(max_examples=200, deadline=None)
def test_a_cut_or_corrupted_message_is_an_error_where_protobuf_has_one(data, draw):
    """Every prefix (a message cut anywhere), and one byte changed: never a different answer, and where
    protobuf refuses the bytes the C reader raises ValueError, never reads past the end."""
    for n in range(len(data)):
        both(data[:n])
    if data:
        i = draw.draw(st.integers(0, len(data) - 1))
        b = draw.draw(st.integers(0, 255))
        bad = data[:i] + bytes([b]) + data[i + 1:]
        if not _uses_groups(bad):  # group wire types (3, 4): protobuf skips them, the C reader refuses them
            both(bad)


def _uses_groups(data: bytes) -> bool:
    try:
        return any(wt in (3, 4) for wt in _wire_types(data))
    except ValueError:
        return False


def _wire_types(data: bytes, depth: int = 0):
    """The wire types of every tag reachable by reading length-delimited fields as messages where they parse."""
    i = 0
    while i < len(data):
        tag, i = _varint(data, i)
        wt = tag & 7
        yield wt
        if wt == 0:
            _, i = _varint(data, i)
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        elif wt == 2:
            n, i = _varint(data, i)
            if depth < 4:
                try:
                    yield from list(_wire_types(data[i:i + n], depth + 1))
                except ValueError:
                    pass
            i += n
        else:
            return


def _varint(data: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated")
        c = data[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return v, i


def test_bad_input_is_a_clear_error():
    bad_key = b"\x12\x07\x0a\x05\x0a\x03\x0a\x01\xff"  # request_headers > headers > header > key = b"\xff"
    with pytest.raises(DecodeError):
        read_request_pb(bad_key)
    with pytest.raises(UnicodeDecodeError):  # a ValueError: grpc fails the stream, as with protobuf's error
        _wire.read(bad_key)
    for data, words in ((b"\x12", "truncated varint"), (b"\x12\x05ab", "length past the end"),
                        (b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", "longer than 10 bytes"),
                        (b"\x00\x01", "bad field number"), (b"\x13", "unsupported wire type"),
                        (b"\x2a\x03\x11ab", "truncated fixed64")):
        with pytest.raises(ValueError, match=words):
            _wire.read(data)
    with pytest.raises(TypeError):
        _wire.read("not bytes")


def test_the_servicer_reads_with_the_c_reader():
    assert ext_proc.read_request is _wire.read


# -- the body responses, written --------------------------------------------------------------------
latin1 = st.text(st.characters(max_codepoint=0xFF), max_size=40)
set_headers = st.lists(st.tuples(st.text(max_size=30), latin1), max_size=6).map(tuple)
removes = st.lists(st.text(max_size=20), max_size=4).map(tuple)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([ext_proc.REQUEST_BODY, ext_proc.RESPONSE_BODY]),
       st.one_of(st.binary(max_size=300), st.integers(0, 3).map(lambda n: bytes(range(256)) * (70 * n))),
       set_headers, removes)
def test_body_response_writes_protobufs_bytes(which, data, headers, remove):
    got = _wire.body_response(which, data, headers, remove)
    want = protobuf_body_response(which, data, headers, remove)
    assert got == want.SerializeToString()
    assert got == ext_proc.body_response_py(which, data, headers, remove)
    assert pb.ProcessingResponse.FromString(got) == want


def test_body_response_takes_any_buffer_and_sequence():
    want = ext_proc.body_response_py(4, b"abc", (("content-length", "3"),), ("etag",))
    assert _wire.body_response(4, bytearray(b"abc"), [("content-length", "3")], ["etag"]) == want
    assert _wire.body_response(4, memoryview(b"abc"), (("content-length", "3"),), ("etag",)) == want
    many = tuple((f"x-h{i}", "\u00e9" * i) for i in range(40))  # past the writer's stack array
    assert _wire.body_response(3, b"", many, ()) == ext_proc.body_response_py(3, b"", many, ())
    with pytest.raises(UnicodeEncodeError):  # a failure late in a long list frees what came before
        _wire.body_response(3, b"", (*many, ("x-k", "\u20ac")), ())


@pytest.mark.parametrize(("args", "error", "words"), [
    ((5, b"", (), ()), ValueError, "which must be 3"),
    ((3, "text", (), ()), TypeError, "bytes-like"),
    ((3, b"", (("a", "b", "c"),), ()), TypeError, "pairs"),
    ((3, b"", (("a", 1),), ()), TypeError, "must be str"),
    ((3, b"", ("ab",), ()), TypeError, "pairs"),
    ((3, b"", (), (b"etag",)), TypeError, "must be str"),
    ((3, b"", None, ()), TypeError, "sequence"),
    ((3, b"", (), None), TypeError, "sequence"),
    ((3, b"", (("x-k", "\u20ac"),), ()), UnicodeEncodeError, "latin-1"),
    ((3, b"", (("x-\ud800", "v"),), ()), UnicodeEncodeError, "utf-8"),
])
def test_body_response_refuses_what_it_cannot_write(args, error, words):
    with pytest.raises(error, match=words):
        _wire.body_response(*args)


def test_a_value_outside_latin1_fails_in_both_writers():
    with pytest.raises(UnicodeEncodeError):
        ext_proc.body_response_py(3, b"", (("x-k", "\u20ac"),), ())

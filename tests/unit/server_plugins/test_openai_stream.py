"""Logprobs JSON <-> packed arrays, SSE events split anywhere, gzip/deflate bodies decoded and re-encoded."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from defense.types import Api
from server_plugins.openai import logprobs as lp
from server_plugins.openai.sse import BodyCodec, SSERewriter, UnsupportedEncoding


def completion_doc():
    return {"tokens": [" a", " b", " c"], "token_logprobs": [-0.5, -2.0, -1.0],
            "top_logprobs": [{" a": -0.5, " x": -1.5}, {" y": -0.7, " z": -1.2}, {" c": -1.0}],
            "text_offset": [0, 2, 4]}


def chat_doc():
    def e(t, v):
        return {"token": t, "logprob": v, "bytes": list(t.encode())}
    return {"content": [{**e("Hi", -0.2), "top_logprobs": [e("Hi", -0.2), e("Hey", -2.0), e("Hi", -3.0)]},
                        {**e("!", -0.1), "top_logprobs": [e("!", -0.1), e(".", -2.5), e("?", -3.5)]}]}


def test_token_keys_are_stable_and_read_vllm_ids():
    assert lp.token_key(" the") == lp.token_key(" the") >= 0
    assert lp.token_key(" the") != lp.token_key("the")
    assert lp.token_key("token_id:42") == 42
    assert lp.token_key("\ud800") >= 0  # a lone surrogate (invalid UTF-8) still keys


def test_completion_logprobs_pack_with_the_sampled_token():
    pos = lp.read(Api.OPENAI_COMPLETIONS, completion_doc())
    assert pos.values.shape == (3, 2) and pos.disclosed == 5
    assert pos.token_ids[2, 1] == -1  # a position with fewer alternatives
    assert pos.sampled_ids[1] == lp.token_key(" b") and pos.sampled_values[1] == -2.0  # outside the top-k
    np.testing.assert_allclose(pos.values[0], [-0.5, -1.5])


def test_chat_duplicate_token_texts_get_distinct_keys():
    pos = lp.read(Api.OPENAI_CHAT, chat_doc())
    row = pos.token_ids[0]
    assert len(set(row.tolist())) == 3 and row[0] == lp.token_key("Hi")


def test_write_back_changes_only_the_numbers():
    doc = completion_doc()
    pos = lp.read(Api.OPENAI_COMPLETIONS, doc)
    lp.write(pos, pos.values - 0.25, pos.sampled_values - 0.25)
    assert list(doc["top_logprobs"][0]) == [" a", " x"] and doc["top_logprobs"][0][" a"] == -0.75
    assert doc["token_logprobs"] == [-0.75, -2.25, -1.25] and doc["tokens"] == [" a", " b", " c"]
    chat = chat_doc()
    pos = lp.read(Api.OPENAI_CHAT, chat)
    lp.write(pos, np.full_like(pos.values, -np.inf), pos.sampled_values)
    assert chat["content"][0]["top_logprobs"][1]["logprob"] == lp.JSON_NEG_INF  # JSON has no -inf


def test_logprobs_zero_keys_the_sampled_token_alone():
    doc = {"tokens": [" a", " b"], "token_logprobs": [-0.5, -0.6], "top_logprobs": [{}, {}]}
    pos = lp.read(Api.OPENAI_COMPLETIONS, doc)
    assert pos.values.shape == (2, 1) and pos.token_ids[1, 0] == lp.token_key(" b")


def test_echoed_first_token_without_a_logprob():
    doc = {"tokens": ["Hi", " a"], "token_logprobs": [None, -0.5], "top_logprobs": [None, {" a": -0.5}]}
    pos = lp.read(Api.OPENAI_COMPLETIONS, doc)
    assert pos.sampled_ids[0] == -1 and (pos.token_ids[0] == -1).all()
    lp.write(pos, pos.values, pos.sampled_values)
    assert doc["token_logprobs"][0] is None


@pytest.mark.parametrize("doc, api", [
    ({"tokens": [" a"], "token_logprobs": ["-0.5"], "top_logprobs": [{" a": -0.5}]}, Api.OPENAI_COMPLETIONS),
    ({"tokens": [" a"], "token_logprobs": [-0.5], "top_logprobs": [[-0.5]]}, Api.OPENAI_COMPLETIONS),
    ({"content": [{"token": "a", "logprob": True}]}, Api.OPENAI_CHAT),
    ({"content": [{"logprob": -1.0}]}, Api.OPENAI_CHAT),
    ({"content": "a"}, Api.OPENAI_CHAT),
    ([1, 2], Api.OPENAI_CHAT),
])
def test_malformed_logprobs_are_refused_not_passed(doc, api):
    with pytest.raises(lp.UpstreamFormatError):
        lp.read(api, doc)


def test_chat_refusal_logprobs_are_dropped():
    doc = {"content": [], "refusal": [{"token": "no", "logprob": -0.1, "top_logprobs": []}]}
    assert lp.read(Api.OPENAI_CHAT, doc) is None and doc["refusal"] is None


# -- SSE ------------------------------------------------------------------------------------------
STREAM = (b'data: {"n": 1}\n\n: keep-alive\n\nevent: x\nid: 7\ndata: {"n": 2}\n\n'
          b'data: {"n":\ndata: 3}\r\n\r\ndata: [DONE]\n\n')


def _double(data: bytes) -> bytes:
    doc = json.loads(data)
    return json.dumps({"n": doc["n"] * 2}).encode()


def expected() -> bytes:
    return (b'data: {"n": 2}\n\n: keep-alive\n\nevent: x\nid: 7\ndata: {"n": 4}\n\n'
            b'data: {"n": 6}\n\ndata: [DONE]\n\n')


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_events_split_at_any_byte_come_out_whole(cut):
    r = SSERewriter(_double)
    out = r.feed(STREAM[:cut]) + r.feed(STREAM[cut:]) + r.close()
    assert out == expected()


def test_byte_by_byte_and_a_final_event_without_its_blank_line():
    r = SSERewriter(_double)
    out = b"".join(r.feed(STREAM[i:i + 1]) for i in range(len(STREAM))) + r.close()
    assert out == expected()
    r = SSERewriter(_double)
    assert r.feed(b'data: {"n": 5}') == b""
    assert r.close() == b'data: {"n": 10}\n\n'


def test_a_dropped_event_disappears():
    r = SSERewriter(lambda d: None)
    assert r.feed(b'data: {"n": 1}\n\ndata: [DONE]\n\n') == b"data: [DONE]\n\n"


# -- content-encoding -------------------------------------------------------------------------------
@pytest.mark.parametrize("enc, wbits", [("gzip", 31), ("deflate", 15)])
def test_compressed_streams_decode_in_pieces_and_reencode(enc, wbits):
    plain = STREAM * 20
    comp = zlib.compressobj(6, zlib.DEFLATED, wbits)
    data = comp.compress(plain) + comp.flush()
    codec = BodyCodec(enc, max_decoded=1 << 20)
    pieces = [codec.decode(data[i:i + 7]) for i in range(0, len(data), 7)]
    assert b"".join(pieces) == plain
    r = SSERewriter(_double)
    out = b"".join(codec.encode(r.feed(p), final=False) for p in pieces) + codec.encode(r.close(), final=True)
    assert zlib.decompress(out, wbits) == expected() * 20


def test_a_gzip_bomb_is_refused():
    data = zlib.compress(b"\0" * (5 << 20), wbits=31)
    codec = BodyCodec("gzip", max_decoded=1 << 20)
    with pytest.raises(UnsupportedEncoding, match="larger than"):
        codec.decode(data)


@pytest.mark.parametrize("enc", ["gzip", "deflate"])
def test_a_body_that_is_not_what_its_encoding_says_is_refused(enc):
    with pytest.raises(UnsupportedEncoding, match="not valid for its content-encoding"):
        BodyCodec(enc, max_decoded=1 << 20).decode(b'{"choices": []}')  # zlib.error before


def test_unknown_encodings_are_refused():
    with pytest.raises(UnsupportedEncoding, match="br"):
        BodyCodec("br", max_decoded=10)
    assert BodyCodec("identity", max_decoded=10).decode(b"x" * 100) == b"x" * 100

"""The C reader of buffered answers (_lpscan) against the reference: the parsed document read by logprobs.read
and written by logprobs.write. Whatever the scanner accepts, the reference must accept with the same numbers,
keys and counts, and the spliced bytes must parse to what the reference writes."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defense.types import Api, SettleStatus
from server_plugins.openai import jsonx
from server_plugins.openai import logprobs as lpmod
from tests.support.openai_answers import AUTH, completion_answer, make_runtime, req

_lpscan = pytest.importorskip("server_plugins.openai._lpscan", reason="the C reader is not built")

COMPLETIONS, CHAT = Api.OPENAI_COMPLETIONS, Api.OPENAI_CHAT


def chat_answer(texts, values, *, k=3, usage=True, content="hello"):
    """A chat answer whose position i samples texts[i*k] and returns texts[i*k:(i+1)*k] as alternatives."""
    entries = []
    for i in range(len(texts) // k):
        alts = [{"token": texts[i * k + j], "logprob": values[i * k + j], "bytes": [1, 2]} for j in range(k)]
        entries.append({"token": texts[i * k], "logprob": values[i * k], "bytes": None, "top_logprobs": alts})
    doc = {"id": "chatcmpl-1", "object": "chat.completion", "model": "tiny",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                        "logprobs": {"content": entries, "refusal": None}, "finish_reason": "stop"}]}
    if usage:
        doc["usage"] = {"prompt_tokens": 3, "completion_tokens": len(entries), "total_tokens": 3 + len(entries),
                        "prompt_tokens_details": {"cached_tokens": 0}, "note": 1.5, "flag": True}
    return doc


def completion_doc(texts, values, *, k=3, text="abc"):
    p = len(texts) // k
    tops = [{texts[i * k + j]: values[i * k + j] for j in range(k)} for i in range(p)]
    return {"choices": [{"index": 0, "text": text, "logprobs": {
        "tokens": [texts[i * k] for i in range(p)], "token_logprobs": [values[i * k] for i in range(p)],
        "top_logprobs": tops, "text_offset": list(range(p))}}], "usage": {"completion_tokens": p}}


def count_chars(api, choice):
    """Exchange._count_text, restated."""
    if api is CHAT:
        part = choice.get("delta") or choice.get("message") or {}
        text = part.get("content") if isinstance(part, dict) else None
    else:
        text = choice.get("text")
    return len(text) if isinstance(text, str) else 0


def reference(api, data):
    """(positions, chars, usage) the slow way; raises what the front would refuse."""
    doc = jsonx.loads(data or b"null")
    if not isinstance(doc, dict):
        raise lpmod.UpstreamFormatError("not an object")
    choices = doc.get("choices") or []
    if not isinstance(choices, list):
        raise lpmod.UpstreamFormatError("choices")
    positions, chars = [], []
    for c in choices:
        if not isinstance(c, dict):
            raise lpmod.UpstreamFormatError("choice")
        chars.append(count_chars(api, c))
        positions.append(lpmod.read(api, c.get("logprobs")))
    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
    usage = {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
    return doc, positions, chars, usage


def assert_same(api, data):
    """scan(data) agrees with the reference wherever it answers; returns the scan (None: declined)."""
    got = lpmod.scan(api, data)
    if got is None:
        return None
    doc, positions, chars, usage = reference(api, data)  # must not raise: the scanner accepted it
    assert got.chars == chars
    assert got.usage == usage
    assert len(got.positions) == len(positions)
    for a, b in zip(got.positions, positions, strict=True):
        assert (a is None) == (b is None)
        if a is None:
            continue
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.sampled_ids, b.sampled_ids)
        np.testing.assert_array_equal(a.sampled_values, b.sampled_values)
        assert (a.disclosed, a.n_sampled, a.n_positions) == (b.disclosed, b.n_sampled, b.n_positions)
    return got


def assert_same_write(api, data, rng, *, sampled=True):
    """Scanned.write and logprobs.write put the same numbers into the same places."""
    got = assert_same(api, data)
    assert got is not None
    doc, positions, _, _ = reference(api, data)
    protected = []
    for pos in positions:
        if pos is None:
            protected.append(None)
            continue
        v = rng.normal(-3, 2, size=pos.values.shape).astype(np.float32)
        v.flat[rng.integers(v.size)] = -np.inf  # written as vLLM's -9999.0
        v.flat[rng.integers(v.size)] = 3e-9  # rounds to 0.0
        s = rng.normal(-1, 1, size=pos.n_positions).astype(np.float32) if sampled else None
        protected.append((v, s))
        lpmod.write(pos, v, s)
    want = json.loads(jsonx.dumps(doc))
    out = got.write(protected)
    assert json.loads(out) == want
    return out


# -- token keys -----------------------------------------------------------------------------------------
@given(st.text(max_size=300))
def test_key_is_token_key(text):
    assert _lpscan.key(text.encode("utf-8")) == lpmod.token_key(text)


@pytest.mark.parametrize("text", ["token_id:0", "token_id:123", "token_id:0042", "token_id:", "token_id:12a",
                                  "token_id:" + "9" * 18, "token_id:" + "9" * 19, "token_id:\u0663", "token_id:-1",
                                  "x" * 127, "x" * 128, "x" * 129, "x" * 256, "x" * 257])
def test_key_edges(text):
    key = _lpscan.key(text.encode())
    assert key == lpmod.token_key(text)
    rest = text[9:]
    if text.startswith("token_id:") and rest.isascii() and rest.isdigit() and len(rest) <= 18:
        assert key == int(rest)
    else:  # blake2b-64 of the text, top bit cleared
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        assert key == int.from_bytes(digest, "little") & ((1 << 63) - 1)


# -- numbers --------------------------------------------------------------------------------------------
decimals = st.builds(
    lambda neg, digits, point, exp: ("-" if neg else "") + (digits[:point].lstrip("0") or "0") + "."
    + (digits[point:] or "0")
    + (f"e{exp}" if exp is not None else ""),
    st.booleans(), st.text("0123456789", min_size=1, max_size=21), st.integers(0, 21),
    st.one_of(st.none(), st.integers(-40, 40)))


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(repr), decimals,
                 st.floats(-30, 0).map(lambda x: f"{x:.{len(repr(x)) % 9 + 4}f}")))
def test_quick_numbers_are_correctly_rounded(text):
    # the scanner's fast path (digits as an integer, one extended-precision scaling) gives float()'s double
    # exactly, or declines (None) and leaves the number to the slow path
    got = _lpscan.number(text.encode())
    if got is not None:
        assert got == float(text) and math.copysign(1, got) == math.copysign(1, float(text)), text


@pytest.mark.parametrize("text", [
    "9007199254740993", "0.1", "-0.916291", "1.7976931348623157e308", "5e-324", "-9999.0", "0.30000000000000004",
    # halfway between two doubles, and one digit either side of it
    "9007199254740993.0", "9007199254740992.9999999", "9007199254740993.0000001", "2.00000000000000011102230246251565",
    "1e23", "8.98846567431158e307", "4.9406564584124654e-324", "-1.2345678901234567e-12",
])
def test_quick_number_edges(text):
    got = _lpscan.number(text.encode())
    assert got is None or got == float(text)


# -- reading ----------------------------------------------------------------------------------------------
def test_reads_the_bench_answer_and_the_test_answers():
    rng = np.random.default_rng(0)
    for seed in range(5):
        assert_same_write(COMPLETIONS, json.dumps(completion_answer(seed)).encode(), rng)
        assert_same_write(COMPLETIONS, json.dumps(completion_answer(seed), separators=(",", ":")).encode(), rng)
        assert_same_write(COMPLETIONS, json.dumps(completion_answer(seed), indent=2).encode(), rng,
                          sampled=False)


token_texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_answers_read_and_write_as_the_reference(data):
    k = data.draw(st.integers(1, 4))
    p = data.draw(st.integers(0, 5))
    chat = data.draw(st.booleans())
    values = data.draw(st.lists(st.floats(-50, 0, width=32) | st.integers(-30, 0), min_size=p * k,
                                max_size=p * k))
    if chat:
        texts = []
        for _ in range(p):  # distinct texts within a position (equal ones are the reference's to rename)
            texts += data.draw(st.lists(token_texts, min_size=k, max_size=k, unique=True))
        doc = chat_answer(texts, values, k=k, content=data.draw(token_texts | st.none()))
    else:
        texts = []
        for _ in range(p):
            texts += data.draw(st.lists(token_texts, min_size=k, max_size=k, unique=True))
        doc = completion_doc(texts, values, k=k, text=data.draw(token_texts))
    ensure_ascii = data.draw(st.booleans())  # escapes (\\uXXXX, surrogate pairs) or raw UTF-8
    body = json.dumps(doc, ensure_ascii=ensure_ascii, indent=data.draw(st.sampled_from([None, 1]))).encode()
    api = CHAT if chat else COMPLETIONS
    got = lpmod.scan(api, body)
    assert got is not None, body  # every one of these is the usual shape
    if p:
        assert_same_write(api, body, np.random.default_rng(p * 10 + k))
    else:
        assert_same(api, body)


def test_lone_surrogate_escapes_key_as_the_reference():
    # the stdlib reads a lone surrogate escape (orjson does not); the key hashes it with surrogatepass
    body = (b'{"choices":[{"text":"\\ud800x","logprobs":{"tokens":["\\ud83d\\ude00"],"token_logprobs":[-1.0],'
            b'"top_logprobs":[{"\\ud83d\\ude00":-1.0,"\\udc00":-2.0,"\\ud800\\u0041":-3.0}]}}]}')
    got = assert_same_write(COMPLETIONS, body, np.random.default_rng(1))
    assert got is not None
    assert lpmod.scan(COMPLETIONS, body).chars == [2]


def test_usage_keeps_integers_and_the_last_of_a_repeated_name():
    body = (b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2.0,"total_tokens":true,'
            b'"a":-0,"b":{"c":1},"d":5,"d":"x","e":"y","e":7}}')
    got = assert_same(COMPLETIONS, body)
    assert got.usage == {"prompt_tokens": 3, "a": 0, "e": 7}
    assert got.write([]) == body  # nothing to protect: the same bytes


def test_answers_without_logprobs():
    for body in (b'{"choices":[{"text":"hi","logprobs":null}]}', b'{"choices":[{"text":"hi"}]}',
                 b'{"choices":null}', b'{"id":"x"}',
                 b'{"choices":[{"text":"hi","logprobs":{"tokens":[],"token_logprobs":[],"top_logprobs":[]}}]}'):
        got = assert_same(COMPLETIONS, body)
        assert got is not None and all(p is None for p in got.positions)
    body = b'{"choices":[{"message":{"content":"hey"},"logprobs":{"content":null}}]}'
    assert assert_same(CHAT, body).chars == [3]


# -- declining: the reference decides --------------------------------------------------------------------
BASE = completion_answer(0)


def mutated(f):
    doc = copy.deepcopy(BASE)
    f(doc)
    return json.dumps(doc).encode()


def _lp(d):
    return d["choices"][0]["logprobs"]


DECLINED = {
    "not an object": b"[1, 2]",
    "empty": b"",
    "trailing garbage": json.dumps(BASE).encode() + b"x",
    "truncated": json.dumps(BASE).encode()[:-1],
    "NaN literal": json.dumps(BASE).encode().replace(b"-1.6684381784134268", b"NaN", 1),
    "raw control char": json.dumps(BASE).encode().replace(b'"t39"', b'"t\x0139"', 1),
    "invalid UTF-8": json.dumps(BASE).encode().replace(b'"t39"', b'"t\xff39"', 1),
    "UTF-8 BOM": b"\xef\xbb\xbf" + json.dumps(BASE).encode(),
    "bad escape": json.dumps(BASE).encode().replace(b'"t39"', b'"t\\x39"', 1),
    "leading zero": json.dumps(BASE).encode().replace(b"-1.6684381784134268", b"-01.5", 1),
    "duplicate choices": json.dumps(BASE).encode()[:-1] + b', "choices": []}',
    "escaped member name": json.dumps(BASE).encode().replace(b'"logprobs"', b'"log\\u0070robs"', 1),
    "choice not an object": mutated(lambda d: d["choices"].append(3)),
    "logprobs a list": mutated(lambda d: d["choices"][0].update(logprobs=[])),
    "ragged k": mutated(lambda d: _lp(d)["top_logprobs"][0].pop("t39")),
    "null position": mutated(lambda d: _lp(d)["top_logprobs"].__setitem__(0, None)),
    "echoed prompt": mutated(lambda d: _lp(d)["token_logprobs"].__setitem__(0, None)),
    "short tokens": mutated(lambda d: _lp(d)["tokens"].pop()),
    "string logprob": mutated(lambda d: _lp(d)["token_logprobs"].__setitem__(0, "-1.0")),
    "bool logprob": mutated(lambda d: _lp(d)["token_logprobs"].__setitem__(0, True)),
    "token not a string": mutated(lambda d: _lp(d)["tokens"].__setitem__(0, 7)),
    "no alternatives": mutated(lambda d: _lp(d).update(top_logprobs=[{}] * 8)),
    "huge int logprob": json.dumps(BASE).encode().replace(b"-1.6684381784134268", b"-1" + b"0" * 20, 1),
    "overflowing logprob": json.dumps(BASE).encode().replace(b"-1.6684381784134268", b"-1e400", 1),
    "huge usage int": mutated(lambda d: d["usage"].update(total_tokens=10**30)),
    # a repeated name the reader acts on: the reference keeps the last one
    "duplicate logprobs": json.dumps(BASE).encode().replace(b'"finish_reason"', b'"logprobs": null, "finish_reason"', 1),
    "duplicate text": json.dumps(BASE).encode().replace(b'"finish_reason"', b'"text": "", "finish_reason"', 1),
    "duplicate tokens": json.dumps(BASE).encode().replace(b'"text_offset"', b'"tokens": [], "text_offset"', 1),
    "duplicate top_logprobs": json.dumps(BASE).encode().replace(b'"text_offset"', b'"top_logprobs": [], "text_offset"', 1),
    "duplicate token_logprobs": json.dumps(BASE).encode().replace(b'"text_offset"', b'"token_logprobs": [], "text_offset"', 1),
    "duplicate usage": json.dumps(BASE).encode()[:-1] + b', "usage": null}',
    "duplicate alternative": json.dumps(BASE).encode().replace(b'"t21": -1.9223735277555765', b'"t39": -1.9', 1),
    # a field the front does not read may hold values it never perturbs: the reference refuses the answer
    "unknown logprobs field": mutated(lambda d: _lp(d).update(probs=[0.2] * 8)),
    "chat logprobs on a completion": mutated(lambda d: d["choices"][0].update(
        logprobs={"content": [{"token": "a", "logprob": -0.1, "top_logprobs": [{"token": "a", "logprob": -0.1}]}]})),
}


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_unusual_bodies_are_left_to_the_reference(name):
    assert lpmod.scan(COMPLETIONS, DECLINED[name]) is None


def chat_doc():
    return chat_answer([f"w{i}" for i in range(6)], [-0.5, -1.0, -2.0, -0.25, -1.5, -3.0], k=3)


def chat_mutated(f):
    doc = chat_doc()
    f(doc)
    return json.dumps(doc).encode()


def _content(d):
    return d["choices"][0]["logprobs"]["content"]


CHAT_DECLINED = {
    "refusal": chat_mutated(lambda d: d["choices"][0]["logprobs"].update(refusal="no")),
    "delta": chat_mutated(lambda d: d["choices"][0].update(delta={"content": "x"})),
    "same text twice in a position": chat_mutated(lambda d: _content(d)[0]["top_logprobs"][1].update(token="w0")),
    "entry without logprob": chat_mutated(lambda d: _content(d)[0].pop("logprob")),
    "alternative without token": chat_mutated(lambda d: _content(d)[1]["top_logprobs"][2].pop("token")),
    "entry without alternatives": chat_mutated(lambda d: _content(d)[1].update(top_logprobs=[])),
    "content an object": chat_mutated(lambda d: d["choices"][0]["logprobs"].update(content={})),
    "duplicate content": json.dumps(chat_doc()).encode().replace(b'"content": "hello"',
                                                                 b'"content": "hello", "content": null', 1),
    "duplicate message": json.dumps(chat_doc()).encode().replace(b'"finish_reason"', b'"message": 1, "finish_reason"', 1),
    "duplicate entry token": json.dumps(chat_doc()).encode().replace(b'"bytes": null', b'"bytes": null, "token": "w9"', 1),
    "unknown logprobs field": chat_mutated(lambda d: d["choices"][0]["logprobs"].update(probs=[0.5])),
    "unknown entry field": chat_mutated(lambda d: _content(d)[0].update(prob=0.6)),
    "unknown alternative field": chat_mutated(lambda d: _content(d)[0]["top_logprobs"][1].update(prob=0.2)),
    "completion logprobs on a chat answer": chat_mutated(lambda d: d["choices"][0].update(
        logprobs=_lp(completion_answer(0)))),
}


@pytest.mark.parametrize("name", sorted(CHAT_DECLINED))
def test_unusual_chat_bodies_are_left_to_the_reference(name):
    assert lpmod.scan(CHAT, CHAT_DECLINED[name]) is None
    assert lpmod.scan(CHAT, json.dumps(chat_doc()).encode()) is not None  # the unmutated one is read


# -- whatever the scanner accepts, the reference accepts the same way ----------------------------------------
PIECES = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"0", b"-", b".", b"e", b" ", b"\\u00e9", b"null",
          b"1", b"\xc3\xa9", b"\xed\xa0\x80", b'"t39"', b'"logprobs"', b"-9999.0", b"1e-07"]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_bodies_never_disagree_with_the_reference(data):
    chat = data.draw(st.booleans())
    body = bytearray(json.dumps(chat_doc() if chat else completion_answer(1)).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        how = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = data.draw(st.sampled_from(PIECES))
        if how == "insert":
            body[at:at] = piece
        elif how == "delete":
            del body[at:at + data.draw(st.integers(1, 8))]
        else:
            body[at:at + len(piece)] = piece
    api = CHAT if chat else COMPLETIONS
    got = assert_same(api, bytes(body))  # raises if the reference refuses what the scanner read
    if got is not None and any(p is not None for p in got.positions):
        assert_same_write(api, bytes(body), np.random.default_rng(7))


def test_splice_formats_numbers_as_the_reference():
    body = json.dumps(completion_answer(2)).encode()
    got = lpmod.scan(COMPLETIONS, body)
    pos = got.positions[0]
    special = np.array([-np.inf, -1e-8, 5e-8, -1.23456789, -0.0, -9999.5, -1e-7, -123456.75], dtype=np.float32)
    v = np.resize(special, pos.values.shape).astype(np.float32)
    out = json.loads(got.write([(v, None)]))
    want = [[float(x) for x in row] for row in np.maximum(v.astype(np.float64), -9999.0).round(7)]
    tops = out["choices"][0]["logprobs"]["top_logprobs"]
    assert [list(d.values()) for d in tops] == want
    assert out["choices"][0]["logprobs"]["token_logprobs"] == BASE_SAMPLED(body)
    assert all(isinstance(x, float) for row in tops for x in row.values())
    assert math.copysign(1, list(tops[0].values())[4]) == -1  # -0.0 keeps its sign, as the encoder writes it


def BASE_SAMPLED(body):  # noqa: N802 - the unchanged sampled values
    return json.loads(body)["choices"][0]["logprobs"]["token_logprobs"]


# -- through the Exchange ----------------------------------------------------------------------------------
def test_exchange_answers_the_same_with_and_without_the_scanner(monkeypatch):
    from server_plugins.openai import Guard

    def run(rt, answer, body):
        ex = Guard(rt).start("POST", "/v1/completions", AUTH)
        ex.request(body)
        ex.response_start(200, {"content-type": "application/json"})
        out = ex.response_body(answer)
        return out, ex.usage(SettleStatus.OK)

    rt = make_runtime()
    answers = [json.dumps(completion_answer(s)).encode() for s in range(3)] + [DECLINED["ragged k"]]
    fast = [run(rt, a, req()) for a in answers]
    monkeypatch.setattr(lpmod, "_lpscan", None)
    slow = [run(rt, a, req()) for a in answers]
    for (fo, fu), (so, su) in zip(fast, slow, strict=True):
        assert json.loads(fo) == json.loads(so)  # keyed noise: the same request gets the same numbers
        assert fu == su


def test_splice_refuses_spans_that_do_not_fit():
    import struct

    body = b'{"a": -1.5, "b": -2.5}'
    ok = struct.pack("<2q", 6, 10)
    assert json.loads(_lpscan.splice(body, ok, [(0, np.array([-0.25]))])) == {"a": -0.25, "b": -2.5}
    for spans, segments in ((struct.pack("<2q", 10, 6), [(0, np.array([-0.25]))]),  # ends before it starts
                            (struct.pack("<2q", 6, 99), [(0, np.array([-0.25]))]),  # past the body
                            (struct.pack("<4q", 6, 10, 8, 12), [(0, np.array([-0.25, -0.5]))]),  # overlapping
                            (ok, [(1, np.array([-0.25]))]),  # a segment past the spans
                            (ok, [(0, np.array([-0.25, -0.5]))])):
        with pytest.raises(ValueError):
            _lpscan.splice(body, spans, segments)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_splice_puts_edits_in_document_order_whatever_order_they_come_in(widths, rnd):
    # numbers of random widths; the spans handed over in shuffled segments (runs in and out of order), as a
    # completion's sampled values come after its alternatives in the segments but before them in the body
    import struct

    parts, spans, at = [], [], 0
    for w in widths:
        text = "-" + "1" * w
        parts.append(text)
        spans.append((at, at + len(text)))
        at += len(text) + 1
    body = ",".join(parts).encode()
    packed = b"".join(struct.pack("<2q", a, b) for a, b in spans)
    values = -np.arange(1, len(spans) + 1, dtype=np.float64) / 4
    cuts = sorted({0, len(spans), *(rnd.randrange(len(spans) + 1) for _ in range(rnd.randrange(5)))})
    segments = [(a, values[a:b]) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    rnd.shuffle(segments)
    got = _lpscan.splice(body, packed, segments).decode().split(",")
    assert [float(x) for x in got] == list(values)


@pytest.mark.parametrize("chat", [False, True])
def test_a_defense_that_returns_fewer_alternatives_is_written_as_the_reference_does(monkeypatch, chat):
    # top_k_cap keeps 2 of the engine's 5 (or 3): splicing 2 values a position over 5 numbers would misplace
    # them and leave clean numbers in; the answer must be the reference's, alternatives past k dropped
    from server_plugins.openai import Guard

    rt = make_runtime({"type": "request_rules"}, {"type": "keyed_noise"}, {"type": "top_k_cap", "params": {"k": 2}})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                        "top_logprobs": 3, "max_tokens": 2}).encode() if chat else req())
    valid_chat = chat_answer([f"w{i}" for i in range(6)], [-1.0, -1.5, -2.0, -0.7, -1.6, -3.0], k=3)
    answer = json.dumps(valid_chat if chat else completion_answer(3)).encode()

    def run():
        ex = Guard(rt).start("POST", path, AUTH)
        ex.request(body)
        ex.response_start(200, {"content-type": "application/json"})
        return json.loads(ex.response_body(answer))

    fast = run()
    monkeypatch.setattr(lpmod, "_lpscan", None)
    slow = run()
    assert fast == slow
    lp = fast["choices"][0]["logprobs"]
    tops = [e["top_logprobs"] for e in lp["content"]] if chat else lp["top_logprobs"]
    assert tops and all(len(t) == 2 for t in tops)

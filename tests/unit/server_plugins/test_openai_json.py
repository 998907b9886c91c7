"""The fronts' JSON reads and writes alike with orjson and with the stdlib fallback."""

from __future__ import annotations

import pytest

from server_plugins.openai import jsonx

PAIRS = [pytest.param(jsonx._std_loads, jsonx._std_dumps, id="stdlib")]
if jsonx.FAST:
    PAIRS.append(pytest.param(jsonx._fast_loads, jsonx._fast_dumps, id="orjson"))


@pytest.mark.parametrize("loads, dumps", PAIRS)
def test_same_documents_same_results(loads, dumps):
    doc = loads(b'{"a": 1, "a": 2, "s": "caf\\u00e9 \\u263a", "f": -0.25, "n": null, "l": [true, 1e-3]}')
    assert doc == {"a": 2, "s": "café ☺", "f": -0.25, "n": None, "l": [True, 0.001]}
    assert loads(dumps(doc)) == doc
    assert b" " not in dumps({"a": [1, 2], "b": {"c": "d"}})  # compact


@pytest.mark.parametrize("loads, dumps", PAIRS)
@pytest.mark.parametrize("raw", [b'{"t": NaN}', b'{"t": Infinity}', b'{"t": -Infinity}', b"{", b"\xff\xfe{}", b""])
def test_what_neither_accepts(loads, dumps, raw):
    with pytest.raises(jsonx.JSONError):
        loads(raw)


@pytest.mark.parametrize("loads, dumps", PAIRS)
def test_odd_values_still_write(loads, dumps):
    assert loads(dumps({"big": 2**70})) == {"big": 2**70}
    assert loads(dumps({"s": "\ud800"})) == {"s": "\ud800"}  # a lone surrogate the input escaped

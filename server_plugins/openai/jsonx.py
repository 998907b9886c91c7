"""JSON for the fronts: orjson when installed (the ``envoy`` and ``serve`` extras bring it), else the stdlib.

Both accept the same documents and read them the same way: NaN and Infinity literals are refused,
duplicate keys keep the last value; output is compact. orjson is about 5x faster to parse
and 15x faster to write a 16 x top-5 completion, which is most of the front's own time per request.
The stdlib path is what a bare install uses and is tested too.
"""

from __future__ import annotations

import json
from typing import Any

try:  # optional accelerator
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


class JSONError(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise JSONError(f"{name} is not a JSON number")


def _std_loads(data: bytes | str) -> Any:
    try:
        return json.loads(data, parse_constant=_no_constant)
    except JSONError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise JSONError(str(e)[:120]) from None


def _std_dumps(doc: Any) -> bytes:
    # ASCII escapes: valid output even for a lone surrogate the input carried as an escape
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _fast_loads(data: bytes | str) -> Any:
    try:
        return _orjson.loads(data)  # type: ignore[union-attr]
    except _orjson.JSONDecodeError:  # type: ignore[union-attr]
        # orjson is stricter (lone surrogate escapes, ints beyond 64 bits): the stdlib decides, so both
        # paths accept exactly the same documents
        return _std_loads(data)


def _fast_dumps(doc: Any) -> bytes:
    try:
        return _orjson.dumps(doc)  # type: ignore[union-attr]
    except TypeError:  # a lone surrogate or an int beyond 64 bits: the stdlib writes them
        return _std_dumps(doc)


loads = _fast_loads if _orjson is not None else _std_loads
dumps = _fast_dumps if _orjson is not None else _std_dumps
FAST = _orjson is not None

"""Returned logprobs in OpenAI JSON <-> the packed [positions x k] arrays Protect takes.

Completions carry ``logprobs: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``;
chat carries ``logprobs: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``.
Both name tokens by their text, not their id: a front without the tokenizer keys the noise by a stable
64-bit hash of the token text (or the id itself for vLLM's ``token_id:N`` form), which is as repeat-stable
as the id. Two ids that decode to the same text get distinct keys by their order in the position.

The JSON is a list of Python objects per position, so reading and writing it loops per position; the
perturbation itself runs vectorized on the arrays. A whole buffered answer in the usual shape skips that:
``scan`` reads its numbers and token keys straight from the bytes (``_lpscan``, C, built at install when a
compiler is there) and ``Scanned.write`` puts the protected numbers back over the same bytes. It hands
anything unusual back (None), and the caller reads that document here, as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from defense.types import Api

from . import jsonx

try:  # optional accelerator (pyproject's ext-modules; an install without a compiler goes without)
    from . import _lpscan
except ImportError:  # pragma: no cover - depends on the build
    _lpscan = None

JSON_NEG_INF = -9999.0  # JSON has no -infinity; vLLM writes a probability of 0 as -9999.0
_MASK63 = (1 << 63) - 1
_ids: dict[str, int] = {}


class UpstreamFormatError(ValueError):
    """The engine's logprobs are not in the shape the API defines: the front refuses to pass them unprotected."""


def token_key(token: str) -> int:
    """A stable non-negative int64 for a token's text: the id of vLLM's ``token_id:N`` form (1 to 18 ASCII
    digits), else a hash of the text."""
    v = _ids.get(token)
    if v is None:
        rest = token[9:]
        if token.startswith("token_id:") and 0 < len(rest) <= 18 and rest.isascii() and rest.isdigit():
            v = int(rest)
        else:
            v = int.from_bytes(hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                               "little") & _MASK63
        if len(_ids) > 200_000:  # vocabularies are ~10^5 tokens; bound the cache against odd inputs
            _ids.clear()
        _ids[token] = v
    return v


def _unique(keys: list[int], texts: list[str]) -> list[int]:
    """Keys for one position's alternatives; two with the same text key apart by their rank too."""
    if len(set(keys)) == len(keys):
        return keys
    seen: set[int] = set()
    out = []
    for j, (k, t) in enumerate(zip(keys, texts, strict=True)):
        if k in seen:
            k = token_key(f"{t}\x00{j}")
        seen.add(k)
        out.append(k)
    return out


_NUMBER_TYPES = frozenset({float, int})
_STR = frozenset({str})
# what each logprobs object holds (OpenAI's and vLLM's shapes): a field the front does not read may carry values
# it never perturbed, so an answer with one (other than null) is refused rather than passed on
_COMPLETION_FIELDS = frozenset({"tokens", "token_logprobs", "top_logprobs", "text_offset"})
_CHAT_FIELDS = frozenset({"content", "refusal"})
_CHAT_ENTRY_FIELDS = frozenset({"token", "logprob", "bytes", "top_logprobs"})
_CHAT_ALT_FIELDS = frozenset({"token", "logprob", "bytes"})


def _only(doc: dict[str, Any], known: frozenset[str], where: str) -> None:
    if doc.keys() <= known:
        return
    extra = sorted(str(k) for k, v in doc.items() if k not in known and v is not None)
    if extra:
        raise UpstreamFormatError(f"{where}: field(s) {', '.join(extra)} not read by the front, whose values "
                                  "would pass unprotected")
_DICT_OR_NONE = frozenset({dict, type(None)})


def _numbers(vs: list[Any], where: str) -> list[Any]:
    # exact types: a JSON true is not a logprob, nor is a string that numpy would happily convert
    if not set(map(type, vs)) <= _NUMBER_TYPES:
        bad = next(v for v in vs if type(v) not in _NUMBER_TYPES)
        raise UpstreamFormatError(f"{where}: expected a number, got {type(bad).__name__}")
    return vs


def _keys(texts: list[str]) -> list[int]:
    out = list(map(_ids.get, texts))
    if None in out:
        out = [token_key(t) for t in texts]
    return out  # type: ignore[return-value]


@dataclass(slots=True)
class Positions:
    """One choice's returned logprobs (a whole body, or one streamed chunk's share)."""

    values: np.ndarray  # [P, K] float32; missing slots 0
    token_ids: np.ndarray  # [P, K] int64; -1 marks a missing alternative
    sampled_ids: np.ndarray  # [P] int64; -1 where the sampled token's value was not returned
    sampled_values: np.ndarray  # [P] float32; -inf where unknown
    doc: dict[str, Any] | None  # the choice's logprobs object, written back in place (None: scanned bytes)
    api: Api
    disclosed: int  # logprob values the client receives: the returned alternatives (token_ids >= 0)
    n_sampled: int  # positions whose sampled token's value is known (sampled_ids >= 0)

    @property
    def n_positions(self) -> int:
        return self.values.shape[0]


def _pack(lens: list[int], ids: list[int], vals: list[Any], sid: list[int], sval: list[Any], doc: dict[str, Any],
          api: Api) -> Positions:
    """Arrays from flat lists: ``lens[i]`` alternatives of position i, in order, in ``ids`` and ``vals``."""
    p = len(lens)
    k = max(lens, default=0)
    if k == 0:  # no alternatives asked (logprobs=0): the sampled token is each position's only one
        lens = [1 if s >= 0 else 0 for s in sid]
        ids = [s for s in sid if s >= 0]
        vals = [v for s, v in zip(sid, sval, strict=True) if s >= 0]
        k = 1 if ids else 0
    n_sampled = p - sid.count(-1)
    if k and len(ids) == p * k:  # the usual case, every position with k alternatives: no padding
        # one array per dtype, split into views: half the numpy calls (each is a few us on a cold cache)
        f = np.array(vals + sval, dtype=np.float32)
        i = np.array(ids + sid, dtype=np.int64)
        n = p * k
        return Positions(f[:n].reshape(p, k), i[:n].reshape(p, k), i[n:], f[n:], doc, api, n, n_sampled)
    else:
        k = max(k, 1)
        values = np.zeros((p, k), dtype=np.float32)
        token_ids = np.full((p, k), -1, dtype=np.int64)
        n = np.asarray(lens, dtype=np.int64)
        rows = np.repeat(np.arange(p), n)
        cols = np.arange(len(ids)) - np.repeat(np.cumsum(n) - n, n)
        token_ids[rows, cols] = ids
        values[rows, cols] = vals
    return Positions(values, token_ids, np.array(sid, dtype=np.int64).reshape(p),
                     np.array(sval, dtype=np.float32).reshape(p), doc, api, len(ids), n_sampled)


def read_completion(doc: dict[str, Any]) -> Positions:
    tokens = doc.get("tokens") or []
    sampled_lp = doc.get("token_logprobs") or []
    tops = doc.get("top_logprobs") or []
    if not isinstance(tokens, list) or not isinstance(sampled_lp, list) or not isinstance(tops, list):
        raise UpstreamFormatError("completion logprobs: tokens, token_logprobs and top_logprobs must be lists")
    # type checks as sets of types (map and set run in C): the response path's loops are most of its cost
    if not set(map(type, tokens)) <= _STR:
        raise UpstreamFormatError("completion logprobs: tokens must be strings")
    p = max(len(tokens), len(tops))
    rows = tops + [None] * (p - len(tops))
    if not set(map(type, rows)) <= _DICT_OR_NONE:
        raise UpstreamFormatError("completion logprobs: each top_logprobs entry must be an object or null")
    full = [d for d in rows if d]
    lens = list(map(len, rows)) if len(full) == p else [len(d) if d else 0 for d in rows]
    # an object's keys are distinct texts, so distinct keys: no de-duplication needed here
    ids = _keys(list(chain.from_iterable(full)))
    vals = _numbers(list(chain.from_iterable(map(dict.values, full))), "top_logprobs")
    if len(tokens) == p == len(sampled_lp) and None not in sampled_lp:
        sid, sval = _keys(tokens), _numbers(sampled_lp, "token_logprobs")
    else:  # echoed prompt tokens (the first has no logprob) or ragged lists
        sid, sval = [], []
        for i in range(p):
            t = tokens[i] if i < len(tokens) else None
            v = sampled_lp[i] if i < len(sampled_lp) else None
            if t is not None and v is not None:
                sid.append(token_key(t))
                sval.append(_numbers([v], f"token_logprobs[{i}]")[0])
            else:
                sid.append(-1)
                sval.append(-np.inf)
    return _pack(lens, ids, vals, sid, sval, doc, Api.OPENAI_COMPLETIONS)


def read_chat(doc: dict[str, Any]) -> Positions:
    content = doc.get("content") or []
    if not isinstance(content, list):
        raise UpstreamFormatError("chat logprobs: content must be a list")
    lens: list[int] = []
    ids: list[int] = []
    texts_all: list[str] = []
    alts_all: list[Any] = []
    for i, entry in enumerate(content):
        if type(entry) is not dict or type(entry.get("token")) is not str:
            raise UpstreamFormatError(f"chat logprobs: content[{i}] must be an object with a string token")
        if not entry.keys() <= _CHAT_ENTRY_FIELDS:
            _only(entry, _CHAT_ENTRY_FIELDS, f"chat logprobs: content[{i}]")
        alts = entry.get("top_logprobs") or []
        # the fields' check rides on the type check's pass (a pass of its own added ~25% to this read)
        if type(alts) is not list or not all(type(a) is dict and type(a.get("token")) is str
                                             and a.keys() <= _CHAT_ALT_FIELDS for a in alts):
            if type(alts) is not list or not all(type(a) is dict and type(a.get("token")) is str for a in alts):
                raise UpstreamFormatError(f"chat logprobs: content[{i}].top_logprobs must be a list of objects "
                                          f"with a string token")
            for j, a in enumerate(alts):
                _only(a, _CHAT_ALT_FIELDS, f"chat logprobs: content[{i}].top_logprobs[{j}]")
        texts = [a["token"] for a in alts]
        ids += _unique(_keys(texts), texts)  # one text can stand for two ids (byte fallback)
        lens.append(len(alts))
        texts_all.append(entry["token"])
        alts_all += alts
    vals = _numbers([a.get("logprob") for a in alts_all], "content[].top_logprobs")
    sval = _numbers([e.get("logprob") for e in content], "content[].logprob")
    return _pack(lens, ids, vals, _keys(texts_all), sval, doc, Api.OPENAI_CHAT)


def read(api: Api, doc: Any) -> Positions | None:
    """The positions in a choice's ``logprobs`` object; None when it has none."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise UpstreamFormatError("logprobs must be an object or null")
    if api is Api.OPENAI_CHAT:
        _only(doc, _CHAT_FIELDS, "chat logprobs")
        if doc.get("refusal"):  # never produced by vLLM; dropped rather than passed unprotected
            doc["refusal"] = None
        pos = read_chat(doc)
    else:
        _only(doc, _COMPLETION_FIELDS, "completion logprobs")
        pos = read_completion(doc)
    # nothing returned to perturb (only echoed prompt tokens without logprobs): nothing to protect
    return pos if pos.n_positions and pos.disclosed else None


@dataclass(slots=True)
class Scanned:
    """A buffered answer read from its bytes: each choice's positions (None when it returned none) and text
    length, the integer members of ``usage``; ``write`` gives the bytes with protected numbers."""

    data: bytes
    positions: list[Positions | None]
    chars: list[int]  # characters of each choice's text (completions: text; chat: message.content)
    usage: dict[str, int]
    _spans: bytes
    _first: list[int]  # each choice's first span: its [p x k] alternatives, then its p sampled values

    def write(self, protected: list[tuple[np.ndarray, np.ndarray | None] | None]) -> bytes:
        """The body with each choice's protected (values, sampled values) written over the returned ones.

        A defense that returns fewer alternatives than the engine did (``top_k_cap``) leaves numbers with
        no new value to take their place: then the document is parsed and written as ``write`` does it
        (the alternatives past the new k are dropped), never spliced with the clean numbers left in."""
        segments = []
        for first, pos, new in zip(self._first, self.positions, protected, strict=True):
            if pos is None or new is None:
                continue
            values, sampled = new
            if np.shape(values) != pos.values.shape or (sampled is not None and np.size(sampled) != pos.n_positions):
                return self._rewrite(protected)
            segments.append((first, np.ascontiguousarray(values, dtype=np.float64).ravel()))
            if sampled is not None:
                segments.append((first + pos.disclosed, np.ascontiguousarray(sampled, dtype=np.float64).ravel()))
        return _lpscan.splice(self.data, self._spans, segments) if segments else self.data

    def _rewrite(self, protected: list[tuple[np.ndarray, np.ndarray | None] | None]) -> bytes:
        doc = jsonx.loads(self.data)
        for c, pos, new in zip(doc.get("choices") or [], self.positions, protected, strict=True):
            if pos is not None and new is not None:
                parsed = read(pos.api, c.get("logprobs"))  # the same positions: the reader agrees with scan
                assert parsed is not None  # noqa: S101
                write(parsed, new[0], new[1])
        return jsonx.dumps(doc)


def scan(api: Api, data: bytes) -> Scanned | None:
    """The usual buffered answer read from its bytes; None when ``_lpscan`` is not built or the body is not
    in the shape it takes (the caller then parses it: the reference decides errors and odd shapes)."""
    if _lpscan is None:
        return None
    got = _lpscan.scan(data, api is Api.OPENAI_CHAT)
    if got is None:
        return None
    choices, usage, spans = got
    positions: list[Positions | None] = []
    chars, first, at = [], [], 0
    for p, k, floats, keys, n_chars in choices:
        chars.append(n_chars)
        first.append(at)
        if not p:
            positions.append(None)
            continue
        n = p * k
        f = np.frombuffer(floats, dtype=np.float32)
        i = np.frombuffer(keys, dtype=np.int64)
        positions.append(Positions(f[:n].reshape(p, k), i[:n].reshape(p, k), i[n:], f[n:], None, api, n, p))
        at += n + p
    return Scanned(data, positions, chars, usage, spans, first)


def _json_floats(a: np.ndarray) -> list[Any]:
    """float32 values as short JSON numbers: 7 decimals (float32 holds about 7 significant digits, so nothing
    is lost), which also keeps the encoder off 17-digit reprs; -inf (probability 0) as vLLM's -9999.0."""
    x = np.maximum(a, JSON_NEG_INF, dtype=np.float64)  # widened and floored in one pass
    return x.round(7, out=x).tolist()


def write(pos: Positions, values: np.ndarray, sampled_values: np.ndarray | None) -> None:
    """Write protected values back into the JSON, in place: same tokens, same order, new numbers."""
    p, k = values.shape
    if sampled_values is None:
        flat, sv = _json_floats(values.ravel()), None
    else:  # one conversion for both
        flat = _json_floats(np.concatenate((values.ravel(), sampled_values)))
        sv = flat[p * k:]
    vals = [flat[i * k:(i + 1) * k] for i in range(p)]
    doc = pos.doc
    assert doc is not None  # noqa: S101 - scanned positions are written by Scanned.write
    if pos.api is Api.OPENAI_CHAT:
        for i, entry in enumerate(doc.get("content") or []):
            if sv is not None:
                entry["logprob"] = sv[i]
            row = vals[i]
            alts = entry.get("top_logprobs") or []
            if len(alts) > k:  # a defense returned fewer alternatives (top_k_cap): the rest are dropped
                del alts[k:]
            for j, a in enumerate(alts):
                a["logprob"] = row[j]
        return
    tops = doc.get("top_logprobs") or []
    for i, d in enumerate(tops):
        if d:
            tops[i] = dict(zip(d, vals[i], strict=False))
    if sv is not None:
        lps = doc.get("token_logprobs") or []
        n = min(len(lps), p)
        if pos.n_sampled == p:  # every position's sampled value is known (no echoed prompt tokens)
            lps[:n] = sv[:n]
        else:
            known = (pos.sampled_ids >= 0).tolist()
            for i in range(n):
                if known[i]:
                    lps[i] = sv[i]

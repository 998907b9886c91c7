"""The canonical context that keys perturbation noise: one function every path calls.

The same prompt must key the same noise whatever front it came through and however it was spaced or
cased, or an attacker averages noise away over trivial variants. Canonical text is Unicode NFKC,
case-folded, with whitespace runs collapsed; chat is each message's role and content canonicalized and
joined; token-id and tensor prompts are keyed by their exact bytes. Sampling parameters (temperature,
seed, ...) are deliberately not part of it.
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata

from .types import Prompt

_VERSION = b"distillguard-ctx-v1"
# separators between chat messages and between role and content: both count as whitespace, so canonical
# text never contains them and the joined form is unambiguous
_RS, _US = "\x1e", "\x1f"


def canonical_text(text: str) -> str:
    # str.split() splits on exactly the characters re's \s matches (str.isspace), and is 3x faster
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def canonical_prompt(prompt: Prompt) -> tuple[bytes, bytes]:
    """(form tag, canonical bytes) of a prompt."""
    if prompt.text is not None:
        return b"text", canonical_text(prompt.text).encode()
    if prompt.chat is not None:
        parts = [canonical_text(m.role) + _US + canonical_text(m.content) for m in prompt.chat]
        return b"chat", _RS.join(parts).encode()
    if prompt.token_ids is not None:
        return b"ids", struct.pack(f"<{len(prompt.token_ids)}q", *prompt.token_ids)
    if prompt.tensor_bytes is not None:
        return b"tensor", prompt.tensor_bytes
    return b"none", b""


def context_digest(model: str, prompt: Prompt) -> bytes:
    """32-byte SHA-256 over the model and canonical prompt, length-framed so fields cannot run together."""
    tag, body = canonical_prompt(prompt)
    head = _HEADS.get((model, tag))
    if head is None:  # the version, model and form framing: the same for every request of a model
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        name = canonical_text(model).encode()
        head = _HEADS[(model, tag)] = b"".join((_VERSION, _LEN(len(name)), name, _LEN(len(tag)), tag))
    if len(body) <= _JOIN_MAX:
        return hashlib.sha256(head + _LEN(len(body)) + body).digest()
    h = hashlib.sha256(head)  # a large tensor is hashed where it lies, not copied into one buffer
    h.update(_LEN(len(body)))
    h.update(body)
    return h.digest()


_LEN = struct.Struct("<Q").pack
_HEADS: dict[tuple[str, bytes], bytes] = {}
_HEADS_MAX = 1024
_JOIN_MAX = 1 << 16

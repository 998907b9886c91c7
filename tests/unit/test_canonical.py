"""The context digest keys every perturbation: its bytes are pinned, so noise stays the same across versions,
replicas and restarts (a change would hand a distiller two draws of the noise for every prompt)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from defense.canonical import context_digest
from defense.types import ChatMessage, Prompt

PINNED = [
    ("Tiny-Model", Prompt(text="Hello  World"), "863bdc02e23256659bd3d8492728400a69852758d7fb39f5e5c2e08b42b6aea9"),
    ("mlp", Prompt(tensor_bytes=bytes(range(40))), "797527cc2e40b619ae08987bea185cecedce9f7562d313d814f771cfbe9f6c6d"),
    ("m", Prompt(token_ids=(1, 2, 3)), "0559610cb5b983ffbe313a2af8e6d495f57a8b71bca7a1ed1bceab62c7e365a4"),
    ("m", Prompt(chat=(ChatMessage("user", "Hi there"),)), "87f6296e6c1553e3b46e0a460273d1e9bbd3603b5d7949eaf8023b017fa85114"),
]


@pytest.mark.parametrize("model, prompt, digest", PINNED)
def test_context_digest_bytes_are_pinned(model, prompt, digest):
    for _ in range(2):  # the first call and a cached one
        assert context_digest(model, prompt).hex() == digest


def test_context_digest_is_the_documented_framing():
    """SHA-256 over version, then model, form tag and canonical body, each length-prefixed (u64 LE)."""
    def framed(*parts: bytes) -> bytes:
        return b"".join(struct.pack("<Q", len(p)) + p for p in parts)

    body = bytes(range(256)) * 300  # a large tensor goes through the same framing
    want = hashlib.sha256(b"distillguard-ctx-v1" + framed(b"mlp", b"tensor", body)).digest()
    assert context_digest("mlp", Prompt(tensor_bytes=body)) == want
    assert context_digest("MLP", Prompt(tensor_bytes=body)) == want  # model names are canonical text too
    assert context_digest("mlp2", Prompt(tensor_bytes=body)) != want
    assert context_digest("mlp", Prompt(text="x")) == hashlib.sha256(
        b"distillguard-ctx-v1" + framed(b"mlp", b"text", b"x")).digest()

"""Helpers for the watermark tests: fixed keys, one torch thread, watermarked streams from random logits."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import yaml

from defense.keys import KeyRing


def write_fixed_key_file(path: Path, n: int = 1, *, tag: str = "wm", retired: int = 0) -> Path:
    """A key file with n keys whose secrets depend only on ``tag`` (the first ``retired`` retired): tests
    whose statistics must come out the same on every run (a fresh key redraws every green list)."""
    keys = [{"id": f"k-{tag}-{i}", "status": "retired" if i < retired else "active",
             "secret": base64.b64encode(hashlib.sha256(f"distillguard-test/{tag}/{i}".encode()).digest()).decode()}
            for i in range(n)]
    path.write_text(yaml.safe_dump({"version": 1, "keys": keys}))
    os.chmod(path, 0o600)
    return path


def fixed_ring(folder: Path, n: int = 1, *, tag: str = "wm", retired: int = 0) -> KeyRing:
    """``write_fixed_key_file``'s keys, loaded."""
    return KeyRing.load(write_fixed_key_file(folder / f"keys-{tag}-{n}-{retired}.yaml", n, tag=tag, retired=retired))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sample_streams(defense, n, length, vocab, seed=0):
    """Watermarked streams from a random 'model' (fresh random logits each step), prompt left out."""
    import torch

    from defense.types import RequestContext

    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(vocab, (n, 1), generator=g)
    cs = [RequestContext(request_id=f"r{i}", client_id="c") for i in range(n)]
    for _ in range(length):
        out = defense.process_logits(torch.randn(n, vocab, generator=g) * 2, seqs, cs)
        seqs = torch.cat([seqs, torch.multinomial(torch.softmax(out, 1), 1, generator=g)], 1)
    return seqs[:, 1:].numpy()

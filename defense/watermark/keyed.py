"""The watermark's keyed function: (key, previous h tokens, token) -> 64-bit hash, on numpy or torch.

The embedders (green list, Gumbel) and the detectors call only this module, so they cannot drift
apart. Everything is ``defense.prf`` integer hashing, so a token's hash is the same on numpy, torch
CPU and torch CUDA, and independent of any global RNG.

Two ways to seed from the context window ``x[t-h:t]`` (``h`` = ``context``, 1..4):

- ``lefthash``: one hash of the key and the h context tokens in order, then of the token:
  ``hash_combine(K, x[t-h], ..., x[t-1], v)``. The context part is per row, so a sampler step costs
  one mix per (row, vocabulary entry).
- ``selfhash``: anchored min-hash, with the candidate token in the seed. Each context token is
  hashed together with the candidate (``hash_combine(hash_combine(K, v), x[t-i])``), the minimum over
  the window is the seed, and the token is hashed once more with it. Editing a context token that is
  not the minimum leaves the seed unchanged, which is what makes larger h robust to edits; the price
  is h + 1 mixes per (row, vocabulary entry).

A token is green when the low 24 bits of its hash fall below ``round(gamma * 2**24)``: an integer
compare, so CPU and GPU masks are equal bit for bit. The Gumbel scheme reads a uniform in (0, 1)
from the low 23 bits: ``(2k + 1) / 2**24`` is exact in float32, so it is the same number everywhere.

Windows may hold -1 for positions before the start of a sequence (a prefix shorter than h); it is
hashed like any other id, and detectors never score such positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import prf

__all__ = [
    "GREEN_BITS",
    "HASHINGS",
    "MAX_CONTEXT",
    "SCHEMES",
    "green",
    "green_threshold",
    "row_seeds",
    "scheme_seed",
    "token_hashes",
    "uniform",
]

SCHEMES = ("kgw", "gumbel")
HASHINGS = ("lefthash", "selfhash")
MAX_CONTEXT = 4
GREEN_BITS = 24
_GREEN_MASK = (1 << GREEN_BITS) - 1
_UNIFORM_BITS = 23
_UNIFORM_MASK = (1 << _UNIFORM_BITS) - 1
_UNIFORM_SCALE = 2.0 ** -(_UNIFORM_BITS + 1)


def check_seeding(context: int, hashing: str) -> None:
    """The one validation of a seeding scheme, shared by every Params class that names one."""
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= MAX_CONTEXT:
        raise ValueError(f"context (h, the previous tokens that seed the PRF) must be an int in 1..{MAX_CONTEXT}, "
                         f"got {context!r}")
    if hashing not in HASHINGS:
        raise ValueError(f"hashing must be one of {', '.join(HASHINGS)}, got {hashing!r}")


def scheme_seed(key: bytes, scheme: str, context: int, hashing: str) -> int:
    """The int64 seed of one derived watermark key, bound to the scheme and its seeding.

    Binding the seeding into the seed means two configs never share green lists by accident: a
    detector run with the wrong h finds nothing instead of a diluted signal.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    check_seeding(context, hashing)
    return prf.key_seed(key, b"distillguard/watermark/v1", scheme.encode(), hashing.encode(), bytes([context]))


def green_threshold(gamma: float) -> int:
    """The integer threshold on the low 24 bits; the exact green probability is ``threshold / 2**24``."""
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma (the green fraction) must be in (0, 1), got {gamma}")
    thr = round(gamma * (1 << GREEN_BITS))
    return min(max(thr, 1), (1 << GREEN_BITS) - 1)


def _columns(windows: Any) -> list[Any]:
    return [windows[..., i] for i in range(windows.shape[-1])]


def row_seeds(seed: Any, windows: Any) -> Any:
    """lefthash's per-context seed: ``hash_combine(seed, x[t-h], ..., x[t-1])``, shape ``windows.shape[:-1]``."""
    return prf.hash_combine(seed, *_columns(windows))


def token_hashes(seed: Any, windows: Any, tokens: Any, hashing: str) -> Any:
    """Hashes of ``tokens`` after ``windows``; ``seed`` an int or an int64 array (one key per element).

    ``windows`` is int64 ``[..., h]`` (the context, oldest first) and ``tokens`` int64 broadcastable
    against ``windows[..., 0]`` and ``seed``. A sampler passes windows ``[B, 1, h]`` and the vocabulary
    ``[V]`` to get ``[B, V]``; a detector passes windows ``[N, h]`` and tokens ``[N]``.
    """
    if hashing == "lefthash":
        return prf.hash_combine(row_seeds(seed, windows), tokens)
    if hashing != "selfhash":
        raise ValueError(f"hashing must be one of {', '.join(HASHINGS)}, got {hashing!r}")
    anchor = prf.hash_combine(seed, tokens)  # the candidate token, keyed
    low = None
    for col in _columns(windows):
        h = prf.hash_combine(anchor, col)
        if low is None:
            low = h
        elif prf._is_torch(h):
            import torch

            low = torch.minimum(low, h)
        else:
            low = np.minimum(low, h)
    return prf.hash_combine(low, tokens)


def green(h: Any, threshold: int) -> Any:
    """Boolean green mask from hashes (integer compare: bit-identical on every device)."""
    return (h & _GREEN_MASK) < threshold


def uniform(h: Any, *, dtype: Any = None) -> Any:
    """A uniform in (0, 1), never 0 or 1, from the low 23 bits of each hash (exact in float32)."""
    bits = h & _UNIFORM_MASK
    if prf._is_torch(h):
        import torch

        return (bits * 2 + 1).to(dtype or torch.float32) * _UNIFORM_SCALE
    return (bits * 2 + 1).astype(dtype or np.float64) * _UNIFORM_SCALE

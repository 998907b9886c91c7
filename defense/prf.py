"""The keyed pseudorandom function every defense draws from: integer hashing, identical on numpy, torch
CPU and torch CUDA.

Perturbation noise and watermark green lists must be the same for the same (key, context, position,
token) wherever they are computed, and independent of any global RNG: seeding torch.Generator per row
neither vectorizes nor matches across devices. So everything here is splitmix64's finalizer on int64
arrays. Both numpy and torch wrap int64 multiplication modulo 2**64 (two's complement), so a product
gives the same bits as unsigned arithmetic; right shifts on int64 are arithmetic, so ``_srl`` masks
them into logical shifts. Floats are made from the top bits only at the end.

Functions take and return arrays of one library (numpy ``ndarray`` or ``torch.Tensor``, int64) and
broadcast like their operands.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["hash_combine", "key_seed", "mix64", "normal", "seed_from_bytes", "uniform"]

_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_C1 = _signed(0xBF58476D1CE4E5B9)
_C2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)  # 2**64 / phi: spreads consecutive inputs across the word
_C1_U, _C2_U, _GOLDEN_NP = np.uint64(_C1 & _M64), np.uint64(_C2 & _M64), np.int64(_GOLDEN)
_S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)
_GOLDEN_U = np.uint64(_GOLDEN & _M64)
_LOW24 = float(2**-24)
_LOW53 = float(2**-53)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _srl(x: Any, s: int) -> Any:
    """Logical right shift of int64 by ``s`` (1 <= s <= 63)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64_np(x: np.ndarray) -> np.ndarray:
    # in place on an unsigned copy: logical shifts and wrapping products with no masks, a handful of calls
    # on the hot path (a [16, 5] response pays for the calls, not the arithmetic). Arrays wrap silently;
    # a 0-d input goes through as a 1-element array, so numpy's scalar overflow warning never fires.
    if x.ndim == 0:
        return _mix64_np(x.reshape(1))[0]
    u = x.astype(np.uint64)
    u ^= u >> _S30
    u *= _C1_U
    u ^= u >> _S27
    u *= _C2_U
    u ^= u >> _S31
    return u.view(np.int64)


def mix64(x: Any) -> Any:
    """splitmix64's finalizer: a bijection on 64-bit words with full avalanche. int64 in, int64 out."""
    if not _is_torch(x):
        return _mix64_np(np.asarray(x, dtype=np.int64))
    x = (x ^ _srl(x, 30)) * _C1
    x = (x ^ _srl(x, 27)) * _C2
    return x ^ _srl(x, 31)


def hash_combine(seed: Any, *parts: Any) -> Any:
    """Hash of ``seed`` then each part in order (order matters); parts broadcast against each other.

    ``seed`` is an int (a key seed) or an array; each part an int array (token ids, positions, ...).
    """
    h = seed
    for part in parts:
        if _is_torch(part):
            h = mix64(part * _GOLDEN + h)
            continue
        p = np.asarray(part, dtype=np.int64)
        hh = np.asarray(h, dtype=np.int64)
        if p.ndim == 0 and hh.ndim == 0:
            with np.errstate(over="ignore"):
                h = mix64(p * _GOLDEN_NP + hh)
        else:
            h = _mix64_np(p * _GOLDEN_NP + hh)
    return h if parts else mix64(h)


def uniform(h: Any, *, dtype: Any = None) -> Any:
    """Floats in [0, 1) from hashes. float32 uses the top 24 bits (exact on every device); float64 53."""
    if _is_torch(h):
        import torch

        dtype = dtype or torch.float32
        if dtype == torch.float64:
            return _srl(h, 11).to(torch.float64) * _LOW53
        return _srl(h, 40).to(dtype) * _LOW24
    if dtype is not None and np.dtype(dtype) == np.float32:
        return (_srl(h, 40).astype(np.float32) * np.float32(_LOW24)).astype(np.float32)
    return _srl(h, 11).astype(np.float64) * _LOW53


def normal(h: Any, *, dtype: Any = None) -> Any:
    """Standard normal draws from hashes (Box-Muller on two independent halves of a rehash)."""
    if not _is_torch(h):
        out = _normal_np(np.asarray(h, dtype=np.int64))
        return out.astype(dtype) if dtype is not None else out
    import torch

    h2 = mix64(h ^ _GOLDEN)
    dtype = dtype or torch.float32
    u1 = 1.0 - uniform(h, dtype=torch.float64)  # (0, 1]: log is finite
    u2 = uniform(h2, dtype=torch.float64)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * np.pi * u2)).to(dtype)


def _normal_np(h: np.ndarray) -> np.ndarray:
    # the same arithmetic as the torch branch, in place on unsigned words (a logical shift needs no mask)
    # and on the float buffers: the ufunc calls, not the math, are the cost on a [16, 5] response
    if h.ndim == 0:
        return _normal_np(h.reshape(1))[0]
    u = h.view(np.uint64)
    h2 = u ^ _GOLDEN_U
    h2 ^= h2 >> _S30
    h2 *= _C1_U
    h2 ^= h2 >> _S27
    h2 *= _C2_U
    h2 ^= h2 >> _S31
    u1 = (u >> _S11).astype(np.float64)
    u1 *= _LOW53
    np.subtract(1.0, u1, out=u1)  # (0, 1]: log is finite
    np.log(u1, out=u1)
    u1 *= -2.0
    np.sqrt(u1, out=u1)
    h2 >>= _S11
    u2 = h2.astype(np.float64)
    u2 *= _LOW53
    u2 *= 2.0 * np.pi
    np.cos(u2, out=u2)
    u1 *= u2
    return u1


def seed_from_bytes(b: bytes) -> int:
    """An int64 seed from the first 8 bytes of a key or digest (little-endian, signed)."""
    if len(b) < 8:
        raise ValueError(f"need at least 8 bytes for a seed, got {len(b)}")
    return int.from_bytes(b[:8], "little", signed=True)


def key_seed(key: bytes, *parts: bytes) -> int:
    """A seed bound to a derived key and byte strings (model, context digest, ...): SHA-256 over the key,
    then each part after its length (8 bytes, little-endian), hashed as one buffer."""
    buf = [key]
    for p in parts:
        buf += (len(p).to_bytes(8, "little"), p)
    return seed_from_bytes(hashlib.sha256(b"".join(buf)).digest())

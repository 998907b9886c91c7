"""The per-step [B, V] work of the embedders, in torch: hashes, green bias, Gumbel choice.

The hashes are ``keyed.token_hashes`` computed with in-place int64 ops (a fresh [B, V] int64
temporary per op costs three times as much on CPU as the arithmetic). ``Kernel`` optionally runs a
step through ``torch.compile`` (inductor), which fuses the hash, the compare and the add into one
pass over the logits; when compiling fails (no C compiler, an unsupported device) it logs once and
stays eager, so a fused config never takes a server down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import prf
from .keyed import _GREEN_MASK, _UNIFORM_MASK, _UNIFORM_SCALE

if TYPE_CHECKING:
    import torch

log = logging.getLogger("distillguard.watermark")

_SHIFTS = ((30, prf._C1), (27, prf._C2), (31, None))


def _mix_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``prf.mix64`` in place on ``x`` (int64), using ``tmp`` (same shape) as scratch."""
    import torch

    for shift, mult in _SHIFTS:
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp &= (1 << (64 - shift)) - 1  # arithmetic shift -> logical shift
        x ^= tmp
        if mult is not None:
            x *= mult
    return x


def _combine(seed: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``prf.hash_combine(seed, part)`` for broadcasting int64 tensors, into a fresh tensor."""
    import torch

    x = part * prf._GOLDEN + seed
    return _mix_(x, torch.empty_like(x))


def vocab_hashes(seed: torch.Tensor, windows: torch.Tensor, vocab: torch.Tensor, hashing: str) -> torch.Tensor:
    """``[B, V]`` int64 hashes of every vocabulary entry after each row's window.

    ``seed``: int64 ``[]`` (one key) or ``[B, 1]`` (a key per row); ``windows``: ``[B, h]``;
    ``vocab``: ``[V]``. Equal to ``keyed.token_hashes(seed, windows[:, None, :], vocab, hashing)``.
    """
    import torch

    if hashing == "lefthash":
        rows = seed.reshape(-1, 1) if seed.ndim else seed
        for i in range(windows.shape[1]):  # h <= 4 columns, not rows
            rows = _combine(rows, windows[:, i : i + 1])
        return _combine(rows.reshape(-1, 1), vocab)
    anchor = _combine(seed.reshape(-1, 1) if seed.ndim else seed, vocab)  # [V] or [B, V]
    low: torch.Tensor | None = None
    tmp: torch.Tensor | None = None
    for i in range(windows.shape[1]):
        x = windows[:, i : i + 1] * prf._GOLDEN + anchor  # [B, V]
        if tmp is None:
            tmp = torch.empty_like(x)
        _mix_(x, tmp)
        low = x if low is None else torch.minimum(low, x, out=low)
    assert low is not None and tmp is not None  # noqa: S101 - h >= 1 is validated at construction
    low += vocab * prf._GOLDEN
    return _mix_(low, tmp)


def green_bias(logits: torch.Tensor, seed: torch.Tensor, windows: torch.Tensor, vocab: torch.Tensor,
               delta: torch.Tensor, *, threshold: int, hashing: str) -> torch.Tensor:
    """logits + delta_row on green tokens. ``delta``: ``[B, 1]`` float (0 for rows left alone)."""
    h = vocab_hashes(seed, windows, vocab, hashing)
    h &= _GREEN_MASK
    return logits + (h < threshold).to(logits.dtype) * delta


def gumbel_choice(logits: torch.Tensor, seed: torch.Tensor, windows: torch.Tensor, vocab: torch.Tensor,
                  inv_temp: torch.Tensor, *, hashing: str) -> torch.Tensor:
    """``[B]`` argmax of logits / T + Gumbel(u), u the keyed uniform: the Gumbel-max (Aaronson) choice.

    Equivalent to argmax u ** (1 / p): the choice is a deterministic function of key and context, and
    over keys it is distributed exactly as sampling from softmax(logits / T).
    """
    import torch

    h = vocab_hashes(seed, windows, vocab, hashing)
    h &= _UNIFORM_MASK
    u = (h * 2 + 1).to(torch.float32) * _UNIFORM_SCALE
    gumbel = -torch.log(-torch.log(u))
    return torch.argmax(logits.float() * inv_temp + gumbel, dim=1)


def gumbel_step(logits: torch.Tensor, seed: torch.Tensor, windows: torch.Tensor, vocab: torch.Tensor,
                temps: torch.Tensor, repeated: torch.Tensor | None, *, hashing: str) -> torch.Tensor:
    """``[B, V]`` logits after a Gumbel-max step: each row one-hot at its keyed choice (0 there, -inf
    elsewhere), except greedy rows (``temps`` <= 0) and rows whose context ``repeated``, left as they came.
    One function, so a fused step is the choice's reduction and one pass that writes the result."""
    import torch

    greedy = temps <= 0
    inv_temp = torch.where(greedy, 1.0, 1.0 / temps.clamp_min(1e-6)).reshape(-1, 1)
    leave = greedy if repeated is None else greedy | repeated
    choice = gumbel_choice(logits, seed, windows, vocab, inv_temp, hashing=hashing).reshape(-1, 1)
    if torch.compiler.is_compiling():  # fused into the pass below: no [B, V] tensor of its own
        onehot = torch.where(vocab == choice, 0.0, float("-inf")).to(logits.dtype)
    else:  # eager: a fill and a scatter cost less than a [B, V] compare
        onehot = torch.full_like(logits, float("-inf")).scatter_(1, choice, 0.0)
    return torch.where(leave.reshape(-1, 1), logits, onehot)


class Kernel:
    """A step function, eager or compiled by inductor (``fused``), falling back to eager on failure."""

    def __init__(self, fn: Callable[..., Any], *, fused: bool) -> None:
        self.fn = fn
        self.fused = fused
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fused:
            try:
                if self._compiled is None:
                    import torch

                    self._compiled = torch.compile(self.fn, dynamic=None)
                return self._compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - compiling is an optimization, never a failure
                log.warning("watermark: torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
                self.fused = False
        return self.fn(*args, **kwargs)

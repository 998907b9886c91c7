"""What seeds the PRF at a decode step: the last h tokens of each row's prefix, as one int64 tensor.

Exactly these tokens seed the embedder, and the detectors mirror it: the token at position t of a
sequence is hashed with ``x[t-h:t]``. A prefix shorter than h is padded on the left with -1; the
detectors never score those first positions, because they cannot know the prompt that preceded them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PAD = -1


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def last_windows(prefixes: Any, h: int, *, batch: int, device: torch.device) -> torch.Tensor:
    """``[B, h]`` int64 on ``device``: the last h tokens of each prefix, oldest first, -1 where missing.

    ``prefixes`` is a ``[B, L]`` integer tensor (what engines hold; no Python work per row) or B
    sequences of ints (one list comprehension over rows, one host-to-device copy per step).
    """
    import torch

    if _is_tensor(prefixes):
        if prefixes.ndim != 2 or prefixes.shape[0] != batch:
            raise ValueError(f"prefixes must be a [B, L] tensor with B={batch}, got shape {tuple(prefixes.shape)}")
        tail = prefixes[:, -h:].to(device=device, dtype=torch.int64)
        if tail.shape[1] < h:
            tail = torch.nn.functional.pad(tail, (h - tail.shape[1], 0), value=PAD)
        return tail
    if len(prefixes) != batch:
        raise ValueError(f"got {len(prefixes)} prefixes for {batch} rows of logits")
    rows = [_tail(p, h) for p in prefixes]
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def _tail(prefix: Sequence[int], h: int) -> list[int]:
    tail = [int(t) for t in prefix[-h:]] if len(prefix) else []
    return [PAD] * (h - len(tail)) + tail


def padded(prefixes: Any, *, batch: int, device: torch.device) -> torch.Tensor:
    """``[B, L]`` int64: whole prefixes, left-padded with -1 to the longest (for repeated-context checks)."""
    import torch

    if _is_tensor(prefixes):
        return prefixes.to(device=device, dtype=torch.int64)
    if len(prefixes) != batch:
        raise ValueError(f"got {len(prefixes)} prefixes for {batch} rows of logits")
    width = max((len(p) for p in prefixes), default=0)
    rows = [[PAD] * (width - len(p)) + [int(t) for t in p] for p in prefixes]
    return torch.tensor(rows, dtype=torch.int64).reshape(batch, width).to(device, non_blocking=True)


def repeated_context(full: torch.Tensor, h: int) -> torch.Tensor:
    """``[B]`` bool: the row's current context (its last h tokens) already occurred earlier in the row.

    Used by the Gumbel scheme to leave such steps unwatermarked: with a deterministic choice per
    context, a repeated context would otherwise repeat the same token and loop. Vectorized over rows
    and positions (one compare per window); windows touching the -1 padding never match.
    """
    import torch

    b, length = full.shape
    if length <= h:
        return torch.zeros(b, dtype=torch.bool, device=full.device)
    windows = full.unfold(1, h, 1)  # [B, L-h+1, h]; the last one is the current context
    current = windows[:, -1:, :]
    same = (windows[:, :-1, :] == current).all(dim=2) & (windows[:, :-1, :] != PAD).all(dim=2)
    return same.any(dim=1) & (current != PAD).all(dim=2).squeeze(1)

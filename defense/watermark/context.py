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


def _ints(tokens: Any) -> list[int]:
    """A list of Python ints: what V1's lists already are; anything else (a tensor or array row, numpy
    ints) is converted, so windows hash and compare by value."""
    if tokens.__class__ is list and (not tokens or tokens[0].__class__ is int):
        return tokens
    return [int(t) for t in tokens]


def _tail(prefix: Sequence[int], h: int) -> list[int]:
    tail = prefix[-h:]
    if tail.__class__ is list and len(tail) == h:  # the usual row: a list of ids (V1's live lists) as it is
        return tail
    tail = [int(t) for t in tail]
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


class RepeatedContexts:
    """``repeated_context`` for prefixes held on the host (vLLM V1's live token lists), read incrementally.

    Each row's windows seen so far are kept between steps, so a step reads only the tokens added since the
    last one: O(new tokens) per row rather than the O(prefix length) of building a padded [B, L] tensor
    every step, which grows with every generated token.

    A row is known by its prefix object (V1 keeps one ``TokenView`` per request while it is in the batch),
    held here so its id cannot pass to another; a new object (a fresh list each step) is read in full.
    A prefix that is not the continuation of what was read (shorter, or another token where the last
    window read ended) is read again from its start. Rows not in a step are let go once more than twice
    the batch are held.
    """

    def __init__(self, h: int) -> None:
        self.h = h
        # id(prefix) -> [prefix, windows starting before `start`, start, the window at start - 1 or None]
        self._rows: dict[int, list[Any]] = {}

    def __call__(self, prefixes: Sequence[Sequence[int]]) -> tuple[list[bool], list[Any]]:
        """(whether each row's current context occurred earlier in it, each row's current context: its
        last h tokens, -1 where missing, as ``last_windows`` reads them)."""
        h = self.h
        rows = self._rows
        out = []
        windows = []
        for p in prefixes:
            n = len(p)
            end = n - h  # the current context starts here; earlier windows start at 0 .. end - 1
            if end <= 0:
                out.append(False)
                windows.append(_tail(p, h))
                continue
            st = rows.get(id(p))
            if st is not None and st[0] is p and st[2] <= end:
                start = st[2]
                base = start - 1 if start else 0
                toks = _ints(p[base:n])  # one read: the window read last, the new windows, the current context
                if start and tuple(toks[:h]) != st[3]:
                    st = None
            else:
                st = None
            if st is None:  # new, or not a continuation of what was read: read it from the start
                st = rows[id(p)] = [p, set(), 0, None]
                start = base = 0
                toks = _ints(p[0:n])
            seen = st[1]
            for i in range(start - base, end - base):
                seen.add(tuple(toks[i:i + h]))
            if start < end:
                st[2], st[3] = end, tuple(toks[end - 1 - base:end - 1 - base + h])
            current = toks[end - base:]
            out.append(tuple(current) in seen)
            windows.append(current)
        if len(rows) > 2 * len(prefixes) + 64:
            keep = {id(p) for p in prefixes}
            for key in [k for k in rows if k not in keep]:
                del rows[key]
        return out, windows

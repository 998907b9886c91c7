"""Batch bookkeeping for the engine plugin, without vLLM: which request sits in which row.

vLLM V1 describes each change of its persistent batch as removed / added / moved indices; Model Runner
V2 names a request slot per logits row every step. Both land here: one ``RowState`` per index, and a
per-step view (contexts, prefixes, which rows skip the watermark) that is rebuilt only when the batch
changed, so a decode step that only appended tokens does no Python work per row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from defense.types import RequestContext

if TYPE_CHECKING:
    import numpy as np
    import torch


class TokenView(Sequence[int]):
    """A request's prompt plus its output so far, read as one sequence without copying either.

    ``output`` is vLLM's live list of generated tokens: the view sees each new token as it is appended,
    so the prefix of a row never has to be rebuilt between steps.
    """

    __slots__ = ("_output", "_prompt")

    def __init__(self, prompt: Sequence[int] | None, output: Sequence[int]) -> None:
        self._prompt: Sequence[int] = prompt if prompt is not None else ()
        self._output = output

    def __len__(self) -> int:
        return len(self._prompt) + len(self._output)

    def __iter__(self) -> Iterator[int]:
        return itertools.chain(self._prompt, self._output)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        n_prompt = len(self._prompt)
        if i.__class__ is slice and i.step is None:  # the defenses' reads each step: recent tokens only
            start, stop = i.start, i.stop
            out = self._output
            if start is not None and start < 0 and stop is None and -start <= len(out):
                return out[start:]  # the last -start tokens (a window)
            if start is not None and stop is not None and n_prompt <= start <= stop <= n_prompt + len(out):
                return out[start - n_prompt:stop - n_prompt]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            if stop <= start:
                return []
            if start >= n_prompt:  # the common case, a window over recent tokens: output only
                return list(self._output[start - n_prompt:stop - n_prompt])
            if stop <= n_prompt:
                return list(self._prompt[start:stop])
            return [*self._prompt[start:], *self._output[:stop - n_prompt]]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index out of range for a prefix of {n} tokens")
        return self._prompt[i] if i < n_prompt else self._output[i - n_prompt]

    def __repr__(self) -> str:
        return f"TokenView(prompt={len(self._prompt)} tokens, output={len(self._output)} tokens)"


@dataclass(frozen=True, slots=True)
class RowState:
    """One request as the sampling defenses see it, fixed when it enters the batch."""

    ctx: RequestContext
    prefix: Sequence[int] | None = None  # V1: a TokenView; V2 reads prefixes on the device instead
    plain: bool = False  # its profile turned the watermark off: watermark defenses skip this row


@dataclass(frozen=True, slots=True)
class StepView:
    """What one decode step hands the defenses, in logits-row order."""

    ctxs: tuple[RequestContext, ...]
    prefixes: tuple[Sequence[int] | None, ...]
    plain: torch.Tensor | None  # [B, 1] bool on the logits' device; None when no row skips the watermark


class BatchSlots:
    """Row states by index (V1: persistent-batch index; V2: request slot), and the cached step view."""

    def __init__(self) -> None:
        self._rows: list[RowState | None] = []
        self._size = 0  # V1: rows in the persistent batch
        self._version = 0  # bumped on every change: the cached view belongs to one version
        self._view_key: tuple[Any, ...] | None = None
        self._view: StepView | None = None

    # -- changes -------------------------------------------------------------------------------
    def put(self, index: int, row: RowState) -> None:
        """A request enters at ``index``; whatever held it before is gone (slots are reused)."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        if index >= len(self._rows):
            self._rows.extend([None] * (index + 1 - len(self._rows)))
        self._rows[index] = row
        self._version += 1

    def remove(self, index: int) -> None:
        if 0 <= index < len(self._rows):
            self._rows[index] = None
            self._version += 1

    def move(self, src: int, dst: int) -> None:
        """One-way move: ``dst`` takes ``src``'s request and ``src`` is left empty (V1 condensing)."""
        row = self.get(src)
        self.remove(src)
        if row is None:
            self.remove(dst)
        else:
            self.put(dst, row)

    def swap(self, a: int, b: int) -> None:
        ra, rb = self.get(a), self.get(b)
        self.remove(a)
        self.remove(b)
        if rb is not None:
            self.put(a, rb)
        if ra is not None:
            self.put(b, ra)

    def resize(self, batch_size: int) -> None:
        if batch_size < 0:
            raise ValueError(f"batch size must be >= 0, got {batch_size}")
        if batch_size != self._size:
            self._size = batch_size
            self._version += 1

    def get(self, index: int) -> RowState | None:
        return self._rows[index] if 0 <= index < len(self._rows) else None

    @property
    def size(self) -> int:
        return self._size

    # -- the per-step view -----------------------------------------------------------------------
    def view(self, order: np.ndarray | Sequence[int] | None, *, device: torch.device | str) -> StepView:
        """The rows in logits order: ``order`` maps row -> index (V2), or None for 0..size-1 (V1).

        Cached until the batch changes or the order does: V1 rebuilds it once per batch update, V2 when
        its row order changes; every other step costs a comparison.
        """
        key = (self._version, None if order is None else bytes(memoryview(_as_int64(order))), str(device))
        if key == self._view_key and self._view is not None:
            return self._view
        indices = range(self._size) if order is None else [int(i) for i in order]
        rows = []
        for i in indices:  # once per batch change, not per step: vLLM names rows one by one
            row = self.get(i)
            if row is None:
                raise RuntimeError(f"distillguard: logits row for batch index {i} has no request; "
                                   "the plugin's batch bookkeeping is out of step with vLLM")
            rows.append(row)
        plain = None
        if any(r.plain for r in rows):
            import torch

            plain = torch.tensor([r.plain for r in rows], dtype=torch.bool).reshape(-1, 1).to(device)
        self._view = StepView(tuple(r.ctx for r in rows), tuple(r.prefix for r in rows), plain)
        self._view_key = key
        return self._view


def _as_int64(order: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(order, dtype=np.int64)

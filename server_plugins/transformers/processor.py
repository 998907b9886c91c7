"""A transformers ``LogitsProcessor`` that runs any SamplingDefense (or a whole DefenseChain).

transformers calls custom processors after its own (repetition penalty, ...) and before the
temperature and top-k/top-p warpers, so the defense sees pre-temperature logits, as the interface
says. ``input_ids`` (prompt plus generated tokens) go to the defense as a ``[B, L]`` tensor, its
per-row context read on device with no Python work per row, when no row is padded. Rows of a batch
left-padded to one width (``pad_lengths``) go as lists without their padding: a defense that reads the
whole prefix (antidistillation sampling's proxy) must not take pad tokens for context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from defense.types import RequestContext

__all__ = ["DefenseLogitsProcessor"]


class DefenseLogitsProcessor(LogitsProcessor):
    """Runs ``defense.process_logits`` on every decode step.

    ``ctxs``: one RequestContext per prompt (or one for all). When generate() expands the batch
    (``num_return_sequences``), each prompt's context is repeated for its copies, in order.
    """

    def __init__(self, defense: object, ctxs: RequestContext | Sequence[RequestContext],
                 pad_lengths: Sequence[int] | None = None) -> None:
        if not hasattr(defense, "process_logits"):
            raise TypeError(f"{type(defense).__name__} has no process_logits; pass a SamplingDefense or DefenseChain")
        self.defense = defense
        self.ctxs = (ctxs,) if isinstance(ctxs, RequestContext) else tuple(ctxs)
        if not self.ctxs:
            raise ValueError("need at least one RequestContext")
        self._expanded: dict[int, tuple[RequestContext, ...]] = {}
        self.pad_lengths = tuple(int(n) for n in pad_lengths) if pad_lengths is not None else ()
        if self.pad_lengths and len(self.pad_lengths) != len(self.ctxs):
            raise ValueError(f"{len(self.pad_lengths)} pad lengths for {len(self.ctxs)} request contexts")
        if any(n < 0 for n in self.pad_lengths):
            raise ValueError("pad lengths must be >= 0")

    def contexts(self, batch: int) -> tuple[RequestContext, ...]:
        out = self._expanded.get(batch)
        if out is None:
            n = len(self.ctxs)
            if batch % n != 0:
                raise ValueError(f"{n} request contexts cannot cover a batch of {batch} rows")
            out = self._expanded[batch] = tuple(c for c in self.ctxs for _ in range(batch // n))
        return out

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch = scores.shape[0]
        prefixes: torch.Tensor | list[list[int]] = input_ids
        if any(self.pad_lengths):
            copies = batch // len(self.ctxs)  # contexts() checked that it divides
            pads = [n for n in self.pad_lengths for _ in range(copies)]
            prefixes = [row[n:] for row, n in zip(input_ids.tolist(), pads, strict=True)]
        out = self.defense.process_logits(scores.float(), prefixes, self.contexts(batch))  # type: ignore[attr-defined]
        return out.to(scores.dtype)

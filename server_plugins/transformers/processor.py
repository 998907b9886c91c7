"""A transformers ``LogitsProcessor`` that runs any SamplingDefense (or a whole DefenseChain).

transformers calls custom processors after its own (repetition penalty, ...) and before the
temperature and top-k/top-p warpers, so the defense sees pre-temperature logits, as the interface
says. ``input_ids`` (prompt plus generated tokens, left-padded) go to the defense as a ``[B, L]``
tensor: its per-row context is read on device, with no Python work per row.
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

    def __init__(self, defense: object, ctxs: RequestContext | Sequence[RequestContext]) -> None:
        if not hasattr(defense, "process_logits"):
            raise TypeError(f"{type(defense).__name__} has no process_logits; pass a SamplingDefense or DefenseChain")
        self.defense = defense
        self.ctxs = (ctxs,) if isinstance(ctxs, RequestContext) else tuple(ctxs)
        if not self.ctxs:
            raise ValueError("need at least one RequestContext")
        self._expanded: dict[int, tuple[RequestContext, ...]] = {}

    def contexts(self, batch: int) -> tuple[RequestContext, ...]:
        out = self._expanded.get(batch)
        if out is None:
            n = len(self.ctxs)
            if batch % n != 0:
                raise ValueError(f"{n} request contexts cannot cover a batch of {batch} rows")
            out = self._expanded[batch] = tuple(c for c in self.ctxs for _ in range(batch // n))
        return out

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = self.defense.process_logits(scores.float(), input_ids, self.contexts(scores.shape[0]))  # type: ignore[attr-defined]
        return out.to(scores.dtype)

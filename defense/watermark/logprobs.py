"""Logprobs consistent with what was sampled, so returned logprobs do not leak the clean distribution.

An engine that returns logprobs computed from the raw logits hands the distiller the unwatermarked
distribution next to the watermarked text (and with it the green lists, by differencing). Engines
and adapters return ``processed_logprobs`` instead: the log-softmax, at the request's temperature,
of the logits after the sampling defenses, i.e. the distribution the token was actually drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..types import RequestContext


def processed_logprobs(defense: Any, logits: torch.Tensor, prefixes: Sequence[Sequence[int]] | torch.Tensor,
                       ctxs: Sequence[RequestContext], *, processed: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] float32 log-probabilities of the sampling distribution after ``defense``.

    ``defense`` is a SamplingDefense or a DefenseChain; pass ``processed`` (its output for these
    logits, when the engine already has it) to skip running it again. Temperature 0 (greedy) rows get
    the temperature-1 distribution of the processed logits, as OpenAI-style servers report them.
    """
    import torch

    out = processed if processed is not None else defense.process_logits(logits, prefixes, ctxs)
    temps = torch.tensor([1.0 if c.temperature in (None, 0) else float(c.temperature) for c in ctxs],
                         dtype=torch.float32).to(out.device, non_blocking=True)
    return torch.log_softmax(out.float() / temps.reshape(-1, 1), dim=1)


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, k], token ids [B, k]) of the k most likely tokens, from ``processed_logprobs``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vals, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=1)
    return vals, ids

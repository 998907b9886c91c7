"""A sampling defense whose output shows exactly what reached it, for the vLLM plugin's tests.

``StepDefense`` forces the next token to (last token of the row's prefix + step x strength) mod V. A
generation then follows t[i] = t[i-1] + step x strength from the prompt's last token, so each output
reveals which prefix its row was given (batch bookkeeping) and which profile strength it ran with
(signed profile or default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from defense.base import SamplingDefense
from defense.types import RequestContext


@dataclass(frozen=True, slots=True)
class StepParams:
    step: int = 1

    def __post_init__(self) -> None:
        if self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")


class StepDefense(SamplingDefense):
    Params = StepParams

    def process_logits(self, logits: Any, prefixes: Sequence[Sequence[int]], ctxs: Sequence[RequestContext]) -> Any:
        import torch

        from defense.watermark.context import last_windows

        b, v = logits.shape
        last = last_windows(prefixes, 1, batch=b, device=logits.device)[:, 0]  # [B]; -1 for an empty prefix
        shift = torch.tensor([round(c.strength * self.params.step) for c in ctxs], dtype=torch.int64,
                             device=logits.device)
        target = torch.remainder(last + shift, v)
        return torch.full_like(logits, float("-inf")).scatter_(1, target[:, None], 0.0)


def expected_steps(prompt_last: int, *, shift: int, n: int, vocab: int) -> list[int]:
    """The tokens StepDefense makes a greedy row generate."""
    out, t = [], prompt_last
    for _ in range(n):
        t = (t + shift) % vocab
        out.append(t)
    return out

"""Antidistillation sampling (Savani et al., 2025) as a sampling defense.

Adds lambda x Delta to the teacher's next-token logits, where Delta(v) estimates how much one SFT step on
token v would raise a proxy student's loss on clean teacher traces (the finite difference of two perturbed
proxy copies, see ``proxy.py``). Sampling from softmax(z / T + lambda x Delta) keeps the teacher's answers
likely while steering its traces toward tokens that teach a distiller badly. The engine divides by the
temperature after this runs, so the term is added as T x lambda x Delta (T from the request, else the
``temperature`` param). lambda = 0 returns the logits untouched, with no proxy work.

The proxy is a local causal LM folder sharing the teacher's tokenizer (or a model-factory one); its loss
gradient is computed once (``gradient.py``) and loaded with a check that it belongs to this proxy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..base import Deps, SamplingDefense
from ..types import RequestContext

__all__ = ["AntidistillParams", "AntidistillSampling"]


@dataclass(frozen=True, slots=True)
class AntidistillParams:
    lam: float = 0.05  # the released grid spans 0 .. 0.15; the profile's strength multiplies it
    epsilon: float = 1e-2  # finite-difference step along the raw gradient (the paper's value)
    temperature: float = 1.0  # used when a request carries none
    proxy_path: str = ""  # local causal LM folder (shares the teacher's tokenizer)
    gradient_path: str = ""  # folder written by defense.antidistill.gradient.save_gradient
    device: str = "cpu"
    max_strength: float = 4.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_strength < 1:
            raise ValueError(f"max_strength must be >= 1, got {self.max_strength}")


class AntidistillSampling(SamplingDefense):
    Params = AntidistillParams

    def __init__(self, params: AntidistillParams | None = None, *, deps: Deps | None = None,
                 proxy: Any = None, gradient: dict | None = None) -> None:
        """``proxy`` and ``gradient`` may be given directly (tests, experiments) instead of as paths."""
        super().__init__(params, deps=deps)
        p: AntidistillParams = self.params
        self.pair = None
        if p.lam == 0 and proxy is None:
            return
        if (proxy is None and not p.proxy_path) or (gradient is None and not p.gradient_path):
            raise ValueError("lam > 0 needs proxy_path and gradient_path")
        if proxy is None:
            from ..models import load_model

            proxy, _ = load_model(p.proxy_path, device=p.device)
        if gradient is None:
            from .gradient import load_gradient

            gradient, _ = load_gradient(p.gradient_path, model=proxy)
        from .proxy import PerturbedPair

        self.pair = PerturbedPair(proxy, gradient, epsilon=p.epsilon, device=p.device)

    def process_logits(self, logits: Any, prefixes: Sequence[Sequence[int]], ctxs: Sequence[RequestContext]) -> Any:
        """logits [B, V] float32 -> logits + T x lambda x strength x Delta, per row."""
        p: AntidistillParams = self.params
        if p.lam == 0 or self.pair is None:
            return logits
        import torch

        if logits.shape[-1] != self.pair.vocab_size:
            raise ValueError(f"teacher vocabulary {logits.shape[-1]} != proxy vocabulary {self.pair.vocab_size}: "
                             "the proxy must share the teacher's tokenizer")
        delta = self.pair.difference(prefixes, [c.request_id for c in ctxs]).to(logits.device, logits.dtype)
        scale = torch.tensor([p.lam * min(c.strength, p.max_strength) * (c.temperature or p.temperature)
                              for c in ctxs], device=logits.device, dtype=logits.dtype)[:, None]
        return logits + scale * delta

    def close(self) -> None:
        if self.pair is not None:
            self.pair.reset()

"""Gumbel-max watermark (Aaronson): choose argmax_v u_v ** (1 / p_v), u the keyed uniform of
(key, previous h tokens, v). Over keys this is exactly a sample from p (distortion-free); for one key
the chosen tokens have large u, which the detector sees as a large sum of -log(1 - u).

As a sampling defense it returns logits that put all mass on the chosen token (0 there, -inf
elsewhere), so whatever sampler runs after it takes that token; the processed logprobs are then
that one-hot distribution, consistent with what was sampled. The choice uses the request's
temperature (``RequestContext.temperature``; none means 1). Greedy rows (temperature 0) and, by
default, steps whose context already occurred in the sequence (a fixed choice per context would
repeat itself into a loop) are sampled normally. Radioactivity is weak by design: this is the
quality-first provenance mark, not the anti-distillation one.

Registered as the defense type ``watermark_gumbel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .base import WatermarkDefense, check_detection_params, temperatures
from .context import RepeatedContexts, _is_tensor, last_windows, padded, repeated_context
from .kernels import Kernel, gumbel_step
from .keyed import check_seeding

if TYPE_CHECKING:
    import torch

    from ..base import Deps
    from ..types import RequestContext


@dataclass(frozen=True, slots=True)
class GumbelParams:
    context: int = 1  # h: previous tokens that seed the uniforms
    hashing: Literal["lefthash", "selfhash"] = "lefthash"
    skip_repeated_context: bool = True  # sample normally when the current context already occurred
    per_tenant: bool = False
    fused: bool = False  # torch.compile the hash, the Gumbel transform and the argmax
    vocab_size: int | None = None
    min_tokens: int = 16
    detection_p: float = 1e-6

    def __post_init__(self) -> None:
        check_seeding(self.context, self.hashing)
        check_detection_params(self.vocab_size, self.min_tokens, self.detection_p)


class GumbelWatermark(WatermarkDefense):
    Params = GumbelParams
    scheme = "gumbel"

    def __init__(self, params: GumbelParams | None = None, *, deps: Deps | None = None) -> None:
        super().__init__(params, deps=deps)
        self._kernel = Kernel(gumbel_step, fused=self.params.fused)
        self._repeats = RepeatedContexts(self.params.context)

    def process_logits(self, logits: torch.Tensor, prefixes: Sequence[Sequence[int]],
                       ctxs: Sequence[RequestContext]) -> torch.Tensor:
        import torch

        self._check_logits(logits, ctxs)
        p: GumbelParams = self.params
        b, v = logits.shape
        dev = logits.device
        temps = torch.tensor(temperatures(ctxs), dtype=torch.float32).to(dev, non_blocking=True)
        if p.skip_repeated_context and _is_tensor(prefixes):  # on the device (V2, transformers): vectorized
            full = padded(prefixes, batch=b, device=dev)
            repeated = repeated_context(full, p.context)
            windows = last_windows(full, p.context, batch=b, device=dev)
        elif p.skip_repeated_context:  # on the host (V1's token lists): only the tokens new since the last step
            if len(prefixes) != b:
                raise ValueError(f"got {len(prefixes)} prefixes for {b} rows of logits")
            seen, current = self._repeats(prefixes)
            repeated = torch.tensor(seen, dtype=torch.bool).to(dev, non_blocking=True)
            windows = torch.tensor(current, dtype=torch.int64).reshape(b, p.context).to(dev, non_blocking=True)
        else:
            repeated = None
            windows = last_windows(prefixes, p.context, batch=b, device=dev)
        return self._kernel(logits, self._seeds(ctxs, dev), windows, self._vocab(v, dev), temps, repeated,
                            hashing=p.hashing)

    def is_argmax_invariant(self) -> bool:
        return False

"""Green-list watermark (the KGW family): add delta to the logits of a keyed, context-dependent
fraction gamma of the vocabulary, so sampled text over-represents green tokens.

The green list of a step is a function of (key, previous h tokens, token) only (``keyed.py``), so the
detector needs no model, and a student trained on the text learns the bias (radioactivity, which
is the point for us: small h is the most radioactive). An optional entropy gate leaves steps whose
distribution is nearly certain unbiased: there the bias would cost quality and carry almost no signal.

Registered as the defense type ``watermark``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .base import WatermarkDefense, check_detection_params
from .context import last_windows
from .kernels import Kernel, green_bias
from .keyed import check_seeding, green_threshold

if TYPE_CHECKING:
    import torch

    from ..base import Deps
    from ..types import RequestContext


@dataclass(frozen=True, slots=True)
class GreenListParams:
    gamma: float = 0.25  # green fraction of the vocabulary (0.25 detects faster than 0.5 at equal delta)
    delta: float = 2.0  # logit bias on green tokens, before temperature
    context: int = 1  # h: previous tokens that seed the green list (1 is the most radioactive, 4 the most robust)
    hashing: Literal["lefthash", "selfhash"] = "lefthash"
    entropy_threshold: float = 0.0  # nats; steps whose entropy is below it are left unbiased; 0 turns the gate off
    per_tenant: bool = False  # a key per tenant (HKDF): tracing by tenant; detection then needs the tenant
    fused: bool = False  # torch.compile the step into one pass (first call compiles for tens of seconds)
    # detection (the sidecar's Detect and `distillguard detect` read these)
    vocab_size: int | None = None  # token ids must be below it when set
    min_tokens: int = 16  # scorable tokens a sequence needs
    detection_p: float = 1e-6  # corrected p-value at or below which a sequence counts as watermarked

    def __post_init__(self) -> None:
        green_threshold(self.gamma)
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"delta (the green logit bias) must be finite and > 0, got {self.delta}")
        check_seeding(self.context, self.hashing)
        if not (math.isfinite(self.entropy_threshold) and self.entropy_threshold >= 0):
            raise ValueError(f"entropy_threshold must be finite and >= 0 (nats; 0 is off), got {self.entropy_threshold}")
        check_detection_params(self.vocab_size, self.min_tokens, self.detection_p)


class GreenListWatermark(WatermarkDefense):
    """logits[B, V] -> logits + delta on each row's green tokens; one vectorized pass, no host sync."""

    Params = GreenListParams
    scheme = "kgw"

    def __init__(self, params: GreenListParams | None = None, *, deps: Deps | None = None) -> None:
        super().__init__(params, deps=deps)
        self.threshold = green_threshold(self.params.gamma)
        self._kernel = Kernel(green_bias, fused=self.params.fused)

    def process_logits(self, logits: torch.Tensor, prefixes: Sequence[Sequence[int]],
                       ctxs: Sequence[RequestContext]) -> torch.Tensor:
        self._check_logits(logits, ctxs)
        p: GreenListParams = self.params
        b, v = logits.shape
        windows = last_windows(prefixes, p.context, batch=b, device=logits.device)
        delta = self._deltas(logits)
        return self._kernel(logits, self._seeds(ctxs, logits.device), windows, self._vocab(v, logits.device), delta,
                            threshold=self.threshold, hashing=p.hashing)

    def _deltas(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, 1] float: delta, or 0 on rows the entropy gate leaves alone (computed on device)."""
        import torch

        p: GreenListParams = self.params
        if p.entropy_threshold <= 0:
            return torch.full((logits.shape[0], 1), p.delta, dtype=logits.dtype, device=logits.device)
        logp = torch.log_softmax(logits.float(), dim=1)
        entropy = -(logp.exp() * logp).nan_to_num().sum(dim=1, keepdim=True)  # -inf logits give 0 * -inf
        return torch.where(entropy >= p.entropy_threshold, p.delta, 0.0).to(logits.dtype)

    def green_mask(self, prefixes: Sequence[Sequence[int]], ctxs: Sequence[RequestContext], vocab_size: int,
                   *, device: torch.device | str = "cpu") -> torch.Tensor:
        """[B, V] bool: each row's green list (for tests, audits and the CPU/GPU equality check)."""
        import torch

        from .kernels import vocab_hashes
        from .keyed import green

        device = torch.device(device)
        windows = last_windows(prefixes, self.params.context, batch=len(ctxs), device=device)
        h = vocab_hashes(self._seeds(ctxs, device), windows, self._vocab(vocab_size, device), self.params.hashing)
        return green(h, self.threshold)

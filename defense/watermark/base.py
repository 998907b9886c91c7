"""What the two watermark defenses share: keys, per-row seeds, windows, and their detector.

The watermark key is ``KeyRing.derive("watermark", tenant=...)``: the derived secret, never the key
id, seeds the PRF. Embedding uses the primary key; the detector built by ``detector()`` tries every
active and retired key with the same keyed function (``keyed.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..base import OnError, SamplingDefense
from .detect import DEFAULT_GAMMA, DetectorSpec, WatermarkDetector
from .keyed import scheme_seed

if TYPE_CHECKING:
    import torch

    from ..types import RequestContext

KEY_PURPOSE = "watermark"


def check_detection_params(vocab_size: int | None, min_tokens: int, detection_p: float) -> None:
    if vocab_size is not None and (isinstance(vocab_size, bool) or vocab_size < 2):
        raise ValueError(f"vocab_size must be >= 2 (or null: ids are only checked to be >= 0), got {vocab_size}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"min_tokens must be an int >= 1, got {min_tokens!r}")
    if not 0.0 < detection_p < 1.0:
        raise ValueError(f"detection_p (the p-value threshold) must be in (0, 1), got {detection_p}")


def spec_from_params(scheme: str, params: Any) -> DetectorSpec:
    """What the detector of a watermark configured with ``params`` must mirror."""
    return DetectorSpec(scheme=scheme, context=params.context, hashing=params.hashing,
                        gamma=getattr(params, "gamma", DEFAULT_GAMMA), vocab_size=params.vocab_size,
                        min_tokens=params.min_tokens, detection_p=params.detection_p)


class WatermarkDefense(SamplingDefense):
    """Base of the green-list and Gumbel defenses. Subclasses set ``scheme`` and implement the step."""

    scheme: ClassVar[str] = ""
    # a failed watermark step passes the logits through: text goes out unmarked, service goes on
    default_on_error = OnError.FAIL_OPEN

    def __init__(self, params: Any = None, *, deps: Any = None) -> None:
        super().__init__(params, deps=deps)
        self.keys = self.deps.require_keys(type(self).__name__)
        p = self.params
        self.key_id = self.keys.primary_id
        self._seed = self._seed_for("")
        self._tenant_seeds: dict[str, int] = {}
        self._vocab_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._seed_tensors: dict[str, torch.Tensor] = {}
        self._detectors: dict[str, WatermarkDetector] = {}
        self.spec = spec_from_params(self.scheme, p)

    # -- keys ---------------------------------------------------------------------------------
    def _seed_for(self, tenant: str) -> int:
        p = self.params
        return scheme_seed(self.keys.derive(KEY_PURPOSE, tenant=tenant), self.scheme, p.context, p.hashing)

    def detector(self, *, tenant: str = "") -> WatermarkDetector:
        """The detector for this defense's scheme, trying every key in the key ring (cached)."""
        tenant = tenant if self.params.per_tenant else ""
        det = self._detectors.get(tenant)
        if det is None:
            det = self._detectors[tenant] = WatermarkDetector.from_keyring(self.spec, self.keys, tenant=tenant)
        return det

    # -- per-step inputs ----------------------------------------------------------------------
    def _vocab(self, v: int, device: torch.device) -> torch.Tensor:
        key = (v, str(device))
        t = self._vocab_cache.get(key)
        if t is None:
            import torch

            t = self._vocab_cache[key] = torch.arange(v, dtype=torch.int64, device=device)
        return t

    def _seeds(self, ctxs: Sequence[RequestContext], device: torch.device) -> torch.Tensor:
        """int64 ``[]`` (one key for all rows) or ``[B, 1]`` (per-tenant keys)."""
        import torch

        if not self.params.per_tenant:
            dev = str(device)
            t = self._seed_tensors.get(dev)
            if t is None:
                t = self._seed_tensors[dev] = torch.tensor(self._seed, dtype=torch.int64, device=device)
            return t
        seeds = []
        for c in ctxs:  # a dict lookup per row: the seeds themselves are derived once per tenant
            s = self._tenant_seeds.get(c.tenant)
            if s is None:
                s = self._tenant_seeds[c.tenant] = self._seed_for(c.tenant)
            seeds.append(s)
        return torch.tensor(seeds, dtype=torch.int64).reshape(-1, 1).to(device, non_blocking=True)

    @staticmethod
    def _check_logits(logits: torch.Tensor, ctxs: Sequence[RequestContext]) -> None:
        if logits.ndim != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        if len(ctxs) != logits.shape[0]:
            raise ValueError(f"got {len(ctxs)} request contexts for {logits.shape[0]} rows of logits")


def temperatures(ctxs: Sequence[RequestContext]) -> list[float]:
    """Each row's sampling temperature; a request that set none samples at 1."""
    return [1.0 if c.temperature is None else float(c.temperature) for c in ctxs]

"""Two copies of the proxy student, moved by +/- epsilon along the loss gradient, run side by side.

Their next-token logits give, for every vocabulary token at once, the central difference
[log p(v | theta + eps g) - log p(v | theta - eps g)] / (2 eps) ~ <g, grad log p(v | theta)>: how much one
SFT step on v would change the proxy's loss. Logits stand in for log-probabilities: the log-partition
difference is one number per row and cancels in the softmax.

Each copy keeps a KV cache for the batch it saw last. A decode step that extends every row by one token
feeds only those tokens; any other change of the batch (rows added, removed, reordered, prefixes
rewritten) rebuilds the cache from the left-padded prefixes, so the answer is always the full-prefix one.
A Llama proxy runs through ``defense.models.fastpath.LlamaDecoder`` (same logits, less per-step overhead).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ..models.fastpath import LlamaDecoder, supported

__all__ = ["PerturbedPair"]


class PerturbedPair:
    def __init__(self, proxy: Any, grad: dict[str, torch.Tensor], *, epsilon: float, device: str = "cpu") -> None:
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.epsilon = epsilon
        self.device = torch.device(device)
        self.models = (self._moved(proxy, grad, +epsilon), self._moved(proxy, grad, -epsilon))
        self.vocab_size = int(proxy.config.vocab_size)
        # transformers 5.2x names the KV cache argument `cache`; earlier releases `past_key_values`
        self._cache_arg = "cache" if "cache" in inspect.signature(type(proxy).forward).parameters else "past_key_values"
        self._keys: tuple[Any, ...] | None = None  # the batch the caches hold: (row key, length) per row
        self._caches: list[Any] = [None, None]
        self._mask: torch.Tensor | None = None
        # a Llama proxy runs through the lean decoder (the same logits, a fraction of transformers' per-step
        # plumbing, which dominates at proxy sizes); other architectures through their own forward
        self._lean = tuple(LlamaDecoder(m) for m in self.models) if supported(proxy) else None

    def _moved(self, proxy: Any, grad: dict[str, torch.Tensor], step: float) -> Any:
        m = copy.deepcopy(proxy).to(self.device, torch.float32).eval()
        with torch.no_grad():
            for name, p in m.named_parameters():
                g = grad.get(name)
                if g is None:
                    raise ValueError(f"the gradient has no entry for proxy parameter {name!r}")
                p.add_(g.to(p.device, p.dtype), alpha=step)
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def reset(self) -> None:
        self._keys, self._caches, self._mask = None, [None, None], None

    @torch.inference_mode()
    def difference(self, prefixes: Sequence[Sequence[int]], keys: Sequence[Any]) -> torch.Tensor:
        """[B, V] float32: (logits(theta + eps g) - logits(theta - eps g)) / (2 eps) after each prefix.

        ``keys`` identify the rows (request ids) so a batch that merely grew by one token reuses the caches.
        """
        dense = isinstance(prefixes, torch.Tensor)  # [B, L] from transformers: every row the same length
        lengths = [prefixes.shape[1]] * prefixes.shape[0] if dense else [len(p) for p in prefixes]
        if min(lengths, default=0) == 0:
            raise ValueError("every row needs at least one token of prefix")
        want = tuple(zip(keys, lengths, strict=True))
        if self._keys is not None and len(want) == len(self._keys) and all(
                k == old[0] and n == old[1] + 1 for (k, n), old in zip(want, self._keys, strict=True)):
            last = prefixes[:, -1:].to(self.device) if dense else torch.tensor([[p[-1]] for p in prefixes],
                                                                               device=self.device)
            out = self._step(last)
        else:
            out = self._prefill(prefixes.tolist() if dense else prefixes)
        self._keys = want
        return out

    def _prefill(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(p) for p in prefixes)
        ids = torch.zeros((len(prefixes), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prefixes):  # building the padded batch: one row copy each
            ids[i, width - len(p):] = torch.tensor(list(p), device=self.device).clamp_(0, self.vocab_size - 1)
            mask[i, width - len(p):] = 1
        self._mask = mask
        if self._lean is not None:
            return self._combine([d.prefill(ids, mask) for d in self._lean])
        return self._run(ids, mask, fresh=True)

    def _step(self, last: torch.Tensor) -> torch.Tensor:
        assert self._mask is not None  # noqa: S101 - only called with live caches
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)
        if self._lean is not None:
            return self._combine([d.step(last.clamp(0, self.vocab_size - 1)) for d in self._lean])
        return self._run(last.clamp(0, self.vocab_size - 1), self._mask, fresh=False)

    def _combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return (logits[0].float() - logits[1].float()) / (2.0 * self.epsilon)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, *, fresh: bool) -> torch.Tensor:
        positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)[:, -ids.shape[1]:]
        logits = []
        for i, m in enumerate(self.models):  # the two copies: a fixed pair, not a per-row loop
            kw = {self._cache_arg: None if fresh else self._caches[i]}
            # logits_to_keep=1: only the last position's head, not [B, T, V]
            out = m(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kw)
            self._caches[i] = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            logits.append(out.logits[:, -1])
        return self._combine(logits)

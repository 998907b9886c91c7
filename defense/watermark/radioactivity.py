"""Radioactivity: does a suspect model carry our watermark because it was trained on our text?

- Closed-box (only samples of the suspect): prompt it, score its deduplicated tokens with the
  exact test of the scheme, leaving out windows that occur in the prompts. The sampling is the
  caller's (``generate``): an API, an engine or ``server_plugins.transformers.generate``.
- Open-box (the suspect's weights): teacher-force our texts through it and, per distinct context,
  take its probability mass on our green tokens (for Gumbel, its expected ``-log(1 - u)``). The
  statistic is the mean over contexts. Its null is the same statistic under K >= 1000 alternative
  keys, for the same model and texts: a normal fitted to those gives a parametric p-value (far
  into the tail, where ranks cannot go), and the rank among them is reported as a check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import prf
from ..types import Detection
from .detect import DetectorSpec, WatermarkDetector
from .keyed import green, token_hashes, uniform
from .stats import norm_log10_sf

if TYPE_CHECKING:
    import torch

__all__ = ["OpenBoxResult", "alternative_seeds", "closed_box_test", "open_box_statistics", "open_box_test"]

MIN_ALTERNATIVE_KEYS = 1000
_CONTEXT_SEED = 0x0DD5  # unkeyed hash of a context window, for dedup only (public)


def closed_box_test(detector: WatermarkDetector, generate: Callable[[list[list[int]]], Sequence[Sequence[int]]],
                    prompts: Sequence[Sequence[int]], *, key_ids: Sequence[str] | None = None) -> Detection:
    """Sample the suspect on ``prompts`` (``generate`` returns the continuations, prompts left out)
    and run the detector's pooled, deduplicated test on them, prompt windows excluded."""
    prompt_lists = [list(map(int, p)) for p in prompts]
    samples = [list(map(int, s)) for s in generate(prompt_lists)]
    samples = [s for s in samples if s] or [[]]
    report = detector.detect_many(samples, key_ids=key_ids, exclude=prompt_lists, per_sequence=False)
    return report.combined


@dataclass(frozen=True, slots=True)
class OpenBoxResult:
    statistic: float  # mean over contexts of the suspect's green mass (or expected -log(1-u)) under our key
    null_mean: float  # the same statistic's mean over the alternative keys
    null_std: float
    z: float
    log10_p: float  # parametric: normal tail of z
    empirical_p: float  # (1 + alternative keys scoring >= ours) / (1 + K)
    contexts: int  # distinct contexts scored
    alternative_keys: int
    key_id: str


def _distributions(model: Any, texts: list[np.ndarray], h: int, top_k: int | None, batch_size: int,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct context (first occurrence): its window [C, h], the model's top tokens [C, k] and
    their probabilities [C, k]."""
    import torch

    windows, ids, probs = [], [], []
    seen = np.zeros(0, dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        chunk = [t for t in texts[start : start + batch_size] if t.size > h]
        if not chunk:
            continue
        width = max(t.size for t in chunk)
        x = np.zeros((len(chunk), width), dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        for r, t in enumerate(chunk):  # padding a batch: one row copy each
            x[r, : t.size] = t
            mask[r, : t.size] = 1
        # windows: x[r, j : j + h] is the context of the token at j + h, predicted at position j + h - 1
        win = np.lib.stride_tricks.sliding_window_view(x[:, :-1], h, axis=1)  # [R, width - h, h]
        valid = (np.arange(win.shape[1])[None, :] + h) < np.array([t.size for t in chunk])[:, None]
        keys = prf.hash_combine(_CONTEXT_SEED, *[win[..., i] for i in range(h)])  # [R, width - h]
        rr, jj = np.nonzero(valid)
        k = keys[rr, jj]
        _, first = np.unique(k, return_index=True)
        first = np.sort(first)  # first occurrence within the batch, in text order
        new = first[~np.isin(k[first], seen)]
        if new.size == 0:
            continue
        seen = np.concatenate([seen, k[new]])
        rr, jj = rr[new], jj[new]
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(x).to(device),
                           attention_mask=torch.from_numpy(mask).to(device)).logits
            sel = logits[torch.from_numpy(rr).to(device), torch.from_numpy(jj + h - 1).to(device)]  # [n, V]
            p = torch.softmax(sel.float(), dim=-1)
            if top_k is not None and top_k < p.shape[-1]:
                pv, pi = p.topk(top_k, dim=-1)
            else:
                pv, pi = p, torch.arange(p.shape[-1], device=p.device).expand_as(p)
        windows.append(win[rr, jj])
        ids.append(pi.cpu().numpy())
        probs.append(pv.cpu().numpy())
    if not windows:
        raise ValueError(f"no text is longer than the context (h={h}); nothing to score")
    return np.concatenate(windows), np.concatenate(ids), np.concatenate(probs)


def open_box_statistics(model: Any, texts: Sequence[Sequence[int]], spec: DetectorSpec, seeds: np.ndarray, *,
                        top_k: int | None = 64, batch_size: int = 16, key_chunk: int = 64) -> tuple[np.ndarray, int]:
    """The open-box statistic of ``model`` on ``texts`` under each key seed: ([len(seeds)], contexts).

    Per distinct context, the model's mass on the green tokens (kgw) or its expectation of
    ``-log(1 - u)`` (gumbel), averaged over contexts. ``top_k`` restricts each context to the model's
    k most likely tokens (the same function for every key, so comparisons between keys stay fair;
    None scores the whole vocabulary).
    """
    import torch

    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    seqs = [np.asarray(t, dtype=np.int64) for t in texts]
    device = next(model.parameters()).device
    win, ids, probs = _distributions(model, seqs, spec.context, top_k, batch_size, device)
    w_t = torch.from_numpy(win)[None, :, None, :]  # [1, C, 1, h]
    ids_t = torch.from_numpy(ids.astype(np.int64))[None]  # [1, C, k]
    p_t = torch.from_numpy(probs.astype(np.float32))[None]
    seeds = np.asarray(seeds, dtype=np.int64)
    out = np.empty(seeds.size, dtype=np.float64)
    for s in range(0, seeds.size, key_chunk):
        seed_t = torch.from_numpy(seeds[s : s + key_chunk]).reshape(-1, 1, 1)
        hashes = token_hashes(seed_t, w_t, ids_t, spec.hashing)  # [Kc, C, k]
        if spec.scheme == "kgw":
            value = green(hashes, spec.threshold).to(torch.float32)
        else:
            value = -torch.log1p(-uniform(hashes, dtype=torch.float64)).to(torch.float32)
        out[s : s + key_chunk] = (value * p_t).sum(dim=2).double().mean(dim=1).numpy()
    return out, int(win.shape[0])


def alternative_seeds(seed: int, n: int) -> np.ndarray:
    """n key seeds derived from ``seed`` (distinct from it and from each other), for the null."""
    return prf.hash_combine(np.int64(seed), np.arange(1, n + 1, dtype=np.int64))


def open_box_test(model: Any, texts: Sequence[Sequence[int]], detector: WatermarkDetector, *,
                  key_id: str | None = None, alternative_keys: int = MIN_ALTERNATIVE_KEYS, top_k: int | None = 64,
                  batch_size: int = 16, key_seed: int | None = None) -> OpenBoxResult:
    """Teacher-force ``texts`` (our watermarked outputs, token ids) through ``model`` and test it.

    The null is the statistic under ``alternative_keys`` other keys for the same model and texts;
    ``key_seed`` overrides our key (calibration studies use random seeds as "ours").
    """
    if alternative_keys < MIN_ALTERNATIVE_KEYS:
        raise ValueError(f"alternative_keys must be >= {MIN_ALTERNATIVE_KEYS} for a fitted null, got {alternative_keys}")
    ours = key_seed if key_seed is not None else detector.key_seed(key_id)
    seeds = np.concatenate([[ours], alternative_seeds(ours, alternative_keys)]).astype(np.int64)
    stats, contexts = open_box_statistics(model, texts, detector.spec, seeds, top_k=top_k, batch_size=batch_size)
    null = stats[1:]
    mean, std = float(null.mean()), float(null.std(ddof=1))
    z = (stats[0] - mean) / std if std > 0 else 0.0
    return OpenBoxResult(
        statistic=float(stats[0]), null_mean=mean, null_std=std, z=float(z), log10_p=float(norm_log10_sf(z)),
        empirical_p=float((1 + np.sum(null >= stats[0])) / (1 + null.size)), contexts=contexts,
        alternative_keys=int(null.size), key_id=key_id or (detector.key_ids[0] if key_seed is None else ""),
    )

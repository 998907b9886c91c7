"""``generate``: batched sampling from a transformers causal LM, with sampling defenses in the loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel

from defense.types import RequestContext

from .processor import DefenseLogitsProcessor

__all__ = ["generate"]


def _pad_id(model: PreTrainedModel) -> int:
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else model.config.pad_token_id
    if pad is None:
        eos = gc.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    if pad is None:
        raise ValueError("the model has neither a pad nor an eos token id; set model.generation_config.pad_token_id")
    return int(pad)


def _eos_ids(model: PreTrainedModel) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    defense: object | None = None,
    ctxs: Sequence[RequestContext] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_at_eos: bool = True,
    batch_size: int = 64,
    seed: int | None = 0,
) -> list[list[int]]:
    """Sample a continuation of each prompt (token ids); returns the new tokens, prompt left out.

    ``defense`` (a SamplingDefense or DefenseChain) runs on every step; ``ctxs`` are the requests,
    one per prompt (default: one per prompt at ``temperature``). ``temperature`` 0 decodes greedily.
    Without ``stop_at_eos`` generation runs to ``max_new_tokens`` and eos is an ordinary token;
    with it, each continuation ends before its first eos. ``seed`` makes sampling repeatable
    without touching the caller's global RNG state.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    prompts = [[int(t) for t in p] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (start with the bos/eos token for none)")
    if ctxs is None:
        ctxs = [RequestContext(request_id=f"generate-{i}", client_id="local", temperature=temperature)
                for i in range(len(prompts))]
    if len(ctxs) != len(prompts):
        raise ValueError(f"got {len(ctxs)} request contexts for {len(prompts)} prompts")
    pad = _pad_id(model)
    eos = _eos_ids(model)
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
        top_k=top_k if sample else None, top_p=top_p if sample else None, pad_token_id=pad,
        eos_token_id=sorted(eos) if stop_at_eos and eos else [],
    )
    device = next(model.parameters()).device
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.int64)
            mask = torch.zeros((len(chunk), width), dtype=torch.int64)
            for r, p in enumerate(chunk):  # left padding: the last prompt token is the last column
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            processors = LogitsProcessorList()
            if defense is not None:
                processors.append(DefenseLogitsProcessor(defense, ctxs[start : start + len(chunk)],
                                                         pad_lengths=[width - len(p) for p in chunk]))
            with torch.inference_mode():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                     logits_processor=processors)
            for row in gen[:, width:].tolist():
                if stop_at_eos:
                    cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                    row = row[:cut]
                out.append(row)
    return out

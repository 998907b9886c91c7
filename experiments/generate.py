"""Batched sampling from a causal LM with a KV cache, a per-step logits hook and top-k logprob capture.

The hook is where the chain's sampling defenses run (``TeacherAPI.process_logits``), on every decode step
and vectorized over the batch, as inside an engine. Prompts are batched by equal token length, so no
padding or attention mask is needed. Randomness comes from a CPU generator seeded per batch, so the same
seed gives the same samples on CPU and CUDA.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from .progress import bar

LogitsHook = Callable[[torch.Tensor, list[list[int]], list[int]], torch.Tensor]


@dataclass
class Generation:
    tokens: list[int]  # the new tokens (ending with eos when generation stopped there)
    top_ids: np.ndarray  # [P, K] int64: the K most likely tokens at each new position (K = 0: none kept)
    # temperature -> [P, K] float32: log_softmax(logits / T) at top_ids; logits are after the hook
    top_logprobs: dict[float, np.ndarray] = field(default_factory=dict)


def _cache_names(model: torch.nn.Module) -> tuple[str, str]:
    """(forward kwarg, output attribute) of the KV cache: transformers 5 says ``cache``, 4 ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


def _groups(prompts: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    group: list[int] = []
    for i in order:
        if group and (len(prompts[i]) != len(prompts[group[0]]) or len(group) == batch_size):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    seed: int,
    batch_size: int = 64,
    top_k: int = 0,
    logprob_temperatures: Sequence[float] = (1.0,),
    stop_at_eos: bool = False,
    logits_hook: LogitsHook | None = None,
    desc: str = "generate",
) -> list[Generation]:
    """Sample ``max_new_tokens`` after each prompt; temperature 0 is greedy. Returns one Generation per prompt."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    kw_name, out_name = _cache_names(model)
    results: list[Generation | None] = [None] * len(prompts)
    groups = list(_groups(prompts, batch_size))
    progress = bar(total=len(prompts), desc=desc)
    for group in groups:
        # seeded by the batch's first prompt index: reruns and resumed runs draw the same samples
        gen = torch.Generator().manual_seed(seed * 1_000_003 + group[0])
        seqs = [list(prompts[i]) for i in group]
        x = torch.tensor(seqs, dtype=torch.int64, device=device)  # [B, L]
        out = model(input_ids=x, use_cache=True)
        cache = getattr(out, out_name)
        logits = out.logits[:, -1].float()  # [B, V]
        b = len(group)
        new: list[list[int]] = [[] for _ in range(b)]
        ids_steps: list[torch.Tensor] = []
        vals_steps: dict[float, list[torch.Tensor]] = {t: [] for t in logprob_temperatures}
        done = torch.zeros(b, dtype=torch.bool)
        for _ in range(max_new_tokens):
            if logits_hook is not None:
                logits = logits_hook(logits, seqs, group)
            if top_k:
                logp = F.log_softmax(logits, dim=-1)
                top_vals, top_ids = logp.topk(top_k, dim=-1)  # [B, K]; the order is the same at any T > 0
                ids_steps.append(top_ids.cpu())
                for t in logprob_temperatures:
                    v = top_vals if t == 1.0 else F.log_softmax(logits / t, dim=-1).gather(1, top_ids)
                    vals_steps[t].append(v.cpu())
            if temperature == 0:
                nxt = logits.argmax(dim=-1).cpu()
            else:
                probs = F.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            for r in range(b):
                if not done[r]:
                    new[r].append(int(nxt[r]))
                    seqs[r].append(int(nxt[r]))
            if stop_at_eos:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            out = model(input_ids=nxt[:, None].to(device), use_cache=True, **{kw_name: cache})
            cache = getattr(out, out_name)
            logits = out.logits[:, -1].float()
        ids_all = torch.stack(ids_steps, dim=1).numpy() if ids_steps else None  # [B, P, K]
        vals_all = {t: torch.stack(v, dim=1).numpy() for t, v in vals_steps.items()} if ids_steps else {}
        for r, i in enumerate(group):
            n = len(new[r])
            top_ids = ids_all[r, :n].astype(np.int64) if ids_all is not None else np.empty((n, 0), np.int64)
            tops = {t: v[r, :n].astype(np.float32) for t, v in vals_all.items()}
            results[i] = Generation(new[r], top_ids, tops)
        progress.update(b)
    progress.close()
    return results  # type: ignore[return-value]


@torch.inference_mode()
def forward_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, *, batch_size: int = 16) -> Iterator[tuple[slice, torch.Tensor]]:
    """Teacher-forced next-token log-probabilities, batch by batch: (rows, [b, T-1, V] float32)."""
    device = next(model.parameters()).device
    for s in range(0, input_ids.shape[0], batch_size):
        x = input_ids[s : s + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        yield slice(s, s + x.shape[0]), F.log_softmax(logits, dim=-1)

"""Student training: soft-label classifiers and LM students on collected sequences (SFT or top-k KD).

Deterministic given the seed (a local generator orders batches; the global RNG is forked). The loss math
lives in ``losses.py`` as pure functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .losses import soft_cross_entropy, topk_kd_loss
from .progress import bar


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    warmup = min(warmup, steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_soft_classifier(
    model: torch.nn.Module,
    x: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Fit ``model`` to target probability vectors (one-hot for label-only answers) with Adam.

    x: [N, D] float32; targets: [N, C] float32 rows summing to 1.
    """
    if len(x) == 0:
        return {"loss": math.nan, "samples": 0.0}
    device = next(model.parameters()).device
    xs = torch.as_tensor(x, dtype=torch.float32, device=device)
    ts = torch.as_tensor(targets, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(math.nan)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(xs), generator=gen).to(device)
            for s in range(0, len(xs), batch_size):
                idx = order[s : s + batch_size]
                loss = soft_cross_entropy(model(xs[idx]), ts[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()
    return {"loss": float(loss.item()), "samples": float(len(xs))}


@dataclass
class SeqData:
    """Collected sequences for LM students, right-padded to one length.

    input_ids: [N, T] int64; loss_mask: [N, T-1] bool, True where the next token (t+1) is supervised;
    kd_ids / kd_logprobs: [N, T-1, K] (ids -1 where nothing was returned), present for KD only.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    kd_ids: torch.Tensor | None = None
    kd_logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def supervised_tokens(self) -> int:
        return int(self.loss_mask.sum())


def build_seq_data(
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    pad_id: int,
    kd: list[tuple[np.ndarray, np.ndarray]] | None = None,
    k: int = 0,
) -> SeqData:
    """Sequences prompt + completion, supervised on the completion; ``kd`` gives per completion token
    (ids [P, k'], logprobs [P, k']) with k' <= k, padded to k with -1 ids."""
    n = len(prompts)
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((n, length), pad_id, dtype=torch.int64)
    mask = torch.zeros((n, length - 1), dtype=torch.bool)
    kd_ids = torch.full((n, length - 1, k), -1, dtype=torch.int64) if kd is not None else None
    kd_lp = torch.full((n, length - 1, k), -1e4, dtype=torch.float32) if kd is not None else None
    for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = list(p) + list(c)
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        # position t predicts token t + 1: the completion's tokens are predicted from len(p) - 1 on
        mask[r, len(p) - 1 : len(seq) - 1] = True
        if kd is not None:
            tid, tlp = kd[r]
            m = min(len(c), tid.shape[0])
            kk = tid.shape[1]
            kd_ids[r, len(p) - 1 : len(p) - 1 + m, :kk] = torch.as_tensor(tid[:m])  # type: ignore[index]
            kd_lp[r, len(p) - 1 : len(p) - 1 + m, :kk] = torch.as_tensor(tlp[:m])  # type: ignore[index]
    return SeqData(ids, mask, kd_ids, kd_lp)


def train_lm_student(
    model: torch.nn.Module,
    data: SeqData,
    *,
    loss: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    kd_ce_weight: float = 0.0,
    warmup: int = 20,
    weight_decay: float = 0.1,
    desc: str = "student",
) -> dict[str, float]:
    """Train in place for ``steps`` AdamW steps on random minibatches; ``loss`` is 'sft' or 'kd'."""
    if loss not in ("sft", "kd"):
        raise ValueError(f"loss must be 'sft' or 'kd', got {loss!r}")
    if loss == "kd" and data.kd_ids is None:
        raise ValueError("kd needs kd_ids and kd_logprobs in the data")
    if len(data) == 0 or data.supervised_tokens == 0:
        return {"loss": math.nan, "steps": 0.0, "sequences": float(len(data))}
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    recent: list[float] = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in bar(range(steps), desc=desc):
            idx = torch.randint(len(data), (batch_size,), generator=gen)
            x = data.input_ids[idx].to(device)  # [b, T]
            m = data.loss_mask[idx].to(device)  # [b, T-1]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()  # [b, T-1, V]
            sel = logits[m]  # [M, V]: only supervised positions
            if loss == "sft":
                value = F.cross_entropy(sel, x[:, 1:][m])
            else:
                value = topk_kd_loss(sel, data.kd_ids[idx].to(device)[m], data.kd_logprobs[idx].to(device)[m])  # type: ignore[index]
                if kd_ce_weight:
                    value = value + kd_ce_weight * F.cross_entropy(sel, x[:, 1:][m])
            opt.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            recent = (recent + [float(value.item())])[-10:]
    model.eval()
    return {"loss": sum(recent) / len(recent), "steps": float(steps), "sequences": float(len(data)),
            "supervised_tokens": float(data.supervised_tokens)}

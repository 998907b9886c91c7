"""Train a small causal LM on packed text, and measure its loss on held-out text.

fp32 throughout (bf16 is far slower on AVX2-only CPUs). Deterministic given the seed: the seed
drives a forked global torch RNG (for any dropout) and a local generator for batch sampling.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["LMTrainConfig", "lm_loss", "pack_tokens", "train_lm", "unigram_loss"]


@dataclass(frozen=True)
class LMTrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3  # tiny models (d ~128-256) tolerate and need a large lr to learn in minutes
    warmup: int = 20  # capped at steps, so short smoke runs need not change it
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decays to lr * 0.1, not to zero: the last steps still learn
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (one input and one target), got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")


def _token_stream(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one id stream, each followed by eos: [N] int64."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token to separate documents")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    flat = [tok for ids in encoded for tok in (*ids, eos)]
    return torch.tensor(flat, dtype=torch.int64)


def pack_tokens(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, *, keep_tail: bool = False
) -> list[torch.Tensor]:
    """Pack texts (eos between documents) into consecutive blocks of ``seq_len`` ids.

    Returns full blocks as one [N, seq_len] int64 tensor; with ``keep_tail`` a last shorter block
    (at least 2 ids, so it holds a prediction) is returned as a second [1, rest] tensor.
    """
    stream = _token_stream(tokenizer, texts)  # [L] int64
    n_full = stream.numel() // seq_len
    blocks = [stream[: n_full * seq_len].view(n_full, seq_len)]
    rest = stream[n_full * seq_len :]
    if keep_tail and rest.numel() >= 2:
        blocks.append(rest.view(1, -1))
    return blocks


def _lr_factor(step: int, cfg: LMTrainConfig) -> float:
    warmup = min(cfg.warmup, cfg.steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _next_token_loss(model: PreTrainedModel, input_ids: torch.Tensor, reduction: str) -> torch.Tensor:
    # input_ids: [B, T] int64 -> logits [B, T, V] float32; position t predicts token t + 1
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        input_ids[:, 1:].reshape(-1),
        reduction=reduction,
    )


def train_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: LMTrainConfig,
    *,
    progress: Callable[[dict[str, float]], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Train ``model`` in place with AdamW and a warmup-cosine schedule; returns run statistics.

    ``progress`` gets ``{"step", "loss", "lr", "tokens", "seconds"}`` every ``log_every`` steps and
    at the last step. The model is left in eval mode.
    """
    (blocks,) = pack_tokens(tokenizer, texts, cfg.seq_len)  # [N, seq_len] int64
    if blocks.shape[0] == 0:
        raise ValueError(f"corpus is shorter than one block of seq_len={cfg.seq_len} tokens")
    device = next(model.parameters()).device
    blocks = blocks.to(device)

    # decay matrices only: decaying norms' gains and biases hurts tiny models for no gain
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    generator = torch.Generator().manual_seed(cfg.seed)  # batch order independent of global state
    tokens_per_step = cfg.batch_size * cfg.seq_len

    start = clock()
    first_loss = 0.0
    recent: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # dropout, if the model has any
        model.train()
        for step in range(cfg.steps):
            idx = torch.randint(blocks.shape[0], (cfg.batch_size,), generator=generator)
            loss = _next_token_loss(model, blocks[idx.to(device)], "mean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            value = loss.item()
            if step == 0:
                first_loss = value
            recent = (recent + [value])[-10:]
            last = step == cfg.steps - 1
            if progress is not None and ((step + 1) % cfg.log_every == 0 or last):
                progress(
                    {
                        "step": step + 1,
                        "loss": value,
                        "lr": optimizer.param_groups[0]["lr"],
                        "tokens": (step + 1) * tokens_per_step,
                        "seconds": clock() - start,
                    }
                )
        model.eval()
    seconds = clock() - start
    return {
        "first_loss": first_loss,
        "loss": sum(recent) / len(recent),  # mean of the last 10 steps: one batch's loss is noisy
        "steps": cfg.steps,
        "tokens": cfg.steps * tokens_per_step,
        "seconds": seconds,
        "tokens_per_second": cfg.steps * tokens_per_step / seconds if seconds > 0 else float("inf"),
    }


@torch.inference_mode()
def lm_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    seq_len: int = 128,
    *,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean next-token cross entropy (nats) and perplexity on ``texts``, packed like training."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for blocks in pack_tokens(tokenizer, texts, seq_len, keep_tail=True):
        for i in range(0, blocks.shape[0], batch_size):
            batch = blocks[i : i + batch_size].to(device)  # [b, T] int64
            total += _next_token_loss(model, batch, "sum").item()
            count += batch.shape[0] * (batch.shape[1] - 1)
    model.train(was_training)
    if count == 0:
        raise ValueError("texts hold fewer than 2 tokens: nothing to predict")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": float(count)}


def unigram_loss(
    tokenizer: PreTrainedTokenizerBase, train_texts: Sequence[str], eval_texts: Sequence[str]
) -> dict[str, float]:
    """Cross entropy of an add-one unigram model fit on ``train_texts``: the bar an LM must clear."""
    counts = Counter(_token_stream(tokenizer, train_texts).tolist())
    vocab = len(tokenizer)
    denom = sum(counts.values()) + vocab
    eval_ids = _token_stream(tokenizer, eval_texts).tolist()
    if not eval_ids:
        raise ValueError("eval_texts are empty")
    loss = -sum(math.log((counts[t] + 1) / denom) for t in eval_ids) / len(eval_ids)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": float(len(eval_ids))}

"""One call from nothing to a loadable model folder: the entry point for tests and demos."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from .corpus import synthetic_corpus
from .factory import TinyLMConfig, build_lm, save_model
from .tokenizer import train_tokenizer
from .train import LMTrainConfig, train_lm

__all__ = ["DEFAULT_CORPUS_DOCS", "STATS_FILE", "build_tiny_lm_folder"]

DEFAULT_CORPUS_DOCS = 4000  # ~650k characters, ~210k tokens: several passes fit in a 300-step run
STATS_FILE = "distillguard_build.json"  # how the folder was made, beside the weights


def build_tiny_lm_folder(
    folder: str | Path,
    *,
    arch: str = "llama",
    vocab_size: int = 2048,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 256,
    train_steps: int = 0,
    train_config: LMTrainConfig | None = None,
    seed: int = 0,
    corpus: Sequence[str] | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> Path:
    """Train a tokenizer, build a model, optionally train it, and save both into ``folder``.

    ``corpus`` defaults to ``synthetic_corpus(DEFAULT_CORPUS_DOCS, seed=seed)``. ``vocab_size`` caps
    the tokenizer; the model's vocabulary is the tokenizer's real size, which is smaller on a corpus
    with few distinct words (the synthetic one saturates near 1.4k). ``train_steps`` > 0 trains with
    ``train_config`` (default ``LMTrainConfig()``) for that many steps. Load with ``load_model``.
    """
    if train_steps < 0:
        raise ValueError(f"train_steps must be >= 0, got {train_steps}")
    texts = list(corpus) if corpus is not None else synthetic_corpus(DEFAULT_CORPUS_DOCS, seed=seed)
    if not texts:
        raise ValueError("corpus is empty")
    tokenizer = train_tokenizer(texts, vocab_size, model_max_length=max_positions)
    cfg = TinyLMConfig(
        arch=arch,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        max_positions=max_positions,
    )
    model = build_lm(cfg, tokenizer=tokenizer, seed=seed)
    record: dict[str, object] = {"model": asdict(cfg), "seed": seed, "corpus_docs": len(texts)}
    if train_steps > 0:
        train_cfg = replace(train_config or LMTrainConfig(seed=seed), steps=train_steps)
        if train_cfg.seq_len > max_positions:
            raise ValueError(f"seq_len {train_cfg.seq_len} exceeds max_positions {max_positions}")
        record["train"] = asdict(train_cfg)
        record["train_stats"] = train_lm(model, tokenizer, texts, train_cfg, progress=progress)
    path = save_model(model, tokenizer, folder)
    (path / STATS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return path

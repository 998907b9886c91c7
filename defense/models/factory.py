"""Build, save and load small causal language models.

``load_model`` is the one loading path for any local model folder, ours or a user's: the ordinary
transformers auto classes, local files only, no remote code, fp32 on CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = ["ARCHS", "TinyLMConfig", "build_lm", "load_model", "save_model"]

logger = logging.getLogger(__name__)

# default special-token ids when no tokenizer is given; train_tokenizer assigns the same ones
_DEFAULT_EOS_ID = 0
_DEFAULT_PAD_ID = 1


@dataclass(frozen=True)
class TinyLMConfig:
    """Shape of a small causal LM. ``intermediate_size=None`` picks the usual ratio for the arch."""

    arch: str = "llama"
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None
    max_positions: int = 256
    tie_embeddings: bool = True  # at V=8k, d=256 an untied head alone is 2M params: half a tiny model

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; known: {', '.join(sorted(ARCHS))}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (eos and pad), got {self.vocab_size}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size must be divisible by num_heads, got {self.hidden_size} and {self.num_heads}"
            )
        head_dim = self.hidden_size // self.num_heads
        if self.arch == "llama" and head_dim % 2 != 0:
            raise ValueError(f"llama needs an even head dim for rotary embeddings, got {head_dim}")
        if self.intermediate_size is None:
            # the frozen dataclass resolves its own default once, so every reader sees the same int
            object.__setattr__(self, "intermediate_size", _default_ffn(self.arch, self.hidden_size))
        elif (
            not isinstance(self.intermediate_size, int)
            or isinstance(self.intermediate_size, bool)
            or self.intermediate_size < 1
        ):
            raise ValueError(f"intermediate_size must be a positive int, got {self.intermediate_size!r}")


def _default_ffn(arch: str, hidden: int) -> int:
    if arch == "llama":
        # SwiGLU has three matrices: 8/3 * d keeps the MLP's parameters equal to a 4 * d GELU MLP
        return math.ceil(8 * hidden / 3 / 32) * 32  # rounded up to a multiple of 32 for matmul tiles
    return 4 * hidden


def _gpt2_config(cfg: TinyLMConfig, ids: dict[str, int]) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_positions,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        # no dropout: tiny models trained for minutes underfit, they do not overfit
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        **ids,
    )


def _llama_config(cfg: TinyLMConfig, ids: dict[str, int]) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=cfg.tie_embeddings,
        **ids,
    )


ARCHS: dict[str, Callable[[TinyLMConfig, dict[str, int]], PretrainedConfig]] = {
    "gpt2": _gpt2_config,
    "llama": _llama_config,
}


def _special_ids(tokenizer: PreTrainedTokenizerBase | None, vocab_size: int) -> dict[str, int]:
    if tokenizer is None:
        return {
            "bos_token_id": _DEFAULT_EOS_ID,
            "eos_token_id": _DEFAULT_EOS_ID,
            "pad_token_id": _DEFAULT_PAD_ID,
        }
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size is {vocab_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; train one with defense.models.train_tokenizer")
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def build_lm(
    cfg: TinyLMConfig,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialized fp32 causal LM, in eval mode; the same ``seed`` gives the same weights.

    bos/eos/pad ids come from ``tokenizer`` (explicitly: GPT-2's default 50256 does not exist in a
    small vocabulary); without one they are 0, 0 and 1, as ``train_tokenizer`` assigns them.
    """
    ids = _special_ids(tokenizer, cfg.vocab_size)
    config = ARCHS[cfg.arch](cfg, ids)
    # a forked RNG: the seed fixes the init without touching the caller's global torch state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.to(torch.float32)
    for name, value in ids.items():
        setattr(model.generation_config, name, value)
    return model.eval()


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """Save weights (safetensors), config and tokenizer into ``folder``; returns it as a Path."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)  # transformers 5 always writes model.safetensors
    tokenizer.save_pretrained(path)
    return path


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _check_model_folder(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model folder does not exist: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"model path is not a folder: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json; is it a transformers model folder?")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"model folder {path} has no weights; expected one of: {', '.join(_WEIGHT_FILES)}"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {path} has no tokenizer; expected one of: {', '.join(_TOKENIZER_FILES)}"
        )


def load_model(
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a local folder, in eval mode on ``device``.

    On CPU the model is always fp32 (bf16 matmuls are about 400x slower on this class of CPU), so a
    bf16/fp16 folder is cast up. A tokenizer without a pad token gets eos as pad, so batches pad.
    """
    path = Path(folder)
    _check_model_folder(path)
    device = torch.device(device)
    if device.type == "cpu" and dtype != torch.float32:
        logger.warning("load_model: computing in float32 on cpu instead of %s", dtype)
        dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer

"""Pieces the lm and reasoning tracks share: teachers and students from the model factory, and the
student evaluations (held-out loss, KL to the teacher, top-1 fidelity)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from defense.errors import ConfigError
from defense.models import LMTrainConfig, TinyLMConfig, build_lm, lm_loss, load_model, save_model, train_lm

from ..config import LMSpec
from ..generate import forward_logprobs
from ..metrics import kl_divergence

TEACHER_STATS = "teacher_stats.json"


def build_student(spec: LMSpec, tokenizer, *, max_positions: int, seed: int, device: str) -> torch.nn.Module:
    """A fresh student from the factory (or a local pretrained one) sharing the teacher's tokenizer."""
    if spec.model_folder:
        model, tok = load_model(spec.model_folder, device=device)
        if len(tok) != len(tokenizer) or tok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"student model folder {spec.model_folder} does not share the teacher's tokenizer",
                              path="student.model_folder")
        return model
    cfg = TinyLMConfig(arch=spec.arch, vocab_size=len(tokenizer), hidden_size=spec.hidden, num_layers=spec.layers,
                       num_heads=spec.heads, max_positions=max_positions)
    return build_lm(cfg, tokenizer=tokenizer, seed=seed).to(device)


def train_or_load_teacher(folder: Path, spec: LMSpec, tokenizer, texts: Sequence[str], *, steps: int,
                          batch_size: int, seq_len: int, lr: float, seed: int, device: str):
    """(model, tokenizer, stats): a factory LM trained on ``texts`` and saved in ``folder``, or reloaded
    from there (a resumed run), or a user's model folder (``spec.model_folder``) used as is."""
    if spec.model_folder:
        model, tok = load_model(spec.model_folder, device=device)
        return model, tok, {"model_folder": spec.model_folder}
    if (folder / "config.json").exists():
        model, tok = load_model(folder, device=device)
        return model, tok, json.loads((folder / TEACHER_STATS).read_text())
    model = build_student(spec, tokenizer, max_positions=max(seq_len, 128), seed=seed, device=device)
    # warmup of a tenth of the run: the arithmetic teacher learned to copy operands from the question
    # (88% solved at 300 steps) with 30 warmup steps, and stayed near 60% with 20
    cfg = LMTrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                        warmup=max(20, steps // 10), log_every=max(1, steps // 5))
    stats = train_lm(model, tokenizer, list(texts), cfg)
    save_model(model, tokenizer, folder)
    stats = {**stats, "train": asdict(cfg)}
    (folder / TEACHER_STATS).write_text(json.dumps(stats, indent=1) + "\n")
    return model.eval(), tokenizer, stats


@torch.inference_mode()
def student_vs_teacher(student: torch.nn.Module, teacher: torch.nn.Module, blocks: torch.Tensor, *,
                       batch_size: int = 16) -> dict[str, float]:
    """KL(teacher || student) per position and top-1 fidelity on held-out text blocks [N, T]."""
    kl_sum, agree, count = 0.0, 0.0, 0
    pairs = zip(forward_logprobs(teacher, blocks, batch_size=batch_size),
                forward_logprobs(student, blocks, batch_size=batch_size), strict=True)
    for (_, t_lp), (_, s_lp) in pairs:
        t = t_lp.reshape(-1, t_lp.shape[-1]).cpu().numpy()
        s = s_lp.reshape(-1, s_lp.shape[-1]).cpu().numpy()
        kl_sum += float(kl_divergence(t, s).sum())
        agree += float(np.sum(t.argmax(-1) == s.argmax(-1)))
        count += t.shape[0]
    return {"kl": kl_sum / count, "fidelity": agree / count}


def evaluate_lm_student(student, teacher, tokenizer, eval_texts: Sequence[str], blocks: torch.Tensor, *,
                        seq_len: int) -> dict[str, float]:
    loss = lm_loss(student, tokenizer, list(eval_texts), seq_len)
    out = {"loss": loss["loss"], "perplexity": loss["perplexity"]}
    out.update(student_vs_teacher(student, teacher, blocks))
    out["neg_kl"] = -out["kl"]
    out["neg_loss"] = -out["loss"]
    return out

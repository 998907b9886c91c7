"""The proxy student's loss gradient, computed once offline and saved with where it came from.

Antidistillation sampling needs g = grad of the proxy's SFT loss on clean, held-out teacher traces (the
loss a distiller wants to lower). It is computed once: fp32, averaged over the traces, completion tokens
only when a prompt length is given. The file is a safetensors of the gradient plus a JSON provenance
record (proxy folder fingerprint, trace count, tokens, loss), so a gradient is never paired with a proxy
it was not computed for.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["GRAD_FILE", "PROVENANCE_FILE", "fingerprint", "load_gradient", "proxy_gradient", "save_gradient"]

GRAD_FILE = "proxy_gradient.safetensors"
PROVENANCE_FILE = "proxy_gradient.json"


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over parameter names, shapes and values: which weights a gradient belongs to."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def proxy_gradient(model: Any, traces: Sequence[Sequence[int]], *, prompt_lengths: Sequence[int] | None = None,
                   batch_size: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Mean gradient of the next-token NLL over ``traces`` (token ids), and {tokens, loss}.

    ``prompt_lengths[i]`` tokens of trace i are context only (completion-only loss, as a distiller's SFT).
    """
    if not traces:
        raise ValueError("need at least one trace")
    if prompt_lengths is not None and len(prompt_lengths) != len(traces):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(traces)} traces")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()  # dropout off: the gradient of the loss the deployed proxy sees
    device = next(model.parameters()).device
    total_tokens, total_loss = 0, 0.0
    for start in range(0, len(traces), batch_size):  # batches of traces, not tokens: memory-bound
        chunk = traces[start:start + batch_size]
        width = max(len(t) for t in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        target_mask = torch.zeros((len(chunk), width - 1), dtype=torch.bool, device=device)
        for i, t in enumerate(chunk):
            ids[i, : len(t)] = torch.tensor(list(t), device=device)
            mask[i, : len(t)] = 1
            first = max(1, prompt_lengths[start + i]) if prompt_lengths is not None else 1
            target_mask[i, first - 1: len(t) - 1] = True
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").view_as(target_mask)
        loss_sum = nll[target_mask].sum()
        n = int(target_mask.sum())
        model.zero_grad(set_to_none=True)
        loss_sum.backward()
        for name, p in params.items():
            if p.grad is not None:
                grads[name] += p.grad.float()
        total_tokens += n
        total_loss += float(loss_sum.detach())
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the traces hold no completion tokens to score")
    return {n: g / total_tokens for n, g in grads.items()}, {"tokens": total_tokens, "loss": total_loss / total_tokens}


def save_gradient(folder: str | Path, grad: dict[str, torch.Tensor], *, model: torch.nn.Module,
                  stats: dict[str, float], source: str = "") -> Path:
    """Write the gradient and its provenance into ``folder``."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    save_file({n: g.contiguous().cpu() for n, g in grad.items()}, str(path / GRAD_FILE))
    record = {"proxy_fingerprint": fingerprint(model), "source": source, "created": datetime.now(UTC).isoformat(),
              "norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad.values()))), **stats}
    (path / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_gradient(folder: str | Path, *, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a saved gradient, refusing one computed for other weights."""
    path = Path(folder)
    if not (path / GRAD_FILE).is_file() or not (path / PROVENANCE_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {GRAD_FILE} with {PROVENANCE_FILE}; make one with save_gradient")
    record = json.loads((path / PROVENANCE_FILE).read_text())
    fp = fingerprint(model)
    if record.get("proxy_fingerprint") != fp:
        raise ValueError(f"gradient in {path} was computed for proxy {record.get('proxy_fingerprint')}, "
                         f"not for this proxy ({fp})")
    grad = load_file(str(path / GRAD_FILE))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(grad) != names:
        raise ValueError(f"gradient in {path} does not cover this proxy's parameters")
    return grad, record

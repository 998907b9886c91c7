"""The proxy student and loss gradient antidistillation sampling needs, prepared once per study.

The paper's proxy is a smaller pretrained model sharing the teacher's tokenizer, and its gradient is the
proxy's SFT loss gradient on held-out clean teacher traces. No pretrained model of this tokenizer exists
here, so the proxy is the factory architecture (at most a quarter of the teacher's parameters) trained
briefly by completion-only SFT on the teacher's clean traces of problems disjoint from the evaluation
problems and every distiller query: a model that knows the format and has partly learned the task, as a
pretrained model that has not yet been distilled. The gradient is then taken on the clean traces of a
further disjoint set of problems.

Everything lands in one folder (``proxy/``, a model folder; ``gradient/``, the safetensors gradient with
its provenance; ``recipe.json``): a resumed run reuses it when the recipe matches and refuses a folder
prepared by another recipe, and the gradient only loads for the proxy whose fingerprint it records.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from defense.antidistill.gradient import fingerprint, load_gradient, proxy_gradient, save_gradient
from defense.errors import ConfigError
from defense.models import load_model, save_model

from ..config import LMSpec, ProxySpec
from ..generate import generate
from ..train import build_seq_data, train_lm_student
from .arithmetic import Problem, make_problem, parse_answer

RECIPE = "recipe.json"
PROXY_DIR = "proxy"
GRADIENT_DIR = "gradient"
# problem streams of the proxy's data, apart from the teacher's (seed), eval (+50k) and queries (+60k + s)
TRAIN_OFFSET = 70_000
HOLDOUT_OFFSET = 80_000


@dataclass(frozen=True)
class PreparedProxy:
    proxy_path: Path
    gradient_path: Path
    record: dict[str, Any]

    def params(self) -> dict[str, str]:
        """What fills an antidistill entry's proxy_path and gradient_path (absolute: a sidecar runs elsewhere)."""
        return {"proxy_path": str(self.proxy_path.resolve()), "gradient_path": str(self.gradient_path.resolve())}


def disjoint_problems(n: int, seed: int, exclude: Iterable[str], **kw: int) -> list[Problem]:
    """``n`` distinct problems from a seeded stream, none whose prompt is in ``exclude``."""
    import random

    rng = random.Random(seed)
    banned = set(exclude)
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 10_000:
            raise ConfigError(f"cannot draw {n} problems disjoint from the {len(banned)} excluded ones: "
                              "the problem space is too small; lower tracks.reasoning.proxy.problems/holdout")
        p = make_problem(rng, **kw)
        if p.prompt not in banned:
            banned.add(p.prompt)
            out.append(p)
    return out


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings count once


def _digest(items: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]


def recipe(spec: ProxySpec, *, teacher: torch.nn.Module, seed: int, problem_kw: dict[str, int],
           exclude: Sequence[str], seq_len: int, gen_tokens: int) -> dict[str, Any]:
    """Everything that decides the proxy and its gradient: a prepared folder is reused only for the same."""
    return {"proxy": asdict(spec), "teacher_fingerprint": fingerprint(teacher), "seed": seed,
            "problems": dict(problem_kw), "excluded_prompts": len(set(exclude)), "excluded_digest": _digest(exclude),
            "seq_len": seq_len, "gen_tokens": gen_tokens}


def prepare_proxy(folder: Path, spec: ProxySpec, *, teacher: torch.nn.Module, tokenizer: Any,
                  build: Callable[[LMSpec, int], torch.nn.Module], seed: int, problem_kw: dict[str, int],
                  exclude: Sequence[str], seq_len: int, gen_tokens: int, gen_batch: int,
                  device: str = "cpu") -> PreparedProxy:
    """Train (or reload) the proxy and compute (or reload) its gradient in ``folder``.

    ``build(lm_spec, seed)`` makes a fresh factory model sharing the teacher's tokenizer.
    """
    want = recipe(spec, teacher=teacher, seed=seed, problem_kw=problem_kw, exclude=exclude, seq_len=seq_len,
                  gen_tokens=gen_tokens)
    proxy_dir, grad_dir = folder / PROXY_DIR, folder / GRADIENT_DIR
    if (folder / RECIPE).exists():
        have = json.loads((folder / RECIPE).read_text())
        if have.get("recipe") != json.loads(json.dumps(want)):
            raise ConfigError(f"{folder} holds a proxy prepared by another recipe (proxy settings, teacher or "
                              "problem sets differ); remove it or use another run directory")
        proxy, _ = load_model(proxy_dir, device=device)
        load_gradient(grad_dir, model=proxy)  # refuses a gradient of other weights
        return PreparedProxy(proxy_dir, grad_dir, have)

    t0 = time.perf_counter()
    eos = tokenizer.eos_token_id
    train = disjoint_problems(spec.problems, seed + TRAIN_OFFSET, exclude, **problem_kw)
    holdout = disjoint_problems(spec.holdout, seed + HOLDOUT_OFFSET, [*exclude, *(p.prompt for p in train)],
                                **problem_kw)

    def traces(items: list[Problem], tag: int) -> tuple[list[list[int]], list[list[int]], float]:
        ids = tokenizer([p.prompt for p in items], add_special_tokens=False)["input_ids"]
        gens = generate(teacher, ids, max_new_tokens=gen_tokens, temperature=spec.teacher_temperature, eos_id=eos,
                        seed=seed + tag, batch_size=gen_batch, stop_at_eos=True, desc="proxy traces")
        texts = tokenizer.batch_decode([g.tokens for g in gens], skip_special_tokens=True)
        acc = sum(parse_answer(t) == p.answer for t, p in zip(texts, items, strict=True)) / len(items)
        return ids, [g.tokens for g in gens], acc

    train_ids, train_out, train_acc = traces(train, TRAIN_OFFSET)
    hold_ids, hold_out, hold_acc = traces(holdout, HOLDOUT_OFFSET)

    proxy = build(LMSpec(arch=spec.arch, hidden=spec.hidden, layers=spec.layers, heads=spec.heads), seed + 7)
    n_proxy, n_teacher = parameter_count(proxy), parameter_count(teacher)
    if n_proxy > spec.max_param_ratio * n_teacher:
        raise ConfigError(f"the proxy has {n_proxy} parameters, more than {spec.max_param_ratio:g} of the teacher's "
                          f"{n_teacher}; make it smaller", path="tracks.reasoning.proxy")
    stats: dict[str, Any] = {}
    if spec.steps:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        stats = train_lm_student(proxy, build_seq_data(train_ids, train_out, pad_id=pad), loss="sft",
                                 steps=spec.steps, batch_size=spec.batch, lr=spec.lr, seed=seed + 7, desc="proxy")
    proxy.eval()
    grad, gstats = proxy_gradient(proxy, [p + c for p, c in zip(hold_ids, hold_out, strict=True)],
                                  prompt_lengths=[len(p) for p in hold_ids])
    save_model(proxy, tokenizer, proxy_dir)
    source = (f"reasoning track: completion-only SFT loss on {len(holdout)} clean teacher traces "
              f"(temperature {spec.teacher_temperature:g}), problem seed {seed + HOLDOUT_OFFSET}")
    save_gradient(grad_dir, grad, model=proxy, stats=gstats, source=source)
    record = {"recipe": want, "proxy_parameters": n_proxy, "teacher_parameters": n_teacher,
              "proxy_train_loss": stats.get("loss"), "holdout_loss": gstats["loss"], "holdout_tokens": gstats["tokens"],
              "clean_trace_accuracy": {"train": train_acc, "holdout": hold_acc},
              "seconds": time.perf_counter() - t0}
    tmp = folder / (RECIPE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, folder / RECIPE)  # last: a folder without it is rebuilt from scratch
    return PreparedProxy(proxy_dir, grad_dir, record)

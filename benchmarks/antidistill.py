"""Antidistillation sampling cost per generated token, against plain sampling, in one run.

    ./dev bench antidistill        # or: .venv/bin/python benchmarks/antidistill.py

Teacher: the reasoning track's standard shape (experiments/config.py LMSpec: llama, hidden 128, 2 layers,
4 heads); proxy: hidden 64, 1 layer (about a seventh of the teacher's parameters, under the quarter the
issue allows). Both random-weighted (cost does not depend on the weights), fp32, one thread. transformers
generate() with our LogitsProcessor adapter, 16 prompts x 64 new tokens, sampling at T=1. Writes
benchmarks/results/antidistill.json (``plain_ms_per_token``, ``ads_ms_per_token``); target ratio <= 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine, record  # noqa: E402

from defense.antidistill.gradient import proxy_gradient  # noqa: E402
from defense.antidistill.sampler import AntidistillParams, AntidistillSampling  # noqa: E402
from defense.models import TinyLMConfig, build_lm  # noqa: E402
from server_plugins.transformers import generate  # noqa: E402

V, B, NEW, PROMPT = 64, 16, 64, 24


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> int:
    torch.set_num_threads(1)  # shared 2-core machine: one thread for every model keeps the ratio fair
    teacher = build_lm(TinyLMConfig(vocab_size=V, hidden_size=128, num_layers=2, num_heads=4, max_positions=256))
    proxy = build_lm(TinyLMConfig(vocab_size=V, hidden_size=64, num_layers=1, num_heads=2, max_positions=256), seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, V, size=PROMPT).tolist() for _ in range(B)]
    grad, _ = proxy_gradient(proxy, [rng.integers(2, V, size=64).tolist() for _ in range(16)])
    ads = AntidistillSampling(AntidistillParams(lam=0.1), proxy=proxy, gradient=grad)

    def run(defense: object | None) -> float:
        t0 = time.perf_counter()
        out = generate(teacher, prompts, defense=defense, max_new_tokens=NEW, temperature=1.0, stop_at_eos=False,
                       seed=0)
        tokens = sum(len(o) for o in out)
        return (time.perf_counter() - t0) * 1e3 / tokens

    run(None), run(ads)  # warm up both paths
    plain = [run(None) for _ in range(3)]
    with_ads = [run(ads) for _ in range(3)]
    result = {
        "plain_ms_per_token": round(float(np.median(plain)), 4), "ads_ms_per_token": round(float(np.median(with_ads)), 4),
        "teacher_params": params(teacher), "proxy_params": params(proxy),
        "proxy_over_teacher_params": round(params(proxy) / params(teacher), 3),
        "batch": B, "new_tokens": NEW, "prompt_tokens": PROMPT, "vocab": V, "threads": 1, **machine(),
    }
    ratio = result["ads_ms_per_token"] / result["plain_ms_per_token"]
    result["ads_over_plain"] = round(ratio, 3)
    result["targets_met"] = ratio <= 2.0 and result["proxy_over_teacher_params"] <= 0.25
    summary = (f"ADS {result['ads_ms_per_token']} ms/token vs plain {result['plain_ms_per_token']} (x{ratio:.2f}, "
               f"target <= 2) with a proxy of {result['proxy_over_teacher_params']} x the teacher's parameters; "
               f"targets {'met' if result['targets_met'] else 'MISSED'}")
    record("antidistill", result, summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

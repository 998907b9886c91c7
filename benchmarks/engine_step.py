"""The vLLM plugin's decode step as an engine drives it, against the watermark kernel alone and a softmax.

    .venv/bin/python benchmarks/engine_step.py [--device cuda] [--reps N] [--no-record]

``EngineDefense.process`` (server_plugins/vllm/core.py, what both adapters call) over a batch of B rows,
V=128256, KGW (lefthash, h=1) and Gumbel, fused (``fused: true``):
- v1: the V1 runner's way: each row's prefix is a ``TokenView`` over vLLM's live lists of prompt and output
  token ids (the plugin reads the last h tokens of each, on the host, every step), the batch's view cached
  between batch changes;
- v2: Model Runner V2's way: the prefixes are a [B, L] int64 tensor already on the logits' device;
- softmax: ``torch.softmax`` over the same logits, the floor any sampler pays.
Before each timed step every row's output list grows by one token, as vLLM's does (not timed: vLLM's
cost). Each timing is the median of ``--reps`` blocks of 5 consecutive steps (the first of each block
left out), each step timed to a ``torch.cuda.synchronize`` on a GPU. Writes
benchmarks/results/engine_step[_cuda].json and appends a dated line to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine, record  # noqa: E402

BATCHES = (1, 64, 256)
V = 128256
PROMPT, OUTPUT = 32, 16  # tokens each row holds when timing starts
BLOCK = 5


def _engine(variant: str, ring):
    from defense.base import Deps
    from defense.chain import ChainEntry, DefenseChain
    from defense.watermark import GreenListParams, GreenListWatermark, GumbelParams, GumbelWatermark
    from server_plugins.vllm.core import EngineDefense

    deps = Deps(keys=ring)
    if variant == "gumbel":
        d = GumbelWatermark(GumbelParams(context=1, fused=True), deps=deps)
    else:
        d = GreenListWatermark(GreenListParams(gamma=0.25, delta=2.0, context=1, hashing=variant, fused=True),
                               deps=deps)
    return EngineDefense(DefenseChain([ChainEntry(variant, d)]), ring, model="bench")


def case(variant: str, b: int, device: str, reps: int, ring) -> dict:
    import torch

    from server_plugins.vllm.batch import BatchSlots, TokenView

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    g = torch.Generator().manual_seed(b)
    engine = _engine(variant, ring)
    logits = (torch.randn(b, V, generator=g) * 3).to(device)
    prompts = torch.randint(0, V, (b, PROMPT), generator=g).tolist()
    outputs = torch.randint(0, V, (b, OUTPUT), generator=g).tolist()
    slots = BatchSlots()
    for i in range(b):
        slots.put(i, engine.row(None, temperature=1.0, prefix=TokenView(prompts[i], outputs[i])))
    slots.resize(b)
    dev_prefixes = torch.tensor([p + o for p, o in zip(prompts, outputs, strict=True)], device=device)

    def grow() -> None:
        for o in outputs:
            o.append(7)

    def v1() -> None:
        engine.process(logits, slots.view(None, device=logits.device))

    def v2() -> None:
        engine.process(logits, slots.view(None, device=logits.device), prefixes=dev_prefixes)

    def soft() -> None:
        torch.softmax(logits, dim=-1)

    timings: dict[str, list[float]] = {"v1": [], "v2": [], "softmax": []}
    fns = {"v1": v1, "v2": v2, "softmax": soft}
    t0 = time.perf_counter()
    v1()
    v2()  # compile (or recompile) for this shape, once
    compile_s = time.perf_counter() - t0
    for _ in range(reps):  # blocks interleaved: drift hits every contender alike
        for name, fn in fns.items():
            block = []
            for _ in range(BLOCK):
                grow()
                sync()
                t = time.perf_counter()
                fn()
                sync()
                block.append((time.perf_counter() - t) * 1e3)
            timings[name] += block[1:]
    out = {"variant": variant, "B": b, "V": V, "compile_s": round(compile_s, 1)}
    for name, ts in timings.items():
        out[f"{name}_ms"] = round(statistics.median(ts), 3)
        out[f"{name}_min_ms"] = round(min(ts), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU)")
    ap.add_argument("--reps", type=int, default=10, help="timed blocks per contender and case")
    ap.add_argument("--no-record", action="store_true", help="print only; write no results")
    args = ap.parse_args()

    import torch

    from defense.keys import KeyRing

    ring = KeyRing.generate()
    cases = []
    for b in BATCHES:
        for variant in ("lefthash", "gumbel"):
            c = case(variant, b, args.device, args.reps, ring)
            cases.append(c)
            print(json.dumps(c), flush=True)
    gpu = args.device != "cpu"
    result = {"cases": cases, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if gpu else None,
              "settings": {"V": V, "context": 1, "prompt_tokens": PROMPT, "output_tokens_at_start": OUTPUT,
                           "fused": True}, **machine()}
    parts = [f"{c['variant']} B={c['B']}: v1 {c['v1_ms']} / v2 {c['v2_ms']} / softmax {c['softmax_ms']} ms"
             for c in cases]
    where = f"{result['gpu']}, torch {torch.__version__}" if gpu else f"cpu, {result['threads']} threads"
    summary = f"{where}, V={V}, per decode step: " + "; ".join(parts)
    print(json.dumps(result, indent=2, sort_keys=True))
    print(summary)
    if not args.no_record:
        record("engine_step_cuda" if gpu else "engine_step", result, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs vLLM (cpu) for the integration tests; executed by the .venvs/vllm interpreter, not by pytest.

    python tests/support/vllm_driver.py SPEC.json OUT.json

SPEC: {"model": folder, "engine": {LLM kwargs}, "batches": [[{"prompt_token_ids": [...],
"params": {SamplingParams kwargs}}, ...], ...], "checks": [...]}. Each batch is one ``generate`` call, so
its requests share the engine's batch (more requests than max_num_seqs make vLLM add, remove and move
rows mid-generation). The plugin is not passed to ``LLM``: vLLM finds it through the entry point, as it
would in production. Checks (no engine needed): "loaders" (both runners' loaders resolve the entry
point), "duplicate" (the plugin named twice runs once), "async" (V1 under async scheduling),
"v2_drive" (the V2 adapter, built by vLLM's V2 loader, driven with vLLM's own state objects).
OUT: {"batches": [[{"token_ids", "logprobs": [[[token, logprob], ...] per step]}]], "checks", "seconds"}.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def run_batches(spec: dict[str, Any], seconds: dict[str, float]) -> list[list[dict[str, Any]]]:
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(model=spec["model"], **spec["engine"])
    seconds["engine_start"] = time.monotonic() - t0
    results = []
    for i, batch in enumerate(spec["batches"]):
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in batch]
        params = [SamplingParams(**r["params"]) for r in batch]
        t0 = time.monotonic()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds[f"batch_{i}"] = time.monotonic() - t0
        results.append([_completion(o) for o in outs])
    return results


def _completion(out: Any) -> dict[str, Any]:
    c = out.outputs[0]
    steps = [[[int(t), float(lp.logprob)] for t, lp in step.items()] for step in (c.logprobs or [])]
    return {"token_ids": [int(t) for t in c.token_ids], "logprobs": steps}


def check_loaders() -> dict[str, Any]:
    """What each runner's loader makes of the installed entry points (the frontend's and the worker's view)."""
    from vllm import SamplingParams
    from vllm.v1.sample import logits_processor as v1
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator
    from vllm.v1.worker.gpu.sample.logits_processor import loader as v2_loader

    out: dict[str, Any] = {
        "v1_classes": [c.__qualname__ for c in v1._load_logitsprocs_plugins()],
        "v2_classes": [c.__qualname__ for c in v2_loader._load_v2_logitsprocs_plugins()],
    }
    validate = build_custom_logits_processors_params_validator(None)
    validate(SamplingParams(extra_args={"dg_sig": "not hex", "dg_rid": "r"}))  # never refused: default profile
    out["v2_validator_accepts_bad_profile"] = True
    v1.validate_logits_processors_parameters(None, SamplingParams(extra_args={"dg_profile": "zz"}))
    out["v1_validator_accepts_bad_profile"] = True
    out["v1_instance"], out["v1_argmax_invariant"] = _v1_instance()
    out["v2_instance"], out["v2_declines"] = _v2_instance()
    return out


def _v1_instance() -> tuple[str, bool]:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import build_logitsprocs

    procs = build_logitsprocs(VllmConfig(), torch.device("cpu"), False, False, ())
    ours = [p for p in procs.all if type(p).__module__.startswith("server_plugins.")]
    return type(ours[0]).__qualname__, ours[0].is_argmax_invariant()


def _v2_state(vocab: int, max_reqs: int = 4, max_len: int = 32) -> Any:
    import torch
    import vllm.v1.worker.cpu.shm  # noqa: F401 - swaps in the CPU buffers, as vLLM's CPU worker does
    from vllm.v1.worker.gpu.states import RequestState

    return RequestState(max_num_reqs=max_reqs, max_model_len=max_len, max_num_batched_tokens=64,
                        num_speculative_steps=0, vocab_size=vocab, device=torch.device("cpu"))


def _v2_ours(state: Any) -> Any:
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors

    procs = build_custom_logits_processors(VllmConfig(), state, False, ())
    ours = [p for p in procs if type(p).__module__.startswith("server_plugins.")]
    assert len(ours) == 1, procs  # noqa: S101 - the test reads the message
    return ours[0]


def _v2_instance() -> tuple[str, bool]:
    from vllm import SamplingParams

    proc = _v2_ours(_v2_state(vocab=100))
    return type(proc).__qualname__, proc.add_request(0, SamplingParams()) is False


def check_duplicate() -> dict[str, Any]:
    """The plugin both installed (entry point) and named in --logits-processors: two instances in one
    pipeline share one loaded engine, and a step runs the defenses once."""
    import torch
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate, build_logitsprocs

    from server_plugins.vllm.entry import DistillGuardLogitsProcessor

    procs = build_logitsprocs(VllmConfig(), torch.device("cpu"), False, False, [DistillGuardLogitsProcessor])
    ours = [p for p in procs.all if type(p).__module__.startswith("server_plugins.")]
    for p in ours:
        p.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, SamplingParams(), [5], [])], moved=[]))
    logits, passed_on = torch.zeros(1, 50), []
    for p in ours:  # as vLLM's sampler does: each processor gets what the previous one returned
        out = p.apply(logits)
        passed_on.append(out is logits)  # the defense always returns a new tensor when it runs
        logits = out
    return {"instances": len(ours), "engines": len({id(p.engine) for p in ours}),
            "argmax": int(logits.argmax()), "passed_on": passed_on}


def check_async() -> dict[str, Any]:
    """V1 with async scheduling (vLLM's GPU default; the CPU platform turns it off): the plugin must be
    named in --logits-processors, or vLLM leaves -1 placeholders in the output ids it reads."""
    from types import SimpleNamespace as NS

    import torch

    from server_plugins.vllm.v1 import ENTRY, V1LogitsProcessor

    def config(named: list[Any] | None) -> Any:
        return NS(model_config=NS(logits_processors=named, served_model_name="tiny"),
                  scheduler_config=NS(async_scheduling=True), speculative_config=None)

    out: dict[str, Any] = {}
    try:
        V1LogitsProcessor(config(None), torch.device("cpu"), False)
        out["entry_point_only"] = "started"
    except ValueError as e:
        out["entry_point_only"] = str(e)
    out["named"] = V1LogitsProcessor(config([ENTRY]), torch.device("cpu"), False).engine is not None
    return out


def check_v2_drive(spec: dict[str, Any]) -> dict[str, Any]:
    """Two steps of the V2 adapter on CPU: slots in a shuffled row order, one slot reused, per-row profiles."""
    import numpy as np
    import torch
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    drive = spec["v2_drive"]
    vocab = drive["vocab"]
    state = _v2_state(vocab=vocab)
    proc = _v2_ours(state)
    steps = []
    for step in drive["steps"]:  # [{"add": {slot: {"history": [...], "extra_args": {...}}}, "order": [slots]}]
        for slot, req in step["add"].items():
            assert proc.add_request(int(slot), SamplingParams(extra_args=req["extra_args"])) is True  # noqa: S101
        for slot, hist in step["history"].items():
            state.all_token_ids.gpu[int(slot), :len(hist)] = torch.tensor(hist, dtype=torch.int32)
        order = np.asarray(step["order"], dtype=np.int32)
        hist_len = [len(step["history"][str(s)]) for s in step["order"]]
        pos = torch.tensor([n - 1 for n in hist_len], dtype=torch.int64)
        idx = torch.from_numpy(order.astype(np.int64))
        ctx = LogitsContext(
            expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=order,
            expanded_local_pos=torch.zeros(len(order), dtype=torch.int64),
            input_ids=torch.tensor([step["history"][str(s)][-1] for s in step["order"]], dtype=torch.int64),
            pos=pos, seq_lens_upper_bound_np=np.asarray(hist_len, dtype=np.int32))
        logits = torch.randn(len(order), vocab, generator=torch.Generator().manual_seed(0))
        steps.append(proc.apply(logits, ctx).argmax(dim=1).tolist())
    return {"argmax": steps}


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    import vllm  # noqa: F401 - timed on its own: the largest fixed cost

    seconds["import"] = time.monotonic() - t0
    result: dict[str, Any] = {"checks": {}, "seconds": seconds}
    # the engine first: it configures vLLM's logging, which the plugin's INFO lines go through
    result["batches"] = run_batches(spec, seconds) if spec.get("batches") else []
    if "loaders" in spec.get("checks", ()):
        result["checks"]["loaders"] = check_loaders()
    if "duplicate" in spec.get("checks", ()):
        result["checks"]["duplicate"] = check_duplicate()
    if "async" in spec.get("checks", ()):
        result["checks"]["async"] = check_async()
    if "v2_drive" in spec.get("checks", ()):
        result["checks"]["v2_drive"] = check_v2_drive(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM may start workers with spawn, which re-imports this file
    main()

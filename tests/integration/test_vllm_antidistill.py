"""Antidistillation sampling inside vLLM (cpu): the plugin's adapter decodes what the transformers adapter does.

A config with `antidistill` (a proxy from the model factory sharing the teacher's tokenizer, its gradient
saved with provenance) is loaded by vLLM through the entry point. Greedy decoding picks argmax(z + lam x
Delta) in both engines, so vLLM's tokens must equal `server_plugins.transformers.generate` with the same
defense, and differ from plain greedy decoding (lam is large enough to move the argmax). Rows of unequal
prompt lengths share vLLM's batch, so the proxy pair's caches see rows added, finished and re-batched.
"""

from __future__ import annotations

import pytest
import torch
from support.vllm_harness import ENGINE, require_vllm, run_driver, tiny_model, write_config, write_keys

from defense.antidistill.gradient import proxy_gradient, save_gradient
from defense.antidistill.sampler import AntidistillParams, AntidistillSampling
from defense.models import TinyLMConfig, build_lm, load_model, save_model
from server_plugins.transformers import generate

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LAM = 4.0
NEW = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_vllm()
    model_dir = tiny_model(tmp_path_factory)
    teacher, tok = load_model(model_dir)
    work = tmp_path_factory.mktemp("vllm-antidistill")
    v = teacher.config.vocab_size
    proxy = build_lm(TinyLMConfig(vocab_size=v, hidden_size=32, num_layers=1, num_heads=2, max_positions=256),
                     tokenizer=tok, seed=5)
    gen = torch.Generator().manual_seed(0)
    traces = [torch.randint(3, v, (24,), generator=gen).tolist() for _ in range(8)]
    grad, stats = proxy_gradient(proxy, traces, prompt_lengths=[4] * len(traces))
    save_model(proxy, tok, work / "proxy")
    save_gradient(work / "gradient", grad, model=proxy, stats=stats, source="test: random traces")
    keys_file, _ = write_keys(work)
    params = {"lam": LAM, "proxy_path": str(work / "proxy"), "gradient_path": str(work / "gradient")}
    config = write_config(work, keys_file, [{"type": "antidistill", "params": params}])
    prompts = [[(7 * i + 5 * j + 3) % v for j in range(3 + 2 * i)] for i in range(6)]
    batch = [{"prompt_token_ids": p, "params": {"temperature": 0.0, "max_tokens": NEW, "ignore_eos": True}}
             for p in prompts]
    out, log = run_driver({"model": str(model_dir), "engine": {**ENGINE, "logprobs_mode": "raw_logprobs"},
                           "batches": [batch], "checks": []}, workdir=work, config=config)
    ads = AntidistillSampling(AntidistillParams(**params))
    return teacher, prompts, [r["token_ids"] for r in out["batches"][0]], ads, log


def test_vllm_decodes_what_the_transformers_adapter_decodes(setup):
    teacher, prompts, got, ads, log = setup
    assert "distillguard" in log  # the plugin was loaded through the entry point
    want = generate(teacher, prompts, defense=ads, max_new_tokens=NEW, temperature=0.0, stop_at_eos=False)
    assert got == [list(w) for w in want]


def test_the_defense_changed_the_greedy_text(setup):
    teacher, prompts, got, _, _ = setup
    plain = generate(teacher, prompts, max_new_tokens=NEW, temperature=0.0, stop_at_eos=False)
    changed = sum(g != list(p) for g, p in zip(got, plain, strict=True))
    assert changed >= len(prompts) // 2, (got, plain)

"""vLLM (cpu) with the plugin installed but not configured: the single entry point resolves to each
runner's adapter, and without DISTILLGUARD_CONFIG the engine's logits are untouched.

One engine for the module (tests/support/vllm_driver.py in .venvs/vllm), found through the entry point.
"""

from __future__ import annotations

import pytest
from support.vllm_harness import ENGINE, require_vllm, run_driver, tiny_model, vocab_size

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def noop(tmp_path_factory):
    require_vllm()
    model = tiny_model(tmp_path_factory)
    v = vocab_size(model)
    prompts = [[(37 * i + 11 * j + 5) % v for j in range(4 + 3 * i)] for i in range(3)]
    spec = {
        "model": str(model), "engine": ENGINE, "checks": ["loaders"],
        "batches": [[{"prompt_token_ids": p,
                      "params": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "logprobs": 5, "ignore_eos": True}}
                     for p in prompts]],
    }
    out, log = run_driver(spec, workdir=tmp_path_factory.mktemp("vllm-noop"))
    return model, prompts, out, log


def test_one_entry_point_resolves_to_each_runners_adapter(noop):
    _, _, out, _ = noop
    c = out["checks"]["loaders"]
    # both loaders accept the one class the entry point names
    assert c["v1_classes"] == ["DistillGuardLogitsProcessor"]
    assert c["v2_classes"] == ["DistillGuardLogitsProcessor"]
    # and constructing it through each runner's loader gives that runner's adapter
    assert c["v1_instance"] == "V1LogitsProcessor"
    assert c["v2_instance"] == "V2LogitsProcessor"
    # neither frontend validator refuses a request over a bad profile (it gets the default instead)
    assert c["v1_validator_accepts_bad_profile"] and c["v2_validator_accepts_bad_profile"]


def test_unconfigured_plugin_is_a_cheap_no_op(noop):
    _, _, out, log = noop
    c = out["checks"]["loaders"]
    assert c["v1_argmax_invariant"] is True  # vLLM skips it for greedy batches
    assert c["v2_declines"] is True  # add_request False: the V2 sampler may skip the pipeline
    assert "plugin inactive (DISTILLGUARD_CONFIG is not set)" in log


def test_unconfigured_engine_logits_match_the_model(noop):
    """Greedy tokens and processed top-5 logprobs equal the model's own, computed by transformers."""
    import torch

    from defense.models import load_model

    model_dir, prompts, out, _ = noop
    model, _ = load_model(model_dir)
    for prompt, got in zip(prompts, out["batches"][0], strict=True):
        tokens = got["token_ids"]
        assert len(tokens) == MAX_TOKENS
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits.float(), dim=-1)
        for step, (tok, top) in enumerate(zip(tokens, got["logprobs"], strict=True)):
            assert float(ref[step].max() - ref[step, tok]) < 1e-4, f"step {step}: {tok} is not the argmax"
            for t, lp in top:
                assert abs(lp - float(ref[step, t])) < 2e-3, f"step {step} token {t}: {lp} vs {float(ref[step, t])}"

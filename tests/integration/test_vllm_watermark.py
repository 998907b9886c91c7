"""vLLM (cpu) with the KGW green-list watermark configured: text sampled through the engine carries the
mark its detector finds; a signed profile that turns the watermark off leaves it out, and a forged one
cannot (the default profile watermarks).

One engine for the module; detection runs here, in the main venv, from the generated token ids.
"""

from __future__ import annotations

import time

import pytest
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

from defense.base import Deps
from defense.keys import KeyRing
from defense.profile import Profile

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKENS = 96
# delta 3 rather than the default 2: the random tiny model is peaky enough that delta 2 gave log10 p
# near -7 on 64 tokens for some seeds; here a marked row lands far below -8, an unmarked one near 0
PARAMS = {"gamma": 0.25, "delta": 3.0, "context": 1}


@pytest.fixture(scope="module")
def watermarked(tmp_path_factory):
    require_vllm()
    kgw = pytest.importorskip("defense.watermark.kgw")
    model = tiny_model(tmp_path_factory)
    v = vocab_size(model)
    work = tmp_path_factory.mktemp("vllm-watermark")
    # a fixed key: the unmarked row's p-value is a draw over green lists, below 1e-2 on about one key in a
    # hundred; with a fresh key per run that draw fails CI now and then for nothing the code did
    keys_file, keys = write_keys(work, fixed_tag="vllm-watermark")
    config = write_config(work, keys_file, [{"type": "watermark", "params": PARAMS}])
    now = time.time()
    off = Profile(watermark=False)
    forged_off = signed_args(KeyRing.generate(), off, "r-forged", now=now)
    forged_off["dg_kid"] = keys.primary_id
    cases = [("default", {}, True), ("default2", {}, True),
             ("signed_off", signed_args(keys, off, "r-off", now=now), False),
             ("forged_off", forged_off, True)]
    batch = [{"prompt_token_ids": [(53 * i + 17 * j + 9) % v for j in range(5)],
              "params": {"temperature": 1.0, "seed": 100 + i, "max_tokens": TOKENS, "ignore_eos": True,
                         "extra_args": xargs}}
             for i, (_, xargs, _) in enumerate(cases)]
    out, _ = run_driver({"model": str(model), "engine": ENGINE, "batches": [batch]}, workdir=work, config=config)
    wm = kgw.GreenListWatermark(kgw.GreenListParams(**PARAMS), deps=Deps(keys=keys))
    return cases, out["batches"][0], wm.detector()


def test_detector_finds_the_mark_in_text_generated_through_vllm(watermarked):
    cases, outs, detector = watermarked
    for (name, _, marked), got in zip(cases, outs, strict=True):
        assert len(got["token_ids"]) == TOKENS
        d = detector.detect(got["token_ids"])
        if marked:
            assert d.detected and d.log10_p < -8, f"{name}: log10 p = {d.log10_p:.1f}"
        else:
            assert not d.detected and d.log10_p > -2, f"{name}: log10 p = {d.log10_p:.1f}"

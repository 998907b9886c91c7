"""The real vLLM OpenAI server (cpu, .venvs/vllm) behind the real Envoy, with the sidecar's ext_proc.

One stack per module: the model factory's tiny random llama served by ``python -m
vllm.entrypoints.openai.api_server`` with the distillguard plugin (the KGW watermark in its sampler,
``--logprobs-mode processed_logprobs``, ``DISTILLGUARD_CONFIG`` the sidecar's own config), ``distillguard
serve`` with ``front.envoy_ext_proc: true`` and ``front.engine_logprobs_mode: processed`` (request rules,
a budget with small limits, keyed noise), and Envoy from examples/envoy.yaml. Each test uses its own API
key, so budgets do not leak between tests. Skips when .venvs/vllm or Envoy is missing, saying why.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from support.openai_stack import (
    DEFENSES,
    EnvoyStack,
    auth,
    call,
    chat_top_values,
    check_settle,
    check_throttle,
    key,
    no_envoy_reason,
    settles,
    sse_events,
    stream_tops,
    streamed_chat_top_values,
    tiny_model,
    tops,
    values,
    wait_for,
)
from support.sidecar import write_config
from support.vllm_harness import require_vllm, signed_args
from support.watermark import write_fixed_key_file

from defense.base import Deps
from defense.profile import Profile
from server_plugins.envoy.process import find_envoy
from server_plugins.vllm.process import VLLMServer

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(find_envoy() is None, reason=no_envoy_reason())]
ADMIN = EnvoyStack.ADMIN
PROMPT = "Alice lives in a small town near the river. She works as a"
# delta 3: on the random tiny model a marked 64-token text lands far below log10 p = -6 (see
# test_vllm_watermark.py); the unmarked control stays near 0
WATERMARK = {"type": "watermark", "params": {"gamma": 0.25, "delta": 3.0, "context": 1}}
WM_TOKENS = 64


class Stack(EnvoyStack):
    """vLLM (cpu) with the plugin (keyed noise at the front, the watermark in the engine) behind Envoy."""

    def __init__(self, tmp):
        # a fixed key: the unmarked control's p-value is then the same draw on every run
        write_fixed_key_file(tmp / "keys.yaml", tag="vllm-envoy")
        config = write_config(tmp, overrides={
            "front": {"envoy_ext_proc": True, "engine_logprobs_mode": "processed"},
            "defenses": [*DEFENSES, WATERMARK]})
        self.model = tiny_model(tmp / "tiny")
        super().__init__(tmp, config, lambda: VLLMServer(self.model, tmp, config=config))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_vllm()
    s = Stack(tmp_path_factory.mktemp("vllm-envoy"))
    yield s
    s.stop()


def completion(**kw):
    # token ids as the top-logprob keys: partial UTF-8 tokens of the random model would collapse as text
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 5,
            "return_tokens_as_token_ids": True, **kw}


def test_vllm_runs_the_plugin(stack):
    assert "distillguard: plugin active with sampling defenses watermark" in stack.engine.log(200_000)


def test_buffered_completion_is_perturbed_argmax_kept_and_repeat_stable(stack):
    t = key()
    # straight to vLLM: no front, the plugin's default profile (the same watermark strength the front signs)
    direct = call("POST", stack.engine.url + "/v1/completions", completion()).json()
    a = call("POST", stack.envoy.url + "/v1/completions", completion(), headers=auth(t))
    b = call("POST", stack.envoy.url + "/v1/completions", completion(), headers=auth(t))
    assert a.status == 200 and a.headers["server"] == "envoy", a.body[:500]
    da, db = a.json(), b.json()
    assert da["choices"][0]["text"] == direct["choices"][0]["text"]
    assert [[tok for tok, _ in row] for row in tops(da)] == [[tok for tok, _ in row] for row in tops(direct)]
    clean, noisy = values(direct), values(da)
    assert not np.allclose(clean, noisy, atol=1e-3)
    assert (noisy.argmax(1) == clean.argmax(1)).all()
    np.testing.assert_allclose(np.exp(noisy).sum(1), np.exp(clean).sum(1), rtol=1e-3)
    assert tops(da) == tops(db)  # the same query gets the same noise


def test_top_logprobs_are_clamped(stack):
    r = call("POST", stack.envoy.url + "/v1/completions", completion(logprobs=15), headers=auth(key()))
    assert r.status == 200
    assert max(len(row) for row in tops(r.json())) <= 6  # 5, plus the sampled token when outside them


def test_streamed_completion_matches_the_buffered_one(stack):
    t = key()
    buffered = call("POST", stack.envoy.url + "/v1/completions", completion(), headers=auth(t))
    streamed = call("POST", stack.envoy.url + "/v1/completions", completion(stream=True), headers=auth(t))
    assert streamed.status == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text())
    assert events[-1] == "[DONE]"
    rows = stream_tops(events[:-1])
    assert rows == tops(buffered.json())  # each chunk keyed at its own position
    assert not any(e.get("usage") for e in events[:-1])  # the usage chunk the front asked for is not passed on


def test_chat_buffered_and_streamed(stack):
    t = key()
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 4}
    direct = call("POST", stack.engine.url + "/v1/chat/completions", body).json()
    r = call("POST", stack.envoy.url + "/v1/chat/completions", body, headers=auth(t))
    assert r.status == 200, r.body[:500]
    got = r.json()
    clean, noisy = chat_top_values(direct), chat_top_values(got)
    assert noisy != clean and got["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    events = sse_events(call("POST", stack.envoy.url + "/v1/chat/completions", {**body, "stream": True},
                             headers=auth(t)).body)
    assert streamed_chat_top_values(events) == noisy


def test_settle_charges_the_engines_usage_and_releases_the_reservation(stack):
    assert check_settle(stack, completion)["requests_per_minute"].used == 1


def test_throttle_is_429_with_retry_after(stack):
    check_throttle(stack, completion)


def test_upstream_error_settles_and_releases(stack):
    t = key()
    before = settles(stack.sidecar.metrics_port, "upstream_error")
    r = call("POST", stack.envoy.url + "/v1/completions", completion(model="no-such-model"), headers=auth(t))
    assert r.status == 404  # vLLM's own answer passes through
    assert wait_for(lambda: settles(stack.sidecar.metrics_port, "upstream_error") == before + 1)
    assert stack.budget(t)["tokens_per_day"].reserved == 0


def test_watermark_is_detectable_in_text_generated_through_the_front(stack):
    """Sampled text through Envoy carries the KGW mark (the front's signed profile in vllm_xargs, verified
    by the plugin); the same request sent straight to vLLM with a signed watermark-off profile does not."""
    from transformers import AutoTokenizer

    from defense.watermark import kgw

    t = key()
    wm = kgw.GreenListWatermark(kgw.GreenListParams(**WATERMARK["params"]), deps=Deps(keys=stack.keys)).detector()
    tok = AutoTokenizer.from_pretrained(str(stack.model), local_files_only=True)
    body = {"model": "tiny", "max_tokens": WM_TOKENS, "temperature": 1.0, "ignore_eos": True,
            "return_token_ids": True}
    marked, texts = [], []
    for i in range(3):
        r = call("POST", stack.envoy.url + "/v1/completions", {**body, "prompt": f"{PROMPT} {i}", "seed": i},
                 headers=auth(t))
        assert r.status == 200, r.body[:500]
        choice = r.json()["choices"][0]
        assert len(choice["token_ids"]) == WM_TOKENS
        marked.append(choice["token_ids"])
        texts.append(choice["text"])
    for ids in marked:
        d = wm.detect(ids)
        assert d.detected and d.log10_p < -6, f"log10 p = {d.log10_p:.1f}"
    # the text alone, re-tokenized as a suspect would hand it in, pooled
    pooled = wm.detect_many([tok(x, add_special_tokens=False)["input_ids"] for x in texts], per_sequence=False)
    assert pooled.combined.log10_p < -12, f"pooled text: log10 p = {pooled.combined.log10_p:.1f}"

    off = signed_args(stack.keys, Profile(watermark=False), "r-wm-off", now=time.time())
    r = call("POST", stack.engine.url + "/v1/completions",
             {**body, "prompt": PROMPT, "seed": 0, "vllm_xargs": off})
    assert r.status == 200, r.body[:500]
    d = wm.detect(r.json()["choices"][0]["token_ids"])
    assert not d.detected and d.log10_p > -3, f"unmarked control: log10 p = {d.log10_p:.1f}"

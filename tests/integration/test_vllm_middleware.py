"""The real vLLM OpenAI server (cpu, .venvs/vllm) with the front as its ASGI middleware, without Envoy.

One server for the module: ``python -m vllm.entrypoints.openai.api_server ... --middleware
server_plugins.openai.middleware.DistillGuardMiddleware`` with ``DISTILLGUARD_CONFIG`` set (request rules,
a budget with small limits kept in sqlite, keyed noise; ``front.engine_logprobs_mode: processed``), the
model factory's tiny random llama. The middleware runs in vLLM's API server process, imported from
.venvs/vllm (where ./dev installs the project). No sampling defense is configured, so the engine's
logprobs are the model's own: the test computes them with transformers and checks what the middleware did
to them. Budgets are read from the same sqlite file. Skips when .venvs/vllm is missing, saying why.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from support.openai_stack import DEFENSES, auth, call, key, sse_events, stream_tops, tiny_model, tops
from support.sidecar import write_config
from support.vllm_harness import require_vllm

from defense.identity import client_id_from_token
from defense.runtime import build_runtime
from server_plugins.vllm.process import VLLMServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROMPT = "Bob lives in a small town near the river. He works as a"


class Served:
    def __init__(self, tmp):
        self.config = write_config(tmp, overrides={
            "front": {"envoy_ext_proc": False, "engine_logprobs_mode": "processed"}, "defenses": DEFENSES})
        self.model = tiny_model(tmp / "tiny")
        self.engine = VLLMServer(self.model, tmp, config=self.config, middleware=True)
        self.url = self.engine.url
        self.runtime = build_runtime(self.config)  # the same sqlite state: reads what the middleware charged

    def stop(self):
        self.engine.stop()
        self.runtime.chain.close()

    def settled_tokens(self, token, expect, timeout_s=15.0):
        """tokens_per_day used as the file holds it, once it reaches ``expect`` (or what it holds at the deadline)."""
        deadline = time.monotonic() + timeout_s
        while True:
            lim = self.budget(token)["tokens_per_day"]
            if (lim.used == expect and lim.reserved == 0) or time.monotonic() > deadline:
                return lim.used
            time.sleep(0.2)

    def budget(self, token):
        budget = next(e.defense for _, e in self.runtime.chain.admission if hasattr(e.defense, "budget_status"))
        status = budget.budget_status(client_id_from_token(token, self.runtime.keys))
        return {lim.name: lim for lim in status.limits}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_vllm()
    s = Served(tmp_path_factory.mktemp("vllm-middleware"))
    yield s
    s.stop()


def completion(**kw):
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 5,
            "return_token_ids": True, "return_tokens_as_token_ids": True, **kw}


def model_top5(served, doc):
    """The model's own top-5 ("token_id:N", logprob) per generated position, computed by transformers."""
    import torch

    from defense.models import load_model

    model, _ = load_model(served.model)
    prompt, out = doc["choices"][0]["prompt_token_ids"], doc["choices"][0]["token_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1]
    v, i = torch.log_softmax(logits.float(), dim=-1).topk(5, dim=-1)
    return [[(f"token_id:{int(t)}", float(x)) for t, x in zip(ti, vi, strict=True)] for ti, vi in zip(i, v, strict=True)]


def test_buffered_answer_is_perturbed_argmax_kept_and_stable(served):
    t = key()
    a = call("POST", served.url + "/v1/completions", completion(), headers=auth(t))
    b = call("POST", served.url + "/v1/completions", completion(), headers=auth(t))
    assert a.status == 200 and int(a.headers["content-length"]) == len(a.body), a.body[:500]
    got, clean = tops(a.json()), model_top5(served, a.json())
    assert [[k for k, _ in row] for row in got] == [[k for k, _ in row] for row in clean]  # same alternatives
    g, c = np.array([[v for _, v in r] for r in got]), np.array([[v for _, v in r] for r in clean])
    assert np.abs(g - c).max() > 0.05  # perturbed (vLLM alone matches the model to 2e-3)
    assert (g.argmax(1) == c.argmax(1)).all()
    np.testing.assert_allclose(np.exp(g).sum(1), np.exp(c).sum(1), rtol=5e-3)  # top-5 mass kept
    assert tops(b.json()) == got  # repeat-stable


def test_stream_matches_buffered_and_settles(served):
    t = key()
    buffered = call("POST", served.url + "/v1/completions", completion(), headers=auth(t)).json()
    streamed = call("POST", served.url + "/v1/completions", completion(stream=True), headers=auth(t))
    assert streamed.status == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.body)
    rows = stream_tops(events[:-1])
    assert rows == tops(buffered) and events[-1] == "[DONE]"
    assert not any(e.get("usage") for e in events[:-1])  # the usage chunk the front asked for is not passed on
    lim = served.budget(t)
    assert lim["tokens_per_day"].reserved == 0 and lim["requests_per_minute"].used == 2  # both settled
    assert lim["logprob_values_per_day"].used >= 2 * sum(min(len(r), 5) for r in tops(buffered))


def test_settle_charges_the_engines_reported_usage(served):
    t = key()
    buffered = call("POST", served.url + "/v1/completions", completion(), headers=auth(t)).json()
    total = buffered["usage"]["total_tokens"]
    # the vLLM process admits from budget it leased from the sqlite file; what it did not use goes back
    # within lease_ttl_s, so the file shows the settled charge once the lease is home
    assert served.settled_tokens(t, total) == total
    call("POST", served.url + "/v1/completions", completion(stream=True), headers=auth(t))
    assert served.settled_tokens(t, 2 * total) == 2 * total


def test_chat_streamed(served):
    r = call("POST", served.url + "/v1/chat/completions",
             {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "stream": True,
              "logprobs": True, "top_logprobs": 3}, headers=auth(key()))
    events = sse_events(r.body)
    assert r.status == 200 and events[-1] == "[DONE]"
    assert any(e["choices"] and e["choices"][0].get("logprobs") for e in events[:-1])


def test_throttle_and_refusals(served):
    t = key()
    codes = []
    while 429 not in codes and len(codes) < 12:  # 6 per minute; a refill on a slow machine may let one more in
        r = call("POST", served.url + "/v1/completions", completion(max_tokens=1), headers=auth(t))
        codes.append(r.status)
    assert codes[:6] == [200] * 6 and codes[-1] == 429
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
    assert call("POST", served.url + "/v1/completions", completion(max_tokens=1), headers=auth(key())).status == 200
    bad = call("POST", served.url + "/v1/completions", completion(logprobs=-1), headers=auth(key()))
    assert bad.status == 400 and bad.json()["error"]["code"] == "top_logprobs_all"
    assert call("POST", served.url + "/v1/completions", b"{", headers=auth(key())).status == 400
    assert call("GET", served.url + "/v1/models").json()["data"][0]["id"] == "tiny"


def test_upstream_error_releases_the_reservation(served):
    t = key()
    r = call("POST", served.url + "/v1/completions", completion(model="no-such-model"), headers=auth(t))
    assert r.status == 404  # vLLM's own answer passes through
    assert served.budget(t)["tokens_per_day"].reserved == 0

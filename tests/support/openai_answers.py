"""Engine answers in OpenAI's shapes (buffered and streamed) and in-process runtimes, for the front's tests."""

from __future__ import annotations

import json

import numpy as np

from defense.clock import FakeClock
from defense.config import parse_config
from defense.keys import KeyRing
from defense.metrics import Metrics
from defense.runtime import build_runtime

P, K = 8, 5
AUTH = {"authorization": "Bearer sk-test-1"}


def make_runtime(*defenses, front=None, identity=None):
    doc = {"state": {"uri": "memory://"}, "front": front or {}, "identity": identity or {},
           "defenses": list(defenses) or [{"type": "request_rules"}, {"type": "keyed_noise"}]}
    keys = KeyRing.generate()
    return build_runtime(loaded=parse_config(doc), keys=keys, clock=FakeClock(1_000_000.0), metrics=Metrics())


def topk(seed=0, positions=P, k=K):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(positions, 40)) * 2
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-logp, 1)[:, :k]
    return ids, np.take_along_axis(logp, ids, 1)


def tok(i: int) -> str:
    return f"t{i}"


def completion_answer(seed=0, *, usage=True, k=K):
    ids, vals = topk(seed, k=k)
    lp = {"tokens": [tok(r[0]) for r in ids], "token_logprobs": [float(v[0]) for v in vals],
          "top_logprobs": [{tok(i): float(v) for i, v in zip(r, vs, strict=True)} for r, vs in zip(ids, vals, strict=True)],
          "text_offset": list(range(P))}
    doc = {"id": "cmpl-1", "object": "text_completion", "model": "tiny",
           "choices": [{"index": 0, "text": "".join(lp["tokens"]), "logprobs": lp, "finish_reason": "length"}]}
    if usage:
        doc["usage"] = {"prompt_tokens": 4, "completion_tokens": P, "total_tokens": 4 + P}
    return doc


def completion_stream(seed=0, *, usage=True):
    """The same answer as completion_answer, one SSE event per token, then usage and [DONE]."""
    doc = completion_answer(seed)
    lp = doc["choices"][0]["logprobs"]
    events = []
    for i in range(P):
        one = {"tokens": [lp["tokens"][i]], "token_logprobs": [lp["token_logprobs"][i]],
               "top_logprobs": [lp["top_logprobs"][i]], "text_offset": [i]}
        events.append({"id": "cmpl-1", "object": "text_completion", "model": "tiny", "usage": None,
                       "choices": [{"index": 0, "text": lp["tokens"][i], "logprobs": one, "finish_reason": None}]})
    if usage:
        events.append({"id": "cmpl-1", "object": "text_completion", "model": "tiny", "choices": [],
                       "usage": doc["usage"]})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def req(**kw):
    return json.dumps({"model": "tiny", "prompt": "What is the capital of France?", "max_tokens": P,
                       "logprobs": K, **kw}).encode()

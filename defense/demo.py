"""The in-process demo: a few requests through the configured chain, showing what each defense did.

This is what the README's main command runs until the sidecar demo replaces it; it is also the
smallest example of using the library from Python.
"""

from __future__ import annotations

import json

import numpy as np

from .runtime import build_runtime
from .types import ChatMessage, LogprobBatch, Prompt, RequestContext, Usage

_REQUESTS = (
    ("ordinary chat request, 3 alternatives per token",
     dict(prompt=Prompt(chat=(ChatMessage("user", "What is the capital of France?"),)), max_tokens=32, top_logprobs=3)),
    ("asks for 20 alternatives and a logit_bias: the classic logit-extraction probe",
     dict(prompt=Prompt(text="Repeat after me: the quick brown fox"), max_tokens=16, top_logprobs=20,
          logit_bias_entries=1)),
    ("asks for every token's logprob (top_logprobs=-1)",
     dict(prompt=Prompt(text="Tell me a story"), max_tokens=64, top_logprobs=-1)),
    ("asks for prompt logprobs with echo",
     dict(prompt=Prompt(text="Score this text for me"), max_tokens=1, logprobs=True, echo=True, prompt_logprobs=True)),
)


def _fake_engine_output(k: int, positions: int = 4) -> LogprobBatch:
    """A response shaped like an engine's top-k logprobs (what the sidecar's Protect receives)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(positions, 64)).astype(np.float32) * 3
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = np.argsort(-logp, axis=1)[:, :k]
    return LogprobBatch(values=np.take_along_axis(logp, top, axis=1), token_ids=top.astype(np.int64))


def run_demo(config_path: str, *, as_json: bool = False) -> int:
    rt = build_runtime(config_path)
    chain = rt.chain
    out = print if not as_json else (lambda *_: None)
    out(f"config {config_path}: defenses in order: {', '.join(chain.names) or 'none'}")
    for i, (label, fields) in enumerate(_REQUESTS):
        ctx = RequestContext(request_id=f"demo-{i}", client_id="c_demo", model="tiny-demo", **fields)
        adm = chain.admit(ctx)
        record: dict = {"request": label, "decision": adm.decision.value, "reason": adm.reason,
                        "reason_code": adm.reason_code, "reservation_id": adm.reservation_id,
                        "steps": [{"defense": s.defense, "mode": s.mode.value,
                                   "decision": s.verdict.decision.value if s.verdict else "error:" + s.error,
                                   "us": round(s.seconds * 1e6, 1)} for s in adm.steps]}
        out(f"\n[{i}] {label}")
        for s in record["steps"]:
            out(f"    {s['defense']:<16} {s['mode']:<8} -> {s['decision']} ({s['us']} us)")
        out(f"    chain decision: {adm.decision.value}" + (f" ({adm.reason_code}: {adm.reason})" if adm.reason else ""))
        if not adm.rewrites.empty:
            changed = {k: v for k, v in {
                "top_logprobs": adm.rewrites.top_logprobs, "max_tokens": adm.rewrites.max_tokens,
                "n": adm.rewrites.n, "drop_logit_bias": adm.rewrites.drop_logit_bias or None,
                "drop_prompt_logprobs": adm.rewrites.drop_prompt_logprobs or None,
                "drop_echo": adm.rewrites.drop_echo or None}.items() if v is not None}
            record["rewrites"] = changed
            out(f"    rewrites: {changed}")
        if adm.allowed:
            k = max(adm.ctx.top_logprobs, 1)
            prot = chain.protect(_fake_engine_output(k), adm.ctx)
            record["protect_applied"] = list(prot.applied)
            out(f"    protect: {k} alternatives x {prot.batch.shape[0]} positions; changed by: "
                f"{', '.join(prot.applied) or 'nothing (no response defense configured yet)'}")
            chain.settle(adm.ctx, Usage(prompt_tokens=8, completion_tokens=4, logprob_values=4 * k))
        if as_json:
            print(json.dumps(record, sort_keys=True))
    chain.close()
    return 0

"""The demo the README's main command runs.

By default it starts the sidecar with the given config, exercises every RPC once through the client,
prints what each returned, and stops it. ``--in-process`` runs the same requests through the chain in
this process instead (the smallest example of using the library from Python).
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


def run_demo(config_path: str, *, as_json: bool = False, in_process: bool = False) -> int:
    if not in_process:
        return run_sidecar_demo(config_path, as_json=as_json)
    return run_in_process_demo(config_path, as_json=as_json)


def run_in_process_demo(config_path: str, *, as_json: bool = False) -> int:
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
            changed = _rewrites(adm.rewrites)
            record["rewrites"] = changed
            out(f"    rewrites: {changed}")
        if adm.allowed:
            k = max(adm.ctx.top_logprobs, 1)
            prot = chain.protect(_fake_engine_output(k), adm.ctx)
            record["protect_applied"] = list(prot.applied)
            out(f"    protect: {k} alternatives x {prot.batch.shape[0]} positions; changed by: "
                f"{', '.join(prot.applied) or 'nothing'}")
            chain.settle(adm.ctx, Usage(prompt_tokens=8, completion_tokens=4, logprob_values=4 * k))
        if as_json:
            print(json.dumps(record, sort_keys=True))
    chain.close()
    return 0


def run_sidecar_demo(config_path: str, *, as_json: bool = False) -> int:
    import tempfile

    import grpc

    from server_plugins.client import SidecarClient, SidecarError

    from .config import load_config
    from .runtime import load_keys
    from .sidecar.process import SidecarProcess

    load_keys(load_config(config_path))  # a bad config or key file: the same clear error serve would give
    out = print if not as_json else (lambda *_: None)
    admin = "demo-admin-token"
    with tempfile.TemporaryDirectory(prefix="distillguard-demo-") as tmp:
        sock = f"unix:{tmp}/sidecar.sock"
        out(f"starting: distillguard serve --config {config_path} --listen {sock}")
        with SidecarProcess(config_path, args=["--listen", sock, "--metrics-port", "0"], cwd=".",
                            env={"DISTILLGUARD_ADMIN_TOKEN": admin}, log_path=f"{tmp}/sidecar.log") as proc:
            out(f"sidecar ready on {proc.target}; metrics on http://127.0.0.1:{proc.metrics_port}/metrics")
            with SidecarClient(proc.target, timeout_s=5, admin_token=admin) as client:
                for i, (label, fields) in enumerate(_REQUESTS):
                    ctx = RequestContext(request_id=f"demo-{i}", client_id="c_demo", model="tiny-demo", **fields)
                    adm = client.admit(ctx)
                    record: dict = {"request": label, "rpc": "Admit", "decision": adm.decision.value,
                                    "reason_code": adm.reason_code, "reservation_id": adm.reservation_id}
                    out(f"\n[{i}] {label}")
                    out(f"    Admit   -> {adm.decision.value}" + (f" ({adm.reason_code}: {adm.reason})" if adm.reason else "")
                        + (f", reservation {adm.reservation_id}" if adm.reservation_id else ""))
                    if not adm.rewrites.empty:
                        out(f"               rewrites {_rewrites(adm.rewrites)}")
                    if adm.allowed:
                        k = adm.rewrites.top_logprobs or max(ctx.top_logprobs, 1)
                        prot = client.protect(_fake_engine_output(k), request_id=ctx.request_id, model=ctx.model,
                                              context_digest=adm.context_digest, client_id=ctx.client_id,
                                              profile=adm.profile)
                        record["protect_applied"] = list(prot.applied)
                        out(f"    Protect -> {prot.batch.shape[0]} positions x {k} alternatives, changed by: "
                            f"{', '.join(prot.applied) or 'nothing'}")
                        usage = Usage(prompt_tokens=8, completion_tokens=4, logprob_values=4 * k)
                        first = client.settle(ctx, usage, reservation_id=adm.reservation_id)
                        retry = client.settle(ctx, usage, reservation_id=adm.reservation_id)
                        record["settle"] = [first, retry]
                        out(f"    Settle  -> charged={first}; retried with the same request_id: charged={retry}")
                    if as_json:
                        print(json.dumps(record, sort_keys=True))
                for rpc, call in (("Detect", lambda: client.detect([[1, 2, 3]])),
                                  ("GetBudget", lambda: client.get_budget("c_demo"))):
                    try:
                        call()
                        status = "OK"
                    except SidecarError as e:
                        status = e.code.name if e.code is not grpc.StatusCode.OK else "OK"
                    out(f"\n{rpc:<9} -> {status}")
                    if as_json:
                        print(json.dumps({"rpc": rpc, "status": status}))
        out("\nsidecar stopped")
    return 0


def _rewrites(rw) -> dict:
    fields = {"top_logprobs": rw.top_logprobs, "max_tokens": rw.max_tokens, "n": rw.n,
              "drop_logit_bias": rw.drop_logit_bias or None, "drop_prompt_logprobs": rw.drop_prompt_logprobs or None,
              "drop_echo": rw.drop_echo or None, "strip_outputs": list(rw.strip_outputs) or None}
    return {k: v for k, v in fields.items() if v is not None}

"""The end-to-end demo (``./dev demo``, ``distillguard demo``): a defended OpenAI-compatible stack on loopback.

It builds a tiny model (the model factory's llama, trained for a few seconds on the synthetic corpus),
starts vLLM (cpu, ``.venvs/vllm``) with the distillguard plugin (the watermark runs in its sampler), the
sidecar (sqlite state in a temporary folder) and Envoy with the sidecar's ext_proc, then sends two
workloads through Envoy: a legitimate client (a few greedy requests for top-5 logprobs) and a distiller
(top-20 logprobs, sampled text, at volume), interleaved. It prints what each client got, what the defense
cost the legitimate client (top-1 agreement and mean total variation of the returned top-5 logprobs against
the undefended model on the same prefixes) and the watermark's log10 p-value over the text the distiller
harvested. Every process is stopped at the end, also on Ctrl-C or an error.

Without ``.venvs/vllm`` the engine is ``server_plugins.transformers.server`` (said so); without Envoy the
front is the ASGI middleware inside the engine's process. ``keep_running`` leaves the stack up after the
report until Ctrl-C and prints how to reach it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from defense.types import LogprobBatch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "demo.yaml"
MODEL_DIR = ROOT / ".distillguard" / "demo-model"  # git-ignored; rebuilt when the recipe changes
MODEL_NAME = "tiny"
ADMIN_TOKEN = "demo-admin-" + uuid.uuid4().hex[:8]

# the model: hidden 64 / 2 heads (head size 32, which vLLM's CPU attention supports), trained briefly so
# its distributions are peaked where the synthetic corpus is predictable (top-1 agreement means something)
MODEL_RECIPE = {"hidden": 64, "heads": 2, "layers": 2, "max_positions": 256, "steps": 400, "batch_size": 16,
                "seq_len": 64, "seed": 0}

LEGIT_REQUESTS = 8  # greedy, top-5, 16 tokens: a client that wants answers and a confidence signal
LEGIT_TOKENS = 16
LEGIT_TOP = 5
DISTILL_REQUESTS = 40  # sampled, top-20 (clamped to 5), 64 tokens: harvesting text and distributions
DISTILL_TOKENS = 64
DISTILL_TOP = 20


# -- pure helpers (unit-tested) -----------------------------------------------------------------------------

@dataclass
class Tally:
    """What one client's requests got back."""

    admitted: int = 0
    throttled: int = 0
    other: dict[int, int] = field(default_factory=dict)  # any other HTTP status -> count

    def add(self, status: int) -> None:
        if status == 200:
            self.admitted += 1
        elif status == 429:
            self.throttled += 1
        else:
            self.other[status] = self.other.get(status, 0) + 1


def token_index(decoded: Sequence[str]) -> dict[str, int]:
    """Decoded token text -> token id (the first id when several decode alike), for reading OpenAI answers."""
    index: dict[str, int] = {}
    for i, text in enumerate(decoded):
        index.setdefault(text, i)
    return index


def token_id_of(token: str, index: dict[str, int]) -> int | None:
    """An OpenAI answer's token: ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``) or its text."""
    if token.startswith("token_id:"):
        try:
            return int(token[9:])
        except ValueError:
            return None
    return index.get(token)


def completion_rows(doc: dict[str, Any]) -> tuple[list[str], list[dict[str, float]]]:
    """(sampled tokens, top-logprob rows) of a /v1/completions answer's first choice."""
    lp = doc["choices"][0].get("logprobs") or {}
    return list(lp.get("tokens") or []), [dict(r or {}) for r in lp.get("top_logprobs") or []]


def rows_to_batch(rows: Sequence[dict[str, float]], index: dict[str, int], k: int) -> LogprobBatch | None:
    """Top-logprob rows ({token text: logprob}) as a [P, k] LogprobBatch; None when a token is unknown."""
    values = np.full((len(rows), k), -np.inf, dtype=np.float32)
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    for p, row in enumerate(rows):
        best = sorted(row.items(), key=lambda kv: -kv[1])[:k]
        for j, (tok, v) in enumerate(best):
            tid = token_id_of(tok, index)
            if tid is None:
                return None
            values[p, j], ids[p, j] = v, tid
    return LogprobBatch(values=values, token_ids=ids)


def utility(returned: Sequence[LogprobBatch], reference: Sequence[LogprobBatch]) -> tuple[float, float]:
    """(top-1 agreement, mean TV) over every position of every pair, as defense.perturbation.measures counts
    them (top-k rows compared as distributions over the returned tokens plus the rest)."""
    from defense.perturbation.measures import top1_agreement, total_variation

    agree, tvs, n = 0.0, [], 0
    for a, b in zip(returned, reference, strict=True):
        rows = a.values.shape[0]
        if rows == 0:
            continue
        agree += top1_agreement(a, b) * rows
        tvs.append(total_variation(a, b))
        n += rows
    if n == 0:
        return float("nan"), float("nan")
    return agree / n, float(np.concatenate(tvs).mean())


def format_report(r: dict[str, Any]) -> str:
    """The demo's summary, as printed."""

    def counts(t: Tally) -> str:
        extra = "".join(f", {n} x HTTP {s}" for s, n in sorted(t.other.items()))
        return f"{t.admitted} admitted, {t.throttled} throttled (429){extra}"

    lines = [
        f"stack: {r['engine']} -> {r['front']}",
        f"legitimate client  ({r['legit_sent']} requests, top-{LEGIT_TOP}, greedy):    {counts(r['legit'])}",
        f"distilling client  ({r['distill_sent']} requests, top-{DISTILL_TOP}, sampled): {counts(r['distill'])}",
    ]
    if r.get("retry_after"):
        lines.append(f"  first throttle: HTTP 429, Retry-After {r['retry_after']} s ({r.get('throttle_reason', '')})")
    if r.get("budget"):
        lines.append(f"  distiller's budget: {r['budget']}")
    top1, tv = r["top1"], r["tv"]
    lines.append(f"legitimate top-{LEGIT_TOP} logprobs vs the undefended engine ({r['positions']} positions): "
                 + ("n/a" if math.isnan(top1) else f"top-1 agreement {top1:.3f}, mean TV {tv:.3f}"))
    if r["top1"] < 1:
        lines.append("  (the keyed noise keeps every argmax: top-1 changes are the in-engine watermark's bias, which "
                     "also picks the greedy text)")
    wm = r.get("watermark")
    if wm is None:
        lines.append("watermark: none configured, or no text harvested")
    else:
        lines.append(f"watermark in the distiller's harvested text ({wm['texts']} texts, {wm['tokens']} tokens "
                     f"scored): log10 p = {wm['log10_p']:.1f} -> {'detected' if wm['detected'] else 'not detected'}")
    return "\n".join(lines)


# -- the stack ------------------------------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(msg, flush=True)


def _build_model(say: Callable[[str], None]) -> Path:
    stamp = MODEL_DIR / "demo-recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == MODEL_RECIPE and (MODEL_DIR / "config.json").exists():
        say(f"model: {MODEL_DIR.relative_to(ROOT)} (built earlier; delete it to rebuild)")
        return MODEL_DIR
    import torch

    from defense.models import build_tiny_lm_folder
    from defense.models.train import LMTrainConfig

    r = MODEL_RECIPE
    t0 = time.monotonic()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread than on two busy ones
    say(f"model: training a tiny llama (hidden {r['hidden']}, {r['layers']} layers) for {r['steps']} steps "
        "on the synthetic corpus...")
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    build_tiny_lm_folder(MODEL_DIR, hidden=r["hidden"], heads=r["heads"], layers=r["layers"],
                         max_positions=r["max_positions"], train_steps=r["steps"], seed=r["seed"],
                         train_config=LMTrainConfig(steps=r["steps"], batch_size=r["batch_size"],
                                                    seq_len=r["seq_len"], seed=r["seed"], log_every=10_000))
    stamp.write_text(json.dumps(MODEL_RECIPE))
    say(f"model: built in {time.monotonic() - t0:.0f} s at {MODEL_DIR.relative_to(ROOT)}")
    return MODEL_DIR


def _write_config(source: Path, tmp: Path, *, ext_proc: bool) -> tuple[Path, dict[str, Any]]:
    from defense.config import load_config
    from defense.runtime import keys_path, load_keys

    loaded = load_config(source)
    load_keys(loaded)  # no or bad key file: the error `serve` would give, before anything starts
    doc = yaml.safe_load(source.read_text())
    doc.setdefault("server", {}).update({"listen": [f"unix:{tmp}/sidecar.sock"], "metrics_port": 0})
    doc.setdefault("state", {})["uri"] = f"sqlite:///{tmp}/state.db"  # tmp is absolute: four slashes
    doc.setdefault("keys", {})["file"] = str(Path(keys_path(loaded) or "").resolve())
    doc.setdefault("front", {}).update({"envoy_ext_proc": ext_proc, "engine_logprobs_mode": "processed"})
    path = tmp / "distillguard.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, doc


def post(url: str, body: dict[str, Any], token: str, timeout: float = 120) -> tuple[int, dict[str, str], Any]:
    """POST JSON with a bearer token: (status, lower-cased headers, parsed body or None)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers.items()), e.read()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    return status, {k.lower(): v for k, v in headers.items()}, doc


def _prompts(n: int, seed: int, words: int) -> list[str]:
    """Openings of held-out documents from the synthetic world the model was trained on."""
    from defense.models import synthetic_corpus

    return [" ".join(doc.split()[:words]) for doc in synthetic_corpus(n, seed=seed)]


def _reference(model_dir: Path, prompts: Sequence[str], answers: Sequence[list[int]], k: int) -> list[LogprobBatch]:
    """The undefended model's top-k logprobs at each generated position, on the prefixes the client saw."""
    import torch

    from defense.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model(model_dir)
    out = []
    with torch.no_grad():
        for prompt, ids in zip(prompts, answers, strict=True):
            p = tok(prompt)["input_ids"]
            x = torch.tensor([p + ids[:-1]], dtype=torch.int64)
            logp = torch.log_softmax(model(input_ids=x).logits[0, len(p) - 1:].float(), dim=-1)
            v, i = logp.topk(k, dim=-1)
            out.append(LogprobBatch(values=v.numpy().astype(np.float32), token_ids=i.numpy().astype(np.int64)))
    return out


def _detect(cfg: Path, model_dir: Path, texts: Sequence[str]) -> dict[str, Any] | None:
    """The configured watermark's test over the harvested texts, pooled (log10 p corrected for the keys)."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from defense.config import load_config
    from defense.runtime import load_keys
    from defense.watermark.base import WatermarkDefense, spec_from_params
    from defense.watermark.detect import WatermarkDetector

    loaded = load_config(cfg)
    found = [b for b in loaded.defenses if issubclass(b.cls, WatermarkDefense) and b.mode.value != "off"]
    if not found or not texts:
        return None
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    spec = replace(spec_from_params(found[0].cls.scheme, found[0].params), vocab_size=len(tok))
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    report = WatermarkDetector.from_keyring(spec, load_keys(loaded)).detect_many(seqs, per_sequence=False)
    c = report.combined
    return {"texts": len(texts), "tokens": c.tokens_scored, "log10_p": c.log10_p, "detected": c.detected}


def _install_signal_handlers() -> None:
    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell that starts the demo in the background leaves SIGINT ignored, and Ctrl-C must stop it
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def run_stack_demo(config: str | os.PathLike[str] | None = None, *, keep_running: bool = False,
                   as_json: bool = False) -> int:
    from server_plugins.envoy.process import EnvoyProcess, find_envoy, render_config
    from server_plugins.transformers.process import TransformersServer
    from server_plugins.vllm.process import MIDDLEWARE, VLLMServer, vllm_python, why_no_vllm

    _install_signal_handlers()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bars in the report
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    say = _say if not as_json else (lambda _m: None)
    started = time.monotonic()
    source = Path(config) if config else DEFAULT_CONFIG
    use_envoy = find_envoy() is not None
    tmp = Path(tempfile.mkdtemp(prefix="distillguard-demo-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        cfg, doc = _write_config(source, tmp, ext_proc=use_envoy)
        model = _build_model(say)

        if vllm_python() is not None:
            say("engine: vLLM (cpu, .venvs/vllm) with the distillguard plugin; starting (about a minute)...")
            engine: Any = VLLMServer(model, tmp, config=cfg, middleware=not use_envoy, served_model_name=MODEL_NAME)
            engine_name = "vLLM (cpu) + distillguard plugin"
        else:
            say(f"engine: {why_no_vllm()}")
            say("engine: falling back to server_plugins.transformers.server (the same plugin API, in-process)")
            engine = TransformersServer(model, tmp / "engine.log", served_model_name=MODEL_NAME, config=cfg,
                                        logprobs_mode="processed", env={"DISTILLGUARD_CONFIG": str(cfg)},
                                        middleware=() if use_envoy else (MIDDLEWARE,))
            engine_name = "transformers server (fallback: no .venvs/vllm)"
        stack.callback(engine.stop)
        say(f"engine: ready at {engine.url} (log {engine.log_path})")

        sidecar = None
        if use_envoy:
            from defense.sidecar.process import SidecarProcess

            sidecar = SidecarProcess(cfg, env={"DISTILLGUARD_ADMIN_TOKEN": ADMIN_TOKEN}, log_path=tmp / "sidecar.log",
                                     cwd=tmp)
            stack.callback(sidecar.stop)
            say(f"sidecar: ready on {sidecar.target} (state sqlite in {tmp})")
            envoy = EnvoyProcess(render_config(upstream=engine.address, sidecar=sidecar.target), tmp)
            stack.callback(envoy.stop)
            base, front_name = envoy.url, "Envoy + distillguard ext_proc (sidecar)"
            say(f"envoy: ready at {base}")
        else:
            base, front_name = engine.url, "distillguard ASGI middleware in the engine (no Envoy in .venvs/envoy)"
            say("front: no Envoy found (./dev setup makes .venvs/envoy); using the ASGI middleware instead")

        report = _workloads(base, model, doc, cfg, sidecar)
        report.update(engine=engine_name, front=front_name)
        say("")
        say(format_report(report))
        if as_json:
            print(json.dumps({k: (v.__dict__ if isinstance(v, Tally) else v) for k, v in report.items()},
                             sort_keys=True, default=str))
        say(f"\ndemo took {time.monotonic() - started:.0f} s")
        if keep_running:
            key = "sk-demo-" + uuid.uuid4().hex[:16]
            say(f"\nthe stack stays up until Ctrl-C:\n  base URL  {base}/v1\n  model     {MODEL_NAME}\n"
                f"  API key   {key}   (any bearer token works: each one is its own client with its own budget)\n"
                f"  config    {cfg}\n\n"
                f"  curl -s {base}/v1/completions -H 'authorization: Bearer {key}' -H 'content-type: application/json' \\\n"
                f"    -d '{{\"model\": \"{MODEL_NAME}\", \"prompt\": \"{_prompts(1, 7, 6)[0]}\", \"max_tokens\": 16, "
                f"\"logprobs\": 5}}'\n\n"
                f"  OpenAI SDK: OpenAI(base_url=\"{base}/v1\", api_key=\"{key}\")")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                say("\nstopping...")
        say("stopping the stack")
    say("all processes stopped")
    return 0


def _workloads(base: str, model: Path, doc: dict[str, Any], cfg: Path, sidecar: Any) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    index = token_index([tok.decode([i]) for i in range(len(tok))])
    legit_key, distill_key = "sk-legit-" + uuid.uuid4().hex[:12], "sk-distiller-" + uuid.uuid4().hex[:12]
    legit_prompts = _prompts(LEGIT_REQUESTS, 1001, 8)
    distill_prompts = _prompts(DISTILL_REQUESTS, 2002, 6)
    legit, distill = Tally(), Tally()
    legit_seen: list[tuple[str, list[str], list[dict[str, float]]]] = []
    harvested: list[str] = []
    report: dict[str, Any] = {"legit_sent": LEGIT_REQUESTS, "distill_sent": DISTILL_REQUESTS}
    every = max(1, DISTILL_REQUESTS // LEGIT_REQUESTS)
    li = 0
    _say(f"workloads: {DISTILL_REQUESTS} distiller requests (top-{DISTILL_TOP}, {DISTILL_TOKENS} tokens, "
         f"temperature 1) with {LEGIT_REQUESTS} legitimate ones (top-{LEGIT_TOP}, {LEGIT_TOKENS} tokens, greedy) "
         "in between...")
    for i, prompt in enumerate(distill_prompts):
        status, headers, body = post(base + "/v1/completions", {
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": DISTILL_TOKENS, "temperature": 1.0,
            "logprobs": DISTILL_TOP, "seed": i}, distill_key)
        distill.add(status)
        if status == 200:
            harvested.append(body["choices"][0]["text"])
        elif status == 429 and "retry_after" not in report:
            report["retry_after"] = headers.get("retry-after")
            report["throttle_reason"] = ((body or {}).get("error") or {}).get("message", "")
        if (i + 1) % every == 0 and li < LEGIT_REQUESTS:
            p = legit_prompts[li]
            li += 1
            status, _, body = post(base + "/v1/completions", {
                "model": MODEL_NAME, "prompt": p, "max_tokens": LEGIT_TOKENS, "temperature": 0,
                "logprobs": LEGIT_TOP, "return_tokens_as_token_ids": True}, legit_key)
            legit.add(status)
            if status == 200:
                tokens, rows = completion_rows(body)
                legit_seen.append((p, tokens, rows))
    report.update(legit=legit, distill=distill)

    # what the defense cost the legitimate client: its returned rows against the clean model, same prefixes
    returned, prompts, answers = [], [], []
    for p, tokens, rows in legit_seen:
        batch = rows_to_batch(rows, index, LEGIT_TOP)
        ids = [token_id_of(t, index) for t in tokens]
        if batch is None or None in ids:
            continue
        returned.append(batch)
        prompts.append(p)
        answers.append(ids)
    reference = _reference(model, prompts, answers, LEGIT_TOP)
    report["top1"], report["tv"] = utility(returned, reference)
    report["positions"] = sum(b.values.shape[0] for b in returned)

    keys_file = doc["keys"]["file"]
    report["watermark"] = _detect(cfg, model, harvested)
    if sidecar is not None:
        from defense.identity import client_id_from_token
        from defense.keys import KeyRing
        from server_plugins.client import SidecarClient

        with SidecarClient(sidecar.target, admin_token=ADMIN_TOKEN, timeout_s=5) as c:
            resp = c.get_budget(client_id_from_token(distill_key, KeyRing.load(keys_file)))
        report["budget"] = ", ".join(f"{lim.name} {lim.used:.0f}/{lim.limit:.0f}" for lim in resp.limits
                                     if lim.name == "logprob_values_per_day")
    return report

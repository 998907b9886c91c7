"""Suspicion signals: each signal on its own, and synthetic traffic through the budget defense: a scripted
template sweep is flagged within the first 5% of its budget while at most 1% of 500 ordinary clients are."""

from __future__ import annotations

import json
import logging
import random

import pytest

from defense.base import Deps
from defense.canonical import context_digest
from defense.chain import DefenseChain
from defense.config import parse_config
from defense.throttle.params import SignalParams
from defense.throttle.signals import SuspicionTracker, sketch
from defense.types import ChatMessage, Prompt, RequestContext, Usage


def test_sketch_forms():
    a = sketch(Prompt(text="Explain the concept of gravity step by step"), 8, 160)
    b = sketch(Prompt(text="  EXPLAIN the concept of   gravity step by step "), 8, 160)
    assert a == b and len(a) == 6  # 8 words, 6 trigrams; case and spacing do not matter
    chat = Prompt(chat=(ChatMessage("system", "You are a helpful assistant for ACME support staff"),
                        ChatMessage("user", "Explain the concept of gravity step by step")))
    assert sketch(chat, 8, 160) == a  # the last message only: a fixed system prompt is not a template
    assert sketch(Prompt(text="hi there"), 8, 160) is None
    assert len(sketch(Prompt(token_ids=tuple(range(100))), 8, 160)) == 8
    long = Prompt(text=" ".join(f"w{i}" for i in range(10_000)))
    assert len(sketch(long, 8, 160)) == 8  # bounded work however long the prompt


def _observe(tracker, key, prompt, **kw):
    usage = kw.pop("usage", Usage(prompt_tokens=10, completion_tokens=20))
    p = Prompt(text=prompt)
    ctx = RequestContext(request_id="r", client_id=key, prompt=p, context_digest=context_digest("m", p), **kw)
    return tracker.observe(key, ctx, usage)


@pytest.mark.parametrize("signal, kw", [
    ("logit_bias_logprobs", {"logprobs": True, "logit_bias_entries": 3}),
    ("fixed_seed_n", {"n": 4, "seed": 7}),
])
def test_request_shape_signals(signal, kw):
    t = SuspicionTracker(SignalParams(min_requests=5))
    rng = random.Random(1)
    for i in range(10):
        _observe(t, "c", " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) + str(i) for _ in range(12)), **kw)
    sig = t.get("c").signals()
    assert sig[signal] == pytest.approx(1.0)
    assert sig["repeat"] == 0 and sig["template"] < 0.2


def test_logprob_intensity_uses_returned_values():
    t = SuspicionTracker(SignalParams(min_requests=1, intensity_k=5))
    _observe(t, "c", "one two three four", usage=Usage(completion_tokens=10, logprob_values=25))
    assert t.get("c").signals()["logprob_intensity"] == pytest.approx(0.5)


def test_flag_changes_go_to_the_audit_log(caplog):
    t = SuspicionTracker(SignalParams(min_requests=3), name="budget")
    with caplog.at_level(logging.WARNING, logger="distillguard.audit"):
        for _ in range(5):
            _observe(t, "c_evil", "the very same prompt every single time", logprobs=True, top_logprobs=5)
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "distillguard.audit"]
    assert [e["event"] for e in events] == ["client_flagged"]
    assert events[0]["client_id"] == "c_evil" and events[0]["signals"]["repeat"] > 0.5 and t.flagged == 1


# -- synthetic traffic ------------------------------------------------------------------------------------
_SYL = ["ka", "lo", "mi", "ren", "sto", "va", "qui", "del", "pa", "zor", "tin", "e", "ou", "bra", "sel", "mon",
        "ti", "gar", "nu", "fe", "ax", "ly", "pro", "ver"]


def _vocab(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYL) for _ in range(rng.randint(1, 3))))
    return sorted(words)


OPENERS = ["can you explain", "what is the", "how do i", "write a short", "help me understand", "why does",
           "give me three", "is it true that", "summarize", "compare", "i need a", "tell me about",
           "what are good ways to", "draft an email about", "fix this", "translate", "how would you",
           "list some", "describe", "what happens when"]
SYSTEM = ["You are a helpful assistant.", "You are the support bot of a shop. Be brief.",
          "Answer as a friendly tutor for high school students."]


def _ordinary_client(rng: random.Random, vocab: list[str]):
    """A person or an app: varied prompts and lengths, a few repeats, sometimes logprobs or n > 1."""
    n_requests = int(round(10 ** rng.uniform(0.7, 2.6)))  # 5 .. 400 requests, heavy-tailed
    chat = rng.random() < 0.6
    system = rng.choice(SYSTEM)
    wrapper = rng.choice(["", "", "", "translate to french:", "summarize this:"])  # apps that wrap user text
    logprobs = rng.random() < 0.2
    k = rng.randint(1, 5)
    multi = rng.random() < 0.1
    history: list[str] = []
    for _ in range(n_requests):
        if history and rng.random() < 0.03:  # a retry or a reused question
            text = rng.choice(history)
        else:
            length = max(3, int(rng.lognormvariate(2.8, 0.7)))  # median ~16 words, long tail
            words = [rng.choice(OPENERS)] if rng.random() < 0.7 else []
            words += [rng.choice(vocab) for _ in range(length)]
            text = " ".join(([wrapper] if wrapper else []) + words)
            history.append(text)
        prompt = Prompt(chat=(ChatMessage("system", system), ChatMessage("user", text))) if chat else Prompt(text=text)
        n = rng.randint(2, 3) if multi and rng.random() < 0.3 else 1
        yield prompt, {"logprobs": logprobs, "top_logprobs": k if logprobs else 0, "n": n,
                       "seed": rng.randint(0, 9) if n > 1 and rng.random() < 0.2 else None}


TEMPLATES = [
    "You are an expert tutor. Explain the concept of {t} to a curious student step by step, "
    "including the key formula, a worked example and one common misconception.",
    "Explain {t} step by step as an expert tutor would: state the key formula, work through one example, "
    "and name a common misconception about it.",
    "As an expert tutor, walk a curious student through {t} step by step with the key formula, a worked "
    "example, and a common misconception.",
]


def _sweep(rng: random.Random, vocab: list[str]):
    """A distiller's script: a few paraphrased templates, a new topic each time, no logprobs asked."""
    while True:
        topic = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3)))
        yield Prompt(text=rng.choice(TEMPLATES).format(t=topic)), {}


SWEEP_BUDGET = 2000  # requests per day for every client in this simulation


def test_template_sweep_flagged_early_and_ordinary_clients_rarely(clock):
    rng = random.Random(20251125)
    vocab = _vocab(rng, 3000)
    loaded = parse_config({"defenses": [{"type": "budget", "params": {"limits": {
        "requests_per_day": {"unit": "requests", "amount": SWEEP_BUDGET, "period_s": 86400, "window": "sliding_window"}}}}]})
    chain = DefenseChain.from_config(loaded, deps=Deps(clock=clock, state_uri="memory://"))
    budget = chain.entries[0].defense
    audit = logging.getLogger("distillguard.audit")
    audit.disabled = True  # 500 clients: keep the test log readable
    try:
        def run(client: str, traffic, limit: int) -> int | None:
            """Admit and settle up to `limit` requests; the 1-based request at which the client was flagged."""
            flagged_at = None
            for i, (prompt, kw) in zip(range(limit), traffic, strict=False):
                ctx = RequestContext(request_id=f"{client}-{i}", client_id=client, model="m", prompt=prompt,
                                     max_tokens=200, **kw)
                adm = chain.admit(ctx)
                assert adm.allowed, adm.reason
                values = 200 * (kw.get("top_logprobs") or 1) if kw.get("logprobs") else 0
                chain.settle(ctx, Usage(prompt_tokens=30, completion_tokens=200, logprob_values=values))
                clock.advance(rng.expovariate(1 / 3.0))  # rates vary; the signals count requests, not seconds
                state = budget.tracker.get(f"default\x1f{client}")  # what GetBudget reports, without the store read
                if flagged_at is None and state is not None and state.flagged:
                    flagged_at = i + 1
            return flagged_at

        sweep_at = run("c_sweep", _sweep(rng, vocab), SWEEP_BUDGET // 10)
        assert sweep_at is not None and sweep_at <= 0.05 * SWEEP_BUDGET, sweep_at
        assert budget.budget_status("c_sweep").flagged
        ordinary = [run(f"c_{i:03d}", _ordinary_client(rng, vocab), SWEEP_BUDGET) for i in range(500)]
        flagged = sum(f is not None for f in ordinary)
        assert flagged <= 5, flagged  # at most 1% of 500
        print(f"sweep flagged at request {sweep_at} of a {SWEEP_BUDGET}-request budget "
              f"({100 * sweep_at / SWEEP_BUDGET:.1f}%); ordinary clients flagged: {flagged}/500")
    finally:
        audit.disabled = False
        chain.close()

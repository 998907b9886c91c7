"""Per-client suspicion signals, combined into one score in [0, 1].

Observed when a request settles (the logprob values actually returned are known then, and the work
stays off the admission path); admission reads the score as it stands. Per signal, a moving average
over the client's requests (alpha), bias-corrected so a young client's average is its mean so far:

- repeat: the canonical prompt digest was seen among the client's last ``repeat_window`` prompts
  (averaging identical queries is how noise defenses are attacked);
- template: the share of the prompt's bottom-k MinHash values (word trigrams, one hash function) already
  seen in the client's last ``template_horizon`` requests, mapped linearly from ``template_low`` (0) to
  ``template_high`` (1): a scripted sweep fills one template with different topics, so most of each
  prompt's trigrams, and of its minima, recur, where varied prompts share only common phrases;
- logit_bias_logprobs: logit_bias together with logprobs (the logit-extraction probe);
- fixed_seed_n: n > 1 with a fixed seed;
- logprob_intensity: logprob values returned per generated token, over ``intensity_k``.

score = min(1, sum of weight x signal), 0 before ``min_requests``. Flag changes go to the audit log
(``distillguard.audit``, one JSON object per line) with the client id; metrics only count flagged
clients. Scores are per process: replicas sharing a store each score the share of traffic they see.
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..types import Prompt, RequestContext, Usage
from .params import SIGNALS, SignalParams

audit = logging.getLogger("distillguard.audit")

_TAIL_WORDS = 32  # of a long prompt, the first (sketch_words - 32) and the last 32 words are sketched


# words -> a stable 32-bit hash (str hash() is salted per process; sketches should not depend on the run);
# cached: prompts reuse a small vocabulary, and a cache hit costs less than hashing
_word = functools.lru_cache(maxsize=1 << 17)(lambda w: zlib.crc32(w.encode()))


def sketch_source(prompt: Prompt) -> str | tuple[int, ...] | None:
    """What a prompt's sketch is made of: its text, a chat's last message, or its token ids.

    Chat prompts sketch their last message only: a fixed system prompt is how ordinary apps work, and
    would otherwise make every chat client look templated.
    """
    if prompt.text is not None:
        return prompt.text
    if prompt.chat:
        return prompt.chat[-1].content
    return prompt.token_ids


def sketch_of(src: str | tuple[int, ...] | None, k: int, max_words: int) -> list[int] | None:
    """Bottom-k of one hash over the word (or token) trigrams; None under three words. A trigram's hash is
    the tuple hash of its words' stable hashes (int tuples hash the same in every process)."""
    if src is None:
        return None
    words: Any = list(map(_word, src.casefold().split())) if isinstance(src, str) else src
    if len(words) > max_words:
        words = [*words[:max_words - _TAIL_WORDS], *words[-_TAIL_WORDS:]]
    if len(words) < 3:
        return None
    return sorted(set(map(hash, zip(words, words[1:], words[2:], strict=False))))[:k]


def sketch(prompt: Prompt, k: int, max_words: int) -> list[int] | None:
    return sketch_of(sketch_source(prompt), k, max_words)


# What the tracker keeps of an admitted request until it settles: atoms only, so the garbage collector
# stops tracking it, and a chat's history is not held.
# (tenant, client_id, digest hash or None, sketch source, wants logprobs, top_logprobs, logit_bias probe, n>1 seeded)
Observation = tuple[str, str, int | None, str | tuple[int, ...] | None, bool, int, bool, bool]


def observation(ctx: RequestContext) -> Observation:
    wants = ctx.wants_logprobs
    return (ctx.tenant, ctx.client_id, hash(ctx.context_digest) if ctx.context_digest else None,
            sketch_source(ctx.prompt), wants, ctx.top_logprobs, bool(wants and ctx.logit_bias_entries),
            ctx.n > 1 and ctx.seed is not None)


class ClientSignals:
    __slots__ = ("n", "avg", "digests", "seen", "score", "flagged", "tenant", "client", "decay")

    def __init__(self, tenant: str, client: str) -> None:
        self.n = 0
        self.avg = [0.0] * len(SIGNALS)  # raw moving averages (divide by 1 - decay to correct)
        self.digests: dict[int, None] = {}  # recent prompt digests, oldest first
        self.seen: dict[int, int] = {}  # sketch value -> index of the request it was last seen in
        self.score = 0.0
        self.flagged = False
        self.tenant = tenant
        self.client = client
        self.decay = 1.0  # (1 - alpha) ** n: the bias correction's denominator is 1 - decay

    def signals(self) -> dict[str, float]:
        c = 1.0 - self.decay
        return {name: (v / c if c > 0 else 0.0) for name, v in zip(SIGNALS, self.avg, strict=True)}


class SuspicionTracker:
    def __init__(self, params: SignalParams, *, name: str = "budget",
                 on_flag: Callable[[ClientSignals, bool], None] | None = None) -> None:
        self.name = name
        self.on_flag = on_flag
        self._clients: OrderedDict[str, ClientSignals] = OrderedDict()
        self.flagged = 0
        self.configure(params)

    def configure(self, params: SignalParams) -> None:
        self.params = params
        self._weights = tuple(params.weights.get(s, 0.0) for s in SIGNALS)

    def score(self, key: str) -> float:
        c = self._clients.get(key)
        return c.score if c is not None else 0.0

    def get(self, key: str) -> ClientSignals | None:
        return self._clients.get(key)  # no move_to_end: a read is not activity

    def observe(self, key: str, obs: Observation | RequestContext, usage: Usage) -> float:
        """Fold one settled request (as admitted: ``obs``; as returned: ``usage``) into its client's score."""
        if isinstance(obs, RequestContext):
            obs = observation(obs)
        tenant, client, d, src, wants, top_logprobs, probe_, seeded_ = obs
        p = self.params
        clients = self._clients
        c = clients.get(key)
        if c is None:
            c = clients[key] = ClientSignals(tenant, client)
            if len(clients) > p.max_clients:
                _, old = clients.popitem(last=False)
                if old.flagged:
                    self.flagged -= 1
        else:
            clients.move_to_end(key)

        repeat = 0.0
        if d is not None:
            if d in c.digests:
                repeat = 1.0
                del c.digests[d]  # re-inserted below as the most recent
            c.digests[d] = None
            if len(c.digests) > p.repeat_window:
                del c.digests[next(iter(c.digests))]

        template = 0.0
        sk = sketch_of(src, p.sketch_size, p.sketch_words)
        if sk:
            seen = c.seen
            since = c.n - p.template_horizon
            hits = 0
            for v in sk:
                last = seen.get(v)
                if last is not None and last >= since:
                    hits += 1
                seen[v] = c.n
            x = (hits / len(sk) - p.template_low) / (p.template_high - p.template_low)
            template = 0.0 if x <= 0 else 1.0 if x >= 1 else x
            if len(seen) > 4 * p.template_horizon * p.sketch_size:
                c.seen = {v: i for v, i in seen.items() if i >= since}

        probe = 1.0 if probe_ else 0.0
        seeded = 1.0 if seeded_ else 0.0
        per_token = usage.logprob_values / max(usage.completion_tokens, 1)
        if wants:  # a front that reports no values still asked for them: count what it asked for
            per_token = max(per_token, max(top_logprobs, 1))
        intensity = min(per_token / p.intensity_k, 1.0)

        a = p.alpha
        avg = c.avg
        for i, x in enumerate((repeat, template, probe, seeded, intensity)):
            avg[i] += a * (x - avg[i])
        c.decay *= 1.0 - a
        c.n += 1
        if c.n >= p.min_requests:
            corr = 1.0 - c.decay
            w = self._weights
            s = (w[0] * avg[0] + w[1] * avg[1] + w[2] * avg[2] + w[3] * avg[3] + w[4] * avg[4]) / corr
            c.score = s if s < 1.0 else 1.0
            flag = c.score >= p.flag_score or (c.flagged and c.score > p.flag_score - p.unflag_margin)
            if flag != c.flagged:
                c.flagged = flag
                self.flagged += 1 if flag else -1
                self._audit(c, flag)
        return c.score

    def _audit(self, c: ClientSignals, flagged: bool) -> None:
        if audit.isEnabledFor(logging.WARNING):
            audit.warning(json.dumps({
                "event": "client_flagged" if flagged else "client_unflagged", "defense": self.name,
                "tenant": c.tenant, "client_id": c.client, "score": round(c.score, 4), "requests": c.n,
                "signals": {k: round(v, 4) for k, v in c.signals().items()},
            }, sort_keys=True))
        if self.on_flag is not None:
            self.on_flag(c, flagged)

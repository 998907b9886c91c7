"""Batches, contexts and adaptive attackers for the perturbation tests."""

from __future__ import annotations

import numpy as np

from defense.types import LogprobBatch, LogprobsMode, OutputKind, RequestContext


def topk_batch(logits: np.ndarray, k: int, *, missing: int = 0, temperature: float = 1.0,
               mode: LogprobsMode = LogprobsMode.RAW, offset: int = 0) -> LogprobBatch:
    """Top-k logprobs of ``logits`` [P, V] at ``temperature`` (processed mode) or raw; the last ``missing``
    slots of every other row are left empty."""
    t = temperature if mode is LogprobsMode.PROCESSED and temperature > 0 else 1.0
    z = logits / t
    lp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(lp, ids, axis=1)
    if missing:
        ids[::2, k - missing:] = -1
        vals[::2, k - missing:] = 0.0
    return LogprobBatch(values=vals.astype(np.float32), token_ids=ids.astype(np.int64), temperature=temperature,
                        logprobs_mode=mode, position_offset=offset)


def prob_batch(logits: np.ndarray) -> LogprobBatch:
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    return LogprobBatch(values=p.astype(np.float32), token_ids=np.empty((len(p), 0), dtype=np.int64),
                        kind=OutputKind.PROBABILITIES)


def ctx(prompt_digest: bytes = b"d" * 32, *, strength: float = 1.0, model: str = "tiny") -> RequestContext:
    return RequestContext(request_id="r1", client_id="c1", model=model, context_digest=prompt_digest,
                          strength=strength)




# -- adaptive attacks, shared by the in-process and the sidecar tests -----------------------------------
VARIANTS = [
    "What is the capital of France?", "what is the capital of france?", "WHAT IS THE CAPITAL OF FRANCE?",
    "What  is the capital of France?", " What is the capital of France? ", "What is the\tcapital of France?",
    "What is the capital\nof France?", "What is THE capital of France?", "what IS the capital OF france?",
    "What is the capital of  France?", "What is the capital of France?\n", "\nWhat is the capital of France?",
    "What Is The Capital Of France?", "what is the Capital of France?", "What is  the  capital  of  France?",
    "WHAT is the capital of France?",
]


def averaged(protect, batch: LogprobBatch, n: int) -> np.ndarray:
    """The averaging attacker: mean of n answers' logprobs, per (position, token) as returned."""
    return np.mean([protect(batch).values.astype(np.float64) for _ in range(n)], axis=0)


def error(estimate: np.ndarray, clean: LogprobBatch) -> float:
    """Mean absolute distance of an estimate from the clean logprobs, each row centered first: a student
    learns the shape of the distribution, so a per-row constant (a renormalization) is not an error."""
    m = clean.present
    c = clean.values.astype(np.float64)

    def centered(x: np.ndarray) -> np.ndarray:
        return x - (np.where(m, x, 0).sum(1, keepdims=True) / m.sum(1, keepdims=True))

    return float(np.abs(centered(estimate) - centered(c))[m].mean())


def full_vocab_logprobs(z: np.ndarray, temperature: float) -> np.ndarray:
    s = z / temperature
    return s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)


def temperature_difference(l1: LogprobBatch, l2: LogprobBatch, t1: float, t2: float) -> np.ndarray:
    """The differencing attacker: logits up to a per-row constant from processed logprobs at two temperatures.

    Both batches return every token (k = V), in the same token order."""
    o1, o2 = np.argsort(l1.token_ids, 1), np.argsort(l2.token_ids, 1)
    a = np.take_along_axis(l1.values.astype(np.float64), o1, 1)
    b = np.take_along_axis(l2.values.astype(np.float64), o2, 1)
    est = (a - b) / (1 / t1 - 1 / t2)
    return est - est.mean(1, keepdims=True)

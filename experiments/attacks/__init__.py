"""What the distiller does with the API: plain queries and the adaptive variants.

- repeated-query averaging: the same query sent ``repeats`` times (distinct request ids), answers averaged;
- near-duplicate averaging: ``near_dups`` variants of each query, answers averaged;
- temperature differencing: the same query at two temperatures, logits recovered from the difference;
- multi-account split: queries spread round-robin over ``accounts`` client ids;
- correctness filtering (reasoning): traces with a wrong final answer are dropped;
- hard labels (classifier): the distiller keeps only each answer's argmax, ignoring soft labels.

The combining functions are pure and vectorized per query; the tracks decide what a variant is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import AttackConfig

__all__ = [
    "Probe",
    "account_id",
    "average_probabilities",
    "average_topk",
    "probes",
    "temperature_difference",
    "text_variant",
]


@dataclass(frozen=True, slots=True)
class Probe:
    """One request the distiller sends for a query."""

    variant: int = 0  # 0: the query itself; i > 0: the i-th near-duplicate
    repeat: int = 0
    temperature: float | None = None  # set only by temperature differencing

    @property
    def tag(self) -> str:
        t = "" if self.temperature is None else f"-t{self.temperature:g}"
        return f"v{self.variant}r{self.repeat}{t}"


def probes(attack: AttackConfig) -> list[Probe]:
    temps: tuple[float | None, ...] = attack.temperature_pair or (None,)
    return [Probe(v, r, t) for v in range(1 + attack.near_dups) for r in range(attack.repeats) for t in temps]


def account_id(attacker: str, query_index: int, attack: AttackConfig) -> str:
    return f"{attacker}-{query_index % attack.accounts}"


_CANONICAL_EDITS = ("double_space", "upper", "trailing", "title", "tab")


def text_variant(text: str, variant: int, kind: str) -> str:
    """The ``variant``-th near-duplicate of a prompt.

    canonical: whitespace and case edits, which canonicalize to the same context (the keyed noise must
    be the same for them); distinct: a tagged rephrasing the canonical form tells apart.
    """
    if variant == 0:
        return text
    if kind == "distinct":
        return f"{text} (variant {variant})"
    edit = _CANONICAL_EDITS[(variant - 1) % len(_CANONICAL_EDITS)]
    if edit == "double_space":
        out = text.replace(" ", "  ")
    elif edit == "upper":
        out = text.upper()
    elif edit == "trailing":
        out = text + " " * variant
    elif edit == "title":
        out = text.title()
    else:
        out = text.replace(" ", "\t")
    return out + " " * ((variant - 1) // len(_CANONICAL_EDITS))  # more variants than edits: pad


def average_probabilities(answers: list[np.ndarray]) -> np.ndarray:
    """Mean of dense probability vectors: R x [..., C] -> [..., C] (a vote fraction for one-hot answers)."""
    return np.mean(np.stack(answers), axis=0)


def average_topk(answers: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Average top-k answers by token id: each token's mean logprob over the answers that returned it
    (a geometric mean, which is what cancels additive logit noise), rescaled so the top-k keeps the
    answers' mean returned mass.

    answers: R x (ids [P, K_r] int64 with -1 missing, logprobs [P, K_r]) -> (ids [P, k], logprobs [P, k]),
    the k tokens with the highest averaged value, -1 where fewer were ever returned.
    """
    if len(answers) == 1:
        return answers[0]
    n_pos = answers[0][0].shape[0]
    n_ids = max(int(ids.max(initial=-1)) for ids, _ in answers) + 1
    lp_sum = np.zeros((n_pos, n_ids + 1))  # the last column collects missing slots and is dropped
    count = np.zeros((n_pos, n_ids + 1))
    mass = np.zeros((n_pos, 1))
    for ids, lp in answers:
        present = ids >= 0
        cols = np.where(present, ids, n_ids)
        add = np.zeros_like(lp_sum)
        np.put_along_axis(add, cols, np.where(present, lp.astype(np.float64), 0.0), axis=1)
        lp_sum += add
        hit = np.zeros_like(count)
        np.put_along_axis(hit, cols, present.astype(np.float64), axis=1)
        count += hit
        mass += np.where(present, np.exp(np.minimum(lp.astype(np.float64), 0.0)), 0.0).sum(axis=1, keepdims=True)
    mass /= len(answers)
    seen = count[:, :n_ids] > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_lp = np.where(seen, lp_sum[:, :n_ids] / np.maximum(count[:, :n_ids], 1), -np.inf)
    kk = min(k, n_ids)
    order = np.argsort(-mean_lp, axis=1, kind="stable")[:, :kk]
    ok = np.take_along_axis(seen, order, axis=1)
    probs = np.where(ok, np.exp(np.take_along_axis(mean_lp, order, axis=1)), 0.0)
    probs *= np.clip(mass, 0.0, 1.0) / np.maximum(probs.sum(axis=1, keepdims=True), 1e-300)
    ids_out = np.full((n_pos, k), -1, dtype=np.int64)
    lp_out = np.full((n_pos, k), -1e4, dtype=np.float32)
    ids_out[:, :kk] = np.where(ok, order, -1)
    lp_out[:, :kk] = np.where(ok, np.log(np.maximum(probs, 1e-30)), -1e4)
    return ids_out, lp_out


def temperature_difference(
    a: tuple[np.ndarray, np.ndarray], t_a: float, b: tuple[np.ndarray, np.ndarray], t_b: float
) -> tuple[np.ndarray, np.ndarray]:
    """Recover logits from processed logprobs at two temperatures, then the implied T=1 top-k answer.

    At temperature T a returned logprob is z/T - log Z_T, so (v_a - v_b) / (1/t_a - 1/t_b) = z up to a
    per-position constant, cancelling any noise added after temperature with the same value at both
    (what the Contracts forbid). Tokens returned in only one answer are dropped. The top-k's T=1 mass is
    unknown to the attacker; it is taken from the answer whose temperature is closer to 1.
    """
    ids_a, va = a
    ids_b, vb = b
    # for each id in a, its value in b (NaN when b did not return it)
    match = (ids_a[:, :, None] == ids_b[:, None, :]) & (ids_a[:, :, None] >= 0)  # [P, Ka, Kb]
    ok = match.any(axis=2)
    vb_on_a = np.where(match, vb[:, None, :].astype(np.float64), -np.inf).max(axis=2)
    diff = np.where(ok, va.astype(np.float64) - np.where(ok, vb_on_a, 0.0), 0.0)
    z = np.where(ok, diff / (1.0 / t_a - 1.0 / t_b), -np.inf)
    z_max = np.max(np.where(ok, z, -np.inf), axis=1, keepdims=True)
    z_max = np.where(np.isfinite(z_max), z_max, 0.0)
    w = np.where(ok, np.exp(z - z_max), 0.0)
    rel = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    near = va if abs(t_a - 1) <= abs(t_b - 1) else vb
    near_ids = ids_a if near is va else ids_b
    mass = np.where(near_ids >= 0, np.exp(near.astype(np.float64)), 0.0).sum(axis=1, keepdims=True)
    probs = rel * np.clip(mass, 0.0, 1.0)
    ids_out = np.where(ok, ids_a, -1).astype(np.int64)
    with np.errstate(divide="ignore"):
        lp = np.where(ok & (probs > 0), np.log(np.maximum(probs, 1e-30)), -1e4).astype(np.float32)
    return ids_out, lp

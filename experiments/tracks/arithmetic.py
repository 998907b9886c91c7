"""Synthetic multi-step arithmetic with written-out steps, for the reasoning track.

A problem chains 2-4 single-digit additions and subtractions with every running total in
[0, max_value], so a BPE tokenizer keeps each number one token and a tiny model can learn the table::

    Q: 7 + 5 - 3 + 8 = ?
    A: 7 + 5 = 12. 12 - 3 = 9. 9 + 8 = 17. Answer: 17.

The answer is checkable from the question alone, which is what a correctness-filtering distiller uses.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    prompt: str  # "Q: ... = ?\nA:"
    trace: str  # " 7 + 5 = 12. ... Answer: 17."
    answer: int

    @property
    def text(self) -> str:
        return self.prompt + self.trace


def make_problem(rng: random.Random, *, min_steps: int = 2, max_steps: int = 4, max_value: int = 30) -> Problem:
    total = rng.randint(1, 9)
    question = [str(total)]
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        # subtract when adding could leave the range, otherwise a fair coin once the total allows it
        if total + 9 > max_value or (total > 9 and rng.random() < 0.5):
            b, op = rng.randint(1, min(9, total)), "-"
            new = total - b
        else:
            b, op = rng.randint(1, 9), "+"
            new = total + b
        question.append(f"{op} {b}")
        steps.append(f"{total} {op} {b} = {new}.")
        total = new
    return Problem(f"Q: {' '.join(question)} = ?\nA:", " " + " ".join(steps) + f" Answer: {total}.", total)


def problems(n: int, seed: int, **kw: int) -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, **kw) for _ in range(n)]


def parse_answer(text: str) -> int | None:
    """The final answer a trace states, or None when it states none."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def solve(prompt: str) -> int | None:
    """The true answer of a problem prompt, computed from the question (what a filtering distiller does)."""
    m = re.search(r"Q:\s*(.*?)=\s*\?", prompt)
    if not m:
        return None
    tokens = m.group(1).split()
    try:
        total = int(tokens[0])
        for op, b in zip(tokens[1::2], tokens[2::2], strict=True):
            total = total + int(b) if op == "+" else total - int(b)
    except (ValueError, IndexError):
        return None
    return total

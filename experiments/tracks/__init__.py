"""The tracks: classifier (probabilities), lm (text and top-k logprobs), reasoning (traces), budget.

Each is a ``TrackRunner``: ``prepare`` trains or reloads the teacher, ``run_cell`` runs one (attack,
defense, strength, seed) cell and returns its metrics, ``aggregate`` turns the cells into rows per
subtrack (``classifier_ood``, ``lm_logprob``, ...).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import AttackConfig
    from ..runner import Cell, Env


class TrackRunner(abc.ABC):
    def __init__(self, env: Env, cfg: Any) -> None:
        self.env = env
        self.cfg = cfg

    @property
    def attacks(self) -> tuple[AttackConfig, ...]:
        return self.cfg.attacks

    @abc.abstractmethod
    def prepare(self) -> None: ...

    @abc.abstractmethod
    def run_cell(self, cell: Cell) -> dict[str, Any]: ...

    @abc.abstractmethod
    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]: ...


def _classifier(env: Env, cfg: Any) -> TrackRunner:
    from .classifier import ClassifierRunner

    return ClassifierRunner(env, cfg)


def _lm(env: Env, cfg: Any) -> TrackRunner:
    from .lm import LMRunner

    return LMRunner(env, cfg)


def _reasoning(env: Env, cfg: Any) -> TrackRunner:
    from .reasoning import ReasoningRunner

    return ReasoningRunner(env, cfg)


def _budget(env: Env, cfg: Any) -> TrackRunner:
    from .budget import BudgetRunner

    return BudgetRunner(env, cfg)


# each track's module is imported when a study enables it
TRACK_RUNNERS: Mapping[str, Callable[[Env, Any], TrackRunner]] = {
    "classifier": _classifier,
    "lm": _lm,
    "reasoning": _reasoning,
    "budget": _budget,
}

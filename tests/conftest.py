"""Shared fixtures. tests/ is put on sys.path so ``support.*`` helpers import from any test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from defense.clock import FakeClock  # noqa: E402
from defense.keys import KeyRing  # noqa: E402
from defense.metrics import Metrics  # noqa: E402


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


@pytest.fixture
def keys() -> KeyRing:
    return KeyRing.generate()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    from defense.keys import write_new_key_file

    p = tmp_path / "keys.yaml"
    write_new_key_file(p)
    return p


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v

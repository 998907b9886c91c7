"""The synthetic corpus is deterministic, and seeds split one fixed world."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import defense.models.corpus
from defense.models import read_text_files, synthetic_corpus

CORPUS_MODULE = Path(defense.models.corpus.__file__)


def test_same_seed_same_documents():
    assert synthetic_corpus(50, seed=3) == synthetic_corpus(50, seed=3)
    assert synthetic_corpus(50, seed=3) != synthetic_corpus(50, seed=4)


def test_deterministic_across_processes():
    # set iteration order changes with PYTHONHASHSEED; the corpus must not. run_path skips
    # defense/models/__init__.py, so the child does not pay for importing torch.
    code = (
        "import runpy, sys; mod = runpy.run_path(sys.argv[1]); "
        "print(repr(mod['synthetic_corpus'](30, seed=1)))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code, str(CORPUS_MODULE)],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(h)},
        ).stdout
        for h in (1, 2)
    }
    assert outs == {repr(synthetic_corpus(30, seed=1)) + "\n"}


def test_facts_are_consistent_across_seeds():
    # "X lives in Y." names one city per person in every split: held-out text shares the world
    homes: dict[str, set[str]] = {}
    for seed in (0, 1):
        for doc in synthetic_corpus(300, seed=seed):
            for person, city in re.findall(r"(\w+) lives in (\w+)\.", doc):
                homes.setdefault(person, set()).add(city)
    assert homes and all(len(cities) == 1 for cities in homes.values())


def test_arithmetic_is_correct():
    docs = synthetic_corpus(200, seed=0)
    sums = [m for d in docs for m in re.findall(r"(\d+) plus (\d+) is (\d+)\.", d)]
    assert sums and all(int(a) + int(b) == int(c) for a, b, c in sums)


def test_negative_n_docs_rejected():
    with pytest.raises(ValueError, match="n_docs must be >= 0, got -1"):
        synthetic_corpus(-1)


def test_read_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert read_text_files(tmp_path) == ["first", "second"]
    assert read_text_files([tmp_path / "b.txt"]) == ["second"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text_files(tmp_path / "nope.txt")

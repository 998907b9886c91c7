"""Fixtures for the watermark tests: fixed keys (so null p-values are repeatable) and one trained
tiny LM per session, shared by every test that samples text.

The tiny models' matmuls are far too small to gain from a second thread, and on a shared 2-core
machine two OpenMP threads spinning against other processes ran 5x slower than one. So these tests
run torch on one thread, and put the previous setting back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.watermark import fixed_ring, one_thread

from defense.keys import KeyRing


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return fixed_ring(tmp_path)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory):
    """(model, tokenizer, folder): the model factory's tiny Llama, trained 200 steps on the synthetic corpus."""
    import torch

    from defense.models import LMTrainConfig, build_tiny_lm_folder, load_model

    folder = tmp_path_factory.mktemp("watermark-lm") / "tiny"
    with torch.random.fork_rng(devices=[]), one_thread():
        build_tiny_lm_folder(folder, hidden=64, layers=2, heads=4, vocab_size=2048, train_steps=200,
                             train_config=LMTrainConfig(batch_size=16, seq_len=128, seed=0))
    model, tok = load_model(folder)
    return model, tok, folder


@pytest.fixture(scope="session")
def prompts(tiny_lm):
    """Short prompts (the first 3 tokens of held-out documents)."""
    from defense.models import synthetic_corpus

    _, tok, _ = tiny_lm
    return [tok(d)["input_ids"][:3] for d in synthetic_corpus(1600, seed=4242)]

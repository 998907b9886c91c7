"""MLP classifier: seeded init, safetensors + JSON round trip, training that learns digits."""

import json

import numpy as np
import pytest
import torch

from defense.models import (
    ClassifierConfig,
    build_classifier,
    load_classifier,
    save_classifier,
    train_classifier,
)

CFG = ClassifierConfig(in_dim=64, n_classes=10, hidden=(32,))


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y  # pixels are 0..16


def test_forward_returns_logits_shape():
    model = build_classifier(CFG, seed=0)
    x = torch.zeros(5, 64)  # [B, in_dim] float32
    assert model(x).shape == (5, 10)


def test_save_load_round_trip(tmp_path):
    model = build_classifier(CFG, seed=3)
    save_classifier(model, CFG, tmp_path)
    assert json.loads((tmp_path / "classifier_config.json").read_text())["hidden"] == [32]
    loaded, cfg = load_classifier(tmp_path)
    assert cfg == CFG and not loaded.training
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no classifier_config.json"):
        load_classifier(tmp_path)


def test_training_learns_and_is_deterministic():
    X, y = _digits()
    X_train, y_train, X_test, y_test = X[:1400], y[:1400], X[1400:], y[1400:]
    runs = []
    for _ in range(2):
        model = build_classifier(CFG, seed=0)
        stats = train_classifier(model, X_train, y_train, epochs=8, lr=3e-3, batch_size=64, seed=0)
        runs.append((model, stats))
    (model, stats), (twin, _) = runs
    assert stats["accuracy"] > 0.9
    with torch.inference_mode():
        test_acc = (model(torch.from_numpy(X_test)).argmax(-1).numpy() == y_test).mean()
        assert torch.equal(model(torch.from_numpy(X_test)), twin(torch.from_numpy(X_test)))
    assert test_acc > 0.85


def test_training_rejects_wrong_shapes():
    model = build_classifier(CFG, seed=0)
    with pytest.raises(ValueError, match=r"X must have shape \[N, 64\], got \[3, 8\]"):
        train_classifier(model, np.zeros((3, 8)), np.zeros(3), epochs=1, lr=1e-3, batch_size=2, seed=0)

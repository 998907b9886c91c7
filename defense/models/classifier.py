"""A small MLP classifier for the probability-channel track (e.g. scikit-learn digits: 64 -> 10).

Saved as ``model.safetensors`` plus ``classifier_config.json``, so a folder holds no pickles.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "ClassifierConfig",
    "MLPClassifier",
    "build_classifier",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

_WEIGHTS = "model.safetensors"
_CONFIG = "classifier_config.json"


@dataclass(frozen=True)
class ClassifierConfig:
    in_dim: int = 64  # 8x8 digits
    n_classes: int = 10
    hidden: tuple[int, ...] = (128, 64)

    def __post_init__(self) -> None:
        if not isinstance(self.in_dim, int) or self.in_dim < 1:
            raise ValueError(f"in_dim must be a positive int, got {self.in_dim!r}")
        if not isinstance(self.n_classes, int) or self.n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {self.n_classes!r}")
        # lists arrive from JSON; a tuple keeps the config hashable and immutable
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive ints, got {self.hidden!r}")


class MLPClassifier(nn.Module):
    """Linear-ReLU stack; ``forward`` returns logits, never probabilities."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.config = cfg
        sizes = (cfg.in_dim, *cfg.hidden)
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(sizes):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], cfg.n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_dim] float32 -> logits [B, n_classes] float32
        return self.net(x)


def build_classifier(cfg: ClassifierConfig, seed: int = 0) -> MLPClassifier:
    """A freshly initialized classifier in eval mode; the same ``seed`` gives the same weights."""
    with torch.random.fork_rng(devices=[]):  # seed the init without touching global torch state
        torch.manual_seed(seed)
        model = MLPClassifier(cfg)
    return model.eval()


def save_classifier(model: MLPClassifier, cfg: ClassifierConfig, folder: str | Path) -> Path:
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / _WEIGHTS))
    (path / _CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return path


def load_classifier(folder: str | Path) -> tuple[MLPClassifier, ClassifierConfig]:
    """Load ``(model, config)`` saved by ``save_classifier``; the model is in eval mode on CPU."""
    path = Path(folder)
    for name in (_CONFIG, _WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"classifier folder {path} has no {name}")
    raw = json.loads((path / _CONFIG).read_text())
    known = {"in_dim", "n_classes", "hidden"}
    if set(raw) != known:
        raise ValueError(f"{path / _CONFIG} must have exactly the keys {sorted(known)}, got {sorted(raw)}")
    cfg = ClassifierConfig(**raw)
    model = MLPClassifier(cfg)
    model.load_state_dict(load_file(str(path / _WEIGHTS)))
    return model.eval(), cfg


def train_classifier(
    model: MLPClassifier,
    X: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Train with Adam on cross entropy, in place; returns final loss, train accuracy and seconds.

    Scale inputs first (digits pixels are 0..16: divide by 16). Deterministic given ``seed``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features = torch.as_tensor(X, dtype=torch.float32)  # [N, in_dim] float32
    labels = torch.as_tensor(y, dtype=torch.int64)  # [N] int64
    if features.ndim != 2 or features.shape[1] != model.config.in_dim:
        raise ValueError(f"X must have shape [N, {model.config.in_dim}], got {list(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"y must have shape [{features.shape[0]}], got {list(labels.shape)}")

    start = clock()
    generator = torch.Generator().manual_seed(seed)  # local: batch order never depends on global state
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    n = features.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        logits = model(features)
        final_loss = nn.functional.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(dim=-1) == labels).float().mean().item()
    return {"loss": final_loss, "accuracy": accuracy, "seconds": clock() - start}

"""An out-of-distribution score for tensor inputs: Mahalanobis distance to the training inputs.

Adaptive Misinformation (Kariyappa and Qureshi, CVPR 2020) answers in-distribution queries truthfully and
out-of-distribution ones with misinformation; it needs an OOD detector that benign users rarely trip. The
teacher's own top-1 probability is a weak one (an MLP is confident on noise too); the squared Mahalanobis
distance of the input to the training inputs is a strong one on images of a fixed size (on the digits
track it separates the synthetic attacker's queries from held-out digits with AUROC 0.998).

``fit`` takes the training inputs and a quantile: the threshold is that quantile of the training inputs'
own distances, so about (1 - quantile) of in-distribution inputs score above 1. The fitted detector is an
``.npz`` (mean, whitening matrix, threshold and how it was made), loaded by the targeted defense's gate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidInput

__all__ = ["InputDensity"]

FORMAT = "distillguard-input-density-v1"


@dataclass(frozen=True)
class InputDensity:
    mean: np.ndarray  # [D]
    whiten: np.ndarray  # [D, D]: ||(x - mean) @ whiten||^2 is the squared Mahalanobis distance
    threshold: float  # squared distance at the fitted quantile of the training inputs
    quantile: float
    n_train: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, x: np.ndarray, *, quantile: float = 0.995, shrinkage: float = 1e-3) -> InputDensity:
        """From training inputs ``x`` [N, D] (N > D); ``shrinkage`` x the mean variance is added to the
        covariance's diagonal (constant pixels, as digits' borders, would make it singular)."""
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if not 0.5 <= quantile < 1:
            raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
        if x.shape[0] <= x.shape[1]:
            raise ValueError(f"need more inputs than dimensions to fit, got {x.shape[0]} of dimension {x.shape[1]}")
        if not np.isfinite(x).all():
            raise ValueError("training inputs contain NaN or infinity")
        mean = x.mean(axis=0)
        cov = np.cov(x - mean, rowvar=False)
        cov += np.eye(cov.shape[0]) * shrinkage * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
        vals, vecs = np.linalg.eigh(cov)
        whiten = vecs / np.sqrt(vals)[None, :]
        d = (((x - mean) @ whiten) ** 2).sum(axis=1)
        return cls(mean, whiten, float(np.quantile(d, quantile)), quantile, int(x.shape[0]))

    def distance(self, x: np.ndarray) -> np.ndarray:
        """[N] squared Mahalanobis distances of inputs ``x`` [N, D]."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InvalidInput(f"the OOD detector takes inputs of {self.dim} values, got shape {list(x.shape)}")
        return (((x - self.mean) @ self.whiten) ** 2).sum(axis=1)

    def score(self, x: np.ndarray) -> np.ndarray:
        """[N] distance over the threshold: above 1 reads as out of distribution."""
        return self.distance(x) / self.threshold

    def save(self, path: str | os.PathLike[str]) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:  # np.savez would append .npz to a name without it
            np.savez(f, format=np.array(FORMAT), mean=self.mean, whiten=self.whiten, threshold=self.threshold,
                     quantile=self.quantile, n_train=self.n_train)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InputDensity:
        try:
            with np.load(path, allow_pickle=False) as z:
                data: dict[str, Any] = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the OOD detector {path}: {e}") from None
        if str(data.get("format", "")) != FORMAT:
            raise ConfigError(f"{path} is not a distillguard input-density file ({FORMAT})")
        mean, whiten = data["mean"].astype(np.float64), data["whiten"].astype(np.float64)
        if mean.ndim != 1 or whiten.shape != (mean.shape[0], mean.shape[0]) or not float(data["threshold"]) > 0:
            raise ConfigError(f"{path}: inconsistent shapes or threshold")
        return cls(mean, whiten, float(data["threshold"]), float(data["quantile"]), int(data["n_train"]))

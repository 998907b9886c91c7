"""Data for the classifier track: scikit-learn digits, and out-of-distribution 8x8 query images.

Pixels are scaled to [0, 1] (digits are 0..16). The split is fixed by ``split_seed`` so every seed of a
study attacks the same teacher; the attacker's query sample and augmentations follow the cell's seed.
The OOD set mixes three sources in equal parts: sparse uniform noise, random pen strokes, and patches of
scikit-learn's bundled sample photographs downsampled to 8x8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE = 8
N_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    x_teacher: np.ndarray  # [N1, 64] float32 in [0, 1]
    y_teacher: np.ndarray  # [N1] int64
    x_pool: np.ndarray  # held out from the teacher: the in-distribution attacker's pool
    y_pool: np.ndarray
    x_test: np.ndarray  # benign users' queries and the clone's test set
    y_test: np.ndarray


def digits_split(split_seed: int = 0, *, teacher_frac: float = 0.5, pool_frac: float = 0.3) -> DigitsSplit:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(split_seed).permutation(len(x))
    n1 = int(teacher_frac * len(x))
    n2 = n1 + int(pool_frac * len(x))
    a, b, c = order[:n1], order[n1:n2], order[n2:]
    return DigitsSplit(x[a], y[a], x[b], y[b], x[c], y[c])


def shift_images(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Shift each 8x8 image by (dy, dx) pixels, filling with 0: [N, 64] -> [N, 64]."""
    imgs = x.reshape(-1, SIDE, SIDE)
    out = np.zeros_like(imgs)
    for sy in (-1, 0, 1):  # three shifts per axis: a loop over 9 cases, each vectorized over images
        for sx in (-1, 0, 1):
            m = (dy == sy) & (dx == sx)
            if not m.any():
                continue
            src = imgs[m]
            shifted = np.zeros_like(src)
            ys = slice(max(sy, 0), SIDE + min(sy, 0))
            yd = slice(max(-sy, 0), SIDE + min(-sy, 0))
            xs = slice(max(sx, 0), SIDE + min(sx, 0))
            xd = slice(max(-sx, 0), SIDE + min(-sx, 0))
            shifted[:, ys, xs] = src[:, yd, xd]
            out[m] = shifted
    return out.reshape(-1, SIDE * SIDE)


def indist_queries(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` queries from the held-out pool: the pool once, then shifted, noised copies to fill the budget."""
    first = pool[rng.permutation(len(pool))[: min(n, len(pool))]]
    extra = n - len(first)
    if extra <= 0:
        return first.astype(np.float32)
    base = pool[rng.integers(0, len(pool), size=extra)]
    moved = shift_images(base, rng.integers(-1, 2, size=extra), rng.integers(-1, 2, size=extra))
    noisy = np.clip(moved + rng.normal(0.0, 0.05, size=moved.shape), 0.0, 1.0)
    return np.concatenate([first, noisy]).astype(np.float32)


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    density = rng.uniform(0.1, 0.6, size=(n, 1))
    return (rng.uniform(size=(n, SIDE * SIDE)) * (rng.uniform(size=(n, SIDE * SIDE)) < density)).astype(np.float32)


def _strokes(n: int, rng: np.random.Generator) -> np.ndarray:
    """1-4 straight pen strokes per image, drawn by sampling points along each segment."""
    imgs = np.zeros((n, SIDE, SIDE), dtype=np.float32)
    t = np.linspace(0.0, 1.0, 16)
    for _ in range(4):
        active = rng.uniform(size=n) < 0.75
        p0 = rng.uniform(0, SIDE - 1, size=(n, 2))
        p1 = rng.uniform(0, SIDE - 1, size=(n, 2))
        pts = np.rint(p0[:, None, :] + t[None, :, None] * (p1 - p0)[:, None, :]).astype(np.int64)  # [n, 16, 2]
        ink = rng.uniform(0.5, 1.0, size=n).astype(np.float32)
        rows = np.repeat(np.arange(n), len(t))
        vals = np.repeat(np.where(active, ink, 0.0), len(t))
        cur = imgs[rows, pts[..., 0].ravel(), pts[..., 1].ravel()]
        imgs[rows, pts[..., 0].ravel(), pts[..., 1].ravel()] = np.maximum(cur, vals)
    return imgs.reshape(n, -1)


def _photo_patches(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photos = [img.mean(axis=2) / 255.0 for img in load_sample_images().images]  # grayscale [H, W]
    out = np.empty((n, SIDE * SIDE), dtype=np.float32)
    which = rng.integers(0, len(photos), size=n)
    sizes = rng.integers(16, 97, size=n)  # patch side before block-averaging down to 8
    for i in range(n):  # one crop per image: sizes differ, so a loop (n is at most a few thousand)
        img = photos[which[i]]
        s = int(sizes[i]) // SIDE * SIDE
        y0 = int(rng.integers(0, img.shape[0] - s))
        x0 = int(rng.integers(0, img.shape[1] - s))
        patch = img[y0 : y0 + s, x0 : x0 + s].reshape(SIDE, s // SIDE, SIDE, s // SIDE).mean(axis=(1, 3))
        # digits are light strokes on dark: invert half the patches so both polarities appear
        out[i] = (patch if rng.uniform() < 0.5 else 1.0 - patch).ravel()
    return out


def ood_queries(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` out-of-distribution 8x8 images in [0, 1]: noise, strokes and photo patches, shuffled."""
    a = n // 3
    b = n // 3
    parts = [_noise(a, rng), _strokes(b, rng), _photo_patches(n - a - b, rng)]
    x = np.concatenate(parts)
    return x[rng.permutation(n)].astype(np.float32)


def nudge(x: np.ndarray, variant: int, seed: int) -> np.ndarray:
    """A near-duplicate image: +-1/255 pixel noise, invisible to the model, distinct bytes for the key."""
    if variant == 0:
        return x
    rng = np.random.default_rng([seed, variant])
    return np.clip(x + rng.choice([-1.0, 1.0], size=x.shape) / 255.0, 0.0, 1.0).astype(np.float32)

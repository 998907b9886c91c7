"""Watermark detectors: the embedder's keyed function, exact tail p-values, dedup, several keys.

A sequence's token at position t (t >= h) is scored with its window ``x[t-h:t]``; the first h
tokens only seed. Each distinct hash is scored once: the hash is a function of exactly what seeds
the PRF (the context and the token for lefthash; the min-hash seed and the token for selfhash), so
deduplicating on it drops repeated (context, token) pairs, whose green bits are not independent,
and nothing else. Under the null (text that does not depend on the key) the distinct scored bits are
then i.i.d. Bernoulli(gamma) (green-list) or their ``-log(1 - u)`` i.i.d. Exp(1) (Gumbel), which is
what the exact binomial and gamma tails assume.

Everything is vectorized over all tokens of all sequences at once (numpy int64), one pass per key.
Several keys are tried (active and retired); each result reports the key with the smallest p-value,
Bonferroni-corrected for the number of keys tried.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import prf
from ..errors import InvalidInput
from ..types import Detection
from .keyed import (
    GREEN_BITS,
    SCHEMES,
    check_seeding,
    green,
    green_threshold,
    scheme_seed,
    token_hashes,
    uniform,
)
from .stats import binom_log10_sf, bonferroni_log10, gamma_log10_sf

if TYPE_CHECKING:
    from ..keys import KeyRing

__all__ = ["DEFAULT_GAMMA", "DetectionReport", "DetectorSpec", "Scores", "WatermarkDetector"]

DEFAULT_GAMMA = 0.25
MAX_TOKENS = 50_000_000  # one request's worth; a radioactivity test of 10^6 tokens is far below


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    """What a detector needs to mirror an embedder (the key comes from the key ring)."""

    scheme: str = "kgw"
    context: int = 1
    hashing: str = "lefthash"
    gamma: float = DEFAULT_GAMMA  # green-list only
    vocab_size: int | None = None  # ids must be below it when set
    min_tokens: int = 16  # scorable positions (after the first h) a sequence needs
    detection_p: float = 1e-6  # corrected p-values at or below it count as detected

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        check_seeding(self.context, self.hashing)
        green_threshold(self.gamma)
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 or None, got {self.vocab_size}")
        if not 0.0 < self.detection_p < 1.0:
            raise ValueError(f"detection_p must be in (0, 1), got {self.detection_p}")

    @property
    def threshold(self) -> int:
        return green_threshold(self.gamma)

    @property
    def effective_gamma(self) -> float:
        """The exact per-token green probability under the null (gamma rounded to 24 bits)."""
        return self.threshold / (1 << GREEN_BITS)


@dataclass(frozen=True, slots=True)
class Scores:
    """Per-sequence statistics for one key, uncorrected: arrays of shape [N]."""

    n: np.ndarray  # distinct tokens scored
    stat: np.ndarray  # green count (kgw) or sum of -log(1 - u) (gumbel)
    z: np.ndarray
    log10_p: np.ndarray


@dataclass(frozen=True, slots=True)
class DetectionReport:
    results: tuple[Detection, ...]  # one per sequence, in order
    combined: Detection  # all sequences pooled (deduplicated across them)
    keys_tried: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class _Tokens:
    """Scorable positions of a batch of sequences, flattened."""

    windows: np.ndarray  # [M, h] int64
    targets: np.ndarray  # [M] int64
    rows: np.ndarray  # [M] int64
    n_rows: int


class WatermarkDetector:
    """Tests token sequences for one scheme under one or more keys ``(key_id, key seed)``."""

    def __init__(self, spec: DetectorSpec, keys: Sequence[tuple[str, int]]) -> None:
        if not keys:
            raise ValueError("a detector needs at least one key")
        self.spec = spec
        self._keys = dict(keys)
        self.key_ids = tuple(self._keys)

    @classmethod
    def from_keyring(cls, spec: DetectorSpec, ring: KeyRing, *, tenant: str = "") -> WatermarkDetector:
        from .base import KEY_PURPOSE

        keys = [(kid, scheme_seed(key, spec.scheme, spec.context, spec.hashing))
                for kid, key in ring.candidates(KEY_PURPOSE, tenant=tenant)]
        return cls(spec, keys)

    # -- public API ---------------------------------------------------------------------------
    def detect(self, tokens: Sequence[int] | np.ndarray, *, key_ids: Sequence[str] | None = None) -> Detection:
        """Test one sequence (token ids of the served model's tokenizer, the prompt left out)."""
        return self.detect_many([tokens], key_ids=key_ids).results[0]

    def detect_many(self, sequences: Sequence[Sequence[int]] | np.ndarray, *, key_ids: Sequence[str] | None = None,
                    exclude: Sequence[Sequence[int]] | None = None, per_sequence: bool = True) -> DetectionReport:
        """Test each sequence, and all of them pooled.

        ``exclude``: sequences (prompts) whose windows are not scored, because text the tester chose
        says nothing about the model. ``per_sequence=False`` runs only the pooled test (``results``
        is empty) and applies the minimum length to all sequences together: a radioactivity test
        pools many short samples.
        """
        seqs = self._validate(sequences, check_length=per_sequence)
        chosen = self._choose_keys(key_ids)
        toks = self._scorable(seqs)
        if not per_sequence and toks.targets.size < self.spec.min_tokens:
            raise InvalidInput(f"the sequences hold {toks.targets.size} scorable tokens together; "
                               f"a test needs at least min_tokens={self.spec.min_tokens}")
        ex = self._scorable(self._as_arrays(exclude, "exclude")) if exclude else None
        per_key = []
        for kid in chosen:
            hashes = token_hashes(self._keys[kid], toks.windows, toks.targets, self.spec.hashing)
            keep = None
            if ex is not None and ex.targets.size:
                ex_hashes = token_hashes(self._keys[kid], ex.windows, ex.targets, self.spec.hashing)
                keep = ~np.isin(hashes, ex_hashes)
            rows_s = self._score(hashes, toks.rows, toks.n_rows, keep) if per_sequence else None
            pooled = self._score(hashes, np.zeros_like(toks.rows), 1, keep)
            per_key.append((kid, rows_s, pooled))
        m = len(chosen)
        results = tuple(self._best(per_key, i, m, pooled=False) for i in range(toks.n_rows)) if per_sequence else ()
        return DetectionReport(results, self._best(per_key, 0, m, pooled=True), tuple(chosen))

    def score(self, sequences: Sequence[Sequence[int]] | np.ndarray, *, key_id: str | None = None,
              key_seed: int | None = None, check: bool = True) -> Scores:
        """Vectorized per-sequence scores under one key (the first key tried when neither is given).

        For calibration and large null studies: no multiple-testing correction, and ``check=False``
        skips the per-sequence length check (sequences too short to score get n = 0, p = 1).
        """
        seqs = self._validate(sequences, check_length=check)
        if key_seed is None:
            key_seed = self.key_seed(key_id)
        toks = self._scorable(seqs)
        hashes = token_hashes(key_seed, toks.windows, toks.targets, self.spec.hashing)
        return self._score(hashes, toks.rows, toks.n_rows, None)

    # -- input --------------------------------------------------------------------------------
    def _as_arrays(self, sequences: Any, what: str) -> list[np.ndarray]:
        if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
            rows = list(sequences)
        elif type(sequences).__module__.startswith("torch"):
            rows = list(sequences.detach().cpu().numpy().reshape(sequences.shape[0], -1))
        else:
            rows = list(sequences)
        out = []
        for i, r in enumerate(rows):
            try:
                a = np.asarray(r.detach().cpu().numpy() if type(r).__module__.startswith("torch") else r)
            except (OverflowError, TypeError, ValueError):
                raise InvalidInput(f"{what} {i} must be a flat list of integer token ids") from None
            if a.size == 0:
                a = np.zeros(0, dtype=np.int64)
            elif a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise InvalidInput(f"{what} {i} must be a flat list of integer token ids")
            out.append(a.astype(np.int64, copy=False))
        return out

    def _validate(self, sequences: Any, *, check_length: bool = True) -> list[np.ndarray]:
        seqs = self._as_arrays(sequences, "sequence")
        if not seqs:
            raise InvalidInput("no sequences to test")
        total = sum(s.size for s in seqs)
        if total > MAX_TOKENS:
            raise InvalidInput(f"{total} tokens is more than one test takes ({MAX_TOKENS})")
        v = self.spec.vocab_size
        h = self.spec.context
        need = h + self.spec.min_tokens
        lengths = np.array([s.size for s in seqs], dtype=np.int64)
        if check_length and (lengths < need).any():
            i = int(np.flatnonzero(lengths < need)[0])
            if lengths[i] == 0:
                raise InvalidInput(f"sequence {i} is empty")
            raise InvalidInput(f"sequence {i} has {lengths[i]} tokens; a test needs at least {need} "
                               f"(the first {h} only seed the hash, then min_tokens={self.spec.min_tokens})")
        if total:
            flat = np.concatenate(seqs)
            bad = (flat < 0) if v is None else ((flat < 0) | (flat >= v))
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                i = int(np.searchsorted(np.cumsum(lengths), j, side="right"))
                rng = f"[0, {v})" if v is not None else ">= 0"
                raise InvalidInput(f"sequence {i} holds token id {int(flat[j])}, outside the vocabulary ({rng})")
        return seqs

    def _choose_keys(self, key_ids: Sequence[str] | None) -> list[str]:
        if not key_ids:
            return list(self.key_ids)
        unknown = [k for k in key_ids if k not in self._keys]
        if unknown:
            raise InvalidInput(f"unknown key id(s) {', '.join(map(repr, unknown))}; known: {', '.join(self.key_ids)}")
        return list(dict.fromkeys(key_ids))

    def _scorable(self, seqs: list[np.ndarray]) -> _Tokens:
        h = self.spec.context
        lengths = np.array([s.size for s in seqs], dtype=np.int64)
        flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        rows_all = np.repeat(np.arange(len(seqs), dtype=np.int64), lengths)
        pos = np.arange(flat.size, dtype=np.int64) - starts[rows_all]
        idx = np.flatnonzero(pos >= h)
        windows = flat[idx[:, None] + np.arange(-h, 0, dtype=np.int64)]  # oldest first
        return _Tokens(windows, flat[idx], rows_all[idx], len(seqs))

    # -- scoring ------------------------------------------------------------------------------
    def _score(self, hashes: np.ndarray, rows: np.ndarray, n_rows: int, keep: np.ndarray | None) -> Scores:
        if keep is not None:
            hashes, rows = hashes[keep], rows[keep]
        # equal (row, hash) pairs are one scored token: mix the row into the hash, keep first occurrences
        per_row = hashes if n_rows == 1 else prf.hash_combine(hashes, rows)
        _, first = np.unique(per_row, return_index=True)
        h, r = hashes[first], rows[first]
        n = np.bincount(r, minlength=n_rows).astype(np.int64)
        if self.spec.scheme == "kgw":
            k = np.bincount(r, weights=green(h, self.spec.threshold), minlength=n_rows).round().astype(np.int64)
            g = self.spec.effective_gamma
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(n > 0, (k - g * n) / np.sqrt(n * g * (1 - g)), 0.0)
            lp = np.where(n > 0, binom_log10_sf(k, np.maximum(n, 1), g), 0.0)
            return Scores(n, k.astype(np.float64), z, lp)
        s = np.bincount(r, weights=-np.log1p(-uniform(h)), minlength=n_rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(n > 0, (s - n) / np.sqrt(np.maximum(n, 1)), 0.0)
        lp = np.where(n > 0, gamma_log10_sf(s, np.maximum(n, 1)), 0.0)
        return Scores(n, s, z, lp)

    def key_seed(self, key_id: str | None = None) -> int:
        """The int64 seed of ``key_id`` (default: the first key tried, the primary)."""
        return self._keys[self._choose_keys([key_id] if key_id else None)[0]]

    def _best(self, per_key: Iterable[tuple[str, Scores | None, Scores]], i: int, m: int, *, pooled: bool) -> Detection:
        best: tuple[float, str, Scores] | None = None
        for kid, rows_s, pooled_s in per_key:
            s = pooled_s if pooled else rows_s
            assert s is not None  # noqa: S101 - per-sequence scores exist whenever they are asked for
            lp = float(s.log10_p[i])
            if best is None or lp < best[0]:
                best = (lp, kid, s)
        assert best is not None  # noqa: S101 - at least one key is always tried
        lp, kid, s = best
        corrected = float(bonferroni_log10(lp, m))
        return Detection(key_id=kid, tokens_scored=int(s.n[i]), z=float(s.z[i]), log10_p=corrected,
                         detected=corrected <= math.log10(self.spec.detection_p), scheme=self.spec.scheme)

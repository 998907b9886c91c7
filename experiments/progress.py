"""Progress bars: tqdm when it is installed, a plain line every 10% otherwise.

Bars go to stderr; ``enabled=False`` (``--no-progress``) silences them, and tqdm is quiet by itself
when stderr is not a terminal except for its final line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_ENABLED = True


def set_enabled(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = enabled
    if not enabled:  # transformers' own bars (weight loading and saving) too
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass


class _Plain:
    """A minimal tqdm stand-in: update(), set_postfix(), close(), and iteration."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None, desc: str) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.desc = desc
        self.n = 0
        self._next_report = 0.1
        self._start = time.perf_counter()
        self._postfix = ""

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None  # noqa: S101 - only iterated when built from an iterable
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n / self.total >= self._next_report:
            self._next_report += 0.1
            self._print()

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def _print(self) -> None:
        dt = time.perf_counter() - self._start
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.n}{of} ({dt:.0f} s) {self._postfix}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Silent(_Plain):
    def _print(self) -> None:
        pass


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", leave: bool = False) -> Any:
    """A progress bar over ``iterable`` (or a manual one with ``total`` and ``update``)."""
    if not _ENABLED:
        return _Silent(iterable, total, desc)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the experiments extra, not a hard dependency
        return _Plain(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

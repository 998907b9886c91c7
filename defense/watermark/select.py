"""Find the watermark a Detect call means, among the configured defenses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import InvalidInput
from .base import WatermarkDefense


def configured_watermarks(entries: Iterable[Any]) -> list[tuple[str, WatermarkDefense]]:
    """(name, defense) of every watermark in a chain's entries, whatever its mode: text marked
    before a watermark was switched off must stay detectable."""
    return [(e.name, e.defense) for e in entries if isinstance(e.defense, WatermarkDefense)]


def watermark_for(entries: Iterable[Any], scheme: str = "") -> WatermarkDefense | None:
    """The watermark named by ``scheme`` (a scheme, ``kgw`` or ``gumbel``, or a defense name); empty
    picks the first configured. None when no watermark is configured at all."""
    found = configured_watermarks(entries)
    if not found:
        return None
    if not scheme:
        return found[0][1]
    for name, d in found:
        if scheme in (name, d.scheme):
            return d
    known = sorted({d.scheme for _, d in found} | {n for n, _ in found})
    raise InvalidInput(f"no configured watermark matches scheme {scheme!r}; configured: {', '.join(known)}")

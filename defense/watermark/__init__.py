"""Logit watermarks in the sampler, their detectors, and radioactivity tests.

- ``GreenListWatermark`` (type ``watermark``): KGW green lists, the anti-distillation mark.
- ``GumbelWatermark`` (type ``watermark_gumbel``): Gumbel-max, the distortion-free provenance mark.
- ``WatermarkDetector``: exact tail tests on deduplicated tokens, every key tried, log10 p.
- ``closed_box_test`` / ``open_box_test``: is a suspect model trained on our text?
- ``processed_logprobs``: the logprobs to return, consistent with what was sampled.

All of them compute green lists and uniforms with the one keyed function in ``keyed.py``. Names are
imported on first use (scipy for the detectors, torch for a sampler step or an open-box test), so
``distillguard`` commands that never detect do not pay for them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DetectionReport": "detect",
    "DetectorSpec": "detect",
    "Scores": "detect",
    "WatermarkDetector": "detect",
    "GumbelParams": "gumbel",
    "GumbelWatermark": "gumbel",
    "GreenListParams": "kgw",
    "GreenListWatermark": "kgw",
    "processed_logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "OpenBoxResult": "radioactivity",
    "closed_box_test": "radioactivity",
    "open_box_test": "radioactivity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

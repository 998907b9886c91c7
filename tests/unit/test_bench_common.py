"""benchmarks/common.py: the interval the latency benches report beside their ratio of added p50s."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
common = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(common)  # type: ignore[union-attr]


def run(rounds: int, block: int, means: dict[str, float], noise: float, weather: float = 0.0, seed: int = 0):
    """Latencies as the benches record them: per round, one block per path; ``weather`` moves a whole
    round's latencies alike on every path (the machine's load that alternation is there to share)."""
    rng = np.random.default_rng(seed)
    lat: dict[str, list[float]] = {n: [] for n in means}
    for _ in range(rounds):
        shift = rng.normal(0, weather)
        for n, m in means.items():
            lat[n] += list(m + shift + rng.normal(0, noise, block))
    return lat


def test_the_interval_holds_the_true_ratio_and_narrows_with_less_noise():
    means = {"base": 1.0, "noop": 2.0, "ours": 2.5}  # ours adds 1.5 ms, the no-op 1.0: ratio 1.5
    wide = common.p50_ratio_interval(run(20, 100, means, 0.2), 100, ("ours", "base"), ("noop", "base"))
    narrow = common.p50_ratio_interval(run(20, 100, means, 0.02), 100, ("ours", "base"), ("noop", "base"))
    assert wide[0] < 1.5 < wide[1] and narrow[0] < 1.5 < narrow[1]
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3


def test_rounds_are_resampled_together_so_shared_weather_cancels():
    # each round's load moves all paths by the same amount, far more than the noise within a block: drawn
    # round by round (not path by path) the differences keep their pairing and the interval stays tight
    means = {"base": 1.0, "noop": 2.0, "ours": 2.5}
    lo, hi = common.p50_ratio_interval(run(20, 100, means, 0.01, weather=0.3), 100, ("ours", "base"),
                                       ("noop", "base"))
    assert lo < 1.5 < hi and hi - lo < 0.1


def test_no_interval_without_two_rounds_or_a_positive_denominator():
    means = {"base": 1.0, "noop": 2.0, "ours": 2.5}
    assert common.p50_ratio_interval(run(1, 100, means, 0.05), 100, ("ours", "base"), ("noop", "base")) is None
    same = {"base": 1.0, "noop": 1.0, "ours": 2.0}  # the no-op adds nothing: the ratio is not defined
    assert common.p50_ratio_interval(run(20, 100, same, 0.05), 100, ("ours", "base"), ("noop", "base")) is None

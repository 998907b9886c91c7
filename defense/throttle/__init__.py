"""Query budgets: reserve at admission, settle actual usage, suspicion signals, durable and shared stores.

- ``budget.py``: the ``budget`` admission defense (tiers, limits, max_parallel, progressive strength);
- ``strategy.py``: window arithmetic (token bucket, sliding window, concurrency), storage-free;
- ``store.py``: the store interface and ``open_store(uri)``; ``memory.py``, ``sqlite.py``, ``redis.py``;
- ``shared.py``: what a shared store does when it fails (local limits or refuse, counted);
- ``signals.py``: per-client suspicion signals and score.
"""

from .budget import Budget, BudgetStatus, LimitState
from .params import BudgetParams, LimitSpec, SignalParams, StrengthCurve, TierSpec

__all__ = ["Budget", "BudgetParams", "BudgetStatus", "LimitSpec", "LimitState", "SignalParams", "StrengthCurve",
           "TierSpec"]

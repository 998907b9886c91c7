"""Gradient redirection on a returned distribution (GRAD2-style), as a pure vectorized function.

A student fitting soft targets y with a softmax head gets, through its last layer, the gradient
G^T y = (y - m s) (x) h, where s is its own prediction, m the targets' mass and h its last hidden state.
h is common to every candidate target, so the direction the student learns from y is a(y) = y - m s.
To reverse it within an L1 budget, pick y~ minimizing <a(y~), a(y)>, which is linear in y~: with
coefficients c = y - m s, move budget / 2 of mass from the alternatives with the largest c (the student
would learn to raise them) to those with the smallest c (it already over-predicts them). Water-filling
along the sorted coefficients gives the optimum of that linear program under the constraints here:
- the row's mass is kept (top-k logprobs keep their sum, full vectors sum to one);
- no value goes below ``floor`` times its clean value (a returned alternative stays visible);
- with ``keep_argmax`` the top alternative is neither donor nor receiver and no receiver reaches it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["redirect"]

_MARGIN = 1e-4  # relative gap kept below the top alternative (survives a float32 round trip)


def _fill(order: np.ndarray, cap: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """Per row, take up to ``cap`` from slots in ``order`` until ``amount`` is used; returns the takes."""
    cap_sorted = np.take_along_axis(cap, order, axis=1)
    before = np.cumsum(cap_sorted, axis=1) - cap_sorted
    take_sorted = np.clip(amount[:, None] - before, 0.0, cap_sorted)
    take = np.zeros_like(cap)
    np.put_along_axis(take, order, take_sorted, axis=1)
    return take


def redirect(y: np.ndarray, s: np.ndarray, present: np.ndarray, budget_l1: np.ndarray | float, *,
             keep_argmax: bool = True, floor: float = 0.05) -> np.ndarray:
    """Redirected probabilities [P, K] from clean ``y`` [P, K] and the proxy's ``s`` on the same slots.

    ``budget_l1`` (scalar or [P]) is the L1 distance allowed per row; half of it moves. Missing slots
    (``present`` False) are left alone.
    """
    y = np.where(present, y, 0.0).astype(np.float64)
    s = np.where(present, s, 0.0).astype(np.float64)
    rows = y.shape[0]
    budget = np.broadcast_to(np.asarray(budget_l1, dtype=np.float64), (rows,)) / 2.0
    m = y.sum(axis=1, keepdims=True)
    c = y - m * s
    top = np.zeros(y.shape, dtype=bool)
    np.put_along_axis(top, np.argmax(y, axis=1)[:, None], True, axis=1)
    movable = present & ~top if keep_argmax else present
    donor_cap = np.where(movable, y * (1.0 - floor), 0.0)
    ceiling = np.max(np.where(top, y, 0.0), axis=1, keepdims=True) * (1.0 - _MARGIN)
    recv_cap = np.where(movable, np.maximum(ceiling - y, 0.0), 0.0) if keep_argmax else np.where(movable, m - y, 0.0)
    # never move more than both sides can hold
    amount = np.minimum(budget, np.minimum(donor_cap.sum(axis=1), recv_cap.sum(axis=1)))
    big = np.where(movable, c, -np.inf)
    small = np.where(movable, c, np.inf)
    give = _fill(np.argsort(-big, axis=1, kind="stable"), donor_cap, amount)
    get = _fill(np.argsort(small, axis=1, kind="stable"), recv_cap, amount)
    out = y - give + get
    return np.where(present, np.maximum(out, 0.0), 0.0)

"""Window arithmetic with explicit times: what fits, when a refusal may retry, refunds."""

from __future__ import annotations

import math

import pytest

from defense.throttle.strategy import (
    CONCURRENCY,
    SLIDING_WINDOW,
    TOKEN_BUCKET,
    cc_give,
    cc_take,
    new_state,
    sw_give,
    sw_take,
    sw_used,
    tb_give,
    tb_take,
    tb_used,
)

T0 = 1_000_000.0


def test_token_bucket_fills_drains_and_says_when_to_retry():
    s = new_state(TOKEN_BUCKET, 60.0, T0)
    for _ in range(10):
        assert tb_take(s, 10, 60.0, 1, T0, False) >= 0
    r = tb_take(s, 10, 60.0, 1, T0, False)
    assert r == pytest.approx(-6.0)  # 10 per 60 s drains one every 6 s
    assert tb_take(s, 10, 60.0, 1, T0 + 5.99, False) < 0
    assert tb_take(s, 10, 60.0, 1, T0 + 6.0, False) == pytest.approx(10.0)
    assert tb_used(s, 10, 60.0, T0 + 66.0) == 0.0  # drained, never below zero
    assert tb_used(s, 10, 60.0, T0 + 36.0) == pytest.approx(5.0)


def test_token_bucket_cost_above_the_whole_amount_never_fits():
    s = new_state(TOKEN_BUCKET, 60.0, T0)
    assert tb_take(s, 100, 60.0, 101, T0, False) == -math.inf
    assert s[0] == 0.0  # nothing taken


def test_token_bucket_refund_and_force():
    s = new_state(TOKEN_BUCKET, 60.0, T0)
    tb_take(s, 100, 60.0, 80, T0, False)
    tb_give(s, 100, 60.0, 50, T0, 0.0)
    assert tb_used(s, 100, 60.0, T0) == pytest.approx(30.0)
    tb_give(s, 100, 60.0, 500, T0, 0.0)
    assert tb_used(s, 100, 60.0, T0) == 0.0
    assert tb_take(s, 100, 60.0, 150, T0, True) == pytest.approx(150.0)  # settle charges usage over the limit
    assert tb_take(s, 100, 60.0, 1, T0, False) < 0


def test_token_bucket_ignores_a_clock_that_went_back():
    s = new_state(TOKEN_BUCKET, 60.0, T0)
    tb_take(s, 100, 60.0, 50, T0, False)
    assert tb_take(s, 100, 60.0, 10, T0 - 30, False) == pytest.approx(60.0)  # no negative drain
    assert s[1] == T0


def test_sliding_window_weights_the_previous_window():
    period = 100.0
    start = 50 * period  # a window boundary
    s = new_state(SLIDING_WINDOW, period, start)
    assert sw_take(s, 10, period, 10, start + 10, False) == pytest.approx(10.0)
    assert sw_take(s, 10, period, 1, start + 99, False) < 0
    # a quarter into the next window, 75% of the previous window's 10 still counts
    assert sw_used(s, 10, period, start + 125) == pytest.approx(7.5)
    assert sw_take(s, 10, period, 2, start + 125, False) == pytest.approx(9.5)
    assert sw_take(s, 10, period, 1, start + 125, False) < 0
    # two windows later everything is gone
    assert sw_used(s, 10, period, start + 300) == 0.0


def test_sliding_window_retry_after_is_exact():
    period = 100.0
    start = 7 * period
    s = new_state(SLIDING_WINDOW, period, start)
    sw_take(s, 10, period, 8, start + 50, False)
    # same window, count 8: a cost of 5 needs the next window, once 8 x (1 - f) + 5 <= 10: f >= 3/8
    r = -sw_take(s, 10, period, 5, start + 50, False)
    assert r == pytest.approx(50 + 37.5, abs=1e-6)
    assert sw_take(s, 10, period, 5, start + 50 + r - 0.01, False) < 0
    assert sw_take(s, 10, period, 5, start + 50 + r, False) >= 0
    # previous-window case: count 6 in the previous window, 0 now, 20% in: 6 x 0.8 = 4.8; cost 6 fits at f >= 1/3
    s = new_state(SLIDING_WINDOW, period, start)
    sw_take(s, 10, period, 6, start + 10, False)
    r = -sw_take(s, 10, period, 6, start + 120, False)
    assert r == pytest.approx(period / 3 - 20, abs=1e-6)
    assert sw_take(s, 10, period, 6, start + 120 + r, False) >= 0


def test_sliding_window_refund_goes_to_the_window_it_was_counted_in():
    period = 100.0
    start = 3 * period
    s = new_state(SLIDING_WINDOW, period, start)
    sw_take(s, 100, period, 40, start + 10, False)
    tag = s[0]
    sw_take(s, 100, period, 10, start + 110, False)  # next window
    sw_give(s, 100, period, 30, start + 150, tag)  # refund of the earlier reservation: previous window
    assert s[2] == pytest.approx(10.0) and s[1] == pytest.approx(10.0)
    sw_give(s, 100, period, 30, start + 350, tag)  # long gone: nothing to refund
    assert sw_used(s, 100, period, start + 350) == 0.0


def test_concurrency_slots():
    s = new_state(CONCURRENCY, 1.0, T0)
    assert cc_take(s, 2, 1.0, 1, T0, False) == 1
    assert cc_take(s, 2, 1.0, 1, T0, False) == 2
    assert cc_take(s, 2, 1.0, 1, T0, False) == -1.0  # Retry-After is the bucket's period
    cc_give(s, 2, 1.0, 1, T0, 0.0)
    assert cc_take(s, 2, 1.0, 1, T0, False) == 2
    assert cc_take(s, 2, 1.0, 3, T0, False) == -math.inf

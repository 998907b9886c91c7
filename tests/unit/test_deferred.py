"""Deferred settles: after the answer, before long, in order, and none lost."""

from __future__ import annotations

import asyncio

import pytest

from defense.deferred import Deferred


def test_without_a_loop_work_runs_at_once():
    done = []
    Deferred().add(lambda: done.append(1))
    assert done == [1]


def test_the_timer_runs_what_nothing_drained():
    async def main():
        done = []
        d = Deferred(max_delay_s=0.02)
        d.add(lambda: done.append("a"))
        assert done == [] and len(d) == 1  # never inline: the answer goes first
        await asyncio.sleep(0)
        assert done == []
        await asyncio.sleep(0.1)
        assert done == ["a"] and len(d) == 0

    asyncio.run(main())


def test_by_default_work_runs_on_the_next_turn_never_inline():
    async def main():
        order = []
        d = Deferred()
        d.add(lambda: order.append("settle"))
        order.append("answer handed back")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == ["answer handed back", "settle"] and len(d) == 0

    asyncio.run(main())


def test_a_full_queue_drains_and_a_failure_does_not_stop_the_rest(caplog):
    async def main():
        done = []
        d = Deferred(max_delay_s=10, max_pending=3)

        def boom():
            raise RuntimeError("store down")

        d.add(lambda: done.append(1))
        d.add(boom)
        assert done == []
        d.add(lambda: done.append(3))  # the third fills the queue
        assert done == [1, 3]
        d.add(lambda: done.append(4))
        d.drain()  # shutdown: whatever is left
        assert done == [1, 3, 4]

    asyncio.run(main())
    assert "store down" in caplog.text


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Deferred(max_delay_s=-1)
    with pytest.raises(ValueError):
        Deferred(max_pending=0)


def test_held_work_waits_for_the_next_add_and_runs_first():
    async def main():
        order = []
        d = Deferred()
        d.hold(lambda: order.append("admit record"))
        d.hold(lambda: order.append("protect record"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == [] and len(d) == 2  # held: no loop callback asked for
        d.add(lambda: order.append("settle"))
        order.append("answer handed back")
        await asyncio.sleep(0)
        assert order == ["answer handed back", "admit record", "protect record", "settle"] and len(d) == 0

    asyncio.run(main())


def test_a_kick_drains_held_work_on_the_next_turn_and_an_empty_kick_asks_nothing():
    async def main():
        done = []
        d = Deferred()
        d.kick()
        assert d._timer is None
        d.hold(lambda: done.append("refused request's record"))
        d.kick()
        d.kick()  # one callback, however many kicks
        assert done == []
        await asyncio.sleep(0)
        assert done == ["refused request's record"] and len(d) == 0

    asyncio.run(main())


def test_held_work_runs_at_once_without_a_loop_and_a_full_queue_drains():
    done = []
    d = Deferred(max_pending=2)
    d.hold(lambda: done.append(1))
    assert done == [1]

    async def main():
        d.hold(lambda: done.append(2))
        assert done == [1]
        d.hold(lambda: done.append(3))  # the second fills the queue
        assert done == [1, 2, 3] and len(d) == 0

    asyncio.run(main())

"""Pure units: sequential stream detection and the priority slot pool."""

from __future__ import annotations

import trio

from chunkfs.read.slots import Priority, PrioritySlots
from chunkfs.read.streams import StreamDetector


def test_window_starts_small_and_doubles_while_sequential() -> None:
    d = StreamDetector(initial=1, maximum=8)
    assert list(d.on_read(0, 100)) == []  # a first read is not yet a stream
    assert list(d.on_read(1, 100)) == [2]
    assert list(d.on_read(2, 100)) == [3, 4]
    assert list(d.on_read(3, 100)) == [5, 6, 7]
    assert list(d.on_read(4, 100)) == list(range(8, 13))
    for b in range(5, 20):
        ahead = d.on_read(b, 100)
    assert d.streams[0].window == 8 and max(ahead) == 19 + 8  # capped at the maximum
    assert list(d.on_read(19, 100)) == []  # the same block again asks for nothing new


def test_random_reads_fetch_nothing_ahead() -> None:
    d = StreamDetector(initial=1, maximum=64)
    for b in (50, 3, 90, 17, 70, 33, 5, 61, 12):
        assert list(d.on_read(b, 100)) == []


def test_interleaved_readers_of_one_file_are_two_streams() -> None:
    d = StreamDetector(initial=1, maximum=64)
    issued: list[int] = []
    for i in range(10):  # two processes, one at the start, one in the middle, taking turns
        issued += d.on_read(i, 1000)
        issued += d.on_read(500 + i, 1000)
    assert len(d.streams) == 2
    assert {b for b in issued if b < 500} >= set(range(2, 20))
    assert {b for b in issued if b >= 500} >= set(range(502, 520))
    assert len(issued) == len(set(issued))  # nothing asked for twice


def test_readahead_stops_at_the_end_of_the_file() -> None:
    d = StreamDetector(initial=4, maximum=64)
    d.on_read(0, 3)
    assert list(d.on_read(1, 3)) == [2]
    assert list(d.on_read(2, 3)) == []


def test_slots_serve_priority_then_arrival() -> None:
    order: list[str] = []

    async def main() -> None:
        slots = PrioritySlots(1)
        first = slots.ticket(Priority.DEMAND)
        await slots.acquire(first)

        async def want(name: str, priority: Priority) -> None:
            ticket = slots.ticket(priority)
            await slots.acquire(ticket)
            order.append(name)
            slots.release()

        async with trio.open_nursery() as nursery:
            for name, prio in [("p1", Priority.PREFETCH), ("r1", Priority.READAHEAD), ("p2", Priority.PREFETCH),
                               ("d1", Priority.DEMAND), ("r2", Priority.READAHEAD)]:
                nursery.start_soon(want, name, prio)
                await trio.sleep(0.001)
            slots.release()
        assert slots.free == 1

    trio.run(main)
    assert order == ["d1", "r1", "r2", "p1", "p2"]


def test_cancelled_waiter_leaks_no_slot() -> None:
    async def main() -> None:
        slots = PrioritySlots(1)
        held = slots.ticket(Priority.DEMAND)
        await slots.acquire(held)
        with trio.move_on_after(0.01):
            await slots.acquire(slots.ticket(Priority.PREFETCH))
        assert slots.waiting == 0
        slots.release()
        assert slots.free == 1

    trio.run(main)


def test_a_caller_cancelled_before_it_asks_takes_no_free_slot() -> None:
    """A cancellation that arrives while nothing can deliver it (a thread call running) is
    delivered at ``acquire``: the caller must then hold nothing, even with slots free."""

    async def main() -> None:
        slots = PrioritySlots(2)
        reached_acquire = False
        with trio.CancelScope() as scope:
            # cancelled while the thread runs: the cancellation is held back until it returns
            await trio.to_thread.run_sync(lambda: trio.from_thread.run_sync(scope.cancel))
            reached_acquire = True
            await slots.acquire(slots.ticket(Priority.READAHEAD))
            raise AssertionError("acquire should have raised Cancelled")
        assert reached_acquire and scope.cancelled_caught
        assert slots.free == 2

    trio.run(main)

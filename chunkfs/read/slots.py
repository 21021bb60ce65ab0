"""PrioritySlots: a counting semaphore whose waiters are served by priority, then FIFO.

Used for the node's download slots: a demand read (a process is blocked on it) goes ahead
of readahead, which goes ahead of whole-file prefetch. A waiting ticket can be ``raise``d
(a reader now needs the block a prefetch queued), which moves it up the queue.

Invariants: at most ``total`` tickets hold a slot; a cancelled waiter never holds or leaks
a slot; among waiters of equal priority the earliest is served first.
"""

from __future__ import annotations

import itertools
from enum import IntEnum

import trio


class Priority(IntEnum):
    DEMAND = 0
    READAHEAD = 1
    PREFETCH = 2


class Ticket:
    __slots__ = ("event", "granted", "priority", "seq")

    def __init__(self, priority: Priority, seq: int) -> None:
        self.priority = priority
        self.seq = seq
        self.event = trio.Event()
        self.granted = False


class PrioritySlots:
    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("at least one slot is needed")
        self.total = total
        self.free = total
        self._waiting: list[Ticket] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def ticket(self, priority: Priority) -> Ticket:
        return Ticket(priority, next(self._seq))

    async def acquire(self, ticket: Ticket) -> None:
        """Wait for a slot for ``ticket``; the caller must ``release`` it afterwards."""
        if self.free and not self._waiting:
            await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller takes nothing
            self.free -= 1
            ticket.granted = True
            await trio.lowlevel.cancel_shielded_checkpoint()  # ...and a granted one keeps its slot
            return
        self._waiting.append(ticket)
        try:
            await ticket.event.wait()
        except BaseException:
            if ticket.granted:
                self.release()  # granted while being cancelled: hand the slot on
            else:
                self._waiting.remove(ticket)
            raise

    @staticmethod
    def raise_priority(ticket: Ticket, priority: Priority) -> None:
        if priority < ticket.priority:
            ticket.priority = priority

    def release(self) -> None:
        if self._waiting:
            best = min(self._waiting, key=lambda t: (t.priority, t.seq))
            self._waiting.remove(best)
            best.granted = True
            best.event.set()
        else:
            self.free += 1
            if self.free > self.total:
                raise RuntimeError("released more slots than were acquired")

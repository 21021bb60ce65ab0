"""SingleFlight: at most one running load per key; everyone else who wants it waits and shares.

Layer: ``read/``, pure trio (no I/O of its own): ``BlockFetcher`` keys it by block id, and its
tests drive it with toy loads.

Invariants:

- While a load of a key runs, ``run`` with that key starts no other load: it waits for the
  running one and returns its value (``shared`` True).
- A load that fails hands its error to every waiter as ``FlightFailed`` (the original is its
  ``__cause__``); the next ``run`` after that starts a fresh load.
- A load whose task is cancelled (a prefetch stopped at a file's last close) fails nobody:
  one of its waiters starts its own load instead.
- A waiter may tell the running load that it is wanted more urgently (``on_join``, given the
  flight's ``note``, which the load sets: the fetcher's download ticket).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FlightFailed(Exception):
    """The load another caller ran for this key failed (its error is the ``__cause__``)."""


class Flight(Generic[V]):
    """One running load: what its waiters wait on."""

    __slots__ = ("cancelled", "done", "error", "note", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: V | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.note: Any = None  # for the load to publish to joiners (e.g. its queue ticket)


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._flights: dict[K, Flight[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    async def run(self, key: K, load: Callable[[Flight[V]], Awaitable[V]],
                  on_join: Callable[[Flight[V]], None] | None = None) -> tuple[V, bool]:
        """(the value of a load of ``key``, whether another caller's load produced it).
        ``load`` gets its ``Flight`` (to set ``note``); ``on_join`` runs each time this
        caller starts waiting for another caller's load."""
        while (flight := self._flights.get(key)) is not None:
            if on_join is not None:
                on_join(flight)
            await flight.done.wait()
            if flight.cancelled:
                continue  # its owner was cancelled: load it ourselves
            if flight.error is not None:
                raise FlightFailed(str(flight.error)) from flight.error
            return flight.value, True  # type: ignore[return-value]
        flight = self._flights[key] = Flight()
        try:
            flight.value = await load(flight)
            return flight.value, False
        except trio.Cancelled:
            flight.cancelled = True
            raise
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

"""BlockBuffers: the blocks a process holds in memory, to serve their readers without the disk.

Two kinds, looked up alike (``in``, ``copy_into``, ``view``): whole-block buffers lent to
downloads and kept for the blocks' first readers, and (``keep``) a few blocks' bytes the
node cache declined to store, least recently used first out.

A download fills one buffer with the block's plain bytes while they are written to the
cache disk around the page cache (``O_DIRECT``); readers then copy from the buffer instead
of reading the entry back, and the block costs no copy into the page cache. A block stays
in its buffer until a new download needs the buffer, and only once it is spent: read whole
(least recently used first), or held longer than ``STALE_AFTER``. When every buffer is lent
or holds a block not read yet, the download streams its block through the page cache
instead: waiting for a buffer would stall the pipeline, and taking one would push out a
block whose reader is coming (a sequential reader just behind the prefetch, another rank of
a tensor-parallel load). A block no longer held is read from its cache entry like any
other.

Invariants:

- At most ``capacity`` buffers exist: memory is ``capacity`` blocks, whatever the file size.
- A buffer is either free, lent to one download (its worker thread writes it), or holds one
  verified block that readers copy from. All transitions happen on the event loop, and
  readers copy synchronously there, so no reader copies from a buffer a download is
  writing. Nothing outside this class keeps a view of a held buffer across an ``await``.
- Buffers are private anonymous ``mmap`` pages: aligned for ``O_DIRECT`` writes.
- At most ``keep_max`` declined blocks are kept: with the buffers, memory stays bounded.
"""

from __future__ import annotations

import contextlib
import mmap
import time
from collections import OrderedDict

from chunkfs.cache.disk import aligned_buffer

#: seconds after which a held block nobody has read whole may be pushed out by anyone
STALE_AFTER = 5.0


class _Held:
    __slots__ = ("buffer", "length", "served", "since")

    def __init__(self, buffer: mmap.mmap, length: int) -> None:
        self.buffer = buffer
        self.length = length
        self.served = 0  # bytes copied out to readers
        self.since = time.monotonic()

    def spent(self, now: float) -> bool:
        """Read whole already, or held so long its readers are not coming soon."""
        return self.served >= self.length or now - self.since > STALE_AFTER


class BlockBuffers:
    def __init__(self, capacity: int, keep_max: int = 0) -> None:
        """``capacity``: block buffers; ``keep_max``: declined blocks kept (``keep``)."""
        self.capacity = capacity
        self.keep_max = keep_max
        self._free: list[mmap.mmap] = []
        self._held: OrderedDict[bytes, _Held] = OrderedDict()
        self._kept: OrderedDict[bytes, bytes | bytearray] = OrderedDict()
        self._count = 0  # buffers in existence: free, lent or held

    def __contains__(self, bid: bytes) -> bool:
        return bid in self._held or bid in self._kept

    def __len__(self) -> int:
        return len(self._held) + len(self._kept)

    def in_buffer(self, bid: bytes) -> bool:
        """Held in a block buffer (not merely kept)."""
        return bid in self._held

    def keep(self, bid: bytes, data: bytes | bytearray) -> None:
        """Keep a verified block the cache declined (the oldest kept one goes if too many)."""
        if self.keep_max <= 0:
            return
        self._kept[bid] = data
        self._kept.move_to_end(bid)
        while len(self._kept) > self.keep_max:
            self._kept.popitem(last=False)

    def take(self, length: int) -> mmap.mmap | None:
        """A buffer of at least ``length`` bytes for a download, or None (the caller then
        streams the block through the page cache)."""
        for i, buffer in enumerate(self._free):
            if len(buffer) >= length:
                return self._free.pop(i)
        if self._count < self.capacity:
            buffer = aligned_buffer(length)  # counted once it exists: a failed mmap costs nothing
            self._count += 1
            return buffer
        if self._free:  # all too small (a larger block than before): replace one
            buffer = aligned_buffer(length)
            self._close(self._free.pop())
            return buffer
        now = time.monotonic()
        spent = next((bid for bid, held in self._held.items() if held.spent(now)), None)
        if spent is None:
            return None
        if len(self._held[spent].buffer) >= length:
            return self._held.pop(spent).buffer
        buffer = aligned_buffer(length)
        self._close(self._held.pop(spent).buffer)
        return buffer

    @staticmethod
    def _close(buffer: mmap.mmap) -> None:
        with contextlib.suppress(BufferError):  # a view is still out somewhere: the collector unmaps it
            buffer.close()

    def give_back(self, buffer: mmap.mmap) -> None:
        """Return a buffer whose download failed."""
        self._free.append(buffer)

    def hold(self, bid: bytes, buffer: mmap.mmap, length: int) -> None:
        """Keep the verified block ``bid`` (the first ``length`` bytes of ``buffer``)."""
        old = self._held.pop(bid, None)
        if old is not None:
            self._free.append(old.buffer)
        self._kept.pop(bid, None)
        self._held[bid] = _Held(buffer, length)

    def copy_into(self, bid: bytes, start: int, out: memoryview) -> bool:
        """Fill ``out`` from the held block's bytes at ``start``; False if it is not held."""
        held = self._held.get(bid)
        if held is None:
            kept = self._kept.get(bid)
            if kept is None:
                return False
            self._kept.move_to_end(bid)
            out[:] = memoryview(kept)[start : start + len(out)]
            return True
        self._held.move_to_end(bid)
        with memoryview(held.buffer) as view:
            out[:] = view[start : min(held.length, start + len(out))]
        held.served += len(out)
        return True

    def view(self, bid: bytes, start: int, end: int) -> memoryview | None:
        """The held block's bytes [start, end) without a copy, or None if it is not held
        (or ``end`` is past it). The view must be used up before the caller's next
        ``await``: after that the buffer may hold another block."""
        held = self._held.get(bid)
        if held is None:
            kept = self._kept.get(bid)
            return memoryview(kept)[start:end] if kept is not None and end <= len(kept) else None
        if end > held.length:
            return None
        self._held.move_to_end(bid)
        held.served += end - start
        return memoryview(held.buffer)[start:end]

    def drop(self, bid: bytes) -> None:
        self._kept.pop(bid, None)
        held = self._held.pop(bid, None)
        if held is not None:
            self._free.append(held.buffer)

"""StreamDetector: sequential-read detection for one file, in block units (pure, no I/O).

Streams are tracked per file, not per handle: the kernel sends the page faults of several
processes mapping one file (multi-GPU loaders), and its own readahead, through whichever
handle it likes, so a per-handle view would see random reads.

A file has up to ``max_streams`` streams. A read of block ``b`` belongs to a stream whose
last block ``last`` satisfies ``last - slack <= b <= last + max(window, 1)``; it then
moves the stream forward, doubling its window (``initial`` the first time) up to
``maximum`` blocks. A read that belongs to no stream starts a new one (replacing the least
recently used), with no window: a random read fetches just the block it needs.

``on_read`` returns the blocks to fetch ahead, each block at most once per stream.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Stream:
    last: int  # last block read
    window: int = 0  # blocks to keep fetched ahead of ``last``
    issued_to: int = 0  # blocks below this index were already asked for
    used: int = 0  # recency, for replacing streams


class StreamDetector:
    def __init__(self, initial: int = 1, maximum: int = 64, max_streams: int = 8, slack: int = 2) -> None:
        if not 1 <= initial <= maximum:
            raise ValueError("need 1 <= initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.max_streams = max_streams
        self.slack = slack
        self.streams: list[_Stream] = []
        self._clock = 0

    def on_read(self, block: int, block_count: int) -> range:
        """Record a read of ``block`` (of a file of ``block_count`` blocks); blocks to fetch ahead."""
        self._clock += 1
        stream = self._find(block)
        if stream is None:
            if len(self.streams) >= self.max_streams:
                self.streams.remove(min(self.streams, key=lambda s: s.used))
            self.streams.append(_Stream(last=block, issued_to=block + 1, used=self._clock))
            return range(0)
        stream.used = self._clock
        if block <= stream.last:
            return range(0)  # same block again, or a straggler behind the stream
        stream.window = min(self.maximum, stream.window * 2 if stream.window else self.initial)
        stream.last = block
        start = max(stream.issued_to, block + 1)
        stop = min(block_count, block + 1 + stream.window)
        if stop <= start:
            return range(0)
        stream.issued_to = stop
        return range(start, stop)

    def _find(self, block: int) -> _Stream | None:
        for stream in self.streams:
            if stream.last - self.slack <= block <= stream.last + max(stream.window, 1):
                return stream
        return None

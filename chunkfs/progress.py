"""A terminal progress line (bytes, rate, ETA) for long commands such as import and warmup.

It draws only when enabled (the CLI enables it when stderr is a terminal) and redraws at
most ``interval`` seconds apart, so scripts see nothing and terminals see no flicker.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from chunkfs.units import format_size


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, label: str, total_bytes: int, total_items: int, *, enabled: bool,
                 stream: TextIO | None = None, interval: float = 0.25) -> None:
        self.label = label
        self.total_bytes = total_bytes
        self.total_items = total_items
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval = interval
        self.done_bytes = 0
        self.done_items = 0
        self.started = time.monotonic()
        self._last_draw = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def advance(self, nbytes: int = 0, items: int = 0) -> None:
        self.done_bytes += nbytes
        self.done_items += items
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        rate = self.done_bytes / max(self.elapsed, 1e-6)
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        eta = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0
        width = 24
        filled = int(width * pct / 100)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {pct:5.1f}% {format_size(self.done_bytes)}/{format_size(self.total_bytes)}"
            f" {format_size(rate)}/s ETA {format_duration(eta)}"
            f" items {self.done_items}/{self.total_items}  "
        )
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

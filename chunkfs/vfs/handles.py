"""Open files and directories of one mount, by handle number (pure bookkeeping, no I/O).

Layer: ``vfs/``. Invariants: a handle number is never reused within a mount; ``opens``
counts the open file handles of each inode (the stats file's excluded), and an inode is in it
only while that count is positive.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from chunkfs.meta.base import Attr


@dataclass(slots=True)
class OpenFile:
    ino: int
    snapshot: bytes | None = None  # contents of the stats file at open
    writable: bool = False  # opened for writing (writable mounts)
    drops_privileges: bool = False  # opened for writing by someone other than root: a write clears set-uid/gid


@dataclass(frozen=True, slots=True)
class OpenDir:
    ino: int
    listing: list[tuple[bytes, Attr]]  # read once at opendir: offsets stay stable


class Handles:
    def __init__(self) -> None:
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, OpenDir] = {}
        self.opens: Counter[int] = Counter()  # inode -> file handles open on it
        self._next = 1

    def _number(self) -> int:
        fh = self._next
        self._next += 1
        return fh

    def open_file(self, f: OpenFile) -> int:
        fh = self._number()
        self.files[fh] = f
        if f.snapshot is None:
            self.opens[f.ino] += 1
        return fh

    def close_file(self, fh: int) -> tuple[OpenFile | None, bool]:
        """(the file closed, None if the handle is unknown; whether it was its inode's last
        handle)."""
        f = self.files.pop(fh, None)
        if f is None or f.snapshot is not None:
            return f, False
        self.opens[f.ino] -= 1
        if self.opens[f.ino] > 0:
            return f, False
        del self.opens[f.ino]
        return f, True

    def open_dir(self, d: OpenDir) -> int:
        fh = self._number()
        self.dirs[fh] = d
        return fh

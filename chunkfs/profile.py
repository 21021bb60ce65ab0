"""Access profiles: the order in which a model's loader first read the blocks of a directory's
files, so later mounts and warmups fetch in that order.

Layer: pure (no I/O); stored by the metadata engines (``MetaStore.get_profile``/``set_profile``)
as the bytes ``AccessProfile.to_bytes`` makes, used by ``vfs/profiles.py`` (record, prefetch)
and ``warmup/plan.py`` (order).

A profile is per directory (a model's files sit in one): the names of the files read, and
runs ``(name index, first block, count)`` in first-read order. A loader that reads each
file front to back makes one run per file; a tensor-parallel mmap loader makes one run per
stretch it read. The stored form is zlib-compressed JSON: a few KB per model.

Invariants: every (name, block) pair appears at most once; a profile is a hint: blocks
that no longer exist (the file changed since) are skipped by its users, and a damaged
profile is treated as none (``ProfileDamaged``).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

PROFILE_VERSION = 1
#: first reads a recorder keeps, at most (1.6 TB of model at 8 MiB blocks): bounds its memory
MAX_PROFILE_ENTRIES = 200_000


class ProfileDamaged(ValueError):
    """Stored profile bytes that do not parse as a profile of this version."""


@dataclass
class AccessProfile:
    names: list[str] = field(default_factory=list)
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (name index, first block, count)
    recorded_ns: int = 0

    @property
    def blocks(self) -> int:
        return sum(count for _, _, count in self.runs)

    def entries(self) -> Iterator[tuple[str, int]]:
        """(file name, block index) in the recorded order."""
        for name_index, first, count in self.runs:
            name = self.names[name_index]
            for index in range(first, first + count):
                yield name, index

    def to_bytes(self) -> bytes:
        flat = [value for run in self.runs for value in run]
        body = {"v": PROFILE_VERSION, "names": self.names, "runs": flat, "recorded_ns": self.recorded_ns}
        return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 9)

    @classmethod
    def from_bytes(cls, data: bytes) -> AccessProfile:
        try:
            body = json.loads(zlib.decompress(data))
            if body.get("v") != PROFILE_VERSION:
                raise ProfileDamaged(f"profile version {body.get('v')!r} (this chunkfs reads {PROFILE_VERSION})")
            names = [str(n) for n in body["names"]]
            flat = [int(v) for v in body["runs"]]
            runs = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat) - 2, 3)]
            if len(flat) % 3 or any(not 0 <= n < len(names) or first < 0 or count < 1 for n, first, count in runs):
                raise ProfileDamaged("profile runs out of range")
            if sum(count for _, _, count in runs) > MAX_PROFILE_ENTRIES:
                raise ProfileDamaged(f"a profile of more than {MAX_PROFILE_ENTRIES} blocks")
            return cls(names, runs, int(body.get("recorded_ns", 0)))
        except (zlib.error, ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as exc:
            if isinstance(exc, ProfileDamaged):
                raise
            raise ProfileDamaged(f"not a chunkfs access profile ({type(exc).__name__})") from None

    def summary(self) -> dict[str, object]:
        return {"files": len(self.names), "blocks": self.blocks, "runs": len(self.runs),
                "recorded_ns": self.recorded_ns}


class ProfileRecorder:
    """The first read of each block of one directory's files, in order, as runs."""

    def __init__(self, limit: int = MAX_PROFILE_ENTRIES) -> None:
        self.profile = AccessProfile()
        self._name_index: dict[str, int] = {}
        self._seen: set[tuple[int, int]] = set()
        self._limit = limit
        self.last_note = 0.0  # time.monotonic() of the last new entry (0: none yet)
        self.checked = 0.0  # ``last_note`` when its owner last decided not to keep it yet

    def __len__(self) -> int:
        return len(self._seen)

    def note(self, name: str, index: int) -> bool:
        """Record a read of block ``index`` of file ``name``; True if it was its first."""
        n = self._name_index.get(name)
        if n is None:
            n = self._name_index[name] = len(self.profile.names)
            self.profile.names.append(name)
        if (n, index) in self._seen or len(self._seen) >= self._limit:
            return False
        self._seen.add((n, index))
        runs = self.profile.runs
        if runs and runs[-1][0] == n and runs[-1][1] + runs[-1][2] == index:
            runs[-1] = (n, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((n, index, 1))
        self.last_note = time.monotonic()
        return True

    def finished(self) -> AccessProfile:
        """The profile so far, stamped with the time."""
        names_used = {n for n, _, _ in self.profile.runs}
        keep = [i for i in range(len(self.profile.names)) if i in names_used]
        renumber = {old: new for new, old in enumerate(keep)}
        return AccessProfile([self.profile.names[i] for i in keep],
                             [(renumber[n], first, count) for n, first, count in self.profile.runs],
                             time.time_ns())

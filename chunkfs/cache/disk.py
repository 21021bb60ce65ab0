"""DiskCache: content-addressed block files on the node's local disk.

Layout under the cache directory (shared by every volume and mount on the node: a block id
is the hash of its plain bytes, so an entry is valid for any volume that names it)::

    blocks/<id[:2]>/<id hex>     plain block bytes, mode 0600
    tmp/<id hex>.<pid>.<rand>    being written; renamed into blocks/ when complete

Invariants:

- An entry is only ever created by ``put``, which writes a temporary file and renames it:
  a crash never leaves a partial file under ``blocks/``. Temporary files of dead
  processes are removed when a cache is opened.
- ``put`` is only given bytes already verified against their id (``BlockCodec.decode``).
- A reader never gets bytes from an entry whose size differs from the block length, and
  the first read of an entry in a process re-verifies its hash (``verify``), so a file
  damaged on disk is dropped and fetched again rather than served.
- Cache failures (disk full, I/O errors) are logged and reported as a miss or a skipped
  write; they never fail a read.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import uuid
from pathlib import Path

from chunkfs.blocks import block_id

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.blocks_dir = self.root / "blocks"
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.blocks_dir, self.tmp_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._verified: set[bytes] = set()
        self._remove_stale_tmp()

    def _remove_stale_tmp(self) -> None:
        for entry in os.scandir(self.tmp_dir):
            parts = entry.name.split(".")
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
            if pid == os.getpid() or (pid and _pid_alive(pid)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)

    def path(self, bid: bytes) -> str:
        hexid = bid.hex()
        return f"{self.blocks_dir}/{hexid[:2]}/{hexid}"

    def read(self, bid: bytes, length: int, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes [start, end) of the cached block, or None on a miss (absent, wrong size,
        damaged or unreadable entries count as misses and are dropped)."""
        path = self.path(bid)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache: cannot open %s: %s", path, exc.strerror)
            return None
        try:
            if os.fstat(fd).st_size != length:
                log.warning("cache: dropping %s: size differs from block length %d", path, length)
                self.drop(bid)
                return None
            if bid not in self._verified:
                if block_id(os.pread(fd, length, 0)) != bid:
                    log.warning("cache: dropping %s: content does not match its hash", path)
                    self.drop(bid)
                    return None
                self._verified.add(bid)
            stop = length if end is None else end
            return os.pread(fd, stop - start, start)
        except OSError as exc:
            log.warning("cache: reading %s failed: %s", path, exc.strerror)
            return None
        finally:
            os.close(fd)

    def is_verified(self, bid: bytes) -> bool:
        """True once this process has checked (or written) the entry's content."""
        return bid in self._verified

    def contains(self, bid: bytes, length: int) -> bool:
        try:
            return os.stat(self.path(bid)).st_size == length
        except OSError:
            return False

    def put(self, bid: bytes, plain: bytes) -> bool:
        """Store verified plain bytes of block ``bid``; False (logged) if the disk refused."""
        final = self.path(bid)
        tmp = f"{self.tmp_dir}/{bid.hex()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(plain)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
                os.rename(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            level = logging.INFO if exc.errno == errno.ENOSPC else logging.WARNING
            log.log(level, "cache: cannot store block %s: %s", bid.hex()[:16], exc.strerror)
            return False
        self._verified.add(bid)
        return True

    def drop(self, bid: bytes) -> None:
        self._verified.discard(bid)
        with contextlib.suppress(OSError):
            os.unlink(self.path(bid))

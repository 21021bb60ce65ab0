"""BlockCache: the node's bounded, verified block cache over one or more directories.

Layer: ``cache/`` knows blocks (ids, hashes) and local files, nothing of FUSE or stores.
Methods are blocking and thread-safe; async callers run the slow ones (``verify``, ``put``,
``load_index``) in worker threads.

Policy:

- A block lives in exactly one directory, chosen by its id (``dir_for``), so every process
  on the node looks for it in the same place.
- Capacity: the bytes this process indexes stay within ``capacity``, and each directory's
  filesystem keeps at least ``free_ratio`` of its space free. Room is made by evicting the
  least recently used entries; an entry that is pinned (being read) is never evicted. When
  no room can be made, ``put`` declines: the caller serves the bytes from memory instead.
- The index is rebuilt from the directories at start-up (``load_index``), oldest access
  first, so a restarted mount reuses its cache. Entries written by other processes (warmup,
  another mount) join the index when this process first reads them.
- Verification: bytes are only served from an entry this process has admitted: written by
  ``put`` (given bytes already checked against their id), found unchanged since a chunkfs
  process sealed it in this boot (``admit``: an ``fstat`` and an xattr read; see
  ``CacheDir``), or read back whole by ``verify`` (size and SHA-256, after which it is
  sealed for the next process). With ``trust_seals`` off, every entry from elsewhere is
  hashed. A wrong size or hash drops the entry (``chunkfs_cache_corrupt_total``) and
  reports a miss, so the caller fetches the block again, and so does an entry that cannot
  be read. A dropped entry the disk will not let go of is treated as absent (``contains``)
  until this process stores the block again.
- Node-wide single-flight: ``try_claim`` takes a block's download lock in its directory, so
  two processes sharing the cache (a mount and a warmup, two mounts) download it once.
- Failures of the cache disk (ENOSPC, EIO, a vanished directory) are logged, counted and
  answered as a miss or a declined ``put``: they never fail a read.
- Blocks held in file images (``cache/images.py``): once this process knows a usable image
  (``note_image``: it made or admitted it), a block with no verified entry of its own is
  read from its place in the image (``read_into``, ``read_whole_into``, ``advise``,
  ``block_source``; ``in_image`` says so). The image is an entry like the others, verified
  the same way; when it is dropped or evicted, its blocks are forgotten with it. Only the
  process that noted an image reads blocks from it (the note is in memory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from chunkfs.blocks import HASH_NAME, block_id
from chunkfs.cache.disk import CacheDir, NewEntry
from chunkfs.cache.image_places import ImagePlaces
from chunkfs.metrics import Metrics
from chunkfs.units import format_size

log = logging.getLogger(__name__)

#: ``try_claim`` result when locking is impossible (cache disk failing): download anyway
NO_LOCK = -1
DEFAULT_CACHE_SIZE = 100 << 30  # --cache-size of mounts and warmups
#: --verify-cache: "seal" admits sealed entries of other processes (``trust_seals``), "full" hashes them
VERIFY_CACHE_MODES = ("seal", "full")


@dataclass(frozen=True)
class Shortfall:
    """Why a set of blocks cannot all be held by the cache at once."""

    needed: int  # bytes that must be written (or, for the capacity limit, held)
    room: int  # bytes that can be made available
    where: str  # "cache size" or the directories on one filesystem

    def __str__(self) -> str:
        if self.where == "cache size":
            return f"needs {format_size(self.needed)} but the cache size is {format_size(self.room)}"
        return (f"needs {format_size(self.needed)} more in {self.where} but at most "
                f"{format_size(max(0, self.room))} can be freed there")


class BlockCache:
    def __init__(self, dirs: Sequence[str | Path], capacity: int, free_ratio: float = 0.1,
                 metrics: Metrics | None = None, *, trust_seals: bool = True, hash: str = HASH_NAME) -> None:
        """``hash``: the block hash algorithm of the volumes this cache serves (each has its
        own namespace in the directories)."""
        if not dirs:
            raise ValueError("at least one cache directory is needed")
        if not 0 <= free_ratio < 1:
            raise ValueError("free_ratio must be in [0, 1)")
        self.hash = hash
        self.dirs = [CacheDir(d, hash) for d in dirs]
        self.capacity = capacity
        self.free_ratio = free_ratio
        self.trust_seals = trust_seals
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # id -> size, least recently used first
        self._bytes = 0
        self._reserved = 0  # room promised to writes in progress
        self._pins: dict[bytes, int] = {}
        self._verified: set[bytes] = set()
        self._stuck: set[bytes] = set()  # dropped entries the disk would not let us remove
        self._places = ImagePlaces()  # blocks inside the file images this process noted
        self._failing = False  # last write failed: log later failures quietly
        self.index_loaded = threading.Event()  # set once ``load_index`` has run

    # -- bookkeeping -----------------------------------------------------------------------
    def dir_for(self, bid: bytes) -> CacheDir:
        return self.dirs[int.from_bytes(bid[:4], "big") % len(self.dirs)]

    @property
    def used_bytes(self) -> int:
        return self._bytes

    @property
    def block_count(self) -> int:
        return len(self._index)

    def _add(self, bid: bytes, size: int, *, recent: bool = True) -> None:
        """Index an entry (caller holds the lock)."""
        old = self._index.get(bid)
        if old is None:
            self._bytes += size
        else:
            self._bytes += size - old
        self._index[bid] = size
        if recent:
            self._index.move_to_end(bid)
        else:
            self._index.move_to_end(bid, last=False)

    def _forget(self, bid: bytes) -> None:
        """Unindex an entry (caller holds the lock)."""
        size = self._index.pop(bid, None)
        if size is not None:
            self._bytes -= size
        self._verified.discard(bid)
        self._places.remove(bid)  # (if it is a noted image, its blocks are no longer there)

    def _index_verified(self, bid: bytes, size: int) -> None:
        """Record an entry this process wrote or checked: most recently used, servable."""
        with self._lock:
            self._add(bid, size)
            self._verified.add(bid)
        self._publish()

    def _publish(self) -> None:
        self.metrics.cache_bytes.set(self._bytes)
        self.metrics.cache_blocks.set(len(self._index))

    def load_index(self) -> int:
        """Index every entry already on disk (least recently accessed first); returns the count.
        Entries beyond the capacity are evicted at once. Sets ``index_loaded`` in any case."""
        try:
            found: list[tuple[bytes, int, float]] = []
            for cache_dir in self.dirs:
                try:
                    found.extend(cache_dir.scan())
                except OSError as exc:
                    log.warning("cache: cannot scan %s: %s", cache_dir.root, exc.strerror)
            found.sort(key=lambda entry: entry[2], reverse=True)
            with self._lock:
                for bid, size, _atime in found:  # newest first, each pushed to the old end
                    if bid not in self._index:
                        self._add(bid, size, recent=False)
            self._evict(0, None)
            self._publish()
            return len(found)
        finally:
            self.index_loaded.set()

    # -- pins ------------------------------------------------------------------------------
    def demote(self, bids: Sequence[bytes]) -> None:
        """Make these entries the least recently used: the first evicted when room is needed."""
        with self._lock:
            for bid in reversed(bids):
                if bid in self._index:
                    self._index.move_to_end(bid, last=False)

    def pin(self, bid: bytes) -> None:
        """Keep the entry from eviction until ``unpin`` (pins nest)."""
        with self._lock:
            self._pins[bid] = self._pins.get(bid, 0) + 1

    def unpin(self, bid: bytes) -> None:
        with self._lock:
            left = self._pins[bid] - 1
            if left:
                self._pins[bid] = left
            else:
                del self._pins[bid]

    # -- blocks in file images ---------------------------------------------------------------
    def note_image(self, key: bytes, size: int, block_size: int, blocks: Iterable[bytes]) -> None:
        """Image ``key`` of a ``size``-byte file, verified or admitted by this process, holds
        ``blocks`` (in file order, ``block_size`` bytes apart): blocks without an entry of
        their own are read from there (from the first noted image that still holds them)."""
        with self._lock:
            if key in self._verified:
                self._places.add(key, size, block_size, blocks)

    def image_noted(self, key: bytes) -> bool:
        """Image ``key`` is noted (``note_image``) and still verified."""
        return self._places.noted(key) and key in self._verified

    def _image_place(self, bid: bytes) -> tuple[bytes, int, int] | None:
        """(image, offset, length) of a block with no verified entry, held by a noted image."""
        if bid in self._verified:
            return None
        return self._places.place(bid, self._verified.__contains__)

    def in_image(self, bid: bytes) -> bool:
        """No verified entry of its own, but readable from a noted file image."""
        return self._image_place(bid) is not None

    def block_source(self, bid: bytes) -> tuple[bytes, int, int | None] | None:
        """(file, offset, length) of a verified copy of the block: its entry (the block's own
        id, offset 0, length None: the whole file), or its place in a noted image (the
        image's id); None if neither (no system call: the file may have gone since; if it
        has, ``drop`` that id)."""
        if bid in self._verified:
            return bid, 0, None
        return self._image_place(bid)

    def _where(self, bid: bytes, start: int, count: int) -> tuple[bytes, int] | None:
        """(file, offset of the block's byte 0 in it) to read ``count`` bytes of the block from
        ``start``: its verified entry, or its noted image; None if neither holds them."""
        if bid in self._verified:
            return bid, 0
        place = self._image_place(bid)
        if place is None or start + count > place[2]:
            return None
        return place[0], place[1]

    # -- reads -----------------------------------------------------------------------------
    def is_verified(self, bid: bytes) -> bool:
        """True when ``read`` may serve the entry without checking it again."""
        return bid in self._verified

    def read(self, bid: bytes, start: int, end: int) -> bytearray | None:
        """Bytes [start, end) of a verified entry, or None (a miss) if it is not verified,
        has gone or cannot be read."""
        if bid not in self._verified:
            return None
        out = bytearray(end - start)
        return out if self.read_into(bid, start, memoryview(out)) else None

    def read_into(self, bid: bytes, start: int, out: memoryview, *, nowait: bool = False) -> bool:
        """Fill ``out`` with the verified entry's bytes from ``start``; False (a miss) if it
        is not verified, has gone or cannot be read (then ``out`` holds nothing useful).
        With ``nowait`` (the event loop's reads), ``BlockingIOError`` if the bytes are not
        in the page cache: read them again, without ``nowait``, in a worker thread. A
        block held by a noted image is read from there."""
        where = self._where(bid, start, len(out))
        if where is None:
            return False
        key, offset = where
        try:
            got = self.dir_for(key).read_into(key, offset + start, out, nowait=nowait)
        except BlockingIOError:
            raise
        except OSError as exc:
            return self._unreadable(key, exc)
        return self._read_back(key, got == len(out))

    def read_whole_into(self, bid: bytes, length: int, out: memoryview) -> bool:
        """Fill ``out`` (page-aligned, at least ``length`` rounded up to a page) with the
        whole verified entry, around the page cache where the filesystem allows it; False
        (a miss) as ``read_into``."""
        where = self._where(bid, 0, length)
        if where is None:
            return False
        key, offset = where
        try:
            got = self.dir_for(key).read_whole_into(key, length, out, offset)
        except OSError as exc:
            return self._unreadable(key, exc)
        return self._read_back(key, got == length)  # (a block in an image: the next one starts at a page)

    def _unreadable(self, bid: bytes, exc: OSError) -> bool:
        if not isinstance(exc, FileNotFoundError):
            log.warning("cache: reading block %s failed: %s", bid.hex()[:16], exc.strerror)
        self.drop(bid)
        return False

    def _read_back(self, bid: bytes, whole: bool) -> bool:
        """After a read of a verified entry: drop it if it did not come back whole (its size
        changed on disk), else mark it recently used."""
        if not whole:
            log.warning("cache: block %s changed size on disk; dropping it", bid.hex()[:16])
            self.metrics.cache_corrupt.inc()
            self.drop(bid)
            return False
        with self._lock:
            if bid in self._index:
                self._index.move_to_end(bid)
        return True

    def admit(self, bid: bytes, length: int, *, page_in: bool = True) -> bool:
        """Admit an entry found on disk without reading it, if its seal shows it unchanged
        since a chunkfs process put verified bytes there, and (with ``page_in``) have the
        kernel page it in. False (not an error) when there is no entry, no matching seal,
        or seals are not trusted: then ``verify`` it."""
        if not self.trust_seals:
            return False
        try:
            if not self.dir_for(bid).sealed(bid, length, page_in=page_in):
                return False
        except OSError:
            return False
        self._index_verified(bid, length)
        self.metrics.cache_entry_checks.labels("seal").inc()
        return True

    def verify(self, bid: bytes, length: int) -> bytes | None:
        """Check an entry found on disk (size and hash) and return its bytes; None if absent,
        unreadable or damaged (a damaged entry is dropped)."""
        cache_dir = self.dir_for(bid)
        try:
            data, before = cache_dir.read_whole(bid, length)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache: reading block %s failed: %s", bid.hex()[:16], exc.strerror)
            self.drop(bid)
            return None
        if len(data) != length or block_id(data, self.hash) != bid:
            what = "size differs from the block length" if len(data) != length else "content does not match its hash"
            log.warning("cache: dropping %s: %s", cache_dir.path(bid), what)
            self.metrics.cache_corrupt.inc()
            self.drop(bid)
            return None
        self._index_verified(bid, length)
        self.metrics.cache_entry_checks.labels("hash").inc()
        cache_dir.reseal(bid, before)
        return data

    def advise(self, bid: bytes, length: int) -> None:
        """Ask the kernel to start reading a verified entry into the page cache (readahead of
        blocks already on this node), so that later ``read`` calls do not wait for the disk."""
        where = self._where(bid, 0, length)
        if where is None:
            return
        key, offset = where
        with contextlib.suppress(OSError):  # only a hint: real problems show up (and are handled) in ``read``
            self.dir_for(key).advise(key, length, offset)

    def entry_size(self, bid: bytes) -> int | None:
        """Size of the block's file on disk (None if absent or unreadable); not verified."""
        try:
            return self.dir_for(bid).entry_size(bid)
        except OSError:
            return None

    def indexed(self, bid: bytes) -> bool:
        """This process knows of an entry (no system call: the entry may have gone since)."""
        return bid in self._index and bid not in self._stuck

    def contains(self, bid: bytes) -> bool:
        """An entry exists on disk (not necessarily verified) and was not dropped."""
        return bid not in self._stuck and (bid in self._index or self.dir_for(bid).exists(bid))

    # -- node-wide download locks ------------------------------------------------------------
    def try_claim(self, bid: bytes) -> int | None:
        """Take the block's node-wide download lock: a token for ``release_claim``, or None
        while another process downloads it. ``NO_LOCK`` if locking fails (go ahead)."""
        try:
            return self.dir_for(bid).try_lock(bid)
        except OSError as exc:
            log.debug("cache: cannot lock block %s: %s", bid.hex()[:16], exc.strerror)
            return NO_LOCK

    def release_claim(self, bid: bytes, token: int) -> None:
        if token == NO_LOCK:
            return
        try:
            self.dir_for(bid).unlock(token)
        except OSError as exc:
            log.debug("cache: cannot unlock block %s: %s", bid.hex()[:16], exc.strerror)

    # -- writes ----------------------------------------------------------------------------
    def put(self, bid: bytes, plain: bytes | memoryview) -> bool:
        """Store verified plain bytes of block ``bid``; False if no room could be made or the
        disk refused (logged and counted)."""
        if bid in self._verified:
            return True
        entry = self.open_entry(bid, len(plain))
        if entry is None:
            return False
        try:
            entry.write(plain)
        except OSError as exc:
            self.abandon(entry, exc.strerror or str(exc))
            return False
        return self.commit(entry)

    def open_entry(self, bid: bytes, length: int, *, direct: bool = False) -> NewEntry | None:
        """Make room for a block of ``length`` bytes about to be written piece by piece, and
        open its temporary file. None (logged and counted) if no room could be made or the
        disk refused. The caller writes the plain bytes to the entry, verifies them, and
        then calls ``commit``, or ``abandon`` if anything went wrong: the room stays
        reserved until one of the two. ``direct``: no reader waits for the block, so write it
        around the page cache (``CacheDir.create``)."""
        cache_dir = self.dir_for(bid)
        if not self._evict(length, cache_dir, reserve=True):
            self._declined(bid, "no room (cache size or free-space limit, everything else in use)")
            return None
        try:
            entry = cache_dir.create(bid, direct=direct, length=length)
        except OSError as exc:
            self._release(length)
            self._declined(bid, exc.strerror or str(exc))
            return None
        entry.reserved = length
        return entry

    def commit(self, entry: NewEntry) -> bool:
        """Publish an entry whose bytes the caller has verified; False (counted) if the disk
        refused."""
        try:
            entry.publish()
        except OSError as exc:
            self.abandon(entry, exc.strerror or str(exc))
            return False
        self._failing = False
        self._stuck.discard(entry.bid)
        self._index_verified(entry.bid, entry.size)  # counted before its reservation ends: never neither
        self._release(entry.reserved)
        entry.reserved = 0
        return True

    def abandon(self, entry: NewEntry, why: str | None = None) -> None:
        """Give up an entry (``why``: the disk failed; None: the bytes were not the block)."""
        entry.discard()
        self._release(entry.reserved)
        entry.reserved = 0
        if why is not None:
            self._declined(entry.bid, why)

    def _release(self, reserved: int) -> None:
        with self._lock:
            self._reserved -= reserved

    def _declined(self, bid: bytes, why: str) -> None:
        self.metrics.cache_write_errors.inc()
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "cache: not storing block %s: %s; serving it from memory", bid.hex()[:16], why)
        self._failing = True

    def drop(self, bid: bytes) -> None:
        """Remove an entry (damaged or unreadable); one that cannot be removed is treated as
        absent until ``put`` stores the block again."""
        with self._lock:
            self._forget(bid)
        try:
            self.dir_for(bid).remove(bid)
        except OSError as exc:
            log.warning("cache: cannot remove block %s: %s", bid.hex()[:16], exc.strerror)
            self._stuck.add(bid)
        self._publish()

    def drop_blocks(self, bids: Sequence[bytes]) -> tuple[int, int]:
        """Remove these blocks' entries (``warmup --evict``): (entries removed, bytes)."""
        count = size = 0
        for bid in bids:
            found = self.entry_size(bid)
            if found is None:
                continue
            self.drop(bid)
            count += 1
            size += found
        return count, size

    def missing(self, target: Mapping[bytes, int]) -> dict[bytes, int]:
        """The blocks of ``target`` (id -> length) with no entry of that length on disk (one
        stat each; not verified)."""
        return {bid: length for bid, length in target.items() if self.entry_size(bid) != length}

    def shortfalls(self, target: Mapping[bytes, int],
                   missing: Mapping[bytes, int] | None = None) -> list[Shortfall]:
        """Check that every block of ``target`` (id -> length) can be on disk at once, with
        every other entry evictable: within the cache size, and on each filesystem within
        its free space above the free-space ratio. Empty when they fit. ``missing`` (the
        blocks of ``target`` not on disk yet, if the caller knows) saves a stat per block."""
        found: list[Shortfall] = []
        total = sum(target.values())
        if total > self.capacity:
            found.append(Shortfall(total, self.capacity, "cache size"))
        with self._lock:
            evictable_by_dir: dict[CacheDir, int] = {}
            for bid, size in self._index.items():
                if bid not in target and bid not in self._pins:
                    home = self.dir_for(bid)
                    evictable_by_dir[home] = evictable_by_dir.get(home, 0) + size
        groups: dict[int, dict] = {}  # st_dev -> needed, room, dirs
        group_of: dict[CacheDir, dict] = {}  # cache directory -> its filesystem's group
        for cache_dir in self.dirs:
            try:
                dev = os.stat(cache_dir.root).st_dev
                free, disk = cache_dir.free_space()
            except OSError as exc:
                found.append(Shortfall(0, 0, f"{cache_dir.root} ({exc.strerror})"))
                continue
            group = groups.setdefault(dev, {"needed": 0, "room": free - int(self.free_ratio * disk), "dirs": []})
            group["room"] += evictable_by_dir.get(cache_dir, 0)
            group["dirs"].append(cache_dir)
            group_of[cache_dir] = group
        if missing is None:
            missing = self.missing(target)
        for bid, length in missing.items():
            owner = group_of.get(self.dir_for(bid))
            if owner is not None:
                owner["needed"] += length
        for group in groups.values():
            if group["needed"] > group["room"]:
                where = ", ".join(str(d.root) for d in group["dirs"])
                found.append(Shortfall(group["needed"], group["room"], where))
        return found

    # -- eviction --------------------------------------------------------------------------
    def _evict(self, incoming: int, target: CacheDir | None, reserve: bool = False) -> bool:
        """Make room for ``incoming`` bytes in ``target``: within capacity overall, and above
        the free-space ratio on ``target``'s filesystem. False if that is impossible. With
        ``reserve``, the room is held (``_reserved``) until the caller releases it, so
        concurrent writers cannot together overshoot the capacity."""
        if incoming > self.capacity:
            return False
        deficit = 0
        if target is not None and self.free_ratio > 0:
            try:
                free, total = target.free_space()
            except OSError:
                return False
            # room reserved for entries still being written is not yet used on disk: count it
            # (as if on this filesystem), so concurrent downloads cannot together go below the floor
            deficit = max(0, int(self.free_ratio * total) + incoming + self._reserved - free)
        victims: list[tuple[bytes, CacheDir]] = []
        with self._lock:
            over = self._bytes + self._reserved + incoming - self.capacity
            if over <= 0 and deficit <= 0:
                if reserve:
                    self._reserved += incoming
                return True
            chosen: list[tuple[bytes, int, CacheDir]] = []
            for bid, size in self._index.items():
                if over <= 0 and deficit <= 0:
                    break
                if bid in self._pins:
                    continue
                where = self.dir_for(bid)
                if over <= 0 and where is not target:
                    continue  # only the target's filesystem is short of space
                chosen.append((bid, size, where))
                over -= size
                if where is target:
                    deficit -= size
            possible = over <= 0 and deficit <= 0
            if not possible:
                # Space taken by files that are not ours cannot be won back: keep the cache
                # as it is and decline this block rather than empty the cache for nothing.
                return False
            for bid, _size, where in chosen:
                self._forget(bid)
                victims.append((bid, where))
            if reserve:
                self._reserved += incoming
        for bid, where in victims:
            try:
                where.remove(bid)
            except OSError as exc:
                log.warning("cache: cannot evict block %s: %s", bid.hex()[:16], exc.strerror)
        if victims:
            self.metrics.cache_evictions.inc(len(victims))
            self._publish()
        return possible

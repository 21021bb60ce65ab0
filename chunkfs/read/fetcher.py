"""BlockFetcher: verified block bytes for readers, from the node cache or the object store.

Layer: ``read/`` sees the store only through ``AsyncStore`` and the cache only through
``BlockCache``; it knows nothing of FUSE.

Invariants:

- Single-flight: at most one load (disk verification or download) per block id at a time;
  concurrent callers wait for it and share its result. If the task doing the load is
  cancelled (a prefetch stopped), a waiter starts its own load instead of failing.
- Across processes sharing the cache directory (a mount and a warmup, several mounts), a
  download holds the block's node-wide lock (``BlockCache.try_claim``); a process that finds
  it taken waits for the entry to appear and verifies it instead of downloading.
- Downloads hold one of ``downloads`` slots (``PrioritySlots``) from request to cache write,
  so the memory held by in-flight blocks is at most ``downloads`` blocks (twice that with
  compression) plus ``recent_blocks`` kept when the cache declines a block. Demand reads go
  ahead of readahead, readahead ahead of prefetch; a demand read of a block a prefetch has
  queued raises that queued request to demand priority.
- No byte is returned unless it was verified against its id: store bytes go through
  ``BlockCodec.decode``; cache entries through ``BlockCache``'s checks.
- A corrupt or truncated body, or a temporary store error, is retried with backoff up to
  ``attempts`` times; then ``BlockUnavailable`` names the block and the cause.
- A cache that cannot store a block does not fail the read: the bytes are returned and
  kept in a small in-memory LRU.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict

import trio

from chunkfs.blocks import BlockCodec, BlockCorrupt, object_key
from chunkfs.cache.block_cache import NO_LOCK, BlockCache
from chunkfs.metrics import Metrics
from chunkfs.read.slots import Priority, PrioritySlots, Ticket
from chunkfs.store.aio import AsyncStore
from chunkfs.store.base import ObjectNotFound, StoreError

log = logging.getLogger(__name__)


#: seconds to wait for another process's download of a block before fetching it too
OTHER_DOWNLOADER_PATIENCE = 60.0


class BlockUnavailable(Exception):
    """A block could not be fetched intact (missing, corrupt after retries, store failing)."""


class _Pending:
    __slots__ = ("cancelled", "data", "done", "downloaded", "error", "ticket")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.downloaded = False
        self.ticket: Ticket | None = None


class BlockFetcher:
    def __init__(self, store: AsyncStore, codec: BlockCodec, cache: BlockCache, *, downloads: int = 16,
                 attempts: int = 3, recent_blocks: int = 8, disk_threads: int = 8,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.codec = codec
        self.cache = cache
        self.attempts = attempts
        self.metrics = metrics or cache.metrics
        self.slots = PrioritySlots(downloads)
        self._disk = trio.CapacityLimiter(disk_threads)
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        self._recent_max = recent_blocks
        self._inflight: dict[bytes, _Pending] = {}
        self.downloads = 0  # blocks fetched from the store (for tests and stats)
        self.cache_declined = False  # the last block downloaded could not be stored on disk

    def is_local(self, bid: bytes) -> bool:
        """Readable now without a download or a disk verification."""
        return self.cache.is_verified(bid) or bid in self._recent

    async def read(self, bid: bytes, length: int, start: int, end: int) -> bytes | memoryview:
        """Bytes [start, end) of block ``bid`` (plain length ``length``) for a waiting reader:
        a view, not a copy, when the block is in memory (pyfuse3 replies from any buffer; a
        caller must not keep the view beyond its reply)."""
        self.cache.pin(bid)
        try:
            downloaded = False
            for _ in range(3):  # an admitted entry read from disk, unless it vanished meanwhile
                data = self._local(bid, start, end)
                if data is not None:
                    break
                plain, downloaded = await self._obtain(bid, length, Priority.DEMAND)
                if plain is not None:
                    data = memoryview(plain)[start:end]
                    break
            else:
                raise BlockUnavailable(f"block {bid.hex()}: its cache entry keeps vanishing")
        finally:
            self.cache.unpin(bid)
        if downloaded:
            self.metrics.cache_misses.inc()
            self.metrics.cache_miss_bytes.inc(len(data))
        else:
            self.metrics.cache_hits.inc()
            self.metrics.cache_hit_bytes.inc(len(data))
        return data

    def _local(self, bid: bytes, start: int, end: int) -> bytes | memoryview | None:
        """Bytes [start, end) from an admitted cache entry or the in-memory LRU; None if neither."""
        data = self.cache.read(bid, start, end)
        if data is None and (recent := self._recent.get(bid)) is not None:
            self._recent.move_to_end(bid)
            return memoryview(recent)[start:end]
        return data

    async def ensure(self, bid: bytes, length: int, priority: Priority) -> bool:
        """Make the block readable locally (readahead, prefetch, warmup). True if this call
        downloaded the block or read and hashed its entry; False if the block was local
        already, its entry's seal admitted it, or another caller was loading it."""
        if self.cache.is_verified(bid):
            # on this node already: have the kernel page it in before the reader gets there
            await trio.to_thread.run_sync(self.cache.advise, bid, length, limiter=self._disk)
            return False
        if bid in self._recent:
            return False
        someone_else = bid in self._inflight
        data, _downloaded = await self._obtain(bid, length, priority)
        return not someone_else and data is not None

    async def warm(self, bid: bytes, length: int) -> bool:
        """Put the block in the node cache (warmup, at prefetch priority); True if this call
        downloaded it."""
        if self.cache.is_verified(bid):
            return False
        _data, downloaded = await self._obtain(bid, length, Priority.PREFETCH)
        return downloaded

    async def _obtain(self, bid: bytes, length: int, priority: Priority) -> tuple[bytes | None, bool]:
        """(verified plain bytes, whether they were downloaded), one load per block at a time.
        The bytes are None when a sealed entry was admitted without reading it: read it from
        the cache."""
        while (pending := self._inflight.get(bid)) is not None:
            if pending.ticket is not None:
                PrioritySlots.raise_priority(pending.ticket, priority)
            await pending.done.wait()
            if pending.cancelled:
                continue  # its owner was cancelled: load it ourselves
            if pending.error is not None:
                raise BlockUnavailable(str(pending.error)) from pending.error
            return pending.data, pending.downloaded
        pending = self._inflight[bid] = _Pending()
        try:
            found, data = await self._from_disk(bid, length)
            if not found:
                data, pending.downloaded = await self._download_once_on_node(bid, length, priority, pending)
            pending.data = data
            return data, pending.downloaded
        except trio.Cancelled:
            pending.cancelled = True
            raise
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            del self._inflight[bid]
            pending.done.set()

    async def _from_disk(self, bid: bytes, length: int) -> tuple[bool, bytes | None]:
        """(whether an intact entry is on disk, its bytes if checking it meant reading it)."""
        if not self.cache.contains(bid):
            return False, None
        return await trio.to_thread.run_sync(self._check_entry, bid, length, limiter=self._disk)

    def _check_entry(self, bid: bytes, length: int) -> tuple[bool, bytes | None]:
        if self.cache.admit(bid, length):  # it also pages the entry in, as a whole read would
            return True, None
        data = self.cache.verify(bid, length)
        return data is not None, data

    async def _download_once_on_node(self, bid: bytes, length: int, priority: Priority,
                                     pending: _Pending) -> tuple[bytes | None, bool]:
        """Download under the block's node-wide lock; if another process held it, use the
        entry it wrote instead. (bytes, whether this process downloaded them)"""
        give_up = trio.current_time() + OTHER_DOWNLOADER_PATIENCE
        while (token := self.cache.try_claim(bid)) is None:
            if trio.current_time() > give_up:
                log.warning("block %s: another process has been downloading it for %.0f s; fetching it too",
                            bid.hex()[:16], OTHER_DOWNLOADER_PATIENCE)
                token = NO_LOCK
                break
            await trio.sleep(0.02)
        try:
            found, data = await self._from_disk(bid, length)  # another process may have just finished it
            if found:
                return data, False
            pending.ticket = self.slots.ticket(priority)
            return await self._download_and_store(bid, length, pending.ticket), True
        finally:
            self.cache.release_claim(bid, token)

    async def _download_and_store(self, bid: bytes, length: int, ticket: Ticket) -> bytes:
        await self.slots.acquire(ticket)
        try:
            plain = await self._download(bid, length)
            stored = await trio.to_thread.run_sync(self.cache.put, bid, plain, limiter=self._disk)
        finally:
            self.slots.release()
        self.cache_declined = not stored
        if not stored:
            self._recent[bid] = plain
            if len(self._recent) > self._recent_max:
                self._recent.popitem(last=False)
        return plain

    async def _download(self, bid: bytes, length: int) -> bytes:
        key = object_key(bid)
        for attempt in range(1, self.attempts + 1):
            try:
                stored = await self.store.get(key)
                plain = await trio.to_thread.run_sync(self.codec.decode, bid, stored, length)
                break
            except ObjectNotFound as exc:
                raise BlockUnavailable(f"block {bid.hex()} is missing from {self.store.store.url}") from exc
            except (BlockCorrupt, StoreError) as exc:
                if isinstance(exc, StoreError) and not exc.temporary:
                    raise BlockUnavailable(f"block {bid.hex()}: {exc}") from exc
                if attempt == self.attempts:
                    raise BlockUnavailable(
                        f"block {bid.hex()} failed {attempt} attempts, last: {exc}"
                    ) from exc
                log.info("block %s attempt %d failed (%s); retrying", bid.hex()[:16], attempt, exc)
                await trio.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        self.downloads += 1
        return plain

"""BlockFetcher: block bytes for readers, from memory, the disk cache or the object store.

Layer: ``read/`` sees the store only through ``AsyncStore`` and the cache only through
``DiskCache``; it knows nothing of FUSE.

Invariants:

- Single-flight: at most one download per block id at a time; concurrent readers of the
  same block wait for that download and share its result (or its error).
- No byte is returned unless it was verified against its id: store bytes go through
  ``BlockCodec.decode``; disk-cache bytes through ``DiskCache.read``'s checks.
- A corrupted or truncated body, or a temporary store error, is retried with backoff up to
  ``attempts`` times; then ``BlockUnavailable`` names the block and the cause.
- A cache that cannot store a block does not fail the read: the bytes are still returned
  and kept in a small in-memory LRU (``recent_blocks`` entries).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict

import trio

from chunkfs.blocks import BlockCodec, BlockCorrupt, object_key
from chunkfs.cache.disk import DiskCache
from chunkfs.store.aio import AsyncStore
from chunkfs.store.base import ObjectNotFound, StoreError

log = logging.getLogger(__name__)


class BlockUnavailable(Exception):
    """A block could not be fetched intact (missing, corrupt after retries, store failing)."""


class _Pending:
    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class BlockFetcher:
    def __init__(self, store: AsyncStore, codec: BlockCodec, cache: DiskCache, *,
                 attempts: int = 3, recent_blocks: int = 8) -> None:
        self.store = store
        self.codec = codec
        self.cache = cache
        self.attempts = attempts
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        self._recent_max = recent_blocks
        self._inflight: dict[bytes, _Pending] = {}
        self.downloads = 0  # blocks fetched from the store (for tests and stats)

    async def read(self, bid: bytes, length: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of block ``bid`` (whose plain length is ``length``)."""
        recent = self._recent.get(bid)
        if recent is not None:
            self._recent.move_to_end(bid)
            return recent[start:end]
        hit = await self._read_cache(bid, length, start, end)
        if hit is not None:
            return hit
        return (await self.load(bid, length))[start:end]

    async def _read_cache(self, bid: bytes, length: int, start: int, end: int) -> bytes | None:
        if self.cache.is_verified(bid):  # cheap pread: no need to leave the event loop
            return self.cache.read(bid, length, start, end)
        return await trio.to_thread.run_sync(self.cache.read, bid, length, start, end)

    async def load(self, bid: bytes, length: int) -> bytes:
        """The whole verified block, downloading it once however many callers ask."""
        pending = self._inflight.get(bid)
        if pending is not None:
            await pending.done.wait()
            if pending.error is not None:
                raise BlockUnavailable(str(pending.error)) from pending.error
            assert pending.data is not None
            return pending.data
        pending = self._inflight[bid] = _Pending()
        try:
            plain = await self._download(bid, length)
            pending.data = plain
            return plain
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            del self._inflight[bid]
            pending.done.set()

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
        await trio.to_thread.run_sync(self.cache.put, bid, plain)
        self._recent[bid] = plain
        if len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)
        return plain

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
- A download streams: the object is read in ``PIECE``-sized pieces into a page-aligned
  buffer of the fetcher's pool, each piece decoded and hashed while it is still in the CPU
  cache, and the entry is published only once the whole block has matched its id. Where
  the plain bytes go depends on who is waiting for them:

  - with a block buffer (``BlockBuffers``; a mount lends one to each download it can):
    into the buffer, from which the entry is written around the page cache (``O_DIRECT``)
    and from which its readers then copy;
  - a warmup (``warm``, nobody reads here), or a mount's readahead or prefetch that got no
    block buffer: straight to the entry, around the page cache. A mount reads such a block
    back whole into a block buffer, around the page cache too, when its reader comes near
    (``page_in``, paced by ``FileReader``);
  - otherwise (a reader waits for it): through the page cache into the entry, where the
    reader finds it.

  The page cache costs a copy into pages the kernel must allocate (on some virtual machines
  the first touch of such memory costs more than the copy); block buffers are reused.

  The claim, the disk check, the download and the cache write of one block are one call in
  one worker thread, so the event loop makes no blocking call per block. Downloads hold one
  of ``downloads`` slots (``PrioritySlots``), so the memory they hold is ``downloads``
  pieces plus the block buffers, and whole blocks only when the cache cannot take one and
  no block buffer was lent (then the block is read into memory and kept in a small LRU of
  ``recent_blocks``). Demand reads go ahead of readahead, readahead ahead of prefetch; a
  demand read of a block a prefetch has queued raises that queued request to demand
  priority.
- No byte is returned or published unless it was verified against its id: store bytes go
  through ``BlockDecoder``; cache entries through ``BlockCache``'s checks.
- A corrupt or truncated body, or a temporary store error, is retried by the store's one
  retry policy (``RetryingStore``: the sink rejects a body that fails its hash with
  ``BodyRejected``); what still fails is ``BlockUnavailable``, naming the block and the cause.
- A cache that cannot store a block does not fail the read: the bytes are served from
  its block buffer, or kept in a small in-memory LRU.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections import OrderedDict
from enum import IntEnum
from typing import NamedTuple

import trio

from chunkfs.blocks import BlockCodec, BlockCorrupt, object_key
from chunkfs.cache.block_cache import NO_LOCK, BlockCache
from chunkfs.cache.disk import DIRECT_ALIGN, NewEntry, aligned_buffer
from chunkfs.metrics import Metrics
from chunkfs.read.buffers import BlockBuffers
from chunkfs.read.slots import Priority, PrioritySlots, Ticket
from chunkfs.store.aio import AsyncStore
from chunkfs.store.base import BodyRejected, ObjectNotFound, StoreError

log = logging.getLogger(__name__)


#: seconds to wait for another process's download of a block before fetching it too
OTHER_DOWNLOADER_PATIENCE = 60.0
#: bytes read from the store at a time: small enough to stay in the CPU cache from the socket
#: read through the hash to the cache write
PIECE = 1 << 20


class BlockUnavailable(Exception):
    """A block could not be fetched intact (missing, corrupt after retries, store failing)."""


class How(IntEnum):
    """How a load made a block readable."""

    ADMITTED = 0  # its cache entry's seal admitted it (read it from the cache)
    HASHED = 1  # its cache entry was read whole and hashed (the bytes come with it)
    DOWNLOADED = 2  # fetched from the store (into the cache, or into memory if declined)


class _Busy(Exception):
    """Another process holds the block's download lock."""


class _Pending:
    __slots__ = ("cancelled", "data", "done", "error", "how", "ticket")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | bytearray | None = None
        self.how = How.ADMITTED
        self.error: BaseException | None = None
        self.cancelled = False
        self.ticket: Ticket | None = None


class _Loaded(NamedTuple):
    """What one load attempt made of a block."""

    data: bytes | bytearray | None  # its bytes, when they are only in this memory
    how: How  # DOWNLOADED with a block buffer lent: the bytes are in that buffer
    declined: bool = False  # the cache could not store it


class _BlockSink:
    """Receives one download (``Sink``): decodes and verifies it on the way, and writes the
    plain bytes to the block's new cache entry and, when a block buffer is lent, into that
    buffer (from which the entry is written, aligned, around the page cache); with neither,
    into a new ``memory`` buffer. A cache write that fails turns the sink ``spilled``: without
    a block buffer the bytes before it are gone, so the block must be read again."""

    __slots__ = ("bid", "block", "codec", "decoder", "disk_error", "entry", "filled", "finished", "flushed",
                 "length", "memory")

    def __init__(self, codec: BlockCodec, bid: bytes, length: int, entry: NewEntry | None,
                 block: memoryview | None = None) -> None:
        self.codec = codec
        self.bid = bid
        self.length = length
        self.entry = entry
        self.block = block
        self.filled = self.flushed = 0  # bytes in ``block``; of those, bytes written to ``entry``
        self.memory: bytearray | None = None if entry is not None or block is not None else bytearray()
        self.decoder = codec.decoder(bid, length)
        self.disk_error: str | None = None
        self.finished = False

    def restart(self) -> None:
        self.finished = False
        self.decoder = self.codec.decoder(self.bid, self.length)
        self.filled = self.flushed = 0
        if self.memory is not None:
            self.memory = bytearray()
        if self.entry is not None and self.disk_error is None and self.entry.size:
            try:
                self.entry.rewind()
            except OSError as exc:
                self.disk_error = exc.strerror or str(exc)

    def write(self, piece: memoryview) -> None:
        plain = self.decoder.feed(piece)
        if not plain:
            return
        if self.block is not None:
            end = self.filled + len(plain)
            self.block[self.filled : end] = plain
            self.filled = end
            aligned = end - end % DIRECT_ALIGN
            if aligned - self.flushed >= PIECE:
                self._to_entry(self.block[self.flushed : aligned])
                self.flushed = aligned
        elif self.memory is not None:
            self.memory += plain
        else:
            self._to_entry(plain)

    def finish(self) -> None:
        """Verify the whole block (``BodyRejected`` if it is not the block), then write what
        the entry still lacks. Called once per attempt, by ``RetryingStore``."""
        self.finished = True
        try:
            self.decoder.finish()
        except BlockCorrupt as exc:
            raise BodyRejected(str(exc)) from None
        if self.block is not None and self.flushed < self.filled:
            self._to_entry(self.block[self.flushed : self.filled])
            self.flushed = self.filled

    def _to_entry(self, plain: bytes | memoryview) -> None:
        if self.entry is not None and self.disk_error is None:
            try:
                self.entry.write(plain)
            except OSError as exc:
                self.disk_error = exc.strerror or str(exc)

    @property
    def spilled(self) -> bool:
        return self.disk_error is not None


class BlockFetcher:
    def __init__(self, store: AsyncStore, codec: BlockCodec, cache: BlockCache, *, downloads: int = 16,
                 recent_blocks: int = 8, disk_threads: int = 8, block_buffers: int = 0,
                 metrics: Metrics | None = None) -> None:
        """``block_buffers``: whole-block buffers (``BlockBuffers``) for the downloads of
        readers; 0 streams those through the page cache instead. ``recent_blocks``: blocks
        kept in memory when the cache cannot store them."""
        self.store = store
        self.codec = codec
        self.cache = cache
        self.metrics = metrics or cache.metrics
        self.slots = PrioritySlots(downloads)
        self._disk = trio.CapacityLimiter(disk_threads)
        self._recent: OrderedDict[bytes, bytes | bytearray] = OrderedDict()
        self._recent_max = recent_blocks
        self._inflight: dict[bytes, _Pending] = {}
        # PIECE-sized download buffers, one per download at most; page-aligned (``mmap``), so
        # an entry written around the page cache (``direct``) takes the pieces as they are
        self._buffers: list[memoryview] = []
        self.blocks = BlockBuffers(block_buffers)
        self._staging: dict[bytes, trio.Event] = {}  # blocks being read whole from the cache into a block buffer
        # how many blocks ahead of its reader a block already on this node is worth reading
        # into a block buffer: as many as half the buffers hold (the other half holds what
        # readers are on, and downloads); None without block buffers
        self.stage_ahead = max(1, block_buffers // 2) if block_buffers else None
        self.downloads = 0  # blocks fetched from the store (for tests and stats)
        self.cache_declined = False  # the last block downloaded could not be stored on disk

    def is_local(self, bid: bytes) -> bool:
        """Readable now without a download or a disk verification."""
        return self.cache.is_verified(bid) or bid in self.blocks or bid in self._recent

    def on_node(self, bid: bytes) -> bool:
        """In this node's cache as far as this process knows (verified or not): fetching
        it ahead means reading the disk, not the store."""
        return self.cache.is_verified(bid) or self.cache.indexed(bid)

    async def read(self, bid: bytes, length: int, start: int, end: int) -> bytearray:
        """Bytes [start, end) of block ``bid`` (plain length ``length``), in a new buffer."""
        out = bytearray(end - start)
        await self.read_into(bid, length, start, memoryview(out))
        return out

    async def read_into(self, bid: bytes, length: int, start: int, out: memoryview) -> None:
        """Fill ``out`` with block ``bid``'s bytes from ``start`` (a FUSE reply buffer)."""
        self.cache.pin(bid)
        try:
            if (staging := self._staging.get(bid)) is not None:
                await staging.wait()  # read whole into a block buffer just now: copy from there
            downloaded = in_memory = False
            for _ in range(3):
                try:
                    found = self._local(bid, start, out)
                except BlockingIOError:  # not in the page cache: wait for the disk in a thread
                    found = await trio.to_thread.run_sync(self.cache.read_into, bid, start, out, limiter=self._disk)
                if found:
                    break
                plain, how = await self._obtain(bid, length, Priority.DEMAND, in_memory=in_memory)
                downloaded = downloaded or how is How.DOWNLOADED
                if plain is not None:
                    out[:] = memoryview(plain)[start : start + len(out)]
                    break
                # loaded into the cache: read it from there. If that fails (the entry vanished,
                # or the disk cannot read it back), the store serves it, into memory.
                in_memory = True
            else:
                raise BlockUnavailable(f"block {bid.hex()}: its cache entry keeps vanishing")
        finally:
            self.cache.unpin(bid)
        if downloaded:
            self.metrics.cache_misses.inc()
            self.metrics.cache_miss_bytes.inc(len(out))
        else:
            self.metrics.cache_hits.inc()
            self.metrics.cache_hit_bytes.inc(len(out))

    def held_view(self, bid: bytes, start: int, end: int) -> memoryview | None:
        """Bytes [start, end) of a block held in a block buffer, without a copy (for a FUSE
        reply made before the caller's next ``await``); None if it is not held."""
        view = self.blocks.view(bid, start, end)
        if view is not None:
            self.metrics.cache_hits.inc()
            self.metrics.cache_hit_bytes.inc(end - start)
        return view

    def _local(self, bid: bytes, start: int, out: memoryview) -> bool:
        """Fill ``out`` from a block buffer, an admitted cache entry or the in-memory LRU;
        False if none has the block. The entry is read only if it is in the page cache (the
        event loop must not wait for the disk): ``BlockingIOError`` otherwise."""
        if self.blocks.copy_into(bid, start, out) or self.cache.read_into(bid, start, out, nowait=True):
            return True
        recent = self._recent.get(bid)
        if recent is None:
            return False
        self._recent.move_to_end(bid)
        out[:] = memoryview(recent)[start : start + len(out)]
        return True

    async def ensure(self, bid: bytes, length: int, priority: Priority, *, page_in: bool = True) -> bool:
        """Make the block readable locally (readahead, prefetch, warmup). True if this call
        downloaded the block or read and hashed its entry; False if the block was local
        already, its entry's seal admitted it, or another caller was loading it. A block
        found on this node is brought into memory ahead of its reader (``page_in``), unless
        ``page_in`` is off (its reader is far away yet: it is only admitted)."""
        if bid in self.blocks or bid in self._recent:
            return False
        if self.cache.is_verified(bid):
            if page_in:
                await self.page_in(bid, length)
            return False
        someone_else = bid in self._inflight
        staging = bool(self.blocks.capacity)
        data, how = await self._obtain(bid, length, priority, page_in=page_in and not staging)
        if how is How.ADMITTED and staging and page_in:
            await self.page_in(bid, length)
        elif how is How.HASHED and data is not None and staging and page_in:
            await self._stage(bid, length, data)  # read whole to be hashed: keep it rather than read it again
        return not someone_else and how is not How.ADMITTED

    async def page_in(self, bid: bytes, length: int) -> None:
        """Bring a verified entry into memory before its reader gets there: whole into a
        free block buffer, read around the page cache (readers then copy from the buffer,
        and the entry costs no page-cache copy); else have the kernel page it in."""
        if bid in self.blocks:
            return
        if self.blocks.capacity and await self._stage(bid, length):
            return
        await trio.to_thread.run_sync(self.cache.advise, bid, length, limiter=self._disk)

    def _take_buffer(self, length: int) -> mmap.mmap | None:
        """A block buffer for ``length`` bytes (whole pages: an aligned read fits), or None
        if none is free or memory for one cannot be had."""
        try:
            return self.blocks.take(length)
        except OSError as exc:
            log.warning("no memory for a block buffer (%s); reading through the page cache", exc.strerror)
            return None

    async def _stage(self, bid: bytes, length: int, data: bytes | bytearray | None = None) -> bool:
        """Read the verified entry whole into a block buffer (or copy its verified bytes
        ``data`` there) and hold it; False if no buffer is free or the entry cannot be read
        (then it is no longer verified)."""
        if (staging := self._staging.get(bid)) is not None:
            await staging.wait()
            return bid in self.blocks
        buffer = self._take_buffer(length)
        if buffer is None:
            return False
        done = self._staging[bid] = trio.Event()
        read = False
        try:
            if data is None:
                read = await trio.to_thread.run_sync(self._read_whole_into, bid, length, buffer, limiter=self._disk)
            else:
                await trio.to_thread.run_sync(_copy_into, buffer, data, limiter=self._disk)
                read = True
        finally:
            del self._staging[bid]
            if read:
                self.blocks.hold(bid, buffer, length)
            else:
                self.blocks.give_back(buffer)
            done.set()
        return read

    def _read_whole_into(self, bid: bytes, length: int, buffer: mmap.mmap) -> bool:
        with memoryview(buffer) as view:
            return self.cache.read_whole_into(bid, length, view)

    async def warm(self, bid: bytes, length: int) -> bool:
        """Put the block in the node cache (warmup, at prefetch priority); True if this call
        downloaded it."""
        if self.cache.is_verified(bid):
            return False
        _data, how = await self._obtain(bid, length, Priority.PREFETCH, direct=True)
        return how is How.DOWNLOADED

    async def _obtain(self, bid: bytes, length: int, priority: Priority, *, in_memory: bool = False,
                      direct: bool = False, page_in: bool = True) -> tuple[bytes | bytearray | None, How]:
        """One load per block at a time: (the verified plain bytes if the load has them in
        memory, how it was loaded). Without bytes, read the block from the cache.
        ``in_memory``: download it into memory whatever the cache holds. ``direct``: nobody
        here will read the block soon (a warmup), so a download is written to the cache
        around the page cache. ``page_in`` off: an entry admitted by its seal is not paged
        in (the caller reads it whole itself)."""
        while (pending := self._inflight.get(bid)) is not None:
            if pending.ticket is not None:
                PrioritySlots.raise_priority(pending.ticket, priority)
            await pending.done.wait()
            if pending.cancelled:
                continue  # its owner was cancelled: load it ourselves
            if pending.error is not None:
                raise BlockUnavailable(str(pending.error)) from pending.error
            return pending.data, pending.how
        pending = self._inflight[bid] = _Pending()
        try:
            found = False
            if self.cache.indexed(bid) and not in_memory:  # an entry this process knows of: admit or hash it
                found, pending.data = await trio.to_thread.run_sync(self._check_entry, bid, length, page_in,
                                                                    limiter=self._disk)
                pending.how = How.ADMITTED if pending.data is None else How.HASHED
            if not found:
                pending.data, pending.how = await self._load(bid, length, priority, pending, in_memory, direct,
                                                             page_in)
            return pending.data, pending.how
        except trio.Cancelled:
            pending.cancelled = True
            raise
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            del self._inflight[bid]
            pending.done.set()

    def _check_entry(self, bid: bytes, length: int, page_in: bool = True) -> tuple[bool, bytes | None]:
        """(whether an intact entry is on disk, its bytes if checking it meant reading it)."""
        if self.cache.admit(bid, length, page_in=page_in):  # paging the entry in, as a whole read would
            return True, None
        data = self.cache.verify(bid, length)
        return data is not None, data

    async def _load(self, bid: bytes, length: int, priority: Priority, pending: _Pending,
                    in_memory: bool, direct: bool, page_in: bool) -> tuple[bytes | bytearray | None, How]:
        """Load a block from the disk entry another process just planted, or download it,
        in a download slot. Retries temporary failures; while another process holds the
        block's download lock, tries again every 20 ms (holding a slot only for each try),
        up to ``OTHER_DOWNLOADER_PATIENCE``."""
        give_up = trio.current_time() + OTHER_DOWNLOADER_PATIENCE
        claim = True
        while True:
            pending.ticket = self.slots.ticket(pending.ticket.priority if pending.ticket else priority)
            await self.slots.acquire(pending.ticket)
            block: mmap.mmap | None = None
            buffer: memoryview | None = None
            try:
                if self.blocks.capacity and not (direct or in_memory):
                    block = self._take_buffer(length)
                # Around the page cache unless a reader waits for the block and no block buffer
                # holds it: a block fetched ahead is read into a block buffer when its reader
                # comes near (``page_in``), with no copy through the page cache either way.
                around = direct or block is not None or (
                    bool(self.blocks.capacity) and pending.ticket.priority != Priority.DEMAND)
                buffer = self._buffers.pop() if self._buffers else memoryview(aligned_buffer(PIECE))
                loaded = await trio.to_thread.run_sync(self._load_blocking, bid, length, buffer, block, claim,
                                                       in_memory, around, page_in, limiter=self.store.limiter)
            except _Busy:
                if trio.current_time() > give_up:
                    log.warning("block %s: another process has been downloading it for %.0f s; fetching it too",
                                bid.hex()[:16], OTHER_DOWNLOADER_PATIENCE)
                    claim = False
                delay = 0.02
            except ObjectNotFound as exc:
                raise BlockUnavailable(f"block {bid.hex()} is missing from {self.store.store.url}") from exc
            except StoreError as exc:  # already retried by the store's retry policy
                raise BlockUnavailable(f"block {bid.hex()}: {exc}") from exc
            else:
                if block is not None and loaded.how is How.DOWNLOADED:
                    self.blocks.hold(bid, block, length)
                    block = None
                if loaded.how is How.DOWNLOADED:
                    self.downloads += 1
                    self.cache_declined = loaded.declined
                    if loaded.data is not None:
                        self._recent[bid] = loaded.data
                        if len(self._recent) > self._recent_max:
                            self._recent.popitem(last=False)
                return loaded.data, loaded.how
            finally:
                if buffer is not None:
                    self._buffers.append(buffer)
                if block is not None:
                    self.blocks.give_back(block)
                self.slots.release()
            await trio.sleep(delay)

    def _load_blocking(self, bid: bytes, length: int, buffer: memoryview, block: mmap.mmap | None, claim: bool,
                       in_memory: bool, around: bool, page_in: bool = True) -> _Loaded:
        """One attempt, in a worker thread: under the block's node-wide download lock (unless
        ``claim`` is off), use an intact entry another process planted, or download the
        block into a new cache entry (written around the page cache with ``around``), and
        into ``block`` if one is lent (readers copy from there); into memory if the cache
        declines it and there is no ``block`` (or with ``in_memory``, at once). Raises
        ``_Busy`` if another process holds the lock, or the store's or the decoder's error."""
        if in_memory:
            return _Loaded(self._download(bid, length, buffer, None).memory, How.DOWNLOADED)
        token = self.cache.try_claim(bid) if claim else NO_LOCK
        if token is None:
            raise _Busy
        try:
            if self.cache.contains(bid):  # planted by another process, perhaps just now
                found, data = self._check_entry(bid, length, page_in)
                if found:
                    return _Loaded(data, How.ADMITTED if data is None else How.HASHED)
            entry = self.cache.open_entry(bid, length, direct=around)
            if entry is not None:
                sink = self._download(bid, length, buffer, entry, block)
                if not sink.spilled and self.cache.commit(entry):
                    return _Loaded(None, How.DOWNLOADED)
                if sink.spilled:
                    self.cache.abandon(entry, sink.disk_error)
                if block is not None:  # verified, and whole in memory: no need to fetch it again
                    return _Loaded(None, How.DOWNLOADED, declined=True)
            sink = self._download(bid, length, buffer, None, block)
            return _Loaded(sink.memory, How.DOWNLOADED, declined=True)
        finally:
            self.cache.release_claim(bid, token)

    def _download(self, bid: bytes, length: int, buffer: memoryview, entry: NewEntry | None,
                  block: mmap.mmap | None = None) -> _BlockSink:
        """Stream the block's object into ``entry`` and ``block`` (or memory) and verify it;
        the entry is abandoned if that fails."""
        with memoryview(block) if block is not None else contextlib.nullcontext() as view:
            sink = _BlockSink(self.codec, bid, length, entry, view)
            try:
                self.store.store.get_into(object_key(bid), sink, buffer)
                if not sink.finished:  # a store without the retry policy (unit tests)
                    sink.finish()
            except BaseException:
                if entry is not None:
                    self.cache.abandon(entry)
                raise
            finally:
                sink.block = None
        return sink


def _copy_into(buffer: mmap.mmap, data: bytes | bytearray) -> None:
    with memoryview(buffer) as view:
        view[: len(data)] = data

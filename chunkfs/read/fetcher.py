"""BlockFetcher: verified block bytes for readers, from memory, the node cache or the object store.

Layer: ``read/``. It sees the store only through ``AsyncStore`` (whose ``get_into`` carries the
store's one retry policy), the cache only through ``BlockCache``, and nothing of FUSE.

The read path is a straight line (``read_into``):

1. In memory? A block buffer holding the block, or a declined block kept (``BlockBuffers``).
2. On the node? A cache entry this process has verified, or the block's place in a file image
   this process knows (``BlockCache.note_image``): read from the page cache on the event
   loop, or in a worker thread when that would wait for the disk.
3. Else one load per block at a time (``SingleFlight``): an entry on the node this process
   has not checked yet is admitted by its seal or hashed; otherwise the block is downloaded
   (``BlockDownload``: GET, verify, write to the cache and into a block buffer for its
   readers) in one of ``downloads`` slots. Then back to 1 and 2. Should the cache lose the
   block in between (its entry vanished or cannot be read back), it is loaded once more,
   into memory.

Fetching ahead (``ensure``) and warming (``warm``) run step 3 only. Where a load puts the
bytes follows from why it is wanted (``Want``), decided in one place (``_placement``):

- ``READ``, a reader waits: into a free block buffer (readers copy from it; the entry is
  written from it around the page cache), else through the page cache into the entry, where
  the reader finds it;
- ``NEAR``/``FAR``, fetched ahead of a reader within/beyond ``stage_ahead`` blocks: into a
  free block buffer, else straight to the entry around the page cache; an entry found on the
  node is read whole into a block buffer (``NEAR``), or only admitted (``FAR``) and read in
  when its reader comes near (``bring_near``, paced by ``FileReader``);
- ``WARM``, nobody here reads it (warmup): straight to the entry, around the page cache;
- ``IMAGE``, it goes into a file image being filled (``fill_image_part``): through the page
  cache into the image only, where the kernel reads it for a passed-through open
  (``BlockDownload._into_image``: no entry of its own, but for peers).

The page cache costs a copy into pages the kernel must allocate; block buffers are reused.

Invariants:

- Single-flight in this process; across processes sharing the cache directory the download
  holds the block's node-wide lock, and a process that finds it taken waits (up to
  ``OTHER_DOWNLOADER_PATIENCE``) for the entry to appear instead of downloading too.
- No byte is returned or published unless it was verified against its id: store bytes by
  ``BlockSink``, cache entries by ``BlockCache``'s checks.
- One retry policy, in the store: what still fails is ``BlockUnavailable``, naming the block
  and the cause. A cache that cannot store a block does not fail the read (``Fetched.declined``
  says so, so a file's prefetch can stop).
- Memory: ``downloads`` piece buffers, the block buffers, and ``recent_blocks`` declined
  blocks: bounded whatever is read. Demand reads go ahead of readahead, readahead ahead of
  prefetch; a reader joining a queued load raises it to demand priority.
"""

from __future__ import annotations

import enum
import functools
import logging
import mmap
import threading
import time
from typing import NamedTuple

import trio

from chunkfs.blocks import BlockCodec
from chunkfs.cache.block_cache import BlockCache
from chunkfs.cache.disk import aligned_buffer
from chunkfs.metrics import Metrics
from chunkfs.read import download
from chunkfs.read.buffers import BlockBuffers
from chunkfs.read.download import BlockDownload, Busy, Downloaded, ImagePart, PeerSource, check_entry
from chunkfs.read.flight import Flight, FlightFailed, SingleFlight
from chunkfs.read.slots import Priority, PrioritySlots, Ticket
from chunkfs.store.aio import AsyncStore
from chunkfs.store.base import ObjectNotFound, StoreError

log = logging.getLogger(__name__)

#: seconds to wait for another process's download of a block before fetching it too
OTHER_DOWNLOADER_PATIENCE = 60.0
#: seconds between looks at a block another process is downloading
BUSY_RETRY = 0.02
#: blocks loaded from the store at once to answer peers (``load_for_peer``)
PEER_LOADS = 8


class BlockUnavailable(Exception):
    """A block could not be fetched intact (missing, corrupt after retries, store failing)."""


class Want(enum.Enum):
    """Why a block is loaded; decides where its bytes go (``BlockFetcher._placement``)."""

    READ = "read"  # a reader waits for it
    NEAR = "near"  # fetched ahead, its reader is close
    FAR = "far"  # fetched ahead, its reader is far yet
    WARM = "warm"  # warmup: nobody here reads it
    IMAGE = "image"  # into a file image being filled
    MEMORY = "memory"  # the cache just failed a reader: into memory, whatever the cache holds


class Fetched(NamedTuple):
    """What fetching a block ahead (``ensure``) did."""

    worked: bool = False  # this call downloaded the block or hashed its entry
    declined: bool = False  # the node cache could not store it


class _Placement(NamedTuple):
    buffer: bool  # download into a block buffer if one is free
    around: bool  # write the cache entry around the page cache
    page_in: bool  # page in an entry admitted by its seal


class Source(enum.Enum):
    """Where a warmed block came from (``BlockFetcher.warm``)."""

    NODE = "node"  # already on the node: nothing downloaded
    STORE = "store"
    PEER = "peer"


class _Load(NamedTuple):
    """The outcome of one load, shared with every caller that waited for it."""

    data: bytes | bytearray | None  # the verified bytes, when the load has them in hand
    downloaded: bool  # fetched from the store or a peer (else: found on the node)
    admitted: bool = False  # found on the node and admitted by its seal (not hashed)
    declined: bool = False  # the cache did not store it
    from_peer: bool = False  # downloaded from a peer
    image: ImagePart | None = None  # the image part this load wrote the block to


class BlockFetcher:
    def __init__(self, store: AsyncStore, codec: BlockCodec, cache: BlockCache, *, downloads: int = 16,
                 recent_blocks: int = 8, disk_threads: int = 8, block_buffers: int = 0,
                 metrics: Metrics | None = None, peers: PeerSource | None = None) -> None:
        """``block_buffers``: whole-block buffers lent to downloads (0: readers' downloads
        go through the page cache). ``recent_blocks``: blocks kept in memory when the cache
        cannot store them."""
        self.store = store
        self.codec = codec
        self.cache = cache
        self.metrics = metrics or cache.metrics
        self.slots = PrioritySlots(downloads)
        self.memory = BlockBuffers(block_buffers, recent_blocks)
        self._downloader = BlockDownload(store.store.get_into, codec, cache, peers)
        self._peer_loads = threading.BoundedSemaphore(PEER_LOADS)
        self._disk = trio.CapacityLimiter(disk_threads)
        self._flights: SingleFlight[bytes, _Load] = SingleFlight()
        self._pieces: list[memoryview] = []  # ``download.PIECE``-sized, page-aligned: one per running download
        self._staging: dict[bytes, trio.Event] = {}  # blocks being read whole into a block buffer
        # how many blocks ahead of its reader a block on this node is worth reading into a
        # block buffer: as many as half the buffers hold (the other half holds what readers
        # are on, and downloads); None without block buffers
        self.stage_ahead = max(1, block_buffers // 2) if block_buffers else None
        self.downloads = 0  # blocks fetched from the store (for tests and stats)

    # -- where a block is --------------------------------------------------------------------
    def is_local(self, bid: bytes) -> bool:
        """Readable now without a download or a disk verification."""
        return bid in self.memory or self._verified_on_node(bid)

    def _verified_on_node(self, bid: bytes) -> bool:
        """In a verified entry, or in a file image this process knows."""
        return self.cache.is_verified(bid) or self.cache.in_image(bid)

    def on_node(self, bid: bytes) -> bool:
        """In this node's cache as far as this process knows (verified or not): fetching it
        ahead means reading the disk, not the store."""
        return self._verified_on_node(bid) or self.cache.indexed(bid)

    def on_disk_only(self, bid: bytes) -> bool:
        """Verified on the node but not in memory: its reader would wait for the disk unless
        it is brought near first."""
        return self._verified_on_node(bid) and not self.memory.in_buffer(bid)

    # -- reads -------------------------------------------------------------------------------
    async def read(self, bid: bytes, length: int, start: int, end: int) -> bytearray:
        """Bytes [start, end) of block ``bid`` (plain length ``length``), in a new buffer."""
        out = bytearray(end - start)
        await self.read_into(bid, length, start, memoryview(out))
        return out

    async def read_into(self, bid: bytes, length: int, start: int, out: memoryview) -> None:
        """Fill ``out`` with block ``bid``'s bytes from ``start`` (a FUSE reply buffer)."""
        self.cache.pin(bid)
        try:
            downloaded = await self._read_into(bid, length, start, out)
        finally:
            self.cache.unpin(bid)
        if downloaded:
            self.metrics.cache_misses.inc()
            self.metrics.cache_miss_bytes.inc(len(out))
        else:
            self.metrics.cache_hits.inc()
            self.metrics.cache_hit_bytes.inc(len(out))

    async def _read_into(self, bid: bytes, length: int, start: int, out: memoryview) -> bool:
        """The straight line; whether a download was needed."""
        if (staging := self._staging.get(bid)) is not None:
            await staging.wait()  # being read whole into a block buffer: copy from there
        downloaded = False
        for want in (Want.READ, Want.MEMORY):
            if await self._copy_local(bid, start, out):
                return downloaded
            load = await self._load(bid, length, Priority.DEMAND, want)
            downloaded = downloaded or load.downloaded
            if load.data is not None:
                out[:] = memoryview(load.data)[start : start + len(out)]
                return downloaded
        if await self._copy_local(bid, start, out):
            return downloaded
        raise BlockUnavailable(f"block {bid.hex()}: its cache entry keeps vanishing")

    async def _copy_local(self, bid: bytes, start: int, out: memoryview) -> bool:
        """Steps 1 and 2: fill ``out`` from memory or a verified entry; False if neither has it."""
        if self.memory.copy_into(bid, start, out):
            return True
        try:
            return self.cache.read_into(bid, start, out, nowait=True)
        except BlockingIOError:  # not in the page cache: wait for the disk in a thread
            return await trio.to_thread.run_sync(self.cache.read_into, bid, start, out, limiter=self._disk)

    def held_view(self, bid: bytes, start: int, end: int) -> memoryview | None:
        """Bytes [start, end) of a block held in memory, without a copy (for a FUSE reply made
        before the caller's next ``await``); None if it is not held."""
        view = self.memory.view(bid, start, end)
        if view is not None:
            self.metrics.cache_hits.inc()
            self.metrics.cache_hit_bytes.inc(end - start)
        return view

    # -- fetching ahead and warming ----------------------------------------------------------
    async def ensure(self, bid: bytes, length: int, priority: Priority, *, near: bool = True) -> Fetched:
        """Make the block local ahead of its reader (readahead, prefetch). ``near``: its reader
        is close, so a block found on the node is brought into memory now; else it is only
        admitted, and ``bring_near`` reads it in later."""
        if bid in self.memory:
            return Fetched()
        if self._verified_on_node(bid):
            if near:
                await self.bring_near(bid, length)
            return Fetched()
        joined = bid in self._flights
        load = await self._load(bid, length, priority, Want.NEAR if near else Want.FAR)
        if near and self.memory.capacity and not load.downloaded:
            if load.data is not None:
                await self._stage(bid, length, load.data)  # read whole to be hashed: keep it
            else:
                await self.bring_near(bid, length)
        return Fetched(worked=not joined and not load.admitted, declined=load.declined)

    async def bring_near(self, bid: bytes, length: int) -> None:
        """Bring a verified entry into memory before its reader gets there: whole into a free
        block buffer, read around the page cache (readers then copy from the buffer, and the
        entry costs no page-cache copy); else have the kernel page it in."""
        if self.memory.in_buffer(bid):
            return
        if self.memory.capacity and await self._stage(bid, length):
            return
        await trio.to_thread.run_sync(self.cache.advise, bid, length, limiter=self._disk)

    async def warm(self, bid: bytes, length: int) -> Source:
        """Put the block in the node cache (warmup, at prefetch priority); where this call
        got it from (``NODE``: it was there, or another load of it brought it)."""
        if self._verified_on_node(bid):
            return Source.NODE
        load = await self._load(bid, length, Priority.PREFETCH, Want.WARM)
        if not load.downloaded:
            return Source.NODE
        return Source.PEER if load.from_peer else Source.STORE

    async def fill_image_part(self, bid: bytes, length: int, part: ImagePart, priority: Priority) -> Source:
        """Put block ``bid``'s verified bytes at ``part`` of a file image being filled: from
        memory, copied from its entry or another image on the node (in the kernel), or
        written there by its download; where it came from. ``BlockUnavailable`` if it cannot
        be had, ``OSError`` if the image cannot be written."""
        for _ in range(3):
            if await self._copy_local_to_image(bid, length, part):
                return Source.NODE
            load = await self._load(bid, length, priority, Want.IMAGE, part)
            source = Source.NODE if not load.downloaded else Source.PEER if load.from_peer else Source.STORE
            if load.image == part:
                return source
            if load.data is not None:
                await trio.to_thread.run_sync(part.entry.write_at, load.data, part.offset, limiter=self._disk)
                return source
        raise BlockUnavailable(f"block {bid.hex()}: its cache entry keeps vanishing")

    async def _copy_local_to_image(self, bid: bytes, length: int, part: ImagePart) -> bool:
        view = self.memory.view(bid, 0, length)
        if view is not None:  # written here, before any await (the buffer may be reused after)
            with view:
                part.entry.write_at(view, part.offset)  # into the page cache: a few ms per block at most
            return True
        source = self.cache.block_source(bid)
        if source is None:
            return False
        key, offset, _ = source
        self.cache.pin(bid)
        try:
            await trio.to_thread.run_sync(part.entry.copy_at, self.cache.dir_for(key).path(key), length, part.offset,
                                          offset, limiter=self._disk)
        except FileNotFoundError:  # evicted meanwhile (pinned entries are not, but another process may)
            self.cache.drop(key)
            return False
        finally:
            self.cache.unpin(bid)
        return True

    def load_for_peer(self, bid: bytes, length: int) -> bool:
        """Blocking, from a peer server thread: put a block this node owns in the cache for a
        peer that asked (from the store: the caller sets ``ORIGIN_ONLY``); whether it is there.

        Outside the download slots on purpose: those may all be held by this node's own
        downloads waiting on other owners, which may be waiting on this one; a load here only
        waits for the store. One download per block on the node still holds: the cache's
        download lock makes a second asker (or this node's own download) wait for the entry."""
        with self._peer_loads:
            # the download pieces' pool (list pop/append are atomic: shared with the trio thread)
            piece = self._pieces.pop() if self._pieces else memoryview(aligned_buffer(download.PIECE))
            try:
                return self._load_for_peer(bid, length, piece)
            finally:
                self._pieces.append(piece)

    def _load_for_peer(self, bid: bytes, length: int, piece: memoryview) -> bool:
        deadline = time.monotonic() + OTHER_DOWNLOADER_PATIENCE
        while not self.cache.is_verified(bid):
            try:
                got = self._downloader.download(bid, length, piece, around=True, page_in=False)
            except Busy:  # someone on this node is downloading it: wait for the entry
                if time.monotonic() > deadline:
                    return False
                time.sleep(BUSY_RETRY)
                continue
            except StoreError as exc:
                log.info("block %s for a peer: %s", bid.hex()[:16], exc)
                return False
            if not got.planted:
                self.metrics.origin_blocks.inc()
                self.metrics.origin_bytes.inc(length)
            return not got.declined or self.cache.is_verified(bid)
        return True

    # -- step 3: one load per block ----------------------------------------------------------
    async def _load(self, bid: bytes, length: int, priority: Priority, want: Want,
                    image: ImagePart | None = None) -> _Load:
        def join(flight: Flight[_Load]) -> None:
            if isinstance(flight.note, Ticket):
                PrioritySlots.raise_priority(flight.note, priority)

        async def load(flight: Flight[_Load]) -> _Load:
            if want is not Want.MEMORY and self._verified_on_node(bid):  # came meanwhile, or in an image
                return _Load(None, downloaded=False, admitted=True)
            if want is not Want.MEMORY and self.cache.indexed(bid):  # an entry this process knows of
                found, data = await trio.to_thread.run_sync(check_entry, self.cache, bid, length,
                                                            self._placement(want).page_in, limiter=self._disk)
                if found:
                    return _Load(data, downloaded=False, admitted=data is None)
            return await self._download(bid, length, priority, want, flight, image)

        try:
            load_result, _shared = await self._flights.run(bid, load, join)
        except FlightFailed as exc:
            raise BlockUnavailable(str(exc)) from exc.__cause__
        return load_result

    def _placement(self, want: Want) -> _Placement:
        buffers = bool(self.memory.capacity)
        if want is Want.READ:
            return _Placement(buffer=True, around=False, page_in=True)  # around once a buffer is lent
        if want is Want.NEAR:
            return _Placement(buffer=True, around=buffers, page_in=not buffers)  # staged instead
        if want is Want.FAR:  # a free block buffer still takes it (measured: sending it straight to
            # the entry to keep buffers for nearer blocks was slower and no cheaper, A/B in issue 22)
            return _Placement(buffer=True, around=buffers, page_in=False)
        return _Placement(buffer=False, around=True, page_in=False)  # WARM, IMAGE (MEMORY: no cache at all)

    async def _download(self, bid: bytes, length: int, priority: Priority, want: Want,
                        flight: Flight[_Load], image: ImagePart | None = None) -> _Load:
        """Download the block in a download slot (or admit the entry another process just
        planted). While another process holds the block's download lock, try again every
        ``BUSY_RETRY`` seconds, holding a slot only for each try, up to
        ``OTHER_DOWNLOADER_PATIENCE``."""
        give_up = trio.current_time() + OTHER_DOWNLOADER_PATIENCE
        claim = True
        while True:
            ticket = flight.note = self.slots.ticket(flight.note.priority if flight.note else priority)
            await self.slots.acquire(ticket)
            if ticket.priority is Priority.DEMAND and want in (Want.NEAR, Want.FAR):
                want = Want.READ  # a reader joined while it was queued
            place = self._placement(want)
            block = self._take_buffer(length) if place.buffer and self.memory.capacity else None
            piece = self._pieces.pop() if self._pieces else memoryview(aligned_buffer(download.PIECE))
            try:
                attempt = functools.partial(self._downloader.download, bid, length, piece, block=block,
                                            around=place.around or block is not None, claim=claim,
                                            into_memory=want is Want.MEMORY, page_in=place.page_in,
                                            image=image)
                got: Downloaded = await trio.to_thread.run_sync(attempt, limiter=self.store.limiter)
            except Busy:
                if trio.current_time() > give_up:
                    log.warning("block %s: another process has been downloading it for %.0f s; fetching it too",
                                bid.hex()[:16], OTHER_DOWNLOADER_PATIENCE)
                    claim = False
            except ObjectNotFound as exc:
                raise BlockUnavailable(f"block {bid.hex()} is missing from {self.store.store.url}") from exc
            except StoreError as exc:  # already retried by the store's retry policy
                raise BlockUnavailable(f"block {bid.hex()}: {exc}") from exc
            else:
                if got.planted:
                    return _Load(got.data, downloaded=False, admitted=got.data is None)
                self.downloads += 1
                if not got.from_peer:
                    self.metrics.origin_blocks.inc()
                    self.metrics.origin_bytes.inc(length)
                if block is not None:
                    self.memory.hold(bid, block, length)
                    block = None
                elif got.data is not None:
                    self.memory.keep(bid, got.data)
                return _Load(got.data, downloaded=True, declined=got.declined, from_peer=got.from_peer,
                             image=image if got.imaged else None)
            finally:
                self._pieces.append(piece)
                if block is not None:
                    self.memory.give_back(block)
                self.slots.release()
            await trio.sleep(BUSY_RETRY)

    # -- block buffers -----------------------------------------------------------------------
    def _take_buffer(self, length: int) -> mmap.mmap | None:
        """A block buffer for ``length`` bytes (whole pages: an aligned read fits), or None if
        none is free or memory for one cannot be had."""
        try:
            return self.memory.take(length)
        except OSError as exc:
            log.warning("no memory for a block buffer (%s); reading through the page cache", exc.strerror)
            return None

    async def _stage(self, bid: bytes, length: int, data: bytes | bytearray | None = None) -> bool:
        """Read the verified entry whole into a block buffer (or copy its verified bytes
        ``data`` there) and hold it; False if no buffer is free or the entry cannot be read
        (then it is no longer verified)."""
        if (staging := self._staging.get(bid)) is not None:
            await staging.wait()
            return self.memory.in_buffer(bid)
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
                self.memory.hold(bid, buffer, length)
            else:
                self.memory.give_back(buffer)
            done.set()
        return read

    def _read_whole_into(self, bid: bytes, length: int, buffer: mmap.mmap) -> bool:
        with memoryview(buffer) as view:
            return self.cache.read_whole_into(bid, length, view)


def _copy_into(buffer: mmap.mmap, data: bytes | bytearray) -> None:
    with memoryview(buffer) as view:
        view[: len(data)] = data

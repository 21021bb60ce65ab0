"""BlockDownload: one block from the object store into the node cache, verified on the way.

Layer: ``read/``. Blocking code for a worker thread: it sees the store only as a
``get_into(key, sink, buffer)`` callable (``ObjectStore.get_into``, behind the store's one
retry policy), the cache as ``BlockCache`` and the bytes as ``BlockCodec``; its tests use a
toy ``get_into``.

Invariants:

- The object is read in ``PIECE``-sized pieces into a page-aligned piece buffer, or, for a
  plain (uncompressed) block with a block buffer lent, straight into that block buffer
  (``BlockSink.lend``: no copy afterwards); each piece is decoded and hashed while it is
  still in the CPU cache (``BlockSink``), and written on to its destinations. Nothing is
  published (cache entry committed, bytes returned) unless the whole block matched its id:
  a body that does not is ``BodyRejected``, which the retry policy treats as a temporary
  failure; a store without that policy (unit tests) gets the same check here.
- Under the block's node-wide download lock (``BlockCache.try_claim``, unless ``claim`` is
  off) an intact entry another process just planted is used instead of downloading
  (``Downloaded.planted``); while another process holds the lock, ``Busy`` is raised and
  the caller tries again later.
- Peers first: with a ``PeerSource``, the block is asked of the peer that owns it, into the
  same sink and through the same check; only if no peer delivers it is the store asked.
- Destinations: the block's new cache entry (written around the page cache with ``around``)
  and the ``block`` buffer when one is lent (readers copy from there, and the entry is
  written from it, aligned). A cache that declines the block or fails mid-write does not
  fail the download: the bytes are then in ``block``, or read again into memory
  (``Downloaded.data``), and ``declined`` says so.
- With an ``ImagePart``, the block goes to its place in a file image being filled
  (``cache/images.py``) instead, through the page cache, piece by piece as the bytes arrive
  (an image is published only once every part of it verified), and gets no entry of its own
  unless this node fetched it from the store while it has peers (``_into_image``).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from collections.abc import Callable
from typing import NamedTuple, Protocol

from chunkfs.blocks import BlockCodec, BlockCorrupt, object_key
from chunkfs.cache.block_cache import NO_LOCK, BlockCache
from chunkfs.cache.disk import DIRECT_ALIGN, NewEntry
from chunkfs.store.base import BodyRejected, Sink

#: bytes read from the store at a time: small enough to stay in the CPU cache from the socket
#: read through the hash to the cache write
PIECE = 1 << 20

GetInto = Callable[[str, Sink, memoryview], int]


class ImagePart(NamedTuple):
    """Where a block goes in a file image being filled: ``offset`` of ``entry``."""

    entry: NewEntry
    offset: int


class PeerSource(Protocol):
    """Other nodes that may hold a block (``chunkfs.peer.client.PeerClient``)."""

    def fetch(self, bid: bytes, length: int, sink: Sink, buffer: memoryview) -> bool:
        """Deliver the whole block to ``sink`` and have it verified (True), or False: use
        the store. Never raises for a peer's failure."""


class Busy(Exception):
    """Another process holds the block's download lock."""


class Downloaded(NamedTuple):
    """What one download attempt made of a block."""

    data: bytes | bytearray | None = None  # its bytes, when they are only in this memory
    declined: bool = False  # the cache did not store it (the bytes are in ``block`` or ``data``)
    planted: bool = False  # not downloaded: another process's entry was admitted (``data``: hashed)
    from_peer: bool = False  # downloaded from a peer, not the store
    imaged: bool = False  # written whole to the ``ImagePart`` given


class BlockSink:
    """Receives one download (``Sink``): decodes and verifies it on the way, and writes the
    plain bytes to the block's new cache entry and, when a block buffer is lent, into that
    buffer (from which the entry is written, aligned, around the page cache); with neither,
    into a new ``memory`` buffer. A cache write that fails turns the sink ``spilled``: without
    a block buffer the bytes before it are gone, so the block must be read again."""

    __slots__ = ("bid", "block", "codec", "decoder", "disk_error", "entry", "filled", "finished", "flushed",
                 "from_peer", "image", "image_error", "length", "memory", "plain")

    def __init__(self, codec: BlockCodec, bid: bytes, length: int, entry: NewEntry | None,
                 block: memoryview | None = None, image: ImagePart | None = None) -> None:
        self.codec = codec
        self.bid = bid
        self.length = length
        self.entry = entry
        self.block = block
        self.filled = self.flushed = 0  # bytes in ``block``; of those, bytes written to ``entry``
        self.image = image
        self.image_error: str | None = None
        self.plain = 0  # plain bytes received so far (where the next goes in the image)
        held = entry is not None or block is not None or image is not None
        self.memory: bytearray | None = None if held else bytearray()
        self.decoder = codec.decoder(bid, length)
        self.disk_error: str | None = None
        self.finished = False
        self.from_peer = False

    def restart(self) -> None:
        self.finished = False
        self.decoder = self.codec.decoder(self.bid, self.length)
        self.filled = self.flushed = self.plain = 0
        if self.memory is not None:
            self.memory = bytearray()
        if self.entry is not None and self.disk_error is None and self.entry.size:
            try:
                self.entry.rewind()
            except OSError as exc:
                self.disk_error = exc.strerror or str(exc)

    def lend(self, size: int) -> memoryview | None:
        """The block buffer from the bytes filled so far (up to ``size``), when the stored
        bytes are the plain ones: the store receives straight into the block buffer and the
        piece costs no copy. None without a block buffer, for compressed blocks, or once the
        buffer is full (a longer body is then refused by the decoder)."""
        if self.block is None or self.decoder.compressed:
            return None
        room = min(size, len(self.block) - self.filled)
        return self.block[self.filled : self.filled + room] if room > 0 else None

    def write(self, piece: memoryview) -> None:
        plain = self.decoder.feed(piece)
        if not plain:
            return
        if self.image is not None and self.image_error is None:
            try:
                self.image.entry.write_at(plain, self.image.offset + self.plain)
            except OSError as exc:
                self.image_error = exc.strerror or str(exc)
        self.plain += len(plain)
        if self.block is not None:
            end = self.filled + len(plain)
            into = self.block[self.filled : end]
            if not _same_memory(plain, into):  # (else received in place, through ``lend``)
                into[:] = plain
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

    @property
    def imaged(self) -> bool:
        """The whole verified block is in the image part given."""
        return self.image is not None and self.image_error is None and self.finished


def _same_memory(piece: bytes | memoryview, into: memoryview) -> bool:
    """``piece`` already is the memory of ``into`` (same start, same length), not a copy."""
    if not isinstance(piece, memoryview) or piece.readonly or len(piece) != len(into) or not len(piece):
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(piece)) == ctypes.addressof(ctypes.c_char.from_buffer(into))


class BlockDownload:
    """Downloads blocks of one volume into one node cache (``download``: blocking, thread-safe
    as long as each call has its own ``piece`` buffer)."""

    def __init__(self, get_into: GetInto, codec: BlockCodec, cache: BlockCache,
                 peers: PeerSource | None = None) -> None:
        self.get_into = get_into
        self.codec = codec
        self.cache = cache
        self.peers = peers

    def download(self, bid: bytes, length: int, piece: memoryview, *, block: mmap.mmap | None = None,
                 around: bool = False, claim: bool = True, into_memory: bool = False,
                 page_in: bool = True, image: ImagePart | None = None) -> Downloaded:
        """One attempt: see the module docstring. ``into_memory``: the cache is not used at
        all (it failed a reader just now). ``page_in``: a planted entry admitted by its seal
        is paged in (its reader comes soon). ``image``: write the block there instead (see
        ``_into_image``; not when a planted entry is found: the caller copies that). Raises
        ``Busy``, or the store's error."""
        if into_memory:
            sink = self._fetch(bid, length, piece, None)
            return Downloaded(sink.memory, declined=True, from_peer=sink.from_peer)
        token = self.cache.try_claim(bid) if claim else NO_LOCK
        if token is None:
            raise Busy
        try:
            if self.cache.contains(bid):  # planted by another process, perhaps just now
                found, data = check_entry(self.cache, bid, length, page_in)
                if found:
                    return Downloaded(data, planted=True)
            if image is not None:
                return self._into_image(bid, length, piece, image)
            entry = self.cache.open_entry(bid, length, direct=around)
            if entry is not None:
                sink = self._fetch(bid, length, piece, entry, block)
                if not sink.spilled and self.cache.commit(entry):
                    return Downloaded(from_peer=sink.from_peer)
                if sink.spilled:
                    self.cache.abandon(entry, sink.disk_error)
                if block is not None:  # verified, and whole in memory: no need to fetch it again
                    return Downloaded(declined=True, from_peer=sink.from_peer)
            sink = self._fetch(bid, length, piece, None, block)
            return Downloaded(sink.memory, declined=True, from_peer=sink.from_peer)
        finally:
            self.cache.release_claim(bid, token)

    def _into_image(self, bid: bytes, length: int, piece: memoryview, image: ImagePart) -> Downloaded:
        """Download the block into a file image being filled, with no cache entry of its own
        (the image holds it: writing it twice made cold loads 15% slower here), unless it
        comes from the store while this node has peers: then this node is the one that went
        to the origin for it, and keeps an entry to serve them."""
        sink = BlockSink(self.codec, bid, length, None, image=image)
        entry = None
        if self.peers is not None:
            if self.peers.fetch(bid, length, sink, piece):
                return Downloaded(from_peer=True, imaged=sink.imaged)
            entry = self.cache.open_entry(bid, length, direct=True)
            sink = BlockSink(self.codec, bid, length, entry, image=image)
        self._from_store(bid, sink, piece, entry)
        if entry is not None:
            if sink.spilled:
                self.cache.abandon(entry, sink.disk_error)
            else:
                self.cache.commit(entry)
        return Downloaded(imaged=sink.imaged)

    def _fetch(self, bid: bytes, length: int, piece: memoryview, entry: NewEntry | None,
               block: mmap.mmap | None = None) -> BlockSink:
        """Stream the block's object into ``entry`` and ``block`` (or memory), and verify it;
        the entry is abandoned if that fails."""
        with memoryview(block) if block is not None else contextlib.nullcontext() as view:
            sink = BlockSink(self.codec, bid, length, entry, view)
            try:
                if self.peers is not None and self.peers.fetch(bid, length, sink, piece):
                    sink.from_peer = True
                    return sink
                self._from_store(bid, sink, piece, entry)
            finally:
                sink.block = None
        return sink

    def _from_store(self, bid: bytes, sink: BlockSink, piece: memoryview, entry: NewEntry | None) -> None:
        """GET the block's object into ``sink`` and verify it; ``entry`` is abandoned if that fails."""
        try:
            self.get_into(object_key(bid), sink, piece)
            if not sink.finished:  # a store without the retry policy (unit tests)
                sink.finish()
        except BaseException:
            if entry is not None:
                self.cache.abandon(entry)
            raise


def check_entry(cache: BlockCache, bid: bytes, length: int, page_in: bool = True) -> tuple[bool, bytes | None]:
    """(whether an intact entry of ``bid`` is on disk, its bytes if checking it meant reading
    it whole): admitted by its seal (paged in with ``page_in``), else hashed."""
    if cache.admit(bid, length, page_in=page_in):
        return True, None
    data = cache.verify(bid, length)
    return data is not None, data

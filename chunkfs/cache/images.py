"""File images: a whole file's bytes as one node-cache entry, for FUSE passthrough.

The kernel can pass an open FUSE file through to one local backing file (Linux 6.9+), and
then reads it like a local file: no read reaches the daemon. Blocks live in one cache file
each, so a model file gets an image: one more entry of the same ``BlockCache``, counted in
``--cache-size``, evicted least recently used with the blocks, sealed and admitted like them
(``open_entry``/``commit``/``admit``). An image is made in one of two ways:

- ``build``: copied from the file's block entries once they are all on the node (after a
  load served by the daemon, or a warmup);
- ``open_fill``/``finish_fill``: filled block by block, out of order, by
  ``read/image_fill.py`` as the blocks are downloaded or copied from their entries (a cold
  open waits for that, then is passed through). Blocks downloaded for a fill get no entry
  of their own (but for the ones a node with peers fetched from the store, which it keeps
  to serve them): the image holds them, and a warmup counts a file with an image as cached
  (``cached_blocks``).

Invariants:

- An image's id is ``image_id(size, block ids)``: SHA-256 over a domain tag, the size and the
  ids, so it names exactly those bytes. No block id can equal it, short of a preimage of the
  volume's hash (a block's id is the hash of its own content).
- An image is made only from verified or sealed block entries, each pinned while it is
  copied, and from downloads that verified, and published (sealed, renamed into place)
  only once every block is in it whole.
- An image is used only when this process wrote it or its seal is intact (same boot, inode,
  size and mtime). One without a valid seal (after a reboot, or under ``--verify-cache
  full``, which trusts no seal) is never used: it is made again (filled from entries on the
  node, else downloaded) rather than hashed whole against its id (its id is that of its
  block-sized pieces' hashes, so it could be).
- Files with holes get no image (a hole has no entry to copy).
- Once an image is published, its file's blocks become the least recently used entries: when
  room is needed they go first, so the image does not double the space a model takes for
  longer than the cache has room for both.
- Every image this process publishes or finds usable is noted in the cache
  (``BlockCache.note_image``): its blocks are read from it by daemon-served reads (libfuse,
  or an open that could not be passed through), peers and other files' fills, instead of
  being downloaded again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from chunkfs.blocklist import HOLE, BlockList
from chunkfs.blocks import block_length
from chunkfs.cache.block_cache import BlockCache
from chunkfs.cache.disk import NewEntry

log = logging.getLogger(__name__)

_TAG = b"chunkfs file image 1\0"


def image_id(size: int, blocks: Iterable[bytes]) -> bytes | None:
    """The image id of a file of ``size`` bytes made of ``blocks`` (ids in file order); None
    if it has holes (told without listing a ``BlockList``'s slots: a sparse file may have
    billions)."""
    if isinstance(blocks, BlockList) and blocks.holes:
        return None
    ids = list(blocks)
    if HOLE in ids:
        return None
    digest = hashlib.sha256(_TAG)
    digest.update(size.to_bytes(8, "big"))
    for bid in ids:
        digest.update(bid)
    return digest.digest()


def usable(cache: BlockCache, key: bytes, size: int) -> bool:
    """Image ``key`` of ``size`` bytes is in ``cache`` and may be used: this process wrote or
    admitted it, or its seal is intact (blocking: a stat and an xattr read)."""
    return cache.is_verified(key) or cache.admit(key, size, page_in=False)


def cached_blocks(cache: BlockCache, block_size: int,
                  files: Iterable[tuple[int, Iterable[bytes]]]) -> tuple[set[bytes], dict[bytes, int]]:
    """Of these (size, block ids) files, (the blocks of those with a usable image, those
    images' ids -> sizes): what a warmup counts as on the node besides block entries. The
    images found are noted in ``cache`` (blocking)."""
    blocks: set[bytes] = set()
    keys: dict[bytes, int] = {}
    for size, ids in files:
        listed = list(ids)
        key = image_id(size, listed)
        if key is not None and size > 0 and usable(cache, key, size):
            cache.note_image(key, size, block_size, listed)
            blocks.update(listed)
            keys[key] = size
    return blocks, keys


class FileImages:
    """Finds and builds file images in ``cache`` (blocks of ``block_size`` bytes)."""

    def __init__(self, cache: BlockCache, block_size: int) -> None:
        self.cache = cache
        self.block_size = block_size

    def find(self, key: bytes, size: int, blocks: BlockList | None = None) -> str | None:
        """The path of a usable image ``key`` of ``size`` bytes, or None; one found is noted
        in the cache as holding ``blocks`` when they are given. Blocking (a stat and an
        xattr read): run it in a worker thread."""
        if not usable(self.cache, key, size):
            return None
        if blocks is not None:
            self.cache.note_image(key, size, self.block_size, blocks)
        return self.path(key)

    def path(self, key: bytes) -> str:
        """Where image ``key`` lives (whether or not it is there)."""
        return self.cache.dir_for(key).path(key)

    def complete_on_node(self, blocks: BlockList) -> bool:
        """Every block of the file is in this process's index (no system call)."""
        return all(bid != HOLE and self.cache.indexed(bid) for bid in blocks)

    def build(self, key: bytes, size: int, blocks: BlockList) -> bool:
        """Copy the file's block entries into a new image ``key``; False (nothing left
        behind) if a block is not usable here, there is no room, or the disk fails.
        Blocking: run it in a worker thread."""
        lengths = [block_length(i, size, self.block_size) for i in range(len(blocks))]
        if not all(self.cache.is_verified(bid) or self.cache.admit(bid, n, page_in=False)
                   for bid, n in zip(blocks, lengths, strict=True)):
            return False
        entry = self.cache.open_entry(key, size)
        if entry is None:
            return False
        try:
            for index, (bid, length) in enumerate(zip(blocks, lengths, strict=True)):
                self.cache.pin(bid)
                try:
                    entry.copy_at(self.cache.dir_for(bid).path(bid), length, index * self.block_size)
                finally:
                    self.cache.unpin(bid)
        except OSError as exc:
            self.cache.abandon(entry, None)
            log.info("no image of a %d-byte file: %s", size, exc.strerror or exc)
            return False
        return self.finish_fill(entry, size, blocks)

    def _publish(self, entry: NewEntry, blocks: BlockList) -> bool:
        if not self.cache.commit(entry):
            return False
        self.cache.note_image(entry.bid, entry.size, self.block_size, blocks)
        # opens now read the image: its blocks are the first to go when room is needed (a
        # daemon-served open or a peer may still want them until then)
        self.cache.demote([bid for bid in blocks if bid != HOLE])
        return True

    def open_fill(self, key: bytes, size: int) -> NewEntry | None:
        """A new image ``key`` of ``size`` bytes to be filled out of order
        (``NewEntry.write_at``/``copy_at``), or None if there is no room. Blocking."""
        entry = self.cache.open_entry(key, size)
        if entry is None:
            return None
        try:
            entry.allocate(size)
        except OSError as exc:
            self.cache.abandon(entry, exc.strerror or str(exc))
            return None
        return entry

    def finish_fill(self, entry: NewEntry, size: int, blocks: BlockList) -> bool:
        """Publish a filled image: the caller has put every block in it, verified. Blocking."""
        entry.size = size
        return self._publish(entry, blocks)

    def abandon_fill(self, entry: NewEntry) -> None:
        self.cache.abandon(entry, None)


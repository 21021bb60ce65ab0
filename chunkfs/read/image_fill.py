"""Filling a file image: a model file's blocks written into one node-cache file, for a cold
open to be passed through (``fuse/native.py``).

Layer: ``read/``. It sees the blocks through ``BlockFetcher.fill_image_part`` (memory, the
node cache, or one single-flight download that writes the image on the way) and the image
through ``FileImages`` (``cache/images.py``).

Invariants:

- The image is published only if every block of the file was put in it, verified; on any
  failure (a block unavailable, the disk refusing) or cancellation nothing is left behind
  (the caller serves the file through the daemon instead).
- Each distinct block is asked for once: a block the file holds again further on (zeros,
  repeated tensors) is copied within the image once the first copy is in.
- At most ``parallel`` of the file's blocks are asked for at once; the downloads among them
  share the fetcher's slots (``priority``: an open waiting goes ahead of fills of files
  nobody has opened yet).
- Memory: a fill holds no block buffer; bytes pass through the fetcher's piece buffers into
  the page cache of the image file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from chunkfs.blocklist import HOLE, BlockList
from chunkfs.blocks import block_length
from chunkfs.cache.disk import NewEntry
from chunkfs.cache.images import FileImages
from chunkfs.read.download import ImagePart
from chunkfs.read.fetcher import BlockFetcher, BlockUnavailable, Source
from chunkfs.read.slots import Priority

log = logging.getLogger(__name__)


#: told (block, length, where it came from) as each distinct block of a fill is in the image
OnBlock = Callable[[bytes, int, Source], None]


async def fill_image(fetcher: BlockFetcher, images: FileImages, key: bytes, size: int, blocks: BlockList,
                     priority: Priority, parallel: int, on_block: OnBlock | None = None) -> bool:
    """Fill and publish image ``key`` of a file of ``size`` bytes made of ``blocks`` (no holes);
    whether it is now in the node cache."""
    if HOLE in blocks:
        return False
    entry = await trio.to_thread.run_sync(images.open_fill, key, size)
    if entry is None:
        return False
    failure: list[str] = []
    limiter = trio.CapacityLimiter(max(1, parallel))

    async def put(index: int, bid: bytes, cancel: trio.CancelScope) -> None:
        async with limiter:
            length = block_length(index, size, images.block_size)
            try:
                source = await fetcher.fill_image_part(bid, length, ImagePart(entry, index * images.block_size),
                                                       priority)
            except (BlockUnavailable, OSError) as exc:
                failure.append(str(exc))
                cancel.cancel()
                return
            if on_block is not None:
                on_block(bid, length, source)

    first: dict[bytes, int] = {}  # block -> where the file first holds it
    repeats: list[tuple[int, int]] = []  # (index, index of the block's first place)
    for index, bid in enumerate(blocks):
        if bid in first:
            repeats.append((index, first[bid]))
        else:
            first[bid] = index
    settled = False  # published, or handed to ``finish_fill`` (which abandons it if it fails)
    try:
        async with trio.open_nursery() as nursery:
            for bid, index in first.items():
                nursery.start_soon(put, index, bid, nursery.cancel_scope)
        if not failure and repeats:
            try:
                await trio.to_thread.run_sync(_copy_repeats, entry, repeats, size, images.block_size)
            except OSError as exc:
                failure.append(exc.strerror or str(exc))
        if failure:
            log.info("no image of a %d-byte file: %s", size, failure[0])
            return False
        settled = True
        with trio.CancelScope(shield=True):  # (a cancellation now would leave it neither published nor removed)
            published: bool = await trio.to_thread.run_sync(images.finish_fill, entry, size, blocks)
        return published
    finally:
        if not settled:  # failed, or cancelled (stopped warmup, unmount): nothing is left behind
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(images.abandon_fill, entry)


def _copy_repeats(entry: NewEntry, repeats: list[tuple[int, int]], size: int, block_size: int) -> None:
    for index, source in repeats:
        entry.copy_within(source * block_size, block_length(index, size, block_size), index * block_size)

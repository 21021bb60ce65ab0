"""ImagePlaces: where blocks lie inside the file images a process has noted.

Layer: ``cache/``, a leaf used by ``BlockCache`` (which holds its lock around every change).
A block may lie in several images (two versions of a model sharing shards): each holder is
kept, in the order noted, so that when one image goes the block is still found in another.

Invariants: a block is listed under an image only while that image is noted; removing an
image removes it from every block it held. Lookups are single dict operations (safe without
the lock under the GIL); a place found may be gone by the time it is read (the caller then
reads nothing and treats the image as lost).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class ImagePlaces:
    def __init__(self) -> None:
        self._holders: dict[bytes, dict[bytes, tuple[int, int]]] = {}  # block -> image -> (offset, length)
        self._blocks: dict[bytes, tuple[bytes, ...]] = {}  # image -> the distinct blocks it holds

    def noted(self, key: bytes) -> bool:
        return key in self._blocks

    def add(self, key: bytes, size: int, block_size: int, blocks: Iterable[bytes]) -> None:
        """Image ``key`` of a ``size``-byte file holds ``blocks`` in file order, ``block_size``
        bytes apart (a block the file holds twice is placed at its first offset)."""
        if block_size <= 0:
            raise ValueError(f"block size {block_size}")
        if key in self._blocks:
            return
        held: dict[bytes, None] = {}
        for index, bid in enumerate(blocks):
            if bid in held:
                continue
            held[bid] = None
            offset = index * block_size
            self._holders.setdefault(bid, {})[key] = (offset, min(block_size, size - offset))
        self._blocks[key] = tuple(held)

    def remove(self, key: bytes) -> None:
        """Image ``key`` is gone (evicted, dropped, unusable)."""
        for bid in self._blocks.pop(key, ()):
            holders = self._holders.get(bid)
            if holders is not None:
                holders.pop(key, None)
                if not holders:
                    del self._holders[bid]

    def place(self, bid: bytes, usable: Callable[[bytes], bool]) -> tuple[bytes, int, int] | None:
        """(image, offset, length) of the block in the first image holding it that ``usable``
        accepts; None if none does."""
        holders = self._holders.get(bid)
        if not holders:  # (most blocks: no allocation on the read path)
            return None
        for key, (offset, length) in list(holders.items()):
            if usable(key):
                return key, offset, length
        return None

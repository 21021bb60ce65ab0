"""BlockList: a file's block ids by index, where blocks never written are holes.

Pure, no I/O. Invariants:

- A file of size S has ``block_count(S, B)`` block slots; slot ``i`` holds the 32-byte id of
  its block or is a hole (``HOLE``, read as zeros, with no object in the store). A list costs
  memory and metadata per *stored* block, never per logical block: a 1 PiB file that holds
  one written byte is one entry.
- Encoding (the ``blocks`` value of an inode in every engine), chosen by ``pack``:
  * dense, when the file has no hole: the ids concatenated (a multiple of 32 bytes). Every
    volume written before holes existed has only this form, so old volumes read unchanged.
  * sparse, when it has holes: ``SPARSE_MAGIC`` (4 bytes), the slot count (8 bytes, big
    endian), then per stored block its index (8 bytes, big endian) and id (32 bytes), by
    index. Its length is 12 + 40 n, never a multiple of 32, so the two forms cannot be confused.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from chunkfs.blocks import HASH_LEN

HOLE = b""  # the id of a slot nobody wrote: zeros, no object
SPARSE_MAGIC = b"CKS1"
_SPARSE_HEAD = struct.Struct(">4sQ")
_SPARSE_ENTRY = struct.Struct(">Q32s")


class BlockList:
    """Block ids by slot index; missing slots below ``len()`` are holes."""

    __slots__ = ("_count", "_ids")

    def __init__(self, count: int = 0, ids: dict[int, bytes] | None = None) -> None:
        self._count = count
        self._ids: dict[int, bytes] = ids if ids is not None else {}

    @classmethod
    def dense(cls, ids: Iterable[bytes]) -> BlockList:
        """A list from ids in slot order (``HOLE`` for holes)."""
        out = cls()
        for bid in ids:
            out.append(bid)
        return out

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._ids.get(index, HOLE)

    def __setitem__(self, index: int, bid: bytes) -> None:
        if not 0 <= index < self._count:
            raise IndexError(index)
        if bid == HOLE:
            self._ids.pop(index, None)
        else:
            self._ids[index] = bid

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BlockList):
            return self._count == other._count and self._ids == other._ids
        if isinstance(other, list):
            return self == BlockList.dense(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __iter__(self) -> Iterator[bytes]:
        """Every slot's id in order, holes included (use ``stored`` for big sparse files)."""
        for index in range(self._count):
            yield self._ids.get(index, HOLE)

    def __repr__(self) -> str:
        return f"BlockList({self._count} slots, {len(self._ids)} stored)"

    def append(self, bid: bytes) -> None:
        self._count += 1
        if bid != HOLE:
            self._ids[self._count - 1] = bid

    def resize(self, count: int) -> None:
        """Drop the slots from ``count`` on, or add holes up to it."""
        if count < self._count:
            for index in [i for i in self._ids if i >= count]:
                del self._ids[index]
        self._count = count

    def copy(self) -> BlockList:
        return BlockList(self._count, dict(self._ids))

    def stored(self) -> list[tuple[int, bytes]]:
        """(index, id) of every slot that is not a hole, by index."""
        return sorted(self._ids.items())

    def ids(self) -> set[bytes]:
        """The distinct ids stored."""
        return set(self._ids.values())

    @property
    def holes(self) -> int:
        return self._count - len(self._ids)

    # -- encoding --------------------------------------------------------------------------
    def pack(self) -> bytes:
        if not self.holes:
            return b"".join(self._ids[i] for i in range(self._count))
        parts = [_SPARSE_HEAD.pack(SPARSE_MAGIC, self._count)]
        parts.extend(_SPARSE_ENTRY.pack(index, bid) for index, bid in self.stored())
        return b"".join(parts)

    @classmethod
    def unpack(cls, blob: bytes | None) -> BlockList:
        if not blob:
            return cls()
        blob = bytes(blob)
        if len(blob) % HASH_LEN == 0:
            return cls(len(blob) // HASH_LEN, {i: blob[i * HASH_LEN:(i + 1) * HASH_LEN]
                                              for i in range(len(blob) // HASH_LEN)})
        if len(blob) < _SPARSE_HEAD.size or (len(blob) - _SPARSE_HEAD.size) % _SPARSE_ENTRY.size:
            raise ValueError(f"block list of {len(blob)} bytes is neither dense nor sparse")
        magic, count = _SPARSE_HEAD.unpack_from(blob)
        if magic != SPARSE_MAGIC:
            raise ValueError(f"block list with unknown header {magic!r}")
        ids = {}
        for index, bid in _SPARSE_ENTRY.iter_unpack(blob[_SPARSE_HEAD.size:]):
            if index >= count:
                raise ValueError(f"block list names slot {index} of {count}")
            ids[index] = bid
        return cls(count, ids)

"""Block codec: content hashes, optional lz4, object key naming, block arithmetic.

Pure functions, no I/O. Invariants:

- A block's identity is the hash of its *plain* (uncompressed) bytes, with the volume's
  algorithm: BLAKE3 (new volumes) or SHA-256 (volumes made before BLAKE3, or chosen with
  ``format --hash sha256``), both 32 bytes. The same content has the same id whatever the
  volume's compression, so the node cache (which holds plain bytes) can be shared by
  volumes and is never stale. Ids of the two algorithms live in separate namespaces
  everywhere they meet (the node cache keeps each algorithm's entries in its own directory
  and lock file), so an id is only ever checked with the algorithm that made it.
- A file of size S with block size B has ceil(S / B) blocks; block i holds bytes
  [i*B, min((i+1)*B, S)). Block lengths are therefore derived, never stored per file.
- ``BlockCodec.decode`` returns bytes only after they hash to the expected id
  (``BlockCorrupt`` otherwise): no unverified byte leaves this module's checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import blake3
import lz4.frame

HASH_NAME = "sha256"  # volumes whose format names no algorithm (none exist: every format wrote one)
DEFAULT_HASH = "blake3"  # new volumes: about 2.5x SHA-256's speed on one core, same 256-bit strength
HASHES = ("blake3", "sha256")
HASH_LEN = 32
MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = 64 << 20
DEFAULT_BLOCK_SIZE = 8 << 20
COMPRESSIONS = ("none", "lz4")


class BlockCorrupt(Exception):
    """Bytes whose hash (or framing) does not match the block id they were fetched for."""


def new_hasher(algorithm: str) -> Any:
    """A hashlib-style object (``update``, ``digest``) for ``algorithm``. BLAKE3 releases the
    GIL while it hashes (inputs of 2 KiB and up), so downloads hash in parallel threads."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        return blake3.blake3()
    raise ValueError(f"unknown block hash {algorithm!r} (known: {', '.join(HASHES)})")


def block_id(data: bytes | memoryview, algorithm: str = HASH_NAME) -> bytes:
    """The 32-byte content id of a block's plain bytes."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.digest()


def object_key(bid: bytes) -> str:
    """Object-store key of a block: fanned out by the first hash byte."""
    hexid = bid.hex()
    return f"blocks/{hexid[:2]}/{hexid}"


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def block_length(index: int, size: int, block_size: int) -> int:
    """Length of block ``index`` of a file of ``size`` bytes."""
    return max(0, min(block_size, size - index * block_size))


def block_spans(offset: int, length: int, size: int, block_size: int) -> Iterator[tuple[int, int, int]]:
    """Split the file range [offset, offset+length) clipped to ``size`` into
    ``(block_index, start_in_block, end_in_block)`` spans, in file order."""
    end = min(offset + length, size)
    pos = offset
    while pos < end:
        index, start = divmod(pos, block_size)
        stop = min(block_size, start + (end - pos))
        yield index, start, stop
        pos += stop - start


@dataclass(frozen=True)
class BlockCodec:
    """Turns plain block bytes into stored object bytes and back, verifying on the way back."""

    compression: str = "none"
    hash: str = HASH_NAME  # the volume's block hash algorithm

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {self.compression!r}")
        if self.hash not in HASHES:
            raise ValueError(f"unknown block hash {self.hash!r} (known: {', '.join(HASHES)})")

    def block_id(self, plain: bytes | memoryview) -> bytes:
        """The id of a block's plain bytes in this volume."""
        return block_id(plain, self.hash)

    def encode(self, plain: bytes) -> bytes:
        if self.compression == "lz4":
            return lz4.frame.compress(plain, store_size=True)
        return plain

    def decode(self, bid: bytes, stored: bytes, length: int) -> bytes:
        """Plain bytes of block ``bid``, or ``BlockCorrupt`` if they are not exactly that block."""
        decoder = self.decoder(bid, length)
        plain = decoder.feed(stored)
        decoder.finish()
        return bytes(plain)

    def decoder(self, bid: bytes, length: int) -> BlockDecoder:
        """A streaming ``decode``: feed it the stored object piece by piece."""
        return BlockDecoder(bid, length, self.compression == "lz4", self.hash)


class BlockDecoder:
    """``BlockCodec.decode`` for an object that arrives in pieces (a streamed GET).

    ``feed`` takes stored bytes and returns the plain bytes they decode to (so the caller
    can write them out while they are still in the CPU cache); ``finish`` raises
    ``BlockCorrupt`` unless everything fed was exactly block ``bid``. Until ``finish``
    returns, nothing ``feed`` returned is verified. ``feed`` never raises: a bad frame or a
    body longer than the block is remembered and reported by ``finish``.
    """

    __slots__ = ("_error", "_hash", "_lz4", "bid", "length", "size")

    def __init__(self, bid: bytes, length: int, compressed: bool, algorithm: str = HASH_NAME) -> None:
        self.bid = bid
        self.length = length
        self.size = 0  # plain bytes produced so far
        self._hash = new_hasher(algorithm)
        self._lz4 = lz4.frame.LZ4FrameDecompressor() if compressed else None
        self._error: str | None = None

    @property
    def compressed(self) -> bool:
        """Stored bytes decode to other plain bytes (lz4): ``feed`` returns new bytes."""
        return self._lz4 is not None

    def feed(self, piece: bytes | memoryview) -> bytes | memoryview:
        if self._error is not None:
            return b""
        plain = piece
        if self._lz4 is not None:
            if self._lz4.eof:
                return self._fail("has bytes after the end of its lz4 frame")
            try:
                plain = self._lz4.decompress(piece)
            except RuntimeError as exc:
                return self._fail(f"does not decompress ({'not an lz4 frame' if not self.size else exc})")
            if self._lz4.eof and self._lz4.unused_data:
                return self._fail("has bytes after the end of its lz4 frame")
        if self.size + len(plain) > self.length:
            return self._fail(f"is longer than {self.length} bytes")
        self.size += len(plain)
        self._hash.update(plain)
        return plain

    def _fail(self, why: str) -> bytes:
        self._error = why
        return b""

    def finish(self) -> None:
        """Raise ``BlockCorrupt`` unless the pieces fed were exactly the block."""
        name = f"block {self.bid.hex()}"
        if self._error is not None:
            raise BlockCorrupt(f"{name} {self._error}")
        if self._lz4 is not None and not self._lz4.eof:
            raise BlockCorrupt(f"{name} ends inside its lz4 frame")
        if self.size != self.length:
            raise BlockCorrupt(f"{name} has {self.size} bytes, expected {self.length}")
        if self._hash.digest() != self.bid:
            raise BlockCorrupt(f"{name} does not match its hash")

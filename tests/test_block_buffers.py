"""BlockBuffers on its own: the memory bound and which held block a download may take."""

from __future__ import annotations

import pytest

from chunkfs.read import buffers as buffers_module
from chunkfs.read.buffers import BlockBuffers

MiB = 1 << 20


def held(buffers: BlockBuffers, *names: bytes, length: int = MiB) -> None:
    for name in names:
        buffer = buffers.take(length)
        assert buffer is not None
        buffer[:1] = name[:1]
        buffers.hold(name, buffer, length)


def read_whole(buffers: BlockBuffers, name: bytes, length: int = MiB) -> bytes:
    out = memoryview(bytearray(length))
    assert buffers.copy_into(name, 0, out)
    return bytes(out)


def test_no_more_buffers_than_the_capacity() -> None:
    buffers = BlockBuffers(2)
    held(buffers, b"a", b"b")
    assert buffers.take(MiB) is None  # both hold blocks nobody has read
    assert len(buffers) == 2 and buffers._count == 2


def test_a_download_takes_only_a_block_read_whole() -> None:
    buffers = BlockBuffers(2)
    held(buffers, b"a", b"b")
    out = memoryview(bytearray(MiB // 2))
    assert buffers.copy_into(b"b", 0, out)  # half of b read: not spent
    assert buffers.take(MiB) is None
    assert read_whole(buffers, b"a")[:1] == b"a"
    assert buffers.take(MiB) is not None  # a's buffer
    assert b"a" not in buffers and b"b" in buffers


def test_a_stale_block_may_be_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    buffers = BlockBuffers(1)
    held(buffers, b"a")
    assert buffers.take(MiB) is None
    monkeypatch.setattr(buffers_module, "STALE_AFTER", 0.0)
    assert buffers.take(MiB) is not None and b"a" not in buffers


def test_blocks_read_whole_are_taken_least_recently_used_first() -> None:
    buffers = BlockBuffers(3)
    held(buffers, b"a", b"b", b"c")
    read_whole(buffers, b"b")
    read_whole(buffers, b"a")
    assert buffers.take(MiB) is not None and b"b" not in buffers and b"a" in buffers
    assert buffers.take(MiB) is not None and b"a" not in buffers and b"c" in buffers
    assert buffers.take(MiB) is None  # c has not been read


def test_held_bytes_are_served_until_the_buffer_is_reused() -> None:
    buffers = BlockBuffers(1)
    buffer = buffers.take(3000)
    assert buffer is not None and len(buffer) >= 3000 and len(buffer) % 4096 == 0
    buffer[:3000] = bytes(range(250)) * 12
    buffers.hold(b"x", buffer, 3000)
    out = memoryview(bytearray(100))
    assert buffers.copy_into(b"x", 2900, out) and bytes(out) == (bytes(range(250)) * 12)[2900:]
    with pytest.raises(ValueError):  # past the block's end: never bytes beyond it
        buffers.copy_into(b"x", 2950, out)
    buffers.drop(b"x")
    assert not buffers.copy_into(b"x", 0, out)
    assert buffers.take(5 * MiB) is not None  # a larger block: the small buffer is replaced


def test_a_buffer_that_cannot_be_made_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    buffers = BlockBuffers(1)

    def no_memory(_length: int) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(buffers_module, "aligned_buffer", no_memory)
    with pytest.raises(OSError):
        buffers.take(MiB)
    monkeypatch.undo()
    assert buffers.take(MiB) is not None  # the capacity was not used up by the failure

"""FileWriter against a real SQLite volume and file store, without FUSE: orderings that a
mount test cannot force (a write landing while another handle's flush commits)."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from chunkfs.blocklist import HOLE, BlockList
from chunkfs.blocks import block_length
from chunkfs.cache.block_cache import BlockCache
from chunkfs.errors import FsError
from chunkfs.maintenance import collect_garbage
from chunkfs.meta.aio import AsyncMeta
from chunkfs.meta.base import MAX_FILE_SIZE, ROOT_INODE
from chunkfs.read.fetcher import BlockFetcher
from chunkfs.store.aio import AsyncStore
from chunkfs.volume import Volume, open_volume
from chunkfs.write.file_writer import FileWriter, WriteFailed
from tests.conftest import BLOCK, VolumeFixture


@dataclass
class Parts:
    volume: Volume
    meta: AsyncMeta
    fetcher: BlockFetcher
    writer: FileWriter


@pytest.fixture
def parts(volume: VolumeFixture) -> Iterator[Parts]:
    vol = open_volume(volume.meta_url)
    cache = BlockCache([volume.tmp / "cache"], capacity=1 << 30, free_ratio=0)
    fetcher = BlockFetcher(AsyncStore(vol.store, 4), vol.codec, cache)
    meta = AsyncMeta(vol.meta)
    writer = FileWriter(meta, AsyncStore(vol.store, 4), fetcher, vol.fmt.block_size)
    try:
        yield Parts(vol, meta, fetcher, writer)
    finally:
        vol.close()


def published(p: Parts, ino: int) -> bytes:
    """The file's content as the metadata names it (what another mount would read)."""
    size = p.volume.meta.getattr(ino).size
    blocks = p.volume.meta.read_blocks(ino)

    async def read() -> bytes:
        parts = []
        for index, bid in enumerate(blocks):
            length = block_length(index, size, BLOCK)
            parts.append(bytes(length) if bid == HOLE else bytes(await p.fetcher.read(bid, length, 0, length)))
        return b"".join(parts)

    return trio.run(read)


def record_commits(parts: Parts, monkeypatch: pytest.MonkeyPatch,
                   hold_first: tuple[trio.Event, trio.Event] | None = None) -> list[int]:
    """The size of each ``commit_file`` the writer makes, in order. With ``hold_first``
    (committing, proceed), the first commit sets ``committing`` and waits for ``proceed``."""
    commits: list[int] = []
    real_change = parts.meta.change

    async def change(method: Any, *args: Any, **kwargs: Any) -> Any:
        if method == parts.meta.meta.commit_file:
            commits.append(kwargs["size"])
            if hold_first is not None and len(commits) == 1:
                committing, proceed = hold_first
                committing.set()
                await proceed.wait()
        return await real_change(method, *args, **kwargs)

    monkeypatch.setattr(parts.meta, "change", change)
    return commits


def test_a_write_during_another_handles_commit_is_published_by_the_next_flush(
        parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    ino = parts.volume.meta.create_file(ROOT_INODE, b"f", 0o644, 0, 0, time.time_ns()).ino
    committing, proceed = trio.Event(), trio.Event()
    commits = record_commits(parts, monkeypatch, hold_first=(committing, proceed))
    first, second = b"a" * (BLOCK + 10), b"b" * 20

    async def main() -> None:
        async with trio.open_nursery() as background:
            await background.start(parts.writer.run)
            parts.writer.opened(ino, 0, BlockList())  # handle A
            parts.writer.opened(ino, 0, BlockList())  # handle B
            await parts.writer.write(ino, 0, first)
            async with trio.open_nursery() as flushes:
                flushes.start_soon(parts.writer.flush, ino)  # A: fsync
                await committing.wait()
                await parts.writer.write(ino, len(first), second)  # B writes while A's commit runs
                proceed.set()
            await parts.writer.release(ino)  # A closes
            await parts.writer.release(ino)  # B closes: the last handle publishes what is left
            background.cancel_scope.cancel()

    trio.run(main)
    assert commits == [len(first), len(first) + len(second)]
    assert published(parts, ino) == first + second


def test_a_flush_with_nothing_new_commits_nothing(parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    ino = parts.volume.meta.create_file(ROOT_INODE, b"g", 0o644, 0, 0, time.time_ns()).ino
    commits = record_commits(parts, monkeypatch)

    async def main() -> None:
        async with trio.open_nursery() as background:
            await background.start(parts.writer.run)
            parts.writer.opened(ino, 0, BlockList())
            await parts.writer.write(ino, 0, b"x" * 100)
            assert await parts.writer.flush(ino) is not None
            assert await parts.writer.flush(ino) is None  # nothing written since
            assert await parts.writer.release(ino) is None
            background.cancel_scope.cancel()

    trio.run(main)
    assert commits == [100]
    assert published(parts, ino) == b"x" * 100


def test_holes_cost_nothing_and_a_huge_sparse_file_stores_only_what_was_written(parts: Parts) -> None:
    """truncate to 2**50 and a write at 2**45: one block stored, a sparse list of one entry,
    zeros read back around it; a size past MAX_FILE_SIZE is EFBIG."""
    ino = parts.volume.meta.create_file(ROOT_INODE, b"h", 0o644, 0, 0, time.time_ns()).ino
    stored_before = len(list(parts.volume.store.list("blocks/")))
    data = b"written at 2**45"

    async def main() -> None:
        async with trio.open_nursery() as background:
            await background.start(parts.writer.run)
            parts.writer.opened(ino, 0, BlockList())
            await parts.writer.truncate(ino, 1 << 50)
            await parts.writer.write(ino, 1 << 45, data)
            assert await parts.writer.read(ino, (1 << 45) - 4, 8) == bytes(4) + data[:4]
            with pytest.raises(FsError) as too_big:
                await parts.writer.truncate(ino, MAX_FILE_SIZE + 1)
            assert too_big.value.errno == errno.EFBIG
            with pytest.raises(FsError):
                await parts.writer.write(ino, MAX_FILE_SIZE - 2, b"abc")
            await parts.writer.release(ino)
            background.cancel_scope.cancel()

    trio.run(main)
    meta = parts.volume.meta
    assert meta.getattr(ino).size == 1 << 50
    blocks = meta.read_blocks(ino)
    assert len(blocks) == (1 << 50) // BLOCK
    assert [index for index, _ in blocks.stored()] == [(1 << 45) // BLOCK]
    assert len(list(parts.volume.store.list("blocks/"))) == stored_before + 1
    ((_index, bid),) = blocks.stored()
    plain = trio.run(parts.fetcher.read, bid, BLOCK, 0, BLOCK)
    assert bytes(plain[:len(data)]) == data and not any(plain[len(data):])

def writer_renewing_every(parts: Parts, every_s: float | None) -> FileWriter:
    return FileWriter(parts.meta, AsyncStore(parts.volume.store, 4), parts.fetcher, BLOCK, claim_renew_s=every_s)


def gc_with_a_short_grace(parts: Parts, writer: FileWriter) -> tuple[int, bytes]:
    """Write one whole block to a file kept open, let its stored object and first claim age past
    gc's grace (1.5 s), run gc, then close the file: (blocks gc deleted, the file's content)."""
    ino = parts.volume.meta.create_file(ROOT_INODE, b"long-open", 0o644, 0, 0, time.time_ns()).ino
    content = bytes(range(256)) * (BLOCK // 256) + b"tail"
    deleted = 0

    async def main() -> None:
        nonlocal deleted
        async with trio.open_nursery() as background:
            await background.start(writer.run)
            writer.opened(ino, 0, BlockList())
            await writer.write(ino, 0, content)  # block 0 is whole: uploaded now, in the background
            while not writer._files[ino].stored:
                await trio.sleep(0.01)
            await trio.sleep(2.5)  # the object and its first claim are now older than the grace
            report = await trio.to_thread.run_sync(
                lambda: collect_garbage(parts.volume, grace=1.5, dry_run=False))
            deleted = report.deleted
            try:
                await writer.release(ino)
            finally:
                background.cancel_scope.cancel()

    trio.run(main)
    return deleted, content


def test_renewed_claims_keep_gc_off_the_blocks_of_a_file_open_for_writing(parts: Parts) -> None:
    writer = writer_renewing_every(parts, 0.1)
    deleted, content = gc_with_a_short_grace(parts, writer)
    assert deleted == 0
    ino = parts.volume.meta.lookup(ROOT_INODE, b"long-open").ino
    assert published(parts, ino) == content


def test_without_renewals_gc_takes_the_block_of_a_file_open_too_long(parts: Parts) -> None:
    """The control for the test above: the same steps with renewals off lose the block."""
    writer = writer_renewing_every(parts, None)
    deleted, _ = gc_with_a_short_grace(parts, writer)
    assert deleted == 1


def test_a_block_gc_deletes_despite_the_claims_fails_the_flush_until_it_is_stored_again(parts: Parts) -> None:
    writer = writer_renewing_every(parts, None)  # renewals driven by hand below
    ino = parts.volume.meta.create_file(ROOT_INODE, b"lost", 0o644, 0, 0, time.time_ns()).ino
    block = b"q" * BLOCK

    async def main() -> None:
        async with trio.open_nursery() as background:
            await background.start(writer.run)
            writer.opened(ino, 0, BlockList())
            await writer.write(ino, 0, block)
            while not writer._files[ino].stored:
                await trio.sleep(0.01)
            (bid,) = writer._files[ino].stored
            # a forced gc with a grace shorter than the claim's age is deleting it right now
            assert parts.volume.meta.begin_delete(bid, time.time_ns() + 10**9, time.time_ns())
            assert await writer.renew_claims() == 0
            with pytest.raises(WriteFailed, match="deleted by chunkfs gc"):
                await writer.flush(ino)
            with pytest.raises(WriteFailed, match="deleted by chunkfs gc"):
                await writer.flush(ino)  # and again: never published with the block missing
            parts.volume.meta.end_delete(bid)
            await writer.write(ino, 0, block)  # the same bytes, stored again
            assert await writer.flush(ino) is not None
            assert await writer.renew_claims() == 0  # published: nothing left to renew
            await writer.release(ino)
            background.cancel_scope.cancel()

    trio.run(main)
    assert published(parts, ino) == block


def test_blocks_pending_in_all_files_together_stay_within_the_bound(parts: Parts) -> None:
    """Ten files written at once, each ending in a growing half block: past ``max_pending``
    in all files together, writers upload (a growing block too, when nothing else makes
    room) or wait, so at most ``max_pending`` blocks are held; the content is exact."""
    writer = FileWriter(parts.meta, AsyncStore(parts.volume.store, 4), parts.fetcher, BLOCK, max_pending=4)
    inos = [parts.volume.meta.create_file(ROOT_INODE, f"f{i}".encode(), 0o644, 0, 0, time.time_ns()).ino
            for i in range(10)]
    halves = {ino: (bytes([ino % 251]) * (BLOCK // 2), bytes([(ino + 7) % 251]) * (BLOCK // 2 + 3)) for ino in inos}
    most = 0

    async def main() -> None:
        nonlocal most
        async with trio.open_nursery() as background:
            await background.start(writer.run)
            for ino in inos:
                writer.opened(ino, 0, BlockList())
            for part in (0, 1):
                for ino in inos:
                    await writer.write(ino, part * (BLOCK // 2), halves[ino][part])
                    most = max(most, sum(len(s.pending) for s in writer._files.values()))
            for ino in inos:
                await writer.release(ino)
            background.cancel_scope.cancel()

    trio.run(main)
    assert most <= 4, most
    for ino in inos:
        assert published(parts, ino) == halves[ino][0] + halves[ino][1]

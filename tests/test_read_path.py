"""BlockFetcher and BlockCache against a real local store, driven by trio (no FUSE)."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from chunkfs.blocklist import BlockList
from chunkfs.blocks import BlockCodec, block_id, object_key
from chunkfs.cache.block_cache import BlockCache
from chunkfs.cache.disk import CacheDir, NewEntry, aligned_buffer
from chunkfs.read import download as download_module
from chunkfs.read.fetcher import BlockFetcher, BlockUnavailable
from chunkfs.read.reader import FileReader, ReadConfig
from chunkfs.read.slots import Priority
from chunkfs.store.aio import AsyncStore
from chunkfs.store.base import StoreError
from chunkfs.store.file import FileStore
from chunkfs.store.retry import RetryingStore


class CountingStore(FileStore):
    """A real FileStore that records GETs (in order), can corrupt the next N bodies and can
    be slowed down."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, create=True)
        self.keys: list[str] = []
        self.corrupt_next = 0
        self.delay = 0.0
        self._lock = threading.Lock()

    @property
    def gets(self) -> int:
        return len(self.keys)

    def _count(self, key: str) -> bool:
        """Record a GET; whether to corrupt its body."""
        with self._lock:
            self.keys.append(key)
            corrupt = self.corrupt_next > 0
            self.corrupt_next -= corrupt
        time.sleep(self.delay)
        return corrupt

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        corrupt = self._count(key)
        data = super().get(key, start, end)
        return data[:-1] + bytes([data[-1] ^ 0xFF]) if corrupt else data

    def get_into(self, key, sink, buffer):  # type: ignore[no-untyped-def]
        if not self._count(key):
            return super().get_into(key, sink, buffer)  # FileStore's streamed read
        data = super().get(key)
        sink.restart()
        sink.write(memoryview(data[:-1] + bytes([data[-1] ^ 0xFF])))
        return len(data)


def put_block(store: FileStore, codec: BlockCodec, data: bytes) -> bytes:
    bid = block_id(data)
    store.put(object_key(bid), codec.encode(data))
    return bid


@pytest.fixture(params=[0, 4], ids=["streamed", "block-buffers"])
def setup(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A fetcher whose readers' downloads stream through the page cache, or fill block
    buffers (as a mount's do)."""
    store = CountingStore(tmp_path / "store")
    codec = BlockCodec("lz4")
    data = os.urandom(200_000)
    bid = put_block(store, codec, data)
    cache = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    fetcher = BlockFetcher(AsyncStore(RetryingStore(store, 3), 8), codec, cache, downloads=4, recent_blocks=0,
                           block_buffers=request.param)  # the store as open_store makes it: one retry policy
    return store, cache, fetcher, bid, data


def whole(fetcher: BlockFetcher, bid: bytes, data: bytes) -> bytes:
    return trio.run(fetcher.read, bid, len(data), 0, len(data))


def test_single_flight_many_readers_one_get(setup) -> None:  # type: ignore[no-untyped-def]
    store, cache, fetcher, bid, data = setup
    results: list[bytes] = []

    async def main() -> None:
        async def reader(i: int) -> None:
            results.append(await fetcher.read(bid, len(data), i * 1000, i * 1000 + 500))

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(reader, i)

    trio.run(main)
    assert store.gets == 1 and fetcher.downloads == 1
    assert sorted(map(bytes, results)) == sorted(data[i * 1000 : i * 1000 + 500] for i in range(50))
    assert cache.is_verified(bid) and cache.contains(bid)
    assert cache.metrics.cache_misses._value.get() == 50  # every reader waited for the download
    assert whole(fetcher, bid, data) == data
    assert cache.metrics.cache_hits._value.get() == 1


def test_corrupt_body_is_retried_then_fails_with_eio_cause(setup) -> None:  # type: ignore[no-untyped-def]
    store, cache, fetcher, bid, data = setup
    store.corrupt_next = 2
    assert whole(fetcher, bid, data) == data
    assert store.gets == 3
    cache.drop(bid)
    fetcher.memory.drop(bid)
    store.corrupt_next = 10
    with pytest.raises(BlockUnavailable, match="gave up after 3 attempts"):
        whole(fetcher, bid, data)
    assert store.gets == 3 + 3  # one retry loop: 3 GETs in all for the block, not 3 x 3
    assert not cache.contains(bid)  # wrong bytes never reach the cache


def test_damaged_cache_entries_are_dropped_and_refetched(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, cache, fetcher, bid, data = setup
    whole(fetcher, bid, data)
    path = Path(cache.dir_for(bid).path(bid))
    for damage in (lambda b: b[:-10], lambda b: b"\0" + b[1:], lambda b: b + b"x"):  # short, flipped, long
        path.write_bytes(damage(path.read_bytes()))
        fresh = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)  # a restarted mount
        fetcher2 = BlockFetcher(AsyncStore(store, 8), BlockCodec("lz4"), fresh, recent_blocks=0)
        before = store.gets
        assert whole(fetcher2, bid, data) == data
        assert store.gets == before + 1
        assert path.read_bytes() == data
        assert fresh.metrics.cache_corrupt._value.get() == 1


def test_restarted_cache_serves_without_downloading(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, _cache, fetcher, bid, data = setup
    whole(fetcher, bid, data)
    fresh = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    assert fresh.load_index() == 1 and fresh.used_bytes == len(data)
    fetcher2 = BlockFetcher(AsyncStore(store, 8), BlockCodec("lz4"), fresh, recent_blocks=0)
    assert trio.run(fetcher2.read, bid, len(data), 5, 10) == data[5:10]
    assert store.gets == 1 and fresh.metrics.cache_hits._value.get() == 1
    checks = fresh.metrics.cache_entry_checks
    assert checks.labels("seal")._value.get() == 1 and checks.labels("hash")._value.get() == 0


@pytest.mark.parametrize("trust_seals", [True, False])
def test_prefetch_admits_an_entry_another_process_wrote(setup, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         trust_seals: bool) -> None:
    store, _cache, fetcher, bid, data = setup
    whole(fetcher, bid, data)  # "another process" planted the entry
    fresh = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0, trust_seals=trust_seals)
    fetcher2 = BlockFetcher(AsyncStore(store, 8), BlockCodec("lz4"), fresh, recent_blocks=0)
    # admitted by its seal (not counted as fetched ahead), or read and hashed
    assert trio.run(fetcher2.ensure, bid, len(data), Priority.PREFETCH).worked == (not trust_seals)
    assert fetcher2.is_local(bid)
    assert trio.run(fetcher2.read, bid, len(data), 0, len(data)) == data
    checks = fresh.metrics.cache_entry_checks
    assert checks.labels("seal" if trust_seals else "hash")._value.get() == 1
    assert checks.labels("hash" if trust_seals else "seal")._value.get() == 0
    assert store.gets == 1


def test_a_reader_downloads_a_block_whose_admitted_entry_vanished(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, _cache, fetcher, bid, data = setup
    whole(fetcher, bid, data)
    fresh = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    fetcher2 = BlockFetcher(AsyncStore(store, 8), BlockCodec("lz4"), fresh, recent_blocks=0)
    admit = fresh.admit

    def admit_then_lose(b: bytes, length: int, *, page_in: bool = True) -> bool:
        ok = admit(b, length, page_in=page_in)
        os.unlink(fresh.dir_for(b).path(b))  # gone between the seal check and the read
        return ok

    fresh.admit = admit_then_lose  # type: ignore[method-assign]
    assert trio.run(fetcher2.read, bid, len(data), 7, 70) == data[7:70]
    assert store.gets == 2 and fresh.metrics.cache_misses._value.get() == 1


def test_failing_cache_disk_degrades_to_store_reads(setup) -> None:  # type: ignore[no-untyped-def]
    store, cache, _fetcher, bid, data = setup
    cache.dirs[0].tmp_dir = Path("/proc/chunkfs-no-such-dir")  # every cache write now fails (root ignores modes)
    fetcher = BlockFetcher(AsyncStore(store, 8), BlockCodec("lz4"), cache, recent_blocks=2)
    assert trio.run(fetcher.read, bid, len(data), 10, 20) == data[10:20]
    assert not cache.contains(bid)
    assert trio.run(fetcher.read, bid, len(data), 0, 5) == data[:5]  # kept in memory
    assert store.gets == 1 and cache.metrics.cache_write_errors._value.get() == 1


class EntryFillingUp(NewEntry):
    """A cache entry whose disk fills up after its first piece."""

    __slots__ = ()

    def write(self, data: bytes | memoryview) -> None:
        if self.size:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(data)


def test_a_cache_write_failing_midway_serves_the_block_from_memory(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    store, cache, _fetcher, bid, data = setup
    fetcher = BlockFetcher(AsyncStore(store, 8), BlockCodec("lz4"), cache, recent_blocks=2)
    monkeypatch.setattr(download_module, "PIECE", 16 << 10)  # so the block arrives in pieces
    cache_dir = cache.dirs[0]
    real_create = cache_dir.create

    def create(b: bytes, *, direct: bool = False, length: int = 0) -> NewEntry:
        entry = real_create(b, direct=direct, length=length)
        return EntryFillingUp(cache_dir, b, entry.tmp, entry._fd)

    cache_dir.create = create  # type: ignore[method-assign]
    assert trio.run(fetcher.read, bid, len(data), 100, 90_000) == data[100:90_000]
    assert store.gets == 2  # the stream into the cache broke off; the block was read again, into memory
    assert not cache.contains(bid) and os.listdir(cache_dir.tmp_dir) == []
    assert cache.metrics.cache_write_errors._value.get() == 1
    assert cache._reserved == 0  # the room held for the entry was given back
    assert trio.run(fetcher.read, bid, len(data), 0, 10) == data[:10] and store.gets == 2  # from memory


class InterruptedStore(CountingStore):
    """Its first streamed GET of each key breaks off halfway, after delivering half the body."""

    def get_into(self, key, sink, buffer):  # type: ignore[no-untyped-def]
        if key in self.keys:
            return super().get_into(key, sink, buffer)
        self.keys.append(key)
        body = FileStore.get(self, key)
        sink.restart()
        sink.write(memoryview(body)[: len(body) // 2])
        raise StoreError("connection reset", temporary=True)


def test_a_retried_stream_rewrites_the_cache_entry_from_the_start(tmp_path: Path) -> None:
    store = InterruptedStore(tmp_path / "store")
    codec = BlockCodec("none")
    data = os.urandom(300_000)
    bid = put_block(store, codec, data)
    cache = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    fetcher = BlockFetcher(AsyncStore(RetryingStore(store, 3, sleep=lambda _s: None), 4), codec, cache)
    assert trio.run(fetcher.read, bid, len(data), 0, len(data)) == data
    assert store.gets == 2 and Path(cache.dir_for(bid).path(bid)).read_bytes() == data


def test_missing_block_is_unavailable(setup) -> None:  # type: ignore[no-untyped-def]
    _store, _cache, fetcher, _bid, _data = setup
    with pytest.raises(BlockUnavailable, match="missing"):
        trio.run(fetcher.read, block_id(b"nothing"), 7, 0, 7)


def test_stale_tmp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "c")
    dead = cache.tmp_dir / f"{'ab' * 32}.999999999.deadbeef"
    mine = cache.tmp_dir / f"{'cd' * 32}.{os.getpid()}.cafebabe"
    dead.write_bytes(b"partial")
    mine.write_bytes(b"in progress")
    CacheDir(tmp_path / "c")
    assert not dead.exists() and mine.exists()


def _blocks(store: CountingStore, n: int) -> list[tuple[bytes, bytes]]:
    codec = BlockCodec("lz4")
    out = []
    for i in range(n):
        data = bytes([i]) * 1000 + os.urandom(100)
        out.append((put_block(store, codec, data), data))
    return out


def download_order(tmp_path: Path, count: int, queued: int, wanted: int) -> list[str]:
    """Queue prefetches of blocks [0, queued) on one download slot, then read block
    ``wanted``; the order in which the store saw the blocks (as indexes)."""
    store = CountingStore(tmp_path / "store")
    blocks = _blocks(store, count)
    cache = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    fetcher = BlockFetcher(AsyncStore(store, 1), BlockCodec("lz4"), cache, downloads=1)
    store.delay = 0.2  # the first download is still running when the demand read comes, even on a busy machine

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for bid, data in blocks[:queued]:
                nursery.start_soon(fetcher.ensure, bid, len(data), Priority.PREFETCH)
                await trio.sleep(0.001)  # queue them in order
            bid, data = blocks[wanted]
            assert await fetcher.read(bid, len(data), 0, len(data)) == data

    trio.run(main)
    index = {bid.hex(): i for i, (bid, _) in enumerate(blocks)}
    return [index[key.rsplit("/", 1)[1]] for key in store.keys]


def test_demand_reads_jump_the_prefetch_queue(tmp_path: Path) -> None:
    assert download_order(tmp_path, 8, queued=6, wanted=7) == [0, 7, 1, 2, 3, 4, 5]


def test_demand_read_raises_a_queued_prefetch(tmp_path: Path) -> None:
    # block 5 was queued last as a prefetch; a reader wants it: it goes next, and only once
    assert download_order(tmp_path, 6, queued=6, wanted=5) == [0, 5, 1, 2, 3, 4]


def test_cancelled_prefetch_does_not_fail_its_waiters(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    (bid, data), = _blocks(store, 1)
    cache = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    fetcher = BlockFetcher(AsyncStore(store, 1), BlockCodec("lz4"), cache, downloads=1)

    async def main() -> None:
        holder = fetcher.slots.ticket(Priority.DEMAND)
        await fetcher.slots.acquire(holder)  # every download now waits for a slot
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def prefetch() -> None:
                with scope:
                    await fetcher.ensure(bid, len(data), Priority.PREFETCH)

            nursery.start_soon(prefetch)
            await trio.testing.wait_all_tasks_blocked()  # the prefetch waits for the slot
            result: list[bytes] = []

            async def reader() -> None:
                result.append(await fetcher.read(bid, len(data), 0, 3))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()  # the reader waits for the prefetch's load
            scope.cancel()  # the file closed: its prefetch stops
            await trio.testing.wait_all_tasks_blocked()  # the reader starts its own load
            fetcher.slots.release()
        assert result == [data[:3]]

    trio.run(main)
    assert store.gets == 1


def test_an_entry_that_cannot_be_read_or_removed_is_downloaded_around(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, _cache, fetcher, bid, data = setup
    whole(fetcher, bid, data)
    fresh = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    cache_dir = fresh.dirs[0]
    real_create = cache_dir.create
    writes: list[bytes] = []

    def failing_read(*_args: object, **_kwargs: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def failing_remove(_bid: bytes) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    def recording_create(b: bytes, *, direct: bool = False, length: int = 0) -> NewEntry:
        writes.append(b)
        return real_create(b, direct=direct, length=length)

    cache_dir.read_into = failing_read  # type: ignore[method-assign]
    cache_dir.remove = failing_remove  # type: ignore[method-assign]
    cache_dir.create = recording_create  # type: ignore[method-assign]
    fetcher2 = BlockFetcher(AsyncStore(store, 8), BlockCodec("lz4"), fresh, recent_blocks=2)
    assert trio.run(fetcher2.read, bid, len(data), 3, 30) == data[3:30]  # sealed, unreadable, still served
    assert store.gets == 2 and writes == []  # downloaded once, into memory: the disk just failed to read it
    fetcher2.memory.drop(bid)
    assert trio.run(fetcher2.read, bid, len(data), 0, 9) == data[:9]
    # stored again (a new file may read back), still unreadable: served from memory once more
    assert writes == [bid] and store.gets == 4


def test_a_reply_from_an_entry_not_in_the_page_cache_is_read_in_a_thread(setup) -> None:  # type: ignore[no-untyped-def]
    store, cache, fetcher, bid, data = setup
    whole(fetcher, bid, data)
    fetcher.memory.drop(bid)  # no longer in memory (if a block buffer held it)
    path = cache.dir_for(bid).path(bid)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    threads: list[str] = []
    read_into = cache.read_into

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append("main" if threading.current_thread() is threading.main_thread() else "worker")
        return read_into(*args, **kwargs)

    cache.read_into = recording  # type: ignore[method-assign]
    out = memoryview(bytearray(5000))
    trio.run(fetcher.read_into, bid, len(data), 100, out)
    assert out == data[100:5100] and store.gets == 1
    assert threads == ["main", "worker"]  # tried without waiting, then waited off the event loop


@pytest.mark.parametrize("codec_name", ["none", "lz4"])
def test_a_warmed_block_goes_around_the_page_cache(tmp_path: Path, codec_name: str) -> None:
    """A warmup's downloads have no reader waiting: they are written with O_DIRECT, so they
    neither cost a copy into the page cache nor push a node's useful pages out. A reader's
    download goes through the page cache, where that reader finds it."""
    store = CountingStore(tmp_path / "store")
    codec = BlockCodec(codec_name)
    data = os.urandom((3 << 20) + 4321)
    bid, other = put_block(store, codec, data), put_block(store, codec, data[::-1])
    cache = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    fetcher = BlockFetcher(AsyncStore(store, 8), codec, cache, downloads=4, recent_blocks=0)
    assert trio.run(fetcher.warm, bid, len(data))
    out = memoryview(bytearray(4096))
    with pytest.raises(BlockingIOError):
        cache.read_into(bid, len(data) - 4096, out, nowait=True)
    assert trio.run(fetcher.read, bid, len(data), 0, len(data)) == data and store.gets == 1
    assert trio.run(fetcher.read, other, len(data), 0, 10) == data[::-1][:10] and store.gets == 2
    assert cache.read_into(other, len(data) - 4096, out, nowait=True) and out == data[::-1][-4096:]


def _buffered_fetcher(tmp_path: Path, buffers: int, capacity: int = 1 << 30,
                      sizes: tuple[int, ...] = ((3 << 20) + 5,)) -> tuple[CountingStore, BlockCache, BlockFetcher,
                                                                        list[tuple[bytes, bytes]]]:
    store = CountingStore(tmp_path / "store")
    codec = BlockCodec("none")
    blocks = [(put_block(store, codec, data), data) for data in (os.urandom(n) for n in sizes)]
    cache = BlockCache([tmp_path / "cache"], capacity=capacity, free_ratio=0)
    fetcher = BlockFetcher(AsyncStore(store, 8), codec, cache, downloads=2, recent_blocks=0, block_buffers=buffers)
    return store, cache, fetcher, blocks


def _in_page_cache(cache: BlockCache, bid: bytes, length: int) -> bool:
    try:
        return bool(cache.read_into(bid, length - 4096, memoryview(bytearray(4096)), nowait=True))
    except BlockingIOError:
        return False


def test_a_readers_download_is_served_from_its_block_buffer(tmp_path: Path) -> None:
    """A mount's download fills a block buffer: its readers copy from there, and the cache
    entry is written around the page cache (no copy into it, no pages pushed out)."""
    store, cache, fetcher, [(bid, data)] = _buffered_fetcher(tmp_path, 2)
    assert trio.run(fetcher.read, bid, len(data), 1000, 2_000_000) == data[1000:2_000_000]
    assert bid in fetcher.memory and cache.contains(bid) and store.gets == 1
    assert not _in_page_cache(cache, bid, len(data))
    assert Path(cache.dir_for(bid).path(bid)).read_bytes() == data
    cache.read_into = None  # type: ignore[assignment,method-assign]  # the next read must not touch the disk
    assert trio.run(fetcher.read, bid, len(data), 0, len(data)) == data and store.gets == 1


def test_a_download_never_pushes_out_a_block_not_yet_read(tmp_path: Path) -> None:
    store, cache, fetcher, [(a, da), (b, db), (c, dc)] = _buffered_fetcher(tmp_path, 1, sizes=(1 << 20,) * 3)
    assert trio.run(fetcher.ensure, a, len(da), Priority.PREFETCH).worked
    assert trio.run(fetcher.ensure, b, len(db), Priority.PREFETCH).worked
    assert a in fetcher.memory and b not in fetcher.memory  # b went straight to its entry instead
    assert cache.is_verified(b) and not _in_page_cache(cache, b, len(db))  # around the page cache
    assert Path(cache.dir_for(b).path(b)).read_bytes() == db
    assert not _in_page_cache(cache, a, len(da))
    assert trio.run(fetcher.read, a, len(da), 0, len(da)) == da  # a read whole: its buffer is free to reuse
    assert trio.run(fetcher.ensure, c, len(dc), Priority.READAHEAD).worked
    assert c in fetcher.memory and a not in fetcher.memory
    assert trio.run(fetcher.read, a, len(da), 0, len(da)) == da and store.gets == 3  # a from its entry


def test_a_readers_download_leaves_a_block_not_yet_read_alone(tmp_path: Path) -> None:
    """With no block buffer free, a download a reader waits for goes through the page
    cache, where the reader finds it."""
    store, cache, fetcher, [(a, da), (b, db)] = _buffered_fetcher(tmp_path, 1, sizes=(1 << 20,) * 2)
    assert trio.run(fetcher.ensure, a, len(da), Priority.PREFETCH).worked
    assert trio.run(fetcher.read, b, len(db), 5, 50) == db[5:50]
    assert a in fetcher.memory and b not in fetcher.memory and _in_page_cache(cache, b, len(db))
    assert trio.run(fetcher.read, a, len(da), 0, len(da)) == da and store.gets == 2


def test_a_cache_write_failing_midway_keeps_the_block_buffer(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With a block buffer, the bytes are all in memory when the disk fails: the block is
    served from there, with no second download."""
    store, cache, fetcher, [(bid, data)] = _buffered_fetcher(tmp_path, 2)
    monkeypatch.setattr(download_module, "PIECE", 64 << 10)  # so the entry is written in pieces
    cache_dir = cache.dirs[0]
    real_create = cache_dir.create

    def create(b: bytes, *, direct: bool = False, length: int = 0) -> NewEntry:
        entry = real_create(b, direct=direct, length=length)
        return EntryFillingUp(cache_dir, b, entry.tmp, entry._fd, direct=entry.direct)

    cache_dir.create = create  # type: ignore[method-assign]
    assert trio.run(fetcher.read, bid, len(data), 100, 90_000) == data[100:90_000]
    assert store.gets == 1 and fetcher.memory.in_buffer(bid)
    assert not cache.contains(bid) and os.listdir(cache_dir.tmp_dir) == []
    assert cache.metrics.cache_write_errors._value.get() == 1 and cache._reserved == 0
    assert trio.run(fetcher.read, bid, len(data), 0, len(data)) == data and store.gets == 1


def test_a_block_the_cache_declines_is_served_from_its_block_buffer(tmp_path: Path) -> None:
    store, cache, fetcher, [(bid, data)] = _buffered_fetcher(tmp_path, 2, capacity=1 << 20)
    assert trio.run(fetcher.read, bid, len(data), 0, len(data)) == data
    assert not cache.contains(bid) and fetcher.memory.in_buffer(bid) and store.gets == 1
    assert cache.metrics.cache_write_errors._value.get() == 1


def test_a_read_inside_a_held_block_is_answered_without_a_copy(tmp_path: Path) -> None:
    """FUSE reads that fall in one block held in a block buffer get a view of the buffer."""
    mib = 1 << 20
    store, _cache, fetcher, blocks = _buffered_fetcher(tmp_path, 4, sizes=(mib, mib, 5000))
    content = b"".join(data for _bid, data in blocks)
    reader = FileReader(fetcher, ReadConfig(block_size=mib, prefetch_patterns=()), fetcher.metrics)
    reader.opened(7, "model.bin", len(content), BlockList.dense(bid for bid, _data in blocks))
    assert reader.read_held(7, 0, 4096) is None  # nothing downloaded yet
    assert trio.run(reader.read_into, 7, 0, memoryview(bytearray(4096))) == 4096
    view = reader.read_held(7, 4096, 8192)
    assert view is not None and view == content[4096:12288] and view.obj is not None
    assert reader.read_held(7, mib - 10, 20) is None  # spans two blocks
    assert trio.run(reader.read_into, 7, 2 * mib, memoryview(bytearray(10))) == 10
    tail = reader.read_held(7, 2 * mib + 4000, 4096)  # clipped at the end of the file
    assert tail is not None and tail == content[2 * mib + 4000 :]
    assert store.gets == 2


# -- blocks already on the node, read whole into block buffers ------------------------------
def _planted(tmp_path: Path, buffers: int, sizes: tuple[int, ...]) -> tuple[CountingStore, BlockCache, BlockFetcher,
                                                                          list[tuple[bytes, bytes]]]:
    """A fetcher with ``buffers`` block buffers over a cache where a warmup (another
    fetcher) planted every block, around the page cache."""
    store, cache, fetcher, blocks = _buffered_fetcher(tmp_path, buffers, sizes=sizes)
    planter = BlockFetcher(AsyncStore(store, 8), BlockCodec("none"), cache, recent_blocks=0)
    for bid, data in blocks:
        assert trio.run(planter.warm, bid, len(data))
    return store, cache, fetcher, blocks


def test_a_block_on_the_node_is_read_whole_into_a_block_buffer(tmp_path: Path) -> None:
    """Fetching ahead a block already in the cache reads its entry whole into a block
    buffer, around the page cache; readers then copy from the buffer."""
    store, cache, fetcher, [(bid, data)] = _planted(tmp_path, 2, ((3 << 20) + 5,))
    assert not trio.run(fetcher.ensure, bid, len(data), Priority.READAHEAD).worked  # no download: not counted as work
    assert bid in fetcher.memory and not _in_page_cache(cache, bid, len(data))
    cache.read_into = None  # type: ignore[assignment,method-assign]  # the reads must not touch the disk
    assert trio.run(fetcher.read, bid, len(data), 0, len(data)) == data and store.gets == 1


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "index-not-loaded-yet"])
def test_a_restarted_mount_reads_sealed_entries_whole_into_block_buffers(tmp_path: Path, indexed: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Admitted by its seal (from the index, or found on disk by the download path before
    the index is loaded), an entry is not paged in: it is read whole into a block buffer."""
    store, _cache, _fetcher, [(bid, data)] = _planted(tmp_path, 2, ((1 << 20) + 3,))
    fresh = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    if indexed:
        assert fresh.load_index() == 1
    advised: list[int] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(advice))
    fetcher = BlockFetcher(AsyncStore(store, 8), BlockCodec("none"), fresh, recent_blocks=0, block_buffers=2)
    assert not trio.run(fetcher.ensure, bid, len(data), Priority.PREFETCH).worked
    assert bid in fetcher.memory and advised == []  # admitted, read whole, never paged in
    assert fresh.metrics.cache_entry_checks.labels("seal")._value.get() == 1
    assert fetcher.held_view(bid, 0, len(data)) == data and store.gets == 1


def test_without_a_free_block_buffer_a_block_on_the_node_is_paged_in(tmp_path: Path) -> None:
    store, cache, fetcher, [(a, da), (b, db)] = _planted(tmp_path, 1, ((1 << 20),) * 2)
    trio.run(fetcher.ensure, a, len(da), Priority.PREFETCH)
    trio.run(fetcher.ensure, b, len(db), Priority.PREFETCH)
    assert a in fetcher.memory and b not in fetcher.memory  # a not read yet: its buffer stays
    deadline = time.monotonic() + 10
    while not _in_page_cache(cache, b, len(db)):  # POSIX_FADV_WILLNEED reads in the background
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert trio.run(fetcher.read, b, len(db), 0, len(db)) == db and store.gets == 2


def test_an_entry_that_shrank_is_dropped_and_fetched_again(tmp_path: Path) -> None:
    store, cache, fetcher, [(bid, data)] = _planted(tmp_path, 2, (20_000,))
    os.truncate(cache.dir_for(bid).path(bid), 10_000)
    assert not trio.run(fetcher.ensure, bid, len(data), Priority.PREFETCH).worked
    assert bid not in fetcher.memory and not cache.is_verified(bid)
    assert cache.metrics.cache_corrupt._value.get() == 1
    assert trio.run(fetcher.read, bid, len(data), 0, len(data)) == data and store.gets == 2


def test_a_reader_waits_for_a_block_being_read_whole(tmp_path: Path) -> None:
    """A demand read of a block being read into a block buffer waits for that read instead
    of reading the disk a second time."""
    _store, cache, fetcher, [(bid, data)] = _planted(tmp_path, 2, ((2 << 20),))
    reads: list[str] = []
    whole_read, part_read = cache.read_whole_into, cache.read_into

    def slow_whole(*args):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        reads.append("whole")
        return whole_read(*args)

    def part(*args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append("part")
        return part_read(*args, **kwargs)

    cache.read_whole_into, cache.read_into = slow_whole, part  # type: ignore[method-assign]

    async def main() -> bytearray:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.ensure, bid, len(data), Priority.READAHEAD)
            await trio.testing.wait_all_tasks_blocked()  # the whole read is under way in a thread
            return await fetcher.read(bid, len(data), 4096, 8192)

    assert trio.run(main) == data[4096:8192] and reads == ["whole"]


def _entry_on_disk(tmp_path: Path, data: bytes, *, direct: bool = False) -> CacheDir:
    """A cache directory holding one published entry with ``data``."""
    cache_dir = CacheDir(tmp_path / "cache")
    entry = cache_dir.create(block_id(data), direct=direct, length=len(data))
    entry.write(data)
    entry.publish()
    return cache_dir


@pytest.mark.parametrize("length", [1 << 20, (1 << 20) + 123, 100])
def test_reading_an_entry_whole_around_the_page_cache(tmp_path: Path, length: int) -> None:
    data = os.urandom(length)
    cache_dir = _entry_on_disk(tmp_path, data, direct=True)  # not in the page cache either
    out = aligned_buffer(length)
    with memoryview(out) as view:
        assert cache_dir.read_whole_into(block_id(data), length, view) == length
        assert view[:length] == data
        with pytest.raises(ValueError):  # too small for an aligned read of the whole entry
            cache_dir.read_whole_into(block_id(data), length + 4096, view)
    assert not _page_cached(cache_dir.path(block_id(data)))


def test_reading_an_entry_whole_where_o_direct_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(5000)
    cache_dir = _entry_on_disk(tmp_path, data)
    real_open = os.open

    def no_direct(path, flags, *args):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    out = aligned_buffer(len(data))
    with memoryview(out) as view:
        assert cache_dir.read_whole_into(block_id(data), len(data), view) == len(data) and view[:5000] == data
    assert not cache_dir.direct  # remembered: later entries are written and read through the page cache


def _page_cached(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_blocks_on_the_node_are_read_in_just_ahead_of_the_reader(tmp_path: Path) -> None:
    """However far prefetch and readahead run, a block already in the cache is read into a
    block buffer only once the reader is within ``stage_ahead`` blocks of it (half the
    buffers), so the buffers hold what is read next."""
    mib = 1 << 20
    store, _cache, fetcher, blocks = _planted(tmp_path, 4, (mib,) * 8)
    assert fetcher.stage_ahead == 2
    content = b"".join(data for _bid, data in blocks)
    reader = FileReader(fetcher, ReadConfig(block_size=mib, prefetch_patterns=("*.bin",)), fetcher.metrics)

    def held() -> set[int]:
        return {i for i, (bid, _data) in enumerate(blocks) if bid in fetcher.memory}

    async def settled(condition: Callable[[], bool]) -> None:
        """Wait until ``condition`` holds and the fetcher reads nothing more into memory."""
        with trio.fail_after(10):
            while not condition() or fetcher._staging:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            reader.opened(7, "model.bin", len(content), BlockList.dense(bid for bid, _data in blocks))
            await settled(lambda: held() >= {0, 1})
            assert held() == {0, 1}  # nothing read yet: the furthest read is "before block 0"
            out = memoryview(bytearray(mib))
            for index in range(4):
                assert await reader.read_into(7, index * mib, out) == mib and out == blocks[index][1]
            await settled(lambda: held() >= {4, 5})
            assert not held() & {6, 7}
            reader.released(7)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert store.gets == len(blocks)  # the planter's downloads only


def test_prefetch_goes_past_blocks_on_the_node_to_download_the_rest(tmp_path: Path) -> None:
    """A model partly in the cache (an interrupted warmup): the prefetch leaves the cached
    blocks to be read in when the reader comes near, and downloads the rest at once, more
    blocks than there are block buffers and prefetch workers."""
    mib = 1 << 20
    store, cache, fetcher, blocks = _planted(tmp_path, 4, (mib,) * 8)
    codec = BlockCodec("none")
    blocks += [(put_block(store, codec, data), data) for data in (os.urandom(mib) for _ in range(8))]
    content = b"".join(data for _bid, data in blocks)
    config = ReadConfig(block_size=mib, prefetch_patterns=("*.bin",), prefetch_workers=2)
    reader = FileReader(fetcher, config, fetcher.metrics)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            reader.opened(7, "model.bin", len(content), BlockList.dense(bid for bid, _data in blocks))
            deadline = trio.current_time() + 10
            while not all(cache.is_verified(bid) for bid, _data in blocks[8:]):
                assert trio.current_time() < deadline, f"{store.gets - 8} of the 8 missing blocks downloaded"
                await trio.sleep(0.02)
            reader.released(7)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert store.gets == 8 + 8


def test_an_entry_hashed_ahead_of_its_reader_is_kept_in_a_block_buffer(tmp_path: Path) -> None:
    """Without trusted seals, an entry from elsewhere is read whole and hashed; those bytes
    are kept in a block buffer rather than read from the disk a second time."""
    store, _cache, _fetcher, [(bid, data)] = _planted(tmp_path, 2, ((1 << 20) + 7,))
    fresh = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0, trust_seals=False)
    assert fresh.load_index() == 1
    fetcher = BlockFetcher(AsyncStore(store, 8), BlockCodec("none"), fresh, recent_blocks=0, block_buffers=2)
    fresh.read_whole_into = None  # type: ignore[assignment,method-assign]  # a second read would fail
    assert trio.run(fetcher.ensure, bid, len(data), Priority.READAHEAD).worked  # hashed: counted as work
    assert fresh.metrics.cache_entry_checks.labels("hash")._value.get() == 1
    assert fetcher.held_view(bid, 0, len(data)) == data and store.gets == 1


def test_reading_an_entry_whole_where_o_direct_reads_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some filesystems take an O_DIRECT open and refuse the read: the entry is read
    through the page cache, and kept."""
    import fcntl

    data = os.urandom(9000)
    cache_dir = _entry_on_disk(tmp_path, data)
    real_preadv = os.preadv

    def no_direct(fd, buffers, offset, *args):  # type: ignore[no-untyped-def]
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", no_direct)
    out = aligned_buffer(len(data))
    with memoryview(out) as view:
        assert cache_dir.read_whole_into(block_id(data), len(data), view) == len(data) and view[:9000] == data
    assert not cache_dir.direct and cache_dir.exists(block_id(data))

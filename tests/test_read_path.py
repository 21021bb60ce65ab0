"""BlockFetcher and DiskCache against a real local store, driven by trio (no FUSE)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from chunkfs.blocks import BlockCodec, block_id, object_key
from chunkfs.cache.disk import DiskCache
from chunkfs.read.fetcher import BlockFetcher, BlockUnavailable
from chunkfs.store.aio import AsyncStore
from chunkfs.store.file import FileStore


class CountingStore(FileStore):
    """A real FileStore that counts GETs and can corrupt the next N bodies."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, create=True)
        self.gets = 0
        self.corrupt_next = 0
        self._lock = threading.Lock()

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        with self._lock:
            self.gets += 1
            corrupt = self.corrupt_next > 0
            self.corrupt_next -= corrupt
        data = super().get(key, start, end)
        return data[:-1] + bytes([data[-1] ^ 0xFF]) if corrupt else data


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = CountingStore(tmp_path / "store")
    codec = BlockCodec("lz4")
    data = os.urandom(200_000)
    bid = block_id(data)
    store.put(object_key(bid), codec.encode(data))
    cache = DiskCache(tmp_path / "cache")
    fetcher = BlockFetcher(AsyncStore(store, 8), codec, cache, recent_blocks=0)
    return store, cache, fetcher, bid, data


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
    assert sorted(results) == sorted(data[i * 1000 : i * 1000 + 500] for i in range(50))
    assert cache.contains(bid, len(data))


def test_corrupt_body_is_retried_then_fails_with_eio_cause(setup) -> None:  # type: ignore[no-untyped-def]
    store, cache, fetcher, bid, data = setup
    store.corrupt_next = 2
    assert trio.run(fetcher.load, bid, len(data)) == data
    assert store.gets == 3
    cache.drop(bid)
    store.corrupt_next = 10
    with pytest.raises(BlockUnavailable, match="failed 3 attempts"):
        trio.run(fetcher.load, bid, len(data))
    assert not cache.contains(bid, len(data))  # wrong bytes never reach the cache


def test_damaged_cache_entries_are_dropped_and_refetched(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, cache, fetcher, bid, data = setup
    trio.run(fetcher.load, bid, len(data))
    path = Path(cache.path(bid))
    for damage in (lambda b: b[:-10], lambda b: b"\0" + b[1:]):  # truncated, then flipped
        path.write_bytes(damage(path.read_bytes()))
        fresh = DiskCache(tmp_path / "cache")  # a restarted mount: nothing verified yet
        fetcher2 = BlockFetcher(AsyncStore(store, 8), BlockCodec("lz4"), fresh, recent_blocks=0)
        before = store.gets
        assert trio.run(fetcher2.read, bid, len(data), 0, len(data)) == data
        assert store.gets == before + 1
        assert path.read_bytes() == data


def test_failing_cache_disk_degrades_to_store_reads(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _store, cache, fetcher, bid, data = setup
    cache.tmp_dir = Path("/proc/chunkfs-no-such-dir")  # every cache write now fails (root ignores modes)
    assert trio.run(fetcher.read, bid, len(data), 10, 20) == data[10:20]
    assert not cache.contains(bid, len(data))
    assert trio.run(fetcher.read, bid, len(data), 0, 5) == data[:5]


def test_missing_block_is_unavailable(setup) -> None:  # type: ignore[no-untyped-def]
    _store, _cache, fetcher, _bid, _data = setup
    with pytest.raises(BlockUnavailable, match="missing"):
        trio.run(fetcher.load, block_id(b"nothing"), 7)


def test_stale_tmp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c")
    dead = cache.tmp_dir / f"{'ab' * 32}.999999999.deadbeef"
    mine = cache.tmp_dir / f"{'cd' * 32}.{os.getpid()}.cafebabe"
    dead.write_bytes(b"partial")
    mine.write_bytes(b"in progress")
    DiskCache(tmp_path / "c")
    assert not dead.exists() and mine.exists()

"""The read path's stages, each with a toy neighbour: ``SingleFlight`` with toy loads,
``BlockDownload`` with a toy ``get_into``, and a file's prefetch stopping on its own declined
block while another file's goes on (``FileReader`` over a real fetcher and a cache that
declines one file's blocks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from chunkfs.blocklist import BlockList
from chunkfs.blocks import BlockCodec, block_id, object_key
from chunkfs.cache.block_cache import BlockCache
from chunkfs.cache.disk import aligned_buffer
from chunkfs.cache.images import FileImages, image_id
from chunkfs.read.download import PIECE, BlockDownload, Busy
from chunkfs.read.fetcher import BlockFetcher, Source
from chunkfs.read.flight import Flight, FlightFailed, SingleFlight
from chunkfs.read.image_fill import fill_image
from chunkfs.read.reader import FileReader, ReadConfig
from chunkfs.read.slots import Priority
from chunkfs.store.aio import AsyncStore
from chunkfs.store.base import BodyRejected, Sink
from chunkfs.store.file import FileStore

# -- SingleFlight ------------------------------------------------------------------------------


def test_one_load_however_many_callers() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    loads = 0
    release = trio.Event()
    results: list[tuple[int, bool]] = []

    async def load(_flight: Flight[int]) -> int:
        nonlocal loads
        loads += 1
        await release.wait()
        return 42

    async def caller() -> None:
        results.append(await flights.run("k", load))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            assert "k" in flights
            release.set()
        assert "k" not in flights

    trio.run(main)
    assert loads == 1
    assert sorted(results) == [(42, False)] + [(42, True)] * 4


def test_a_failed_load_fails_its_waiters_and_the_next_run_loads_again() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    attempts = 0
    release = trio.Event()
    errors: list[BaseException] = []

    async def failing(_flight: Flight[int]) -> int:
        nonlocal attempts
        attempts += 1
        await release.wait()
        raise ValueError("store down")

    async def caller() -> None:
        try:
            await flights.run("k", failing)
        except (ValueError, FlightFailed) as exc:
            errors.append(exc)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert await flights.run("k", _constant(7)) == (7, False)

    trio.run(main)
    assert attempts == 1
    assert sorted(type(e).__name__ for e in errors) == ["FlightFailed", "FlightFailed", "ValueError"]
    assert all(isinstance(e.__cause__, ValueError) for e in errors if isinstance(e, FlightFailed))


def _constant(value: int):  # type: ignore[no-untyped-def]
    async def load(_flight: Flight[int]) -> int:
        return value
    return load


def test_a_cancelled_load_hands_over_to_a_waiter() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    joined: list[object] = []

    async def slow(flight: Flight[int]) -> int:
        flight.note = "ticket"
        await trio.sleep_forever()
        return 0

    async def main() -> None:
        got: list[tuple[int, bool]] = []
        async with trio.open_nursery() as nursery:
            owner = trio.CancelScope()

            async def first() -> None:
                with owner:
                    await flights.run("k", slow)

            async def second() -> None:
                got.append(await flights.run("k", _constant(5), on_join=lambda f: joined.append(f.note)))

            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            owner.cancel()
        assert got == [(5, False)]  # the waiter ran its own load, and did not fail

    trio.run(main)
    assert joined == ["ticket"]


# -- BlockDownload -----------------------------------------------------------------------------


class ToyStore:
    """``get_into`` over a dict of objects, in small pieces; can flip a byte of the next bodies.
    ``lending``: how it treats ``Sink.lend``: "use" (receive into the lent memory), "ignore"
    (its own buffer), "shift" (a misbehaving store: one byte into the lent memory)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.gets = 0
        self.corrupt = 0
        self.lending = "ignore"
        self.in_place = 0

    def get_into(self, key: str, sink: Sink, buffer: memoryview) -> int:
        self.gets += 1
        body = bytearray(self.objects[key])
        if self.corrupt:
            self.corrupt -= 1
            body[-1] ^= 0xFF
        sink.restart()
        for at in range(0, len(body), 4096):
            piece = body[at : at + 4096]
            lent = sink.lend(len(piece) + (self.lending == "shift")) if self.lending != "ignore" else None
            if lent is not None and self.lending == "shift" and len(lent) > len(piece):
                target = lent[1 : 1 + len(piece)]
            elif lent is not None and len(lent) >= len(piece):
                target = lent[: len(piece)]
                self.in_place += 1
            else:
                target = buffer[: len(piece)]
            target[:] = piece
            sink.write(target)
        return len(body)


@pytest.fixture
def toy(tmp_path: Path):  # type: ignore[no-untyped-def]
    codec = BlockCodec("lz4")
    data = os.urandom(100_000)
    bid = block_id(data)
    store = ToyStore({object_key(bid): codec.encode(data)})
    cache = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    return BlockDownload(store.get_into, codec, cache), store, cache, bid, data


def _piece() -> memoryview:
    return memoryview(aligned_buffer(PIECE))


def test_a_download_lands_verified_in_the_cache(toy) -> None:  # type: ignore[no-untyped-def]
    download, store, cache, bid, data = toy
    got = download.download(bid, len(data), _piece())
    assert got.data is None and not got.declined and not got.planted
    assert cache.read(bid, 0, len(data)) == data and store.gets == 1


def test_a_download_into_a_block_buffer_keeps_the_bytes_there(toy) -> None:  # type: ignore[no-untyped-def]
    download, _store, cache, bid, data = toy
    block = aligned_buffer(len(data))
    got = download.download(bid, len(data), _piece(), block=block, around=True)
    assert block[: len(data)] == data and cache.read(bid, 0, len(data)) == data and not got.declined


@pytest.mark.parametrize("lending", ["use", "shift"])
def test_a_plain_block_is_received_straight_into_its_block_buffer(tmp_path: Path, lending: str) -> None:
    """Uncompressed blocks: the store receives into the block buffer the sink lends, and the
    bytes land there once; a store that writes elsewhere than lent still gets a copy made."""
    codec = BlockCodec("none")
    data = os.urandom(100_000)
    bid = block_id(data)
    store = ToyStore({object_key(bid): codec.encode(data)})
    store.lending = lending
    cache = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    block = aligned_buffer(len(data))
    got = BlockDownload(store.get_into, codec, cache).download(bid, len(data), _piece(), block=block, around=True)
    assert not got.declined and block[: len(data)] == data and cache.read(bid, 0, len(data)) == data
    assert store.in_place == (25 if lending == "use" else 0)


def test_a_compressed_block_is_not_lent_a_block_buffer(toy) -> None:  # type: ignore[no-untyped-def]
    download, store, cache, bid, data = toy  # lz4: the stored bytes are not the block's
    store.lending = "use"
    block = aligned_buffer(len(data))
    download.download(bid, len(data), _piece(), block=block, around=True)
    assert store.in_place == 0 and block[: len(data)] == data and cache.read(bid, 0, len(data)) == data


def test_a_wrong_body_is_rejected_and_nothing_is_published(toy) -> None:  # type: ignore[no-untyped-def]
    download, store, cache, bid, data = toy
    store.corrupt = 1
    with pytest.raises(BodyRejected):
        download.download(bid, len(data), _piece())
    assert not cache.contains(bid) and cache._reserved == 0


def test_an_entry_planted_by_another_process_is_used_not_downloaded(toy) -> None:  # type: ignore[no-untyped-def]
    download, store, cache, bid, data = toy
    other = BlockCache([cache.dirs[0].root], capacity=1 << 30, free_ratio=0)
    assert other.put(bid, data)
    got = download.download(bid, len(data), _piece())
    assert got.planted and store.gets == 0 and cache.is_verified(bid)


def test_another_process_holding_the_download_lock_means_busy(toy) -> None:  # type: ignore[no-untyped-def]
    download, store, cache, bid, data = toy
    token = cache.dirs[0].try_lock(bid)  # "another process" (locks are per open file description)
    assert token is not None
    try:
        with pytest.raises(Busy):
            download.download(bid, len(data), _piece())
        assert store.gets == 0
    finally:
        cache.dirs[0].unlock(token)
    assert download.download(bid, len(data), _piece()).data is None and store.gets == 1


def test_a_cache_without_room_declines_and_the_bytes_come_in_memory(tmp_path: Path) -> None:
    codec = BlockCodec("none")
    data = os.urandom(100_000)
    bid = block_id(data)
    store = ToyStore({object_key(bid): codec.encode(data)})
    cache = BlockCache([tmp_path / "cache"], capacity=10, free_ratio=0)
    got = BlockDownload(store.get_into, codec, cache).download(bid, len(data), _piece())
    assert got.declined and got.data == data and not cache.contains(bid)


# -- per-file prefetch state -------------------------------------------------------------------


def test_a_declined_block_stops_only_its_own_files_prefetch(tmp_path: Path) -> None:
    """The cache declines every block of one file: that file's prefetch stops at once, and
    the other file, opened at the same time, is prefetched whole."""
    block = 64 << 10
    store = FileStore(tmp_path / "store", create=True)
    codec = BlockCodec("none")
    files: dict[str, BlockList] = {}
    for name in ("declined.bin", "kept.bin"):
        ids = []
        for _ in range(6):
            data = os.urandom(block)
            bid = block_id(data)
            store.put(object_key(bid), codec.encode(data))
            ids.append(bid)
        files[name] = BlockList.dense(ids)
    cache = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    refused = set(files["declined.bin"])
    real_open_entry = cache.open_entry

    def open_entry(bid: bytes, length: int, *, direct: bool = False):  # type: ignore[no-untyped-def]
        if bid in refused:
            cache._declined(bid, "refused by the test")
            return None
        return real_open_entry(bid, length, direct=direct)

    cache.open_entry = open_entry  # type: ignore[method-assign]
    fetcher = BlockFetcher(AsyncStore(store, 2), codec, cache, downloads=1, recent_blocks=0)
    reader = FileReader(fetcher, ReadConfig(block_size=block, prefetch_patterns=("*.bin",), prefetch_workers=1))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            for ino, (name, blocks) in enumerate(files.items(), start=1):
                reader.opened(ino, name, block * len(blocks), blocks)
            with trio.fail_after(30):
                while not all(cache.is_verified(bid) for bid in files["kept.bin"]):
                    await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert fetcher.downloads == len(files["kept.bin"]) + 1  # the declined file: its first block only


# -- filling a file image ----------------------------------------------------------------------


def _image_volume(tmp_path: Path, blocks: int, block: int = 64 << 10,  # type: ignore[no-untyped-def]
                  codec: str = "lz4"):
    """A file store holding a file of ``blocks`` blocks (the last one short, the second
    repeated as the fourth: one block twice in one file), a fetcher over it, and the file."""
    store = FileStore(tmp_path / "store", create=True)
    blockcodec = BlockCodec(codec)
    pieces = [os.urandom(block) for _ in range(blocks - 1)] + [os.urandom(block // 3)]
    if blocks > 3:
        pieces[3] = pieces[1]
    ids = []
    for data in pieces:
        bid = block_id(data)
        store.put(object_key(bid), blockcodec.encode(data))
        ids.append(bid)
    cache = BlockCache([tmp_path / "cache"], capacity=1 << 30, free_ratio=0)
    fetcher = BlockFetcher(AsyncStore(store, 4), blockcodec, cache, downloads=3, block_buffers=2)
    return store, fetcher, cache, BlockList.dense(ids), b"".join(pieces)


def _fill(fetcher: BlockFetcher, images: FileImages, blocks: BlockList, size: int) -> tuple[bool, bytes]:
    """Fill the file's image; (whether it was published, its id)."""
    key = image_id(size, blocks)
    assert key is not None

    async def main() -> bool:
        return await fill_image(fetcher, images, key, size, blocks, Priority.DEMAND, parallel=4)

    return trio.run(main), key


def test_a_file_image_is_filled_from_downloads_verified(tmp_path: Path) -> None:
    _store, fetcher, cache, blocks, data = _image_volume(tmp_path, 6)
    images = FileImages(cache, 64 << 10)
    filled, key = _fill(fetcher, images, blocks, len(data))
    assert filled
    path = images.find(key, len(data))
    assert path is not None and Path(path).read_bytes() == data
    assert fetcher.downloads == 5  # one block is in the file twice: downloaded once
    assert not any(cache.contains(bid) for bid in blocks)  # the image holds them: no entries of their own
    assert cache.block_count == 1
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_a_file_image_is_filled_from_entries_and_memory_without_downloads(tmp_path: Path) -> None:
    _store, fetcher, cache, blocks, data = _image_volume(tmp_path, 6, codec="none")
    images = FileImages(cache, 64 << 10)

    async def warm() -> None:  # blocks into the cache, the first ones also held in block buffers
        for index, bid in enumerate(blocks):
            length = len(data) - index * (64 << 10) if index == len(blocks) - 1 else 64 << 10
            await fetcher.read(bid, length, 0, 1)

    trio.run(warm)
    held = [fetcher.memory.in_buffer(bid) for bid in blocks]
    assert any(held) and not all(held)  # both ways are taken
    downloads = fetcher.downloads
    filled, key = _fill(fetcher, images, blocks, len(data))
    assert filled and fetcher.downloads == downloads
    path = images.find(key, len(data))
    assert path is not None and Path(path).read_bytes() == data


def test_a_damaged_block_leaves_no_image_behind(tmp_path: Path) -> None:
    store, fetcher, cache, blocks, data = _image_volume(tmp_path, 5)
    target = store.root / object_key(blocks[2])  # one stored block damaged on every try
    body = bytearray(target.read_bytes())
    body[-1] ^= 0xFF
    target.write_bytes(bytes(body))
    images = FileImages(cache, 64 << 10)
    filled, key = _fill(fetcher, images, blocks, len(data))
    assert not filled
    assert images.find(key, len(data)) is None
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    assert cache._reserved == 0  # the image's room was given back
    assert cache.used_bytes == sum(cache.entry_size(bid) or 0 for bid in set(blocks) if cache.is_verified(bid))


def test_blocks_held_only_by_an_image_are_read_from_it(tmp_path: Path) -> None:
    """After a fill, the image is the blocks' only copy on the node: a daemon-served read, a
    file sharing blocks with it (another pinned version) and ``warm`` take them from there."""
    _store, fetcher, cache, blocks, data = _image_volume(tmp_path, 6)
    images = FileImages(cache, 64 << 10)
    filled, key = _fill(fetcher, images, blocks, len(data))
    assert filled and cache.image_noted(key)
    downloads = fetcher.downloads

    async def reads() -> list[bytes]:
        out = []
        for index, bid in enumerate(blocks):
            length = len(data) - index * (64 << 10) if index == len(blocks) - 1 else 64 << 10
            out.append(bytes(await fetcher.read(bid, length, 0, length)))
            assert await fetcher.warm(bid, length) is Source.NODE
        return out

    assert b"".join(trio.run(reads)) == data
    # another file made of the same blocks in another order: its image is filled by copies
    other = BlockList.dense([blocks[4], blocks[1], blocks[0], blocks[2], blocks[3], blocks[5]])
    moved = b"".join(data[i * (64 << 10):(i + 1) * (64 << 10)] for i in (4, 1, 0, 2, 3)) + data[5 * (64 << 10):]
    filled, other_key = _fill(fetcher, images, other, len(moved))
    assert filled and fetcher.downloads == downloads
    path = images.find(other_key, len(moved))
    assert path is not None and Path(path).read_bytes() == moved
    # once the image is gone, so are its blocks: they are downloaded again
    cache.drop(key)
    cache.drop(other_key)
    assert not cache.in_image(blocks[0])
    assert trio.run(fetcher.read, blocks[0], 64 << 10, 0, 16) == data[:16]
    assert fetcher.downloads == downloads + 1


def test_an_image_removed_by_another_process_is_forgotten(tmp_path: Path) -> None:
    _store, fetcher, cache, blocks, data = _image_volume(tmp_path, 4)
    images = FileImages(cache, 64 << 10)
    filled, key = _fill(fetcher, images, blocks, len(data))
    assert filled
    downloads = fetcher.downloads
    os.unlink(images.path(key))  # warmup --evict in another process
    assert trio.run(fetcher.read, blocks[2], 64 << 10, 5, 10) == data[2 * (64 << 10) + 5: 2 * (64 << 10) + 10]
    assert fetcher.downloads == downloads + 1 and not cache.image_noted(key)


def test_a_sparse_file_has_no_image_and_telling_lists_no_slot() -> None:
    """2^40 slots, one stored: listing them would take the process's memory (the mount's
    sparse-file test bounds its RSS)."""
    assert image_id(1 << 56, BlockList(1 << 40, {5: b"x" * 32})) is None


def test_a_block_in_two_images_is_found_in_the_second_when_the_first_goes(tmp_path: Path) -> None:
    _store, fetcher, cache, blocks, data = _image_volume(tmp_path, 4)
    images = FileImages(cache, 64 << 10)
    filled, first = _fill(fetcher, images, blocks, len(data))
    other = BlockList.dense([blocks[2], blocks[0]])
    moved = data[2 * (64 << 10): 3 * (64 << 10)] + data[: 64 << 10]
    filled, second = _fill(fetcher, images, other, len(moved))
    assert filled
    downloads = fetcher.downloads
    cache.drop(first)
    assert cache.in_image(blocks[0]) and not cache.in_image(blocks[1])
    assert trio.run(fetcher.read, blocks[0], 64 << 10, 3, 9) == data[3:9]  # from the second image
    assert fetcher.downloads == downloads
    source = cache.block_source(blocks[0])
    assert source is not None and source[0] == second and source[1] == 64 << 10

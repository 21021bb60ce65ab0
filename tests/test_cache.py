"""BlockCache policy on real directories: capacity, LRU eviction, pins, free space, restart."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkfs.blocks import block_id
from chunkfs.cache import disk
from chunkfs.cache.block_cache import BlockCache
from tests.conftest import block_files, fill_up, tmpfs


def block(i: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = i.to_bytes(4, "big") * (size // 4)
    return block_id(data), data


def test_lru_eviction_keeps_recently_read_blocks(tmp_path: Path) -> None:
    cache = BlockCache([tmp_path], capacity=3000, free_ratio=0)
    blocks = [block(i) for i in range(4)]
    for bid, data in blocks[:3]:
        assert cache.put(bid, data)
    assert cache.read(blocks[0][0], 0, 4) == blocks[0][1][:4]  # block 0 is now the most recent
    assert cache.put(*blocks[3])
    assert not cache.contains(blocks[1][0])  # the least recently used went
    assert all(cache.contains(b) for b in (blocks[0][0], blocks[2][0], blocks[3][0]))
    assert cache.used_bytes == 3000 and cache.block_count == 3
    assert cache.metrics.cache_evictions._value.get() == 1


def test_pinned_blocks_are_never_evicted(tmp_path: Path) -> None:
    cache = BlockCache([tmp_path], capacity=2000, free_ratio=0)
    (a, da), (b, db), (c, dc) = block(1), block(2), block(3)
    cache.put(a, da)
    cache.put(b, db)
    cache.pin(a)
    assert cache.put(c, dc)
    assert cache.contains(a) and not cache.contains(b)
    cache.pin(c)
    assert not cache.put(b, db)  # everything is being read: decline, evict nothing
    assert cache.contains(a) and cache.contains(c)
    assert cache.metrics.cache_write_errors._value.get() == 1
    cache.unpin(a)
    assert cache.put(b, db) and not cache.contains(a)


def test_block_larger_than_capacity_is_declined(tmp_path: Path) -> None:
    cache = BlockCache([tmp_path], capacity=500, free_ratio=0)
    assert not cache.put(*block(1))
    assert cache.block_count == 0


def test_index_is_rebuilt_at_start_and_trimmed_to_capacity(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    cache = BlockCache(dirs, capacity=1 << 20, free_ratio=0)
    blocks = [block(i) for i in range(10)]
    for n, (bid, data) in enumerate(blocks):
        assert cache.put(bid, data)
        os.utime(cache.dir_for(bid).path(bid), (1_000_000 + n, 1_000_000 + n))
    assert {cache.dir_for(b) for b, _ in blocks} == set(cache.dirs)  # spread over both disks
    restarted = BlockCache(dirs, capacity=5000, free_ratio=0)
    assert restarted.load_index() == 10
    assert restarted.used_bytes == 5000 and restarted.block_count == 5
    assert [restarted.contains(b) for b, _ in blocks] == [False] * 5 + [True] * 5  # oldest went first
    bid, data = blocks[9]
    assert restarted.verify(bid, len(data)) == data and restarted.read(bid, 0, 8) == data[:8]


def test_verify_drops_damaged_entries(tmp_path: Path) -> None:
    cache = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    bid, data = block(7)
    cache.put(bid, data)
    path = Path(cache.dir_for(bid).path(bid))
    path.write_bytes(b"\xff" + data[1:])
    restarted = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    assert restarted.read(bid, 0, 10) is None  # never served unverified
    assert restarted.verify(bid, len(data)) is None
    assert not path.exists() and restarted.metrics.cache_corrupt._value.get() == 1


def sealed_entry(tmp_path: Path) -> tuple[bytes, bytes, Path]:
    bid, data = block(11)
    assert BlockCache([tmp_path], capacity=1 << 20, free_ratio=0).put(bid, data)
    return bid, data, Path(BlockCache([tmp_path], capacity=1 << 20).dir_for(bid).path(bid))


def test_a_restarted_cache_admits_a_sealed_entry_without_reading_it(tmp_path: Path) -> None:
    bid, data, _path = sealed_entry(tmp_path)
    restarted = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    assert restarted.read(bid, 0, 10) is None  # nothing is served before it is admitted
    assert not restarted.admit(bid, len(data) - 1)  # the block's length is part of the seal
    assert restarted.admit(bid, len(data)) and restarted.read(bid, 5, 25) == data[5:25]
    checks = restarted.metrics.cache_entry_checks
    assert checks.labels("seal")._value.get() == 1 and checks.labels("hash")._value.get() == 0
    assert not BlockCache([tmp_path], capacity=1 << 20, free_ratio=0, trust_seals=False).admit(bid, len(data))


@pytest.mark.parametrize("change", ["same bytes rewritten", "byte flipped", "truncated", "touched",
                                    "copied over with its times and xattrs", "another entry renamed onto it"])
def test_any_change_to_a_sealed_entry_breaks_its_seal(tmp_path: Path, change: str) -> None:
    bid, data, path = sealed_entry(tmp_path)
    assert BlockCache([tmp_path], capacity=1 << 20, free_ratio=0).admit(bid, len(data))  # sealed before
    if change == "same bytes rewritten":
        path.write_bytes(data)
    elif change == "byte flipped":
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(bytes([data[100] ^ 1]))
    elif change == "truncated":
        os.truncate(path, len(data) - 1)
    elif change == "touched":
        path.touch()
    elif change == "copied over with its times and xattrs":
        copy = tmp_path / "copy"
        shutil.copy2(path, copy)  # same bytes, mtime and seal, another inode
        os.rename(copy, path)
    else:
        other, other_data = block(12)  # same length, sealed as block 12
        cache = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
        assert cache.put(other, other_data)
        os.rename(cache.dir_for(other).path(other), path)
    restarted = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    assert not restarted.admit(bid, len(data))
    expected = data if change in ("same bytes rewritten", "touched", "copied over with its times and xattrs") else None
    assert restarted.verify(bid, len(data)) == expected  # hashed whole instead; damage is dropped
    assert path.exists() == (expected is not None)
    # an intact entry is sealed again once hashed, so the next process need not hash it
    assert BlockCache([tmp_path], capacity=1 << 20, free_ratio=0).admit(bid, len(data)) == path.exists()


def test_seals_from_an_earlier_boot_are_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bid, data, _path = sealed_entry(tmp_path)
    monkeypatch.setattr(disk, "BOOT_ID", bytes(16))  # the machine rebooted since
    after_reboot = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    assert not after_reboot.admit(bid, len(data))
    assert after_reboot.verify(bid, len(data)) == data  # hashed, then sealed for this boot
    assert BlockCache([tmp_path], capacity=1 << 20, free_ratio=0).admit(bid, len(data))


def test_a_filesystem_with_coarse_mtimes_gets_no_seals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_utime = os.utime

    def whole_seconds(fd: int, *, ns: tuple[int, int]) -> None:
        real_utime(fd, ns=(ns[0] // 10**9 * 10**9, ns[1] // 10**9 * 10**9))

    monkeypatch.setattr(os, "utime", whole_seconds)
    cache = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    bid, data = block(5)
    assert cache.put(bid, data) and not cache.dirs[0].sealing
    monkeypatch.undo()
    assert not BlockCache([tmp_path], capacity=1 << 20, free_ratio=0).admit(bid, len(data))


def test_a_refused_seal_leaves_the_entry_stored_but_unsealed(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")  # a security module, a quota: not "no xattrs"

    monkeypatch.setattr(os, "setxattr", refuse)
    cache = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    bid, data = block(6)
    assert cache.put(bid, data) and cache.read(bid, 0, 4) == data[:4]
    assert cache.dirs[0].sealing  # the next block may still be sealed
    monkeypatch.undo()
    restarted = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    assert not restarted.admit(bid, len(data)) and restarted.verify(bid, len(data)) == data


def test_a_filesystem_without_user_xattrs_leaves_entries_unsealed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refuse)
    cache = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    for i in (1, 2):
        bid, data = block(i)
        assert cache.put(bid, data) and cache.read(bid, 0, 4) == data[:4]  # stored and served all the same
    assert not cache.dirs[0].sealing
    monkeypatch.undo()
    restarted = BlockCache([tmp_path], capacity=1 << 20, free_ratio=0)
    assert not restarted.admit(bid, len(data)) and restarted.verify(bid, len(data)) == data


def test_cache_files_are_private(tmp_path: Path) -> None:
    cache = BlockCache([tmp_path / "c"], capacity=1 << 20, free_ratio=0)
    bid, data = block(3)
    cache.put(bid, data)
    path = Path(cache.dir_for(bid).path(bid))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (path.parent, path.parent.parent, tmp_path / "c"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        yield disk


def test_free_space_ratio_evicts_before_the_disk_fills(small_disk: Path) -> None:
    cache = BlockCache([small_disk], capacity=1 << 30, free_ratio=0.5)
    blocks = [block(i, 256 << 10) for i in range(12)]  # 3 MiB in all on a 4 MiB disk
    for bid, data in blocks:
        assert cache.put(bid, data)
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize >= 0.5 * st.f_blocks * st.f_frsize - (256 << 10)
    assert cache.contains(blocks[-1][0]) and not cache.contains(blocks[0][0])
    assert cache.metrics.cache_evictions._value.get() > 0


def test_full_disk_declines_without_emptying_the_cache(small_disk: Path) -> None:
    cache = BlockCache([small_disk], capacity=1 << 30, free_ratio=0.1)
    kept = block(1, 256 << 10)
    assert cache.put(*kept)
    fill_up(small_disk / "filler")  # someone else fills the disk
    assert not cache.put(*block(2, 256 << 10))
    assert cache.contains(kept[0])  # not evicted for a write that could not fit anyway
    cache_ff = BlockCache([small_disk], capacity=1 << 30, free_ratio=0)
    assert not cache_ff.put(*block(3, 256 << 10))  # ENOSPC itself is a decline, not an error


def test_concurrent_puts_never_overshoot_the_capacity(tmp_path: Path) -> None:
    import threading

    cache = BlockCache([tmp_path / "c"], capacity=4 * 65536, free_ratio=0.0)
    blocks = [bytes([i]) * 65536 for i in range(16)]
    barrier = threading.Barrier(16)

    def put(data: bytes) -> None:
        barrier.wait()
        cache.put(block_id(data), data)

    threads = [threading.Thread(target=put, args=(data,)) for data in blocks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    on_disk = sum(p.stat().st_size for p in block_files(tmp_path / "c"))
    assert cache.used_bytes <= cache.capacity and on_disk <= cache.capacity


def _evict_from_page_cache(path: str, timeout: float = 10.0) -> None:
    """Drop the file's pages from the page cache, and make sure they are gone: DONTNEED
    skips pages still queued on another CPU's LRU batch (seen on 2 busy cores), so ask again
    until a read that must not wait for the disk (``RWF_NOWAIT``) finds nothing."""
    fd = os.open(path, os.O_RDONLY)
    probe = bytearray(os.fstat(fd).st_size)
    deadline = time.monotonic() + timeout
    try:
        os.fsync(fd)
        while True:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            try:
                os.preadv(fd, [probe], 0, os.RWF_NOWAIT)
            except BlockingIOError:
                return
            assert time.monotonic() < deadline, f"{path} stays in the page cache"
            time.sleep(0.05)
    finally:
        os.close(fd)


def test_nowait_reads_come_only_from_the_page_cache(tmp_path: Path) -> None:
    """The event loop reads with ``nowait``: an entry not in the page cache raises
    ``BlockingIOError`` (to be read in a thread) instead of waiting for the disk."""
    cache = BlockCache([tmp_path], capacity=1 << 30, free_ratio=0)
    bid, data = block(1, 1 << 20)
    assert cache.put(bid, data)
    _evict_from_page_cache(cache.dir_for(bid).path(bid))
    out = memoryview(bytearray(4096))
    with pytest.raises(BlockingIOError):
        cache.read_into(bid, 8192, out, nowait=True)
    assert cache.read_into(bid, 8192, out) and out == data[8192 : 8192 + 4096]  # the thread's read
    assert cache.read_into(bid, 8192, out, nowait=True)  # in the page cache now
    assert cache.is_verified(bid)  # not mistaken for a damaged entry


def test_nowait_reads_fall_back_where_the_filesystem_refuses_them(tmp_path: Path) -> None:
    cache = BlockCache([tmp_path], capacity=1 << 30, free_ratio=0)
    bid, data = block(2)
    assert cache.put(bid, data)
    real_preadv = os.preadv

    def no_nowait(fd: int, buffers: list, offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_preadv(fd, buffers, offset)

    out = memoryview(bytearray(10))
    try:
        os.preadv = no_nowait  # type: ignore[assignment]
        with pytest.raises(BlockingIOError):
            cache.read_into(bid, 0, out, nowait=True)
    finally:
        os.preadv = real_preadv  # type: ignore[assignment]
    assert not cache.dirs[0].nowait
    with pytest.raises(BlockingIOError):  # not tried again
        cache.read_into(bid, 0, out, nowait=True)
    assert cache.read_into(bid, 0, out) and out == data[:10]


def _write_direct(cache: BlockCache, bid: bytes, pieces: list[bytes | memoryview]) -> bool:
    entry = cache.open_entry(bid, sum(len(p) for p in pieces), direct=True)
    assert entry is not None
    for piece in pieces:
        entry.write(piece)
    return cache.commit(entry) and entry.direct


def _aligned(data: bytes) -> memoryview:
    buffer = mmap.mmap(-1, len(data))
    buffer[:] = data
    return memoryview(buffer)


@pytest.mark.parametrize("shape", ["aligned pieces", "odd pieces", "aligned then odd", "short"])
def test_direct_entries_bypass_the_page_cache_and_hold_the_exact_bytes(tmp_path: Path, shape: str) -> None:
    """A warmup writes entries with O_DIRECT: pieces from aligned buffers go as they are,
    others through the staging buffer, and a tail that is not a whole page is padded and
    cut back. The result is byte for byte the block, and none of it sits in the page cache."""
    cache = BlockCache([tmp_path], capacity=1 << 30, free_ratio=0)
    data = os.urandom((3 << 20) + 12345 if shape != "short" else 777)
    if shape == "aligned pieces":
        pieces: list[bytes | memoryview] = [_aligned(data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
    elif shape == "odd pieces":
        pieces = [data[i : i + 100_003] for i in range(0, len(data), 100_003)]
    elif shape == "aligned then odd":
        pieces = [_aligned(data[: 1 << 20]), data[1 << 20 : (1 << 20) + 5], _aligned(data[(1 << 20) + 5 :])]
    else:
        pieces = [data]
    bid = block_id(data)
    assert _write_direct(cache, bid, pieces)
    cache_dir = cache.dir_for(bid)
    with open(cache_dir.path(bid), "rb") as f:
        on_disk = f.read()
    _evict_from_page_cache(cache_dir.path(bid))  # the read above paged it in
    assert on_disk == data and os.listdir(cache_dir.tmp_dir) == []
    assert cache.is_verified(bid) and cache.used_bytes == len(data)


def test_a_direct_entry_is_not_left_in_the_page_cache(tmp_path: Path) -> None:
    cache = BlockCache([tmp_path], capacity=1 << 30, free_ratio=0)
    data = os.urandom(2 << 20)
    bid = block_id(data)
    assert _write_direct(cache, bid, [_aligned(data[: 1 << 20]), _aligned(data[1 << 20 :])])
    out = memoryview(bytearray(4096))
    with pytest.raises(BlockingIOError):  # a buffered write would have left it there
        cache.read_into(bid, 0, out, nowait=True)
    assert cache.read_into(bid, 4096, out) and out == data[4096:8192]


def test_a_filesystem_refusing_o_direct_opens_gets_buffered_entries(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, mode))  # as tmpfs before Linux 6.6: made, then refused
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    cache = BlockCache([tmp_path], capacity=1 << 30, free_ratio=0)
    bid, data = block(7, 10_000)
    monkeypatch.setattr(os, "open", no_direct)
    assert not _write_direct(cache, bid, [data])  # stored, but not directly
    monkeypatch.undo()
    assert not cache.dirs[0].direct and os.listdir(cache.dirs[0].tmp_dir) == []
    assert cache.read(bid, 0, len(data)) == data


def test_a_filesystem_refusing_o_direct_writes_gets_buffered_entries(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def no_direct(fd: int, data: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    cache = BlockCache([tmp_path], capacity=1 << 30, free_ratio=0)
    data = os.urandom((2 << 20) + 99)
    bid = block_id(data)
    monkeypatch.setattr(os, "write", no_direct)
    assert not _write_direct(cache, bid, [_aligned(data[: 1 << 20]), data[1 << 20 :]])
    monkeypatch.undo()
    assert not cache.dirs[0].direct
    assert cache.read(bid, 0, len(data)) == data


def test_a_direct_entry_has_its_disk_space_reserved_up_front(tmp_path: Path) -> None:
    """Direct entries are written piece by piece, side by side with other downloads; their
    space is allocated when they are opened, so each stays contiguous on disk (as the page
    cache's delayed allocation makes buffered entries) and reads back sequentially."""
    cache = BlockCache([tmp_path], capacity=1 << 30, free_ratio=0)
    data = os.urandom(4 << 20)
    entry = cache.open_entry(block_id(data), len(data), direct=True)
    assert entry is not None and entry.direct
    st = os.stat(entry.tmp)
    assert st.st_size == 0 and st.st_blocks * 512 >= len(data)
    entry.write(_aligned(data[: 1 << 20]))
    entry.rewind()  # a retried download starts again: the space is reserved again
    st = os.stat(entry.tmp)
    assert st.st_size == 0 and st.st_blocks * 512 >= len(data)
    entry.write(_aligned(data))
    assert cache.commit(entry) and os.path.getsize(cache.dirs[0].path(block_id(data))) == len(data)


def _thp_eligible(address: int) -> bool:
    """The ``THPeligible`` flag of the mapping that holds ``address`` (/proc/self/smaps). It
    need not start there: the kernel merges a new mapping with an adjacent one of the same
    kind (another buffer still alive), so the mapping's start may be below the buffer's."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        span = line.split(" ", 1)[0]  # "start-end" on a mapping's first line, "Key:" on the others
        start, dash, end = span.partition("-")
        if dash and ":" not in span and int(start, 16) <= address < int(end, 16):
            for detail in lines[i + 1 :]:
                if detail.startswith("THPeligible:"):
                    return detail.split()[1] == "1"
    raise AssertionError(f"no mapping at {address:#x}")


_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not _THP_MODE.exists() or "[never]" in _THP_MODE.read_text(),
                    reason="transparent huge pages are off on this kernel")
def test_block_sized_buffers_ask_for_huge_pages() -> None:
    import ctypes

    from chunkfs.cache.disk import HUGE_PAGE, aligned_buffer

    big, small = aligned_buffer(8 << 20), aligned_buffer(HUGE_PAGE // 2)
    try:
        addresses = [ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in (big, small)]
        assert _thp_eligible(addresses[0]) and not _thp_eligible(addresses[1])
    finally:
        big.close()
        small.close()

"""Real FUSE mounts, read-only: every byte, listing, attribute and refusal through the kernel."""

from __future__ import annotations

import errno
import mmap
import os
import random
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkfs.blocks import DEFAULT_HASH, block_id
from tests import mount_guard
from tests.conftest import (
    BLOCK,
    VolumeFixture,
    block_files,
    chunkfs,
    expect_errno,
    listed_inodes,
    mounted,
    tree_listing,
)

pytestmark = pytest.mark.mount


@pytest.fixture(autouse=True, params=["libfuse", "native"])
def fuse_transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs over both FUSE transports (``--fuse-transport``)."""
    mount_guard.mount_args[:] = ["--fuse-transport", request.param]
    yield request.param
    mount_guard.mount_args.clear()

FILES = ["empty", "one", "block-minus-1", "block", "block-plus-1", "several", "zeros",
         "nested/copy-of-several", "nested/deeper/text.txt", "private"]


def test_every_file_reads_back_byte_for_byte(imported: VolumeFixture, source: Path) -> None:
    with mounted(imported) as m:
        for rel in FILES:
            assert (m.path / "model" / rel).read_bytes() == (source / rel).read_bytes(), rel
        # through a symlink too
        assert (m.path / "model/nested/link-to-several").read_bytes() == (source / "several").read_bytes()


def test_listing_sizes_modes_and_links_match_source(imported: VolumeFixture, source: Path) -> None:
    with mounted(imported) as m:
        assert tree_listing(m.path / "model") == tree_listing(source)
        assert os.readlink(m.path / "model/nested/link-to-several") == "../several"
        assert os.readlink(m.path / "model/dangling") == "does-not-exist"
        for rel in FILES:
            got, want = (m.path / "model" / rel).stat(), (source / rel).stat()
            assert (got.st_mode, got.st_size, got.st_mtime_ns) == (want.st_mode, want.st_size, want.st_mtime_ns)
        ls = subprocess.run(["ls", "-l", str(m.path / "model")], capture_output=True, text=True, check=True)
        assert "-rw------- 1" in ls.stdout  # the 0600 file
        assert f" {5 * BLOCK + 123} " in ls.stdout


def test_listings_start_with_dot_and_dotdot(imported: VolumeFixture) -> None:
    with mounted(imported) as m:
        model = m.path / "model"
        assert listed_inodes(m.path)[0] == (".", 1)
        for d, parent in ((model, m.path), (model / "nested", model), (model / "nested" / "deeper", model / "nested")):
            listed = listed_inodes(d)
            assert listed[:2] == [(".", d.stat().st_ino), ("..", parent.stat().st_ino)], d
            assert sorted(name for name, _ in listed[2:]) == sorted(os.listdir(d))
            assert {ino for _, ino in listed[2:]} == {(d / name).lstat().st_ino for name, _ in listed[2:]}


def test_random_ranges_match_source(imported: VolumeFixture, source: Path) -> None:
    """Random offsets and lengths (hypothesis) through the kernel against the source file."""
    data = (source / "several").read_bytes()
    with mounted(imported) as m, open(m.path / "model/several", "rb", buffering=0) as f:
        fd = f.fileno()

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(offset=st.integers(0, len(data) + 10), length=st.integers(0, 3 * BLOCK))
        def check(offset: int, length: int) -> None:
            assert os.pread(fd, length, offset) == data[offset : offset + length]

        check()


def test_mmap_reads(imported: VolumeFixture, source: Path) -> None:
    data = (source / "several").read_bytes()
    rng = random.Random(7)
    with mounted(imported) as m, open(m.path / "model/several", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            for _ in range(200):
                a = rng.randrange(len(data))
                b = min(len(data), a + rng.randrange(1, 2 * BLOCK))
                assert mm[a:b] == data[a:b]
            assert mm[:] == data
        finally:
            mm.close()


def test_safetensors_load_through_mount(volume: VolumeFixture, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "st-model"
    model.mkdir()
    rng = np.random.default_rng(3)
    tensors = {f"w{i}": rng.standard_normal(50_000 + i, dtype=np.float32) for i in range(5)}
    save_file(tensors, str(model / "model.safetensors"))
    chunkfs("import", volume.meta_url, str(model), "/st")
    with mounted(volume) as m:
        loaded = load_file(str(m.path / "st/model.safetensors"))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert np.array_equal(loaded[k], v)


def test_every_write_is_erofs(imported: VolumeFixture) -> None:
    with mounted(imported) as m:
        root = m.path / "model"
        f = root / "several"
        expect_errno(errno.EROFS, os.open, str(root / "new"), os.O_CREAT | os.O_WRONLY, 0o644)
        expect_errno(errno.EROFS, os.open, str(f), os.O_WRONLY)
        expect_errno(errno.EROFS, os.open, str(f), os.O_RDWR)
        expect_errno(errno.EROFS, os.truncate, str(f), 0)
        expect_errno(errno.EROFS, os.mkdir, str(root / "d"))
        expect_errno(errno.EROFS, os.rmdir, str(root / "nested/deeper"))
        expect_errno(errno.EROFS, os.unlink, str(f))
        expect_errno(errno.EROFS, os.rename, str(f), str(root / "moved"))
        expect_errno(errno.EROFS, os.symlink, "x", str(root / "newlink"))
        expect_errno(errno.EROFS, os.link, str(f), str(root / "hardlink"))
        expect_errno(errno.EROFS, os.chmod, str(f), 0o600)
        expect_errno(errno.EROFS, os.chown, str(f), 1, 1)
        expect_errno(errno.EROFS, os.utime, str(f), (1, 1))
        expect_errno(errno.EROFS, os.setxattr, str(f), "user.k", b"v")
        expect_errno(errno.EROFS, os.removexattr, str(f), "user.k")
        assert os.listxattr(str(f)) == []
        for _ in range(2):  # the first answer (ENOSYS) is remembered by the kernel
            with pytest.raises(OSError) as info:
                os.getxattr(str(f), "user.k")
            assert info.value.errno in (errno.ENODATA, errno.EOPNOTSUPP)


def test_lookup_errors_and_statfs(imported: VolumeFixture) -> None:
    with mounted(imported) as m:
        with pytest.raises(FileNotFoundError):
            (m.path / "model/nope").stat()
        with pytest.raises(NotADirectoryError):
            (m.path / "model/several/x").stat()
        with pytest.raises(OSError) as info:
            (m.path / ("x" * 300)).stat()
        assert info.value.errno == errno.ENAMETOOLONG
        vfs = os.statvfs(m.path)
        assert vfs.f_bsize == BLOCK and vfs.f_namemax == 255
        assert vfs.f_blocks * vfs.f_bsize >= sum((imported.tmp / "src" / p).stat().st_size for p in FILES)
        assert vfs.f_flag & os.ST_RDONLY


def test_blocks_read_are_kept_in_the_cache_dir(imported: VolumeFixture, source: Path) -> None:
    cache = imported.tmp / "cache"
    with mounted(imported, cache=cache) as m:
        (m.path / "model/several").read_bytes()
    files = block_files(cache)
    assert len(files) == 6  # ceil((5 * BLOCK + 123) / BLOCK)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert not any((cache / "tmp").iterdir())
    # a second mount reads the same bytes from the cache with the store's blocks gone
    for obj in (imported.storage / "blocks").rglob("*"):
        if obj.is_file():
            obj.unlink()
    with mounted(imported, cache=cache, name="mnt2") as m:
        assert (m.path / "model/several").read_bytes() == (source / "several").read_bytes()


def test_missing_block_is_eio_and_other_files_keep_working(imported: VolumeFixture, source: Path) -> None:
    with mounted(imported, allow_errors=True) as m:
        victim = m.path / "model/block-plus-1"
        # delete the store object of the second block of block-plus-1 (its 1-byte tail)
        tail = (source / "block-plus-1").read_bytes()[BLOCK:]
        key = block_id(tail, DEFAULT_HASH).hex()  # the volume's hash
        (imported.storage / "blocks" / key[:2] / key).unlink()
        with open(victim, "rb", buffering=0) as f:
            assert f.read(BLOCK) == (source / "block-plus-1").read_bytes()[:BLOCK]
            with pytest.raises(OSError) as info:
                f.read(10)
            assert info.value.errno == errno.EIO
        assert (m.path / "model/several").read_bytes() == (source / "several").read_bytes()
    log = m.log_text()
    assert "block-plus-1" in log and key in log and "missing" in log

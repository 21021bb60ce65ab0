"""Writable mounts, on real FUSE mounts: POSIX operations and their error codes (the stateful
test against a plain directory is in test_mount_differential.py), close-to-open between two mounts (SQLite and
Redis), dedup of a model written twice, kill -9 during a write, and a model written through
the mount then loaded with safetensors from a read-only mount."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chunkfs.blocks import object_key
from chunkfs.maintenance import collect_garbage
from chunkfs.meta.base import BUSY, CLAIMED
from chunkfs.volume import open_volume
from tests.conftest import (
    BLOCK,
    VolumeFixture,
    block_files,
    chunkfs,
    expect_errno,
    force_unmount,
    listed_inodes,
    mounted,
    require_mount_marker,
    volume_on,
    wait_for,
    wait_mounted,
)

pytestmark = pytest.mark.mount


@contextlib.contextmanager
def rw_mount(vol: VolumeFixture, name: str = "rw", *extra: str) -> Iterator[Path]:
    """A read-write mount of ``vol`` in a child process; always unmounted afterwards."""
    with mounted(vol, *extra, cache=vol.tmp / f"{name}-cache", name=name, read_only=False) as mount:
        yield mount.path


def store_objects(vol: VolumeFixture) -> set[str]:
    return {p.name for p in block_files(vol.storage)}


def test_posix_operations_and_errors(volume: VolumeFixture) -> None:
    with rw_mount(volume) as mnt:
        data = os.urandom(3 * BLOCK + 1234)
        (mnt / "f").write_bytes(data)
        assert (mnt / "f").read_bytes() == data and (mnt / "f").stat().st_size == len(data)
        with open(mnt / "f", "r+b") as f:  # random writes, inside and past the end, then fsync
            f.seek(BLOCK - 2)
            f.write(b"XXXX")
            f.seek(5 * BLOCK + 10)
            f.write(b"tail")
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            expected = data[:BLOCK - 2] + b"XXXX" + data[BLOCK + 2:] + bytes(5 * BLOCK + 10 - len(data)) + b"tail"
            assert f.read() == expected
        assert (mnt / "f").read_bytes() == expected
        os.truncate(mnt / "f", BLOCK + 5)
        assert (mnt / "f").read_bytes() == expected[:BLOCK + 5]
        os.truncate(mnt / "f", 2 * BLOCK)
        assert (mnt / "f").read_bytes() == expected[:BLOCK + 5] + bytes(BLOCK - 5)
        (mnt / "d" / "e").mkdir(parents=True)
        (mnt / "d" / "e" / "g").write_text("g")
        os.rename(mnt / "f", mnt / "d" / "f2")  # across directories
        (mnt / "over").write_text("old")
        os.rename(mnt / "d" / "e" / "g", mnt / "over")  # over an existing file
        assert (mnt / "over").read_text() == "g" and sorted(os.listdir(mnt / "d" / "e")) == []
        os.symlink("d/f2", mnt / "s")
        assert os.readlink(mnt / "s") == "d/f2" and (mnt / "s").read_bytes()[:5] == expected[:5]
        os.link(mnt / "over", mnt / "hard")
        assert (mnt / "over").stat().st_nlink == 2 and (mnt / "hard").stat().st_ino == (mnt / "over").stat().st_ino
        os.chmod(mnt / "over", 0o600)
        os.chown(mnt / "over", 1234, 5678)
        os.utime(mnt / "over", ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
        st_over = (mnt / "hard").stat()
        assert stat.S_IMODE(st_over.st_mode) == 0o600 and (st_over.st_uid, st_over.st_gid) == (1234, 5678)
        assert st_over.st_mtime_ns == 1_600_000_000_000_000_000
        os.setxattr(mnt / "over", "user.origin", b"hf://meta-llama")
        assert os.getxattr(mnt / "hard", "user.origin") == b"hf://meta-llama"
        assert os.listxattr(mnt / "over") == ["user.origin"]
        os.removexattr(mnt / "over", "user.origin")
        expect_errno(errno.ENODATA, os.getxattr, mnt / "over", "user.origin")
        assert os.statvfs(mnt).f_bavail > 0
        expect_errno(errno.ENOENT, os.stat, mnt / "nope")
        expect_errno(errno.EEXIST, os.mkdir, mnt / "d")
        expect_errno(errno.ENOTEMPTY, os.rmdir, mnt / "d")
        expect_errno(errno.EISDIR, os.unlink, mnt / "d")
        expect_errno(errno.ENOTDIR, os.rmdir, mnt / "over")
        expect_errno(errno.ENOTDIR, os.mkdir, mnt / "over" / "x")
        expect_errno(errno.ENAMETOOLONG, os.mkdir, mnt / ("x" * 256))
        expect_errno(errno.EINVAL, os.rename, mnt / "d", mnt / "d" / "e" / "inside")
        expect_errno(errno.EISDIR, os.rename, mnt / "over", mnt / "d")
        expect_errno(errno.EPERM, os.link, mnt / "d", mnt / "dlink")
        os.unlink(mnt / "hard")
        os.rmdir(mnt / "d" / "e")
        assert sorted(os.listdir(mnt)) == ["d", "over", "s"]
    with rw_mount(volume, "again") as mnt:  # everything was published
        assert (mnt / "d" / "f2").read_bytes() == expected[:BLOCK + 5] + bytes(BLOCK - 5)
        assert (mnt / "over").read_text() == "g" and stat.S_IMODE((mnt / "over").stat().st_mode) == 0o600


def test_a_moved_directory_lists_its_new_parent_as_dotdot(volume: VolumeFixture) -> None:
    with rw_mount(volume, "rw", "--entry-timeout", "60") as mnt:  # the kernel keeps the moved entry
        (mnt / "a" / "sub").mkdir(parents=True)
        (mnt / "b").mkdir()
        assert listed_inodes(mnt / "a" / "sub")[1] == ("..", (mnt / "a").stat().st_ino)
        os.rename(mnt / "a" / "sub", mnt / "b" / "sub")
        moved = mnt / "b" / "sub"
        assert listed_inodes(moved) == [(".", moved.stat().st_ino), ("..", (mnt / "b").stat().st_ino)]


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2) through glibc (the os module has no binding); raises OSError like os.rename."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def test_rename_exchange_swaps_two_entries(volume: VolumeFixture) -> None:
    noreplace, exchange = 1, 2
    with rw_mount(volume, "rw", "--entry-timeout", "60") as mnt:  # the kernel keeps both entries
        (mnt / "a" / "sub").mkdir(parents=True)
        (mnt / "a" / "sub" / "inner").write_text("inner")
        (mnt / "b").mkdir()
        (mnt / "b" / "new.bin").write_bytes(b"new weights")
        (mnt / "b" / "old.bin").write_bytes(b"old weights")
        renameat2(mnt / "b" / "new.bin", mnt / "b" / "old.bin", exchange)  # an atomic swap of two files
        assert (mnt / "b" / "old.bin").read_bytes() == b"new weights"
        assert (mnt / "b" / "new.bin").read_bytes() == b"old weights"
        renameat2(mnt / "a" / "sub", mnt / "b" / "new.bin", exchange)  # a directory and a file, across parents
        moved = mnt / "b" / "new.bin"
        assert (moved / "inner").read_text() == "inner" and (mnt / "a" / "sub").read_bytes() == b"old weights"
        assert listed_inodes(moved)[1] == ("..", (mnt / "b").stat().st_ino)
        assert (mnt / "a").stat().st_nlink == 2 and (mnt / "b").stat().st_nlink == 3
        expect_errno(errno.ENOENT, renameat2, mnt / "b" / "old.bin", mnt / "b" / "missing", exchange)
        expect_errno(errno.EINVAL, renameat2, mnt / "b" / "old.bin", mnt / "a" / "sub", exchange | noreplace)
        expect_errno(errno.EINVAL, renameat2, mnt / "b", moved / "inner", exchange)  # b into itself
        # RENAME_WHITEOUT (overlayfs upper layers) is refused, not taken for a plain rename
        expect_errno(errno.EINVAL, renameat2, mnt / "a" / "sub", mnt / "a" / "other", 4)
        assert (mnt / "a" / "sub").read_bytes() == b"old weights" and not (mnt / "a" / "other").exists()
    with rw_mount(volume, "again") as mnt:  # published, and the same from a fresh mount
        assert (mnt / "b" / "old.bin").read_bytes() == b"new weights"
        assert (mnt / "b" / "new.bin" / "inner").read_text() == "inner"
        assert (mnt / "a" / "sub").read_bytes() == b"old weights"
    fsck = json.loads(chunkfs("fsck", volume.meta_url, "--json").stdout)
    assert fsck["clean"] and fsck["files"] == 3


def test_two_mounts_see_each_others_files_after_close(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    for kind in ("sqlite", "redis"):
        (tmp_path / kind).mkdir()
        vol = volume_on(request, tmp_path / kind, kind)
        with rw_mount(vol, "a") as a, rw_mount(vol, "b") as b:
            payload = os.urandom(2 * BLOCK + 77)
            (a / "model.bin").write_bytes(payload)
            assert (b / "model.bin").read_bytes() == payload, kind
            (b / "model.bin").write_bytes(payload[::-1])  # rewritten on the other mount
            # attribute caches are 1 s on writable mounts: the other mount sees it once they expire
            rewritten = payload[::-1]
            wait_for(lambda: (a / "model.bin").read_bytes() == rewritten, timeout=10)  # noqa: B023 - used at once
            (a / "dir").mkdir()
            os.rename(a / "model.bin", a / "dir" / "m.bin")
            wait_for(lambda: os.listdir(b / "dir") == ["m.bin"], timeout=10)


def test_writing_a_model_the_volume_holds_stores_nothing_new(volume: VolumeFixture, tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "w.safetensors").write_bytes(os.urandom(5 * BLOCK + 3))
    chunkfs("import", volume.meta_url, str(src), "/imported")
    before = store_objects(volume)
    with rw_mount(volume) as mnt:
        shutil.copytree(src, mnt / "copy")
        assert (mnt / "copy" / "w.safetensors").read_bytes() == (src / "w.safetensors").read_bytes()
    assert store_objects(volume) == before


def test_written_blocks_reach_the_node_cache_only_with_cache_writes(volume: VolumeFixture) -> None:
    def cached(name: str) -> int:
        return len(block_files(volume.tmp / f"{name}-cache"))

    with rw_mount(volume, "plain") as mnt:
        (mnt / "a.bin").write_bytes(os.urandom(3 * BLOCK))
    with rw_mount(volume, "caching", "--cache-writes") as mnt:
        (mnt / "b.bin").write_bytes(os.urandom(3 * BLOCK))
    assert (cached("plain"), cached("caching")) == (0, 3)


@contextlib.contextmanager
def daemon_to_kill(vol: VolumeFixture, tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """A read-write mount whose daemon the test kills with SIGKILL; unmounted afterwards whatever happens."""
    mnt = tmp_path / "rw"
    mnt.mkdir()
    require_mount_marker()
    proc = subprocess.Popen([sys.executable, "-m", "chunkfs", "mount", vol.meta_url, str(mnt), "--cache-dir",
                             str(tmp_path / "c")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_mounted(mnt, proc)
        yield mnt, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        force_unmount(mnt)
        proc.wait()


def kill_9_holding(proc: subprocess.Popen, path: Path, flags: int, action: Callable[[int], object]) -> None:
    """Open ``path``, run ``action(fd)``, and kill the daemon with SIGKILL while the file is still open."""
    fd = os.open(path, flags)
    try:
        action(fd)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_kill_9_during_a_write_keeps_closed_files(volume: VolumeFixture, tmp_path: Path) -> None:
    with daemon_to_kill(volume, tmp_path) as (mnt, proc):
        kept = os.urandom(3 * BLOCK)
        (mnt / "kept.bin").write_bytes(kept)
        (mnt / "old.bin").write_bytes(b"old version")
        # being rewritten when the daemon dies
        kill_9_holding(proc, mnt / "old.bin", os.O_RDWR, lambda fd: os.write(fd, os.urandom(40 * BLOCK)))
    with rw_mount(volume) as again:
        assert (again / "kept.bin").read_bytes() == kept
        assert (again / "old.bin").read_bytes() == b"old version"
    report = json.loads(chunkfs("fsck", volume.meta_url, "--check-content", "--json").stdout)
    assert report["clean"] and report["files"] == 2
    assert report["orphans"] > 0  # blocks uploaded for the write that was never published: gc's job


def test_gc_deletes_unused_blocks_after_the_grace_period_and_fsck_stays_clean(volume: VolumeFixture) -> None:
    with rw_mount(volume) as mnt:
        (mnt / "keep.bin").write_bytes(os.urandom(2 * BLOCK))
        (mnt / "gone.bin").write_bytes(os.urandom(3 * BLOCK))
        (mnt / "rewritten.bin").write_bytes(os.urandom(BLOCK))
        (mnt / "rewritten.bin").write_bytes(os.urandom(BLOCK))
        with open(mnt / "gone.bin", "rb") as reader:  # open before the unlink: its blocks must stay readable
            os.unlink(mnt / "gone.bin")
            kept = json.loads(chunkfs("gc", volume.meta_url, "--json").stdout)  # default grace: 1 hour
            # the open, unlinked file still references its 3 blocks; the rewritten block is recent
            assert (kept["deleted"], kept["kept_recent"], kept["referenced"]) == (0, 1, 6)
            assert len(reader.read()) == 3 * BLOCK
    short = chunkfs("gc", volume.meta_url, "--grace", "10m", check=False)
    assert short.returncode == 2 and short.stderr.count("\n") == 1 and "add --force" in short.stderr
    assert len(store_objects(volume)) == 7
    dry = json.loads(chunkfs("gc", volume.meta_url, "--grace", "0", "--force", "--dry-run", "--json").stdout)
    assert (dry["deleted"], dry["referenced"]) == (4, 3) and len(store_objects(volume)) == 7
    done = chunkfs("gc", volume.meta_url, "--grace", "0", "--force")
    assert "deleted 4" in done.stdout and len(store_objects(volume)) == 3
    fsck = json.loads(chunkfs("fsck", volume.meta_url, "--check-content", "--json").stdout)
    assert fsck["clean"] and fsck["orphans"] == 0 and fsck["files"] == 2
    with rw_mount(volume, "after") as mnt:
        assert len((mnt / "keep.bin").read_bytes()) == 2 * BLOCK


def test_gc_never_deletes_a_block_whose_upload_a_writer_claimed(volume: VolumeFixture) -> None:
    """The race gc used to have: a writer re-uploads an old unreferenced block (dedup found no
    file naming it) while gc, which listed it as garbage, is about to delete it."""
    with open_volume(volume.meta_url) as vol:
        def orphan(content: bytes) -> bytes:
            bid = vol.codec.block_id(content)
            vol.store.put(object_key(bid), content)
            two_hours_ago = time.time() - 7200
            os.utime(volume.storage / object_key(bid), (two_hours_ago, two_hours_ago))
            return bid

        claimed, lone = orphan(b"claimed by a writer"), orphan(b"nobody wants this")
        assert vol.meta.claim_upload(claimed, time.time_ns()) == CLAIMED
        report = collect_garbage(vol, grace=3600, dry_run=False)
        assert report.deleted == 1 and vol.store.exists(object_key(claimed))
        assert not vol.store.exists(object_key(lone))
        # a writer that arrives while gc deletes waits for it (BUSY), then uploads again
        late = orphan(b"claimed during the delete")
        answers = []
        real_delete = vol.store.delete

        def delete_as_a_writer_arrives(key: str) -> None:
            if key == object_key(late):
                answers.append(vol.meta.claim_upload(late, time.time_ns()))
            real_delete(key)

        vol.store.delete = delete_as_a_writer_arrives  # type: ignore[method-assign]
        collect_garbage(vol, grace=0, dry_run=False)
        vol.store.delete = real_delete  # type: ignore[method-assign]
        assert answers == [BUSY] and vol.meta.claim_upload(late, time.time_ns()) == CLAIMED


def test_fsck_reports_missing_and_corrupt_blocks(volume: VolumeFixture) -> None:
    with rw_mount(volume) as mnt:
        (mnt / "a.bin").write_bytes(os.urandom(2 * BLOCK))
        (mnt / "b.bin").write_bytes(os.urandom(2 * BLOCK))
    objects = sorted(block_files(volume.storage))
    objects[0].unlink()
    objects[1].write_bytes(b"x" * BLOCK)  # same size, wrong content
    result = chunkfs("fsck", volume.meta_url, "--check-content", check=False)
    assert result.returncode == 1 and result.stderr.strip().endswith("fsck found problems")
    assert result.stdout.count("missing: ") == 1 and result.stdout.count("corrupt: ") == 1


def test_model_written_through_the_mount_loads_from_a_read_only_mount(volume: VolumeFixture, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = {f"layer.{i}.weight": np.random.default_rng(i).standard_normal((64, 333)).astype(np.float32)
               for i in range(6)}
    with rw_mount(volume) as mnt:
        (mnt / "llama").mkdir()
        save_file(tensors, str(mnt / "llama" / "model.safetensors"))
    with mounted(volume) as ro:
        loaded = load_file(str(ro.path / "llama" / "model.safetensors"))
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert np.array_equal(loaded[key], value), key


# -- a stateful property test: the mount behaves like a local directory ------------------------

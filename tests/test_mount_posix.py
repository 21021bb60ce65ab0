"""POSIX rules of writable mounts, each on a real FUSE mount (the differential state machine
in test_mount_write.py checks them in random combinations): O_TRUNC, special files, files
unlinked while open (and after kill -9), huge sparse files within the daemon's memory bound,
set-uid/set-gid clearing, timestamps visible at once, and a volume made by older code."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chunkfs.meta.base import MAX_FILE_SIZE, WRITABLE_FORMAT_VERSION
from tests.conftest import (
    BLOCK,
    VolumeFixture,
    block_files,
    chunkfs,
    expect_errno,
    mounted,
)
from tests.test_mount_write import daemon_to_kill, kill_9_holding, rw_mount, store_objects

pytestmark = pytest.mark.mount

DATA = Path(__file__).parent / "data"


def _stat(path: Path) -> os.stat_result:
    return os.stat(path, follow_symlinks=False)


def test_o_trunc_empties_the_file_and_marks_its_times(volume: VolumeFixture) -> None:
    """The issue's repro: shell redirection over a longer file, ``: > f``, and O_TRUNC without
    a write; then again after a remount."""
    with rw_mount(volume) as mnt:
        subprocess.run("echo '{\"a\": 1234567}' > c.json; echo '{\"a\": 1}' > c.json",
                       shell=True, cwd=mnt, check=True)
        assert (mnt / "c.json").read_bytes() == b'{"a": 1}\n'
        (mnt / "e").write_bytes(b"x" * (BLOCK + 5))
        subprocess.run(": > e", shell=True, cwd=mnt, check=True)
        assert (mnt / "e").read_bytes() == b""
        (mnt / "n").write_bytes(b"12345")
        before = _stat(mnt / "n")
        time.sleep(0.05)
        os.close(os.open(mnt / "n", os.O_WRONLY | os.O_TRUNC))
        after = _stat(mnt / "n")
        assert after.st_size == 0
        assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
        time.sleep(0.05)
        os.close(os.open(mnt / "n", os.O_WRONLY | os.O_TRUNC))  # already empty: the times move all the same
        assert _stat(mnt / "n").st_mtime_ns > after.st_mtime_ns
    with rw_mount(volume, "again") as mnt:
        assert (mnt / "c.json").read_bytes() == b'{"a": 1}\n'
        assert (mnt / "e").read_bytes() == b"" and (mnt / "n").read_bytes() == b""


def _make_specials(root: Path) -> None:
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(root / "blk", stat.S_IFBLK | 0o640, os.makedev(8, 17))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))


def _specials(root: Path) -> dict[str, tuple[int, int]]:
    return {name: (_stat(root / name).st_mode, _stat(root / name).st_rdev) for name in ("fifo", "chr", "blk", "sock")}


def test_special_files_are_kept_and_carried_everywhere(volume: VolumeFixture, tmp_path: Path) -> None:
    """FIFOs, device nodes and sockets: made through the mount, a FIFO carries bytes, and
    they survive a remount, a read-only mount, dump/load into another engine, fsck and status."""
    with rw_mount(volume) as mnt:
        _make_specials(mnt)
        made = _specials(mnt)
        assert stat.S_ISFIFO(made["fifo"][0]) and stat.S_ISSOCK(made["sock"][0])
        assert made["chr"] == (stat.S_IFCHR | 0o600, os.makedev(1, 3))
        assert made["blk"] == (stat.S_IFBLK | 0o640, os.makedev(8, 17))
        expect_errno(errno.EEXIST, os.mkfifo, mnt / "fifo")
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append((mnt / "fifo").read_bytes()))
        reader.start()
        (mnt / "fifo").write_bytes(b"through the pipe")
        reader.join(10)
        assert received == [b"through the pipe"]
        os.link(mnt / "chr", mnt / "chr2")
        os.unlink(mnt / "chr2")  # a device's remaining name gets a new ctime and keeps its rdev
    with mounted(volume, name="ro") as ro:
        assert _specials(ro.path) == made
    status = chunkfs("status", volume.meta_url).stdout
    assert "4 special files" in status
    fsck = json.loads(chunkfs("fsck", volume.meta_url, "--json").stdout)
    assert fsck["clean"]
    dump = chunkfs("dump", volume.meta_url).stdout
    other = tmp_path / "other.db"
    chunkfs("load", f"sqlite://{other}", input=dump)
    copy = VolumeFixture(f"sqlite://{other}", volume.storage, other, tmp_path / "copy")
    copy.tmp.mkdir()
    with mounted(copy, name="ro2") as ro:
        assert _specials(ro.path) == made


def test_a_file_unlinked_while_open_lives_until_its_last_close(volume: VolumeFixture) -> None:
    with rw_mount(volume) as mnt:
        data = os.urandom(2 * BLOCK + 7)
        (mnt / "t").write_bytes(data)
        objects = store_objects(volume)
        fd = os.open(mnt / "t", os.O_RDWR)
        reader = os.open(mnt / "t", os.O_RDONLY)
        os.unlink(mnt / "t")
        assert not (mnt / "t").exists()
        assert os.fstat(fd).st_nlink == 0 and os.fstat(fd).st_size == len(data)
        assert os.pread(fd, len(data), 0) == data and os.pread(reader, 10, BLOCK) == data[BLOCK:BLOCK + 10]
        os.pwrite(fd, b"appended", len(data))
        os.fsync(fd)  # published to the inode that has no name
        assert os.fstat(fd).st_size == len(data) + 8
        assert os.pread(fd, 8, len(data)) == b"appended"
        os.fchmod(fd, 0o600)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        fsck = json.loads(chunkfs("fsck", volume.meta_url, "--json").stdout)
        assert fsck["clean"] and fsck["files"] == 1  # the orphan is a file until its last close
        os.close(reader)
        os.close(fd)
        (mnt / "u").write_bytes(b"renamed over while open")
        (mnt / "v").write_bytes(b"the new one")
        with open(mnt / "u", "rb") as held:
            os.rename(mnt / "v", mnt / "u")
            assert held.read() == b"renamed over while open"
        assert (mnt / "u").read_bytes() == b"the new one"
    fsck = json.loads(chunkfs("fsck", volume.meta_url, "--json").stdout)
    assert fsck["clean"] and fsck["files"] == 1
    chunkfs("gc", volume.meta_url, "--grace", "0", "--force")
    assert store_objects(volume).isdisjoint(objects)  # the unlinked file's blocks were collected


def test_kill_9_with_a_file_unlinked_while_open_leaves_nothing_broken(volume: VolumeFixture, tmp_path: Path) -> None:
    with daemon_to_kill(volume, tmp_path) as (mnt, proc):
        (mnt / "keep").write_bytes(b"kept")
        (mnt / "doomed").write_bytes(os.urandom(3 * BLOCK))
        doomed = store_objects(volume) - {p.name for p in block_files(volume.storage) if p.read_bytes() == b"kept"}

        def unlink_and_read(fd: int) -> None:
            os.unlink(mnt / "doomed")
            assert len(os.pread(fd, 3 * BLOCK, 0)) == 3 * BLOCK

        kill_9_holding(proc, mnt / "doomed", os.O_RDONLY, unlink_and_read)
    fsck = json.loads(chunkfs("fsck", volume.meta_url, "--json").stdout)
    assert fsck["clean"] and fsck["files"] == 2  # the orphan is still a file of a session not yet found dead
    with rw_mount(volume, "again") as again:  # finds the dead session and releases its orphan
        assert sorted(p.name for p in again.iterdir()) == ["keep"]
    fsck = json.loads(chunkfs("fsck", volume.meta_url, "--json").stdout)
    assert fsck["clean"] and fsck["files"] == 1
    chunkfs("gc", volume.meta_url, "--grace", "0", "--force")
    assert not doomed & store_objects(volume)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_huge_sparse_file_stays_within_the_daemon_memory_bound(volume: VolumeFixture) -> None:
    """truncate to 2**50 and a pwrite at 2**45 cost what was written; zeros read back around
    it; a size past the limit is EFBIG; all after a remount too."""
    with mounted(volume, name="rw", read_only=False) as mount:
        mnt = mount.path
        before = _peak_rss_kib(mount.proc.pid)
        with open(mnt / "huge", "wb") as f:
            f.truncate(1 << 50)
            os.pwrite(f.fileno(), b"needle", 1 << 45)
        os.truncate(mnt / "huge", 1 << 50)  # again, on a file not open
        with open(mnt / "huge", "rb") as f:
            assert os.pread(f.fileno(), 16, (1 << 45) - 5) == bytes(5) + b"needle" + bytes(5)
            assert os.pread(f.fileno(), 1 << 20, 1 << 49) == bytes(1 << 20)
            assert os.pread(f.fileno(), 10, (1 << 50) - 4) == bytes(4)
        expect_errno(errno.EFBIG, os.truncate, mnt / "huge", MAX_FILE_SIZE + 1)
        with open(mnt / "huge", "r+b") as f:
            expect_errno(errno.EFBIG, os.pwrite, f.fileno(), b"x", MAX_FILE_SIZE)
        assert _stat(mnt / "huge").st_size == 1 << 50
        grown_mib = (_peak_rss_kib(mount.proc.pid) - before) >> 10
        assert grown_mib < 64, f"the daemon's peak RSS grew by {grown_mib} MiB"
    assert len(store_objects(volume)) == 1  # one block written, no zero blocks stored
    with rw_mount(volume, "again") as mnt, open(mnt / "huge", "rb") as f:
        assert os.pread(f.fileno(), 6, 1 << 45) == b"needle"


def test_set_id_bits_are_cleared_as_the_kernel_would(volume: VolumeFixture) -> None:
    with rw_mount(volume) as mnt:
        os.chmod(mnt, 0o777)
        for mode in (0o4777, 0o2777, 0o6777):
            path = mnt / f"w{mode:o}"
            path.write_bytes(b"root's")
            os.chmod(path, mode)
            # a write by someone other than root clears both (set-gid because group-execute is set)
            subprocess.run([sys.executable, "-c", "import os, sys; os.setgid(65534); os.setuid(65534); "
                            "fd = os.open(sys.argv[1], os.O_WRONLY); os.write(fd, b'x'); "
                            "assert os.fstat(fd).st_mode & 0o7777 == 0o777, oct(os.fstat(fd).st_mode)",
                            path.name], cwd=mnt, check=True)  # relative: the test's tmp dirs are 0700
            assert stat.S_IMODE(_stat(path).st_mode) == 0o777
        (mnt / "c").write_bytes(b"")
        os.chmod(mnt / "c", 0o6755)
        os.chown(mnt / "c", 1, 1)  # chown of a non-directory clears them, even by root
        assert stat.S_IMODE(_stat(mnt / "c").st_mode) == 0o755
        os.chmod(mnt / "c", 0o6745)  # set-gid without group-execute stays
        os.chown(mnt / "c", 2, 2)
        assert stat.S_IMODE(_stat(mnt / "c").st_mode) == 0o2745
        os.chmod(mnt / "c", 0o4755)
        with open(mnt / "c", "ab") as f:  # root's writes keep them
            f.write(b"root")
        assert stat.S_IMODE(_stat(mnt / "c").st_mode) == 0o4755
        os.mkdir(mnt / "sgid")
        os.chown(mnt / "sgid", 0, 4242)
        os.chmod(mnt / "sgid", 0o2775)
        (mnt / "sgid" / "f").write_bytes(b"")
        os.mkdir(mnt / "sgid" / "d")
        assert _stat(mnt / "sgid" / "f").st_gid == 4242 and _stat(mnt / "sgid" / "d").st_gid == 4242
        assert _stat(mnt / "sgid" / "d").st_mode & stat.S_ISGID


_UTIME_OMIT = (1 << 30) - 2


def _utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    times = (ctypes.c_long * 4)(*atime, *mtime)
    if libc.utimensat(-100, os.fsencode(path), times, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def test_times_are_right_at_once_and_survive_the_close(volume: VolumeFixture) -> None:
    with rw_mount(volume) as mnt:
        fd = os.open(mnt / "f", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"abc")
        first = os.fstat(fd)
        time.sleep(0.05)
        os.ftruncate(fd, 1)
        cut = _stat(mnt / "f")
        assert cut.st_size == 1 and cut.st_mtime_ns > first.st_mtime_ns and cut.st_ctime_ns > first.st_ctime_ns
        time.sleep(0.05)
        os.truncate(mnt / "f", 1)  # truncate(2) to the same size marks the times too, as on ext4
        assert _stat(mnt / "f").st_mtime_ns > cut.st_mtime_ns
        # cp -p: write, then set the times, then close; the close must not overwrite them
        os.write(fd, b"more")  # at offset 3: the truncate left the offset where it was
        os.utime(fd, ns=(1_000_000_123, 2_000_000_456))
        os.close(fd)
        assert (_stat(mnt / "f").st_atime_ns, _stat(mnt / "f").st_mtime_ns) == (1_000_000_123, 2_000_000_456)
        _utimensat(mnt / "f", (0, _UTIME_OMIT), (5, 6))
        assert (_stat(mnt / "f").st_atime_ns, _stat(mnt / "f").st_mtime_ns) == (1_000_000_123, 5_000_000_006)
        before = time.time_ns()
        _utimensat(mnt / "f", (0, (1 << 30) - 1), (0, _UTIME_OMIT))  # UTIME_NOW for atime only
        assert _stat(mnt / "f").st_atime_ns >= before - 10**7 and _stat(mnt / "f").st_mtime_ns == 5_000_000_006
        # times beyond what the volume stores (64-bit nanoseconds) are clamped, as ext4 clamps
        # to its range, not refused with EIO
        (mnt / "far").write_bytes(b"")
        os.utime(mnt / "far", ns=((1 << 40) * 10**9, -(1 << 40) * 10**9))
        far = _stat(mnt / "far")
        assert (far.st_atime_ns, far.st_mtime_ns) == ((1 << 63) - 1, -(1 << 63))
    with rw_mount(volume, "again") as mnt:
        assert _stat(mnt / "f").st_mtime_ns == 5_000_000_006 and (mnt / "f").read_bytes() == b"a\0\0more"
        assert _stat(mnt / "far").st_mtime_ns == -(1 << 63)


def test_a_volume_made_by_the_previous_format_reads_and_writes(tmp_path: Path) -> None:
    """tests/data/volume-v1 was made by chunkfs at 7d5a08d (format version 1, dense block
    lists, no rdev column). New code reads it as it was, and a writable mount raises it to
    the current format before writing holes or special files into it."""
    shutil.copytree(DATA / "volume-v1", tmp_path / "v1")
    db = tmp_path / "v1" / "meta.db"
    with sqlite3.connect(db) as conn:  # point the volume at its copied blocks
        fmt = json.loads(conn.execute("SELECT value FROM settings WHERE key='format'").fetchone()[0])
        assert fmt["format_version"] == 1
        fmt["storage"] = f"file://{tmp_path / 'v1' / 'blocks'}"
        conn.execute("UPDATE settings SET value=? WHERE key='format'", (json.dumps(fmt),))
    conn.close()
    vol = VolumeFixture(f"sqlite://{db}", tmp_path / "v1" / "blocks", db, tmp_path)
    source = DATA / "volume-v1-source.json"
    expected = json.loads(source.read_text())
    with mounted(vol, name="ro") as ro:
        for rel, digest in expected.items():
            assert hashlib.sha256((ro.path / rel).read_bytes()).hexdigest() == digest, rel
        assert os.readlink(ro.path / "models/m/link.bin") == "weights.bin"
    assert json.loads(chunkfs("fsck", vol.meta_url, "--check-content", "--json").stdout)["clean"]
    with rw_mount(vol) as mnt:
        with open(mnt / "sparse", "wb") as f:
            f.truncate(10 * BLOCK)
            f.write(b"head")
        os.mkfifo(mnt / "fifo")
        assert (mnt / "models/m/config.json").read_bytes() == b'{"a": 1}\n'
    status = json.loads(chunkfs("status", vol.meta_url, "--json").stdout)
    assert status["format"]["format_version"] == WRITABLE_FORMAT_VERSION
    assert json.loads(chunkfs("fsck", vol.meta_url, "--check-content", "--json").stdout)["clean"]
    with mounted(vol, name="ro2") as ro:
        assert (ro.path / "sparse").read_bytes() == b"head" + bytes(10 * BLOCK - 4)
        assert stat.S_ISFIFO(_stat(ro.path / "fifo").st_mode)



def test_fallocate_is_refused_as_documented_and_posix_fallocate_works(volume: VolumeFixture) -> None:
    """pyfuse3 has no fallocate handler: fallocate(2) gets EOPNOTSUPP in every mode (README),
    and glibc's posix_fallocate falls back to writing, so the file grows as asked."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    with rw_mount(volume) as mnt:
        fd = os.open(mnt / "f", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            for mode in (0, 1, 3, 0x10):  # default, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE
                assert libc.fallocate(fd, mode, 0, BLOCK) == -1 and ctypes.get_errno() == errno.EOPNOTSUPP
            os.posix_fallocate(fd, 0, 3 * BLOCK + 5)
            assert os.fstat(fd).st_size == 3 * BLOCK + 5
            assert os.pread(fd, 10, 2 * BLOCK) == bytes(10)
        finally:
            os.close(fd)

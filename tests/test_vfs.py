"""The Vfs driven without a kernel (as s3ql drives its Operations unmounted): a real SQLite
volume and file store, the real reader and writer, trio; no FUSE. The mount tests check the
same rules through the kernel; these pin the Vfs's own: handles, the read-only policy, the
stats file, reader/writer dispatch, listings, O_TRUNC, and files unlinked while open."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import pytest
import trio

from chunkfs.cache.block_cache import BlockCache
from chunkfs.errors import FsError
from chunkfs.meta.aio import AsyncMeta
from chunkfs.meta.base import ROOT_INODE
from chunkfs.meta.sessions import new_session_id
from chunkfs.metrics import Metrics
from chunkfs.read.fetcher import BlockFetcher
from chunkfs.read.reader import FileReader, ReadConfig
from chunkfs.store.aio import AsyncStore
from chunkfs.vfs.vfs import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    STATS_INODE,
    STATS_NAME,
    UNKNOWN_INODE,
    AttrChange,
    MountOptions,
    Vfs,
)
from chunkfs.volume import open_volume
from chunkfs.write.file_writer import FileWriter
from tests.conftest import BLOCK, VolumeFixture

Scenario = Callable[[Vfs], Awaitable[None]]


@contextmanager
def vfs_on(volume: VolumeFixture, *, read_only: bool) -> Iterator[Callable[[Scenario], None]]:
    """``run(scenario)``: the scenario on a Vfs of ``volume`` whose reader and writer run in
    the background, as in a mount."""
    vol = open_volume(volume.meta_url)
    metrics = Metrics()
    cache = BlockCache([volume.tmp / "cache"], capacity=1 << 30, free_ratio=0, metrics=metrics, hash=vol.fmt.hash)
    fetcher = BlockFetcher(AsyncStore(vol.store, 4), vol.codec, cache, downloads=4, block_buffers=4, metrics=metrics)
    reader = FileReader(fetcher, ReadConfig(block_size=vol.fmt.block_size), metrics)
    meta = AsyncMeta(vol.meta, immutable=read_only)
    writer = None if read_only else FileWriter(meta, AsyncStore(vol.store, 4), fetcher, vol.fmt.block_size)
    session = new_session_id()
    if writer is not None:
        vol.meta.open_session(session, 0)
    vfs = Vfs(meta, reader, vol.fmt.block_size, MountOptions(read_only=read_only), metrics, writer, session)

    def run(scenario: Scenario) -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(reader.run)
                if writer is not None:
                    await nursery.start(writer.run)
                await scenario(vfs)
                nursery.cancel_scope.cancel()

        trio.run(main)

    try:
        yield run
    finally:
        vol.close()


async def read_all(vfs: Vfs, fh: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        piece = bytes(await vfs.read(fh, len(out), min(1 << 20, size - len(out))))
        if not piece:
            break
        out += piece
    return bytes(out)


async def errno_of(call: Awaitable[object]) -> int:
    try:
        await call
    except FsError as exc:
        return exc.errno
    return 0


def test_write_read_publish_and_list(volume: VolumeFixture) -> None:
    data = os.urandom(3 * BLOCK + 123)

    async def scenario(vfs: Vfs) -> None:
        d = await vfs.mkdir(ROOT_INODE, b"models", 0o755, 0, 0)
        fh, attr = await vfs.create(d.ino, b"w.bin", 0o644, 0, 0)
        assert await vfs.write(fh, 0, data) == len(data)
        assert (await vfs.getattr(attr.ino)).size == len(data)  # unpublished, seen by this mount
        assert await read_all(vfs, fh, len(data)) == data  # the writer serves its own file
        await vfs.flush(fh)
        await vfs.release(fh)
        assert not vfs.handles.files and not vfs.handles.opens
        rfh, keep_cache = await vfs.open(attr.ino, os.O_RDONLY, 0)
        assert not keep_cache  # a writable mount: pages may change under the kernel
        assert await read_all(vfs, rfh, len(data)) == data  # now through the reader
        await vfs.release(rfh)
        dh = await vfs.opendir(d.ino)
        listing = list(vfs.readdir(dh, 0))
        assert [(e.name, e.offset) for e in listing] == [(b".", 1), (b"..", 2), (b"w.bin", 3)]
        assert listing[0].ino == d.ino and listing[1].ino == ROOT_INODE and listing[2].attr.size == len(data)
        assert [e.name for e in vfs.readdir(dh, 2)] == [b"w.bin"]  # resumed at an offset
        vfs.releasedir(dh)

    with vfs_on(volume, read_only=False) as run:
        run(scenario)
    with vfs_on(volume, read_only=True) as run:  # what another mount sees after the close

        async def reread(vfs: Vfs) -> None:
            d = await vfs.lookup(ROOT_INODE, b"models")
            f = await vfs.lookup(d.ino, b"w.bin")
            fh, keep_cache = await vfs.open(f.ino, os.O_RDONLY, 0)
            assert keep_cache and await read_all(vfs, fh, f.size) == data
            await vfs.release(fh)

        run(reread)


def test_a_read_only_vfs_refuses_every_change(imported: VolumeFixture) -> None:
    async def scenario(vfs: Vfs) -> None:
        model = await vfs.lookup(ROOT_INODE, b"model")
        f = next(e.attr for e in vfs.readdir(await vfs.opendir(model.ino), 2) if e.attr is not None and e.attr.is_reg)
        name = vfs.name_of(f.ino).encode()
        refusals = [
            vfs.mkdir(ROOT_INODE, b"x", 0o755, 0, 0), vfs.symlink(ROOT_INODE, b"x", b"t", 0, 0),
            vfs.mknod(ROOT_INODE, b"x", stat.S_IFIFO | 0o644, 0, 0, 0), vfs.link(f.ino, ROOT_INODE, b"x"),
            vfs.rmdir(ROOT_INODE, b"x"), vfs.unlink(model.ino, name),
            vfs.rename(model.ino, name, ROOT_INODE, b"x", 0),
            vfs.setattr(f.ino, AttrChange(mode=0o600), 0), vfs.setxattr(f.ino, b"user.a", b"1"),
            vfs.removexattr(f.ino, b"user.a"), vfs.create(ROOT_INODE, b"x", 0o644, 0, 0),
            vfs.open(f.ino, os.O_WRONLY, 0), vfs.open(f.ino, os.O_RDONLY | os.O_TRUNC, 0),
        ]
        for call in refusals:
            assert await errno_of(call) == errno.EROFS
        assert await errno_of(vfs.getxattr(f.ino, b"user.a")) == errno.ENOSYS  # the kernel stops asking
        assert await vfs.listxattr(f.ino) == []
        stats = await vfs.statfs()
        assert stats.free_blocks == 0 and stats.free_files == 0 and stats.blocks > 0

    with vfs_on(imported, read_only=True) as run:
        run(scenario)


def test_the_stats_file_is_found_by_name_only_and_never_written(volume: VolumeFixture) -> None:
    async def scenario(vfs: Vfs) -> None:
        attr = await vfs.lookup(ROOT_INODE, STATS_NAME)
        assert attr.ino == STATS_INODE and vfs.cache_timeout(STATS_INODE) == (1.0, 1.0)
        assert STATS_NAME not in [e.name for e in vfs.readdir(await vfs.opendir(ROOT_INODE), 0)]
        fh, _keep = await vfs.open(STATS_INODE, os.O_RDONLY, 0)
        assert vfs.is_direct(fh) and b"chunkfs_" in bytes(await vfs.read(fh, 0, 1 << 20))
        assert await errno_of(vfs.write(fh, 0, b"x")) == errno.EBADF
        assert await errno_of(vfs.link(STATS_INODE, ROOT_INODE, b"x")) == errno.EPERM
        assert await errno_of(vfs.setattr(STATS_INODE, AttrChange(mode=0o600), 0)) == errno.EPERM
        await vfs.release(fh)
        assert not vfs.handles.opens

    with vfs_on(volume, read_only=False) as run:
        run(scenario)


def test_o_trunc_unlink_while_open_and_rename_flags(volume: VolumeFixture) -> None:
    async def scenario(vfs: Vfs) -> None:
        fh, f = await vfs.create(ROOT_INODE, b"f", 0o644, 0, 0)
        await vfs.write(fh, 0, b"hello world")
        await vfs.release(fh)
        rfh, _ = await vfs.open(f.ino, os.O_RDONLY | os.O_TRUNC, 1000)  # truncates, even read-only
        assert (await vfs.getattr(f.ino)).size == 0
        await vfs.release(rfh)
        wfh, _ = await vfs.open(f.ino, os.O_WRONLY, 0)
        await vfs.write(wfh, 0, b"kept")
        await vfs.unlink(ROOT_INODE, b"f")  # open here: an orphan of this session until its last close
        assert await errno_of(vfs.lookup(ROOT_INODE, b"f")) == errno.ENOENT
        assert await read_all(vfs, wfh, 4) == b"kept"
        assert vfs.meta.meta.orphans() == {f.ino: vfs.session}
        await vfs.release(wfh)
        assert vfs.meta.meta.orphans() == {} and await errno_of(vfs.getattr(f.ino)) == errno.ENOENT
        a = await vfs.mkdir(ROOT_INODE, b"a", 0o755, 0, 0)
        b = await vfs.mkdir(ROOT_INODE, b"b", 0o755, 0, 0)
        assert await errno_of(vfs.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", RENAME_NOREPLACE)) == errno.EEXIST
        assert await errno_of(vfs.rename(ROOT_INODE, b"a", ROOT_INODE, b"b",
                                         RENAME_EXCHANGE | RENAME_NOREPLACE)) == errno.EINVAL
        await vfs.rename(ROOT_INODE, b"a", b.ino, b"a", 0)  # a moved below b: its ``..`` follows
        dh = await vfs.opendir(a.ino)
        assert next(e.ino for e in vfs.readdir(dh, 1)) == b.ino

    with vfs_on(volume, read_only=False) as run:
        run(scenario)


def test_xattr_namespaces_and_far_times_as_on_ext4(volume: VolumeFixture) -> None:
    async def scenario(vfs: Vfs) -> None:
        _fh, f = await vfs.create(ROOT_INODE, b"f", 0o644, 0, 0)
        for name in (b"user.a", b"trusted.a", b"security.a"):
            await vfs.setxattr(f.ino, name, b"1")
        assert await errno_of(vfs.setxattr(f.ino, b"bogus.a", b"1")) == errno.EOPNOTSUPP
        assert await errno_of(vfs.setxattr(f.ino, b"system.posix_acl_access", b"1")) == errno.EOPNOTSUPP
        # too long or empty: ERANGE first, whatever the namespace (as Linux checks)
        assert await errno_of(vfs.setxattr(f.ino, b"x" * 300, b"1")) == errno.ERANGE
        assert await errno_of(vfs.setxattr(f.ino, b"", b"1")) == errno.ERANGE
        # a name stored before the rule (or loaded from such a volume's dump) still reads
        vfs.meta.meta.set_xattr(f.ino, b"older.a", b"2")
        assert await vfs.getxattr(f.ino, b"older.a") == b"2"
        attr = await vfs.setattr(f.ino, AttrChange(atime_ns=1 << 70, mtime_ns=-(1 << 70)), 0)
        assert (attr.atime_ns, attr.mtime_ns) == ((1 << 63) - 1, -(1 << 63))  # clamped, not EIO
        assert await errno_of(vfs.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 4)) == errno.EINVAL  # RENAME_WHITEOUT

    with vfs_on(volume, read_only=False) as run:
        run(scenario)


def test_a_directory_never_seen_lists_an_unknown_parent(volume: VolumeFixture) -> None:
    async def make(vfs: Vfs) -> None:
        await vfs.mkdir(ROOT_INODE, b"d", 0o755, 0, 0)

    with vfs_on(volume, read_only=False) as run:
        run(make)
    ino = open_volume(volume.meta_url).meta.lookup(ROOT_INODE, b"d").ino

    async def scenario(vfs: Vfs) -> None:
        dh = await vfs.opendir(ino)  # reached by inode number alone (as after an NFS export)
        assert [e.ino for e in vfs.readdir(dh, 0)][:2] == [ino, UNKNOWN_INODE]

    with vfs_on(volume, read_only=True) as run:
        run(scenario)


def test_a_failing_block_is_eio_naming_the_file(imported: VolumeFixture, caplog: pytest.LogCaptureFixture) -> None:
    for obj in imported.storage.rglob("*"):
        if obj.is_file() and obj.parent.parent.name == "blocks":
            obj.write_bytes(b"damaged")

    async def scenario(vfs: Vfs) -> None:
        model = await vfs.lookup(ROOT_INODE, b"model")
        listing = list(vfs.readdir(await vfs.opendir(model.ino), 2))
        f = next(e for e in listing if e.attr is not None and e.attr.is_reg and e.attr.size)
        fh, _ = await vfs.open(f.ino, os.O_RDONLY, 0)
        assert await errno_of(vfs.read(fh, 0, 4096)) == errno.EIO

    with vfs_on(imported, read_only=True) as run:
        run(scenario)
    assert any("read of" in r.message and "failed" in r.message for r in caplog.records)

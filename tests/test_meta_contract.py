"""The MetaStore contract, written once and run against every engine: SQLite, a
standalone redis-server, redis-server with TLS and an ACL user, and a 3-master cluster."""

from __future__ import annotations

import errno
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from chunkfs.blocklist import BlockList
from chunkfs.blocks import block_id
from chunkfs.errors import FsError, NotFormatted, UsageError
from chunkfs.meta import ROOT_INODE, MetaStore, open_meta
from chunkfs.meta.base import BUSY, CLAIMED, DELETE_MARK_TTL_NS, KNOWN
from chunkfs.meta.sessions import STALE_AFTER_S, new_session_id, release_dead_sessions
from tests.conftest import FMT

# the ``meta`` fixture (every engine, formatted with FMT) is in conftest.py


def ids(*chunks: bytes) -> list[bytes]:
    return [block_id(c) for c in chunks]


def test_format_round_trip_and_root(meta: MetaStore) -> None:
    assert meta.load_format() == FMT
    root = meta.getattr(ROOT_INODE)
    assert root.is_dir and meta.readdir(ROOT_INODE) == []
    assert meta.is_empty()


def test_namespace_basics(meta: MetaStore) -> None:
    d = meta.mkdir(ROOT_INODE, b"models", 0o750, 0, 0, 123)
    assert d.is_dir and stat.S_IMODE(d.mode) == 0o750 and d.mtime_ns == 123
    f = meta.publish_file(d.ino, b"w.bin", mode=0o644, uid=1, gid=2, mtime_ns=5, size=6,
                          blocks=ids(b"abcd", b"ef"))
    assert f.is_reg and f.size == 6 and (f.uid, f.gid) == (1, 2)
    link = meta.symlink(d.ino, b"l", b"w.bin", 0, 0, 7)
    assert link.is_link and meta.readlink(link.ino) == b"w.bin"
    assert [n for n, _ in meta.readdir(d.ino)] == [b"l", b"w.bin"]
    assert meta.lookup(d.ino, b"w.bin") == f
    assert meta.read_blocks(f.ino) == ids(b"abcd", b"ef")
    assert meta.getattr(ROOT_INODE).nlink == 3
    assert not meta.is_empty()


@pytest.mark.parametrize(("call", "code"), [
    (lambda m: m.lookup(ROOT_INODE, b"nope"), errno.ENOENT),
    (lambda m: m.getattr(999), errno.ENOENT),
    (lambda m: m.mkdir(ROOT_INODE, b"x" * 256, 0o755, 0, 0, 0), errno.ENAMETOOLONG),
    (lambda m: m.mkdir(ROOT_INODE, b"a/b", 0o755, 0, 0, 0), errno.EINVAL),
    (lambda m: m.unlink(ROOT_INODE, b"nope"), errno.ENOENT),
])
def test_errors(meta: MetaStore, call: Callable[[MetaStore], object], code: int) -> None:
    with pytest.raises(FsError) as info:
        call(meta)
    assert info.value.errno == code


def test_exists_and_type_errors(meta: MetaStore) -> None:
    d = meta.mkdir(ROOT_INODE, b"d", 0o755, 0, 0, 0)
    f = meta.publish_file(ROOT_INODE, b"f", mode=0o644, uid=0, gid=0, mtime_ns=0, size=0, blocks=[])
    for call, code in [
        (lambda: meta.mkdir(ROOT_INODE, b"d", 0o755, 0, 0, 0), errno.EEXIST),
        (lambda: meta.symlink(ROOT_INODE, b"f", b"t", 0, 0, 0), errno.EEXIST),
        (lambda: meta.publish_file(ROOT_INODE, b"d", mode=0o644, uid=0, gid=0, mtime_ns=0, size=0, blocks=[]),
         errno.EISDIR),
        (lambda: meta.lookup(f.ino, b"x"), errno.ENOTDIR),
        (lambda: meta.readdir(f.ino), errno.ENOTDIR),
        (lambda: meta.unlink(ROOT_INODE, b"d"), errno.EISDIR),
        (lambda: meta.readlink(d.ino), errno.EINVAL),
    ]:
        with pytest.raises(FsError) as info:
            call()
        assert info.value.errno == code


def test_publish_replaces_atomically_and_keeps_inode(meta: MetaStore) -> None:
    first = meta.publish_file(ROOT_INODE, b"f", mode=0o644, uid=0, gid=0, mtime_ns=1, size=8,
                              blocks=ids(b"aaaa", b"bbbb"))
    second = meta.publish_file(ROOT_INODE, b"f", mode=0o600, uid=0, gid=0, mtime_ns=2, size=2,
                               blocks=ids(b"cc"))
    assert second.ino == first.ino and second.size == 2 and stat.S_IMODE(second.mode) == 0o600
    assert meta.read_blocks(first.ino) == ids(b"cc")
    s = meta.stats()
    assert (s.files, s.unique_blocks, s.block_refs, s.unique_bytes) == (1, 1, 1, 2)
    assert not meta.block_known(block_id(b"aaaa")) and meta.block_known(block_id(b"cc"))


def test_publish_over_symlink_replaces_it(meta: MetaStore) -> None:
    meta.symlink(ROOT_INODE, b"x", b"target", 0, 0, 0)
    f = meta.publish_file(ROOT_INODE, b"x", mode=0o644, uid=0, gid=0, mtime_ns=0, size=1, blocks=ids(b"z"))
    assert meta.lookup(ROOT_INODE, b"x") == f and f.is_reg


def test_dedup_refcounts(meta: MetaStore) -> None:
    same = ids(b"aaaa", b"aaaa", b"bb")
    meta.publish_file(ROOT_INODE, b"one", mode=0o644, uid=0, gid=0, mtime_ns=0, size=10, blocks=same)
    meta.publish_file(ROOT_INODE, b"two", mode=0o644, uid=0, gid=0, mtime_ns=0, size=10, blocks=same)
    s = meta.stats()
    assert (s.logical_bytes, s.block_refs, s.unique_blocks, s.unique_bytes) == (20, 6, 2, 6)
    assert s.dedup_ratio == pytest.approx(20 / 6)
    meta.unlink(ROOT_INODE, b"one")
    meta.unlink(ROOT_INODE, b"two")
    s = meta.stats()
    assert (s.files, s.block_refs, s.unique_blocks) == (0, 0, 0)


def test_set_attrs(meta: MetaStore) -> None:
    d = meta.mkdir(ROOT_INODE, b"d", 0o755, 0, 0, 0)
    out = meta.set_attrs(d.ino, mode=0o700, uid=5, gid=6, mtime_ns=99)
    assert out.is_dir and stat.S_IMODE(out.mode) == 0o700 and (out.uid, out.gid, out.mtime_ns) == (5, 6, 99)


def test_concurrent_publishers_lose_no_entry(meta: MetaStore) -> None:
    def publish(prefix: str) -> None:
        for i in range(40):
            meta.publish_file(ROOT_INODE, f"{prefix}-{i}".encode(), mode=0o644, uid=0, gid=0, mtime_ns=0,
                              size=1, blocks=ids(b"x"))

    threads = [threading.Thread(target=publish, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(meta.readdir(ROOT_INODE)) == 160
    assert meta.stats().block_refs == 160


def test_registry_and_unformatted(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unsupported metadata URL"):
        open_meta("mysql://h/db")
    with pytest.raises(NotFormatted):
        open_meta(f"sqlite://{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()
    alias = open_meta(f"sqlite3://{tmp_path / 'a.db'}", create=True)
    assert alias.load_format() is None
    alias.close()


# -- writable mounts ---------------------------------------------------------------------------
def names(meta: MetaStore, ino: int = ROOT_INODE) -> list[bytes]:
    return [n for n, _ in meta.readdir(ino)]


def test_create_commit_and_truncate(meta: MetaStore) -> None:
    f = meta.create_file(ROOT_INODE, b"new.bin", 0o640, 5, 6, 10)
    assert f.is_reg and f.size == 0 and f.nlink == 1 and stat.S_IMODE(f.mode) == 0o640
    assert meta.read_blocks(f.ino) == []
    with pytest.raises(FsError) as err:
        meta.create_file(ROOT_INODE, b"new.bin", 0o640, 5, 6, 10)
    assert err.value.errno == errno.EEXIST
    after = meta.commit_file(f.ino, size=6, blocks=ids(b"abcd", b"ef"), mtime_ns=20)
    assert after.size == 6 and after.mtime_ns == 20 and meta.read_blocks(f.ino) == ids(b"abcd", b"ef")
    assert meta.stats().unique_blocks == 2 and meta.stats().logical_bytes == 6
    meta.commit_file(f.ino, size=3, blocks=ids(b"abc"), mtime_ns=30)  # a truncate
    stats = meta.stats()
    assert (stats.unique_blocks, stats.block_refs, stats.logical_bytes) == (1, 1, 3)
    assert not meta.block_known(block_id(b"abcd"))
    d = meta.mkdir(ROOT_INODE, b"d", 0o755, 0, 0, 0)
    with pytest.raises(FsError) as err:
        meta.commit_file(d.ino, size=0, blocks=BlockList(), mtime_ns=0)
    assert err.value.errno == errno.EISDIR


def test_rmdir(meta: MetaStore) -> None:
    d = meta.mkdir(ROOT_INODE, b"d", 0o755, 0, 0, 0)
    meta.create_file(d.ino, b"f", 0o644, 0, 0, 0)
    for name, code in ((b"d", errno.ENOTEMPTY), (b"nope", errno.ENOENT)):
        with pytest.raises(FsError) as err:
            meta.rmdir(ROOT_INODE, name)
        assert err.value.errno == code
    with pytest.raises(FsError) as err:
        meta.rmdir(d.ino, b"f")
    assert err.value.errno == errno.ENOTDIR
    meta.unlink(d.ino, b"f")
    assert meta.getattr(ROOT_INODE).nlink == 3
    meta.rmdir(ROOT_INODE, b"d")
    assert names(meta) == [] and meta.getattr(ROOT_INODE).nlink == 2
    assert meta.stats().directories == 1 and meta.stats().files == 0


def test_rename_moves_replaces_and_refuses(meta: MetaStore) -> None:
    a = meta.mkdir(ROOT_INODE, b"a", 0o755, 0, 0, 0)
    b = meta.mkdir(ROOT_INODE, b"b", 0o755, 0, 0, 0)
    meta.mkdir(a.ino, b"sub", 0o755, 0, 0, 0)
    f = meta.publish_file(a.ino, b"f", mode=0o644, uid=0, gid=0, mtime_ns=0, size=4, blocks=ids(b"1111"))
    g = meta.publish_file(b.ino, b"g", mode=0o644, uid=0, gid=0, mtime_ns=0, size=4, blocks=ids(b"2222"))
    meta.rename(a.ino, b"f", b.ino, b"g")  # over an existing file, across directories
    assert names(meta, a.ino) == [b"sub"] and meta.lookup(b.ino, b"g").ino == f.ino
    assert not meta.block_known(block_id(b"2222")) and meta.stats().files == 1
    with pytest.raises(FsError):
        meta.getattr(g.ino)
    meta.rename(a.ino, b"sub", b.ino, b"sub2")  # a directory to another parent: nlinks follow
    assert meta.getattr(a.ino).nlink == 2 and meta.getattr(b.ino).nlink == 3
    meta.rename(b.ino, b"g", b.ino, b"g")  # onto itself: nothing happens
    cases = [
        ((ROOT_INODE, b"b", b.ino, b"inside"), errno.EINVAL),  # into itself
        ((b.ino, b"sub2", ROOT_INODE, b"x"), None),  # fine
        ((ROOT_INODE, b"x", b.ino, b"g"), errno.ENOTDIR),  # a directory over a file
        ((b.ino, b"g", ROOT_INODE, b"a"), errno.EISDIR),  # a file over a directory
        ((ROOT_INODE, b"nope", ROOT_INODE, b"y"), errno.ENOENT),
    ]
    for args, code in cases:
        if code is None:
            meta.rename(*args)
            continue
        with pytest.raises(FsError) as err:
            meta.rename(*args)
        assert err.value.errno == code, args
    meta.create_file(a.ino, b"keep", 0o644, 0, 0, 0)
    with pytest.raises(FsError) as err:
        meta.rename(ROOT_INODE, b"x", ROOT_INODE, b"a")  # over a non-empty directory
    assert err.value.errno == errno.ENOTEMPTY
    with pytest.raises(FsError) as err:
        meta.rename(b.ino, b"g", a.ino, b"keep", noreplace=True)
    assert err.value.errno == errno.EEXIST
    meta.unlink(a.ino, b"keep")
    meta.rename(ROOT_INODE, b"x", ROOT_INODE, b"a")  # over an empty directory
    assert names(meta) == [b"a", b"b"] and meta.stats().directories == 3
    assert meta.getattr(ROOT_INODE).nlink == 4


def _directories(meta: MetaStore, ino: int = ROOT_INODE, parent: int = 0,
                 name: bytes = b"") -> list[tuple[int, int, bytes, set[int]]]:
    """Every directory below ``ino`` (itself included): (ino, parent, name, inodes of the
    directories at or below it), found by reading the tree down from ``ino``."""
    found: list[tuple[int, int, bytes, set[int]]] = []
    below = {ino}
    for child_name, attr in meta.readdir(ino):
        if stat.S_ISDIR(attr.mode):
            sub = _directories(meta, attr.ino, ino, child_name)
            below |= sub[0][3]
            found.extend(sub)
    return [(ino, parent, name, below), *found]


def test_no_directory_moves_below_itself_after_moves_and_exchanges(meta: MetaStore) -> None:
    """Directories moved within and across parents, swapped and renamed: afterwards every
    attempt to move a directory into itself or below it is EINVAL, on every engine (the
    Redis engine's check walks up from the destination by links that moves keep current)."""
    x1 = meta.mkdir(ROOT_INODE, b"x1", 0o755, 0, 0, 0)
    x2 = meta.mkdir(x1.ino, b"x2", 0o755, 0, 0, 0)
    x3 = meta.mkdir(x2.ino, b"x3", 0o755, 0, 0, 0)
    meta.mkdir(x3.ino, b"x4", 0o755, 0, 0, 0)
    y = meta.mkdir(ROOT_INODE, b"y", 0o755, 0, 0, 0)
    z = meta.mkdir(ROOT_INODE, b"z", 0o755, 0, 0, 0)
    meta.rename(x2.ino, b"x3", y.ino, b"x3")  # y/x3/x4
    meta.rename(ROOT_INODE, b"y", x2.ino, b"y")  # x1/x2/y/x3/x4
    meta.rename(x2.ino, b"y", x2.ino, b"y2")  # renamed in place
    meta.exchange(ROOT_INODE, b"z", x1.ino, b"x2")  # x1/z, and x2 (with y2/x3/x4) at the root as z
    meta.exchange(ROOT_INODE, b"x1", ROOT_INODE, b"z")  # names swapped at the root
    checked = 0
    for ino, parent, name, below in _directories(meta)[1:]:
        for target in below:
            with pytest.raises(FsError) as err:
                meta.rename(parent, name, target, b"probe")
            assert err.value.errno == errno.EINVAL, (ino, target)
            checked += 1
    assert checked == 13  # x2 with 4 at or below it, y2 3, x3 2, x4 1; x1 2 (itself, z); z 1
    assert meta.lookup(ROOT_INODE, b"x1").ino == x2.ino and meta.lookup(ROOT_INODE, b"z").ino == x1.ino
    assert meta.lookup(x1.ino, b"x2").ino == z.ino
    meta.rename(ROOT_INODE, b"z", x3.ino, b"moved")  # beside, not below, itself: allowed
    assert sorted(n for n, _ in meta.readdir(x3.ino)) == [b"moved", b"x4"]


def test_exchange_swaps_two_entries_of_any_types(meta: MetaStore) -> None:
    a = meta.mkdir(ROOT_INODE, b"a", 0o755, 0, 0, 0)
    b = meta.mkdir(ROOT_INODE, b"b", 0o755, 0, 0, 0)
    sub = meta.mkdir(a.ino, b"sub", 0o755, 0, 0, 0)
    f = meta.publish_file(b.ino, b"f", mode=0o644, uid=0, gid=0, mtime_ns=0, size=4, blocks=ids(b"1111"))
    g = meta.publish_file(b.ino, b"g", mode=0o644, uid=0, gid=0, mtime_ns=0, size=4, blocks=ids(b"2222"))
    before = meta.stats()
    meta.exchange(b.ino, b"f", b.ino, b"g")  # two files in one directory
    assert meta.lookup(b.ino, b"f").ino == g.ino and meta.lookup(b.ino, b"g").ino == f.ino
    meta.exchange(a.ino, b"sub", b.ino, b"f")  # a directory and a file across directories: nlinks follow
    assert meta.lookup(a.ino, b"sub").ino == g.ino and meta.lookup(b.ino, b"f").ino == sub.ino
    assert meta.getattr(a.ino).nlink == 2 and meta.getattr(b.ino).nlink == 3
    assert meta.getattr(sub.ino).ctime_ns > 0 and meta.getattr(g.ino).ctime_ns > 0
    meta.exchange(ROOT_INODE, b"a", ROOT_INODE, b"a")  # with itself: nothing happens
    after = meta.stats()
    assert (after.files, after.directories) == (before.files, before.directories)
    assert meta.block_known(block_id(b"1111")) and meta.block_known(block_id(b"2222"))
    for args, code in (((ROOT_INODE, b"b", b.ino, b"f"), errno.EINVAL),  # b would land inside itself
                       ((b.ino, b"f", ROOT_INODE, b"b"), errno.EINVAL),  # the same, named the other way
                       ((ROOT_INODE, b"a", ROOT_INODE, b"nope"), errno.ENOENT),
                       ((ROOT_INODE, b"nope", ROOT_INODE, b"a"), errno.ENOENT)):
        with pytest.raises(FsError) as err:
            meta.exchange(*args)
        assert err.value.errno == code, args
    assert sorted(names(meta)) == [b"a", b"b"] and sorted(names(meta, b.ino)) == [b"f", b"g"]


def test_hard_links(meta: MetaStore) -> None:
    f = meta.publish_file(ROOT_INODE, b"f", mode=0o644, uid=0, gid=0, mtime_ns=0, size=4, blocks=ids(b"1111"))
    d = meta.mkdir(ROOT_INODE, b"d", 0o755, 0, 0, 0)
    linked = meta.link(f.ino, d.ino, b"f2")
    assert linked.ino == f.ino and linked.nlink == 2
    for args, code in (((d.ino, ROOT_INODE, b"d2"), errno.EPERM), ((f.ino, ROOT_INODE, b"d"), errno.EEXIST)):
        with pytest.raises(FsError) as err:
            meta.link(*args)
        assert err.value.errno == code
    meta.rename(ROOT_INODE, b"f", d.ino, b"f2")  # both names are the same file: nothing happens
    assert meta.getattr(f.ino).nlink == 2
    meta.unlink(ROOT_INODE, b"f")
    assert meta.getattr(f.ino).nlink == 1 and meta.block_known(block_id(b"1111"))
    meta.unlink(d.ino, b"f2")
    assert not meta.block_known(block_id(b"1111"))


def test_xattrs_and_times(meta: MetaStore) -> None:
    f = meta.create_file(ROOT_INODE, b"f", 0o644, 0, 0, 0)
    assert meta.list_xattrs(f.ino) == []
    meta.set_xattr(f.ino, b"user.a", b"1")
    meta.set_xattr(f.ino, b"user.b", b"\x00\xff")
    assert meta.get_xattr(f.ino, b"user.b") == b"\x00\xff"
    assert meta.list_xattrs(f.ino) == [b"user.a", b"user.b"]
    calls = [(lambda: meta.set_xattr(f.ino, b"user.a", b"2", create=True), errno.EEXIST),
             (lambda: meta.set_xattr(f.ino, b"user.c", b"2", replace=True), errno.ENODATA),
             (lambda: meta.get_xattr(f.ino, b"user.c"), errno.ENODATA),
             (lambda: meta.remove_xattr(f.ino, b"user.c"), errno.ENODATA),
             (lambda: meta.get_xattr(999, b"user.a"), errno.ENOENT),
             (lambda: meta.set_xattr(f.ino, b"user.big", b"x" * 70000), errno.E2BIG)]
    for call, code in calls:
        with pytest.raises(FsError) as err:
            call()
        assert err.value.errno == code
    meta.set_xattr(f.ino, b"user.a", b"3", replace=True)
    meta.remove_xattr(f.ino, b"user.b")
    assert meta.list_xattrs(f.ino) == [b"user.a"] and meta.get_xattr(f.ino, b"user.a") == b"3"
    attr = meta.set_attrs(f.ino, atime_ns=111, mtime_ns=222)
    assert (attr.atime_ns, attr.mtime_ns) == (111, 222) and attr.ctime_ns > 222
    attr = meta.set_attrs(f.ino, atime_ns=(1 << 63) - 1, mtime_ns=-(1 << 63))  # the stored range's ends
    assert (attr.atime_ns, attr.mtime_ns) == ((1 << 63) - 1, -(1 << 63))
    assert (meta.getattr(f.ino).atime_ns, meta.getattr(f.ino).mtime_ns) == ((1 << 63) - 1, -(1 << 63))
    meta.unlink(ROOT_INODE, b"f")
    g = meta.create_file(ROOT_INODE, b"g", 0o644, 0, 0, 0)
    assert meta.list_xattrs(g.ino) == []  # nothing left behind by the deleted inode


def test_upload_claims_and_gc_delete_marks_exclude_each_other(meta: MetaStore) -> None:
    bid, hour, ms = block_id(b"new block"), 3600 * 10**9, 10**6  # Redis Lua compares times as doubles
    t0 = 10**18
    assert meta.claim_upload(bid, t0) == CLAIMED
    assert not meta.begin_delete(bid, t0 - hour, t0 + ms)  # a writer claimed it within the grace period
    assert meta.begin_delete(bid, t0 + ms, t0 + 2 * ms)  # that claim is older than gc's grace: gc may delete
    assert meta.claim_upload(bid, t0 + 3 * ms) == BUSY  # and a writer waits until gc is done with it
    meta.end_delete(bid)
    assert meta.claim_upload(bid, t0 + 4 * ms) == CLAIMED
    # a gc that died mid-delete leaves its mark, which holds writers back for DELETE_MARK_TTL_NS only
    assert meta.begin_delete(bid, t0 + 5 * ms, t0 + 6 * ms)
    assert meta.claim_upload(bid, t0 + 7 * ms) == BUSY
    late = t0 + 6 * ms + DELETE_MARK_TTL_NS + ms
    assert meta.claim_upload(bid, late) == CLAIMED
    assert not meta.begin_delete(bid, late - hour, late + ms)
    meta.forget_freed(late + ms)  # drops claims older than that too
    assert meta.begin_delete(bid, 0, late + 2 * ms)
    meta.end_delete(bid)
    # a block a file references is never deleted, and needs no upload
    meta.publish_file(ROOT_INODE, b"f", mode=0o644, uid=0, gid=0, mtime_ns=1, size=2, blocks=[block_id(b"ab")])
    assert meta.claim_upload(block_id(b"ab"), t0) == KNOWN
    assert not meta.begin_delete(block_id(b"ab"), t0 + hour, t0 + hour)


def test_a_second_gc_cannot_mark_a_block_another_gc_is_deleting(meta: MetaStore) -> None:
    """Two gc runs at once: the second must not take over (and later lose) the first's mark,
    or the first's end_delete would let a writer re-upload while the second deletes."""
    bid, ms, t0 = block_id(b"contested"), 10**6, 10**18
    assert meta.begin_delete(bid, t0, t0)
    assert not meta.begin_delete(bid, t0, t0 + ms)
    assert meta.claim_upload(bid, t0 + 2 * ms) == BUSY
    meta.end_delete(bid)
    assert meta.begin_delete(bid, t0, t0 + 3 * ms)  # free again
    assert meta.begin_delete(bid, t0, t0 + 3 * ms + DELETE_MARK_TTL_NS + ms)  # a dead gc's mark expires
    meta.forget_freed(t0 + 5 * ms + 2 * DELETE_MARK_TTL_NS)  # and is swept with old records
    assert meta.claim_upload(bid, t0 + 3 * ms + DELETE_MARK_TTL_NS + 2 * ms) == CLAIMED


def test_special_files(meta: MetaStore) -> None:
    made = {
        b"fifo": meta.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o640, 0, 3, 4, 10),
        b"sock": meta.mknod(ROOT_INODE, b"sock", stat.S_IFSOCK | 0o755, 0, 3, 4, 10),
        b"chr": meta.mknod(ROOT_INODE, b"chr", stat.S_IFCHR | 0o600, (1 << 8) | 3, 3, 4, 10),
        b"blk": meta.mknod(ROOT_INODE, b"blk", stat.S_IFBLK | 0o660, (8 << 8) | 17, 3, 4, 10),
    }
    assert made[b"chr"].rdev == (1 << 8) | 3 and made[b"blk"].rdev == (8 << 8) | 17 and made[b"fifo"].rdev == 0
    assert all(a.is_special and a.nlink == 1 and (a.uid, a.gid) == (3, 4) for a in made.values())
    assert stat.S_IFMT(meta.lookup(ROOT_INODE, b"sock").mode) == stat.S_IFSOCK
    assert dict(meta.readdir(ROOT_INODE)) == {name: meta.getattr(a.ino) for name, a in made.items()}
    assert meta.getattr(made[b"blk"].ino) == made[b"blk"]
    for bad_mode, code in ((stat.S_IFIFO | 0o644, errno.EEXIST), (stat.S_IFREG | 0o644, errno.EINVAL),
                           (stat.S_IFDIR | 0o755, errno.EINVAL)):
        with pytest.raises(FsError) as err:
            meta.mknod(ROOT_INODE, b"fifo", bad_mode, 0, 0, 0, 0)
        assert err.value.errno == code
    assert meta.stats().specials == 4 and meta.stats().files == 0
    meta.link(made[b"chr"].ino, ROOT_INODE, b"chr2")
    meta.unlink(ROOT_INODE, b"chr")
    assert meta.lookup(ROOT_INODE, b"chr2").rdev == (1 << 8) | 3
    meta.rename(ROOT_INODE, b"fifo", ROOT_INODE, b"sock")  # a FIFO replaces a socket
    assert stat.S_ISFIFO(meta.lookup(ROOT_INODE, b"sock").mode)
    assert meta.stats().specials == 3


def test_block_lists_with_holes(meta: MetaStore) -> None:
    """Sparse lists round-trip; references count stored blocks only; a huge size costs nothing."""
    a, b = ids(b"aaaa", b"bb")
    sparse = BlockList()
    sparse.resize(1 << 40)  # block size 4: a 4 TiB file
    sparse[3] = a
    sparse[(1 << 40) - 1] = b  # the last block, 2 bytes long
    size = ((1 << 40) - 1) * 4 + 2
    f = meta.publish_file(ROOT_INODE, b"sparse", mode=0o644, uid=0, gid=0, mtime_ns=1, size=size, blocks=sparse)
    assert meta.read_blocks(f.ino) == sparse and meta.getattr(f.ino).size == size
    stats = meta.stats()
    assert (stats.block_refs, stats.unique_blocks, stats.unique_bytes, stats.logical_bytes) == (2, 2, 6, size)
    assert meta.referenced_blocks() == {a, b}
    g = meta.create_file(ROOT_INODE, b"g", 0o644, 0, 0, 0)
    holes = BlockList()
    holes.resize(3)
    holes[1] = a
    meta.commit_file(g.ino, size=12, blocks=holes, mtime_ns=2)
    assert list(meta.read_blocks(g.ino)) == [b"", a, b""]
    assert meta.stats().block_refs == 3
    meta.unlink(ROOT_INODE, b"sparse")
    assert meta.referenced_blocks() == {a} and meta.freed_blocks(0) == {b}


def test_files_unlinked_while_open_stay_until_released(meta: MetaStore) -> None:
    a, b = ids(b"aaaa", b"bbbb")
    f = meta.publish_file(ROOT_INODE, b"f", mode=0o644, uid=0, gid=0, mtime_ns=1, size=4, blocks=[a])
    g = meta.publish_file(ROOT_INODE, b"g", mode=0o644, uid=0, gid=0, mtime_ns=1, size=4, blocks=[b])
    meta.open_session("host/1/1/x", 123)
    assert meta.sessions() == {"host/1/1/x": 123}
    meta.unlink(ROOT_INODE, b"f", sustain=f.ino, session="host/1/1/x")
    gone = meta.getattr(f.ino)
    assert gone.nlink == 0 and gone.ctime_ns >= f.ctime_ns
    assert meta.read_blocks(f.ino) == [a] and a in meta.referenced_blocks()
    assert meta.orphans() == {f.ino: "host/1/1/x"}
    meta.commit_file(f.ino, size=4, blocks=[b], mtime_ns=5)  # still written through its handle
    assert meta.referenced_blocks() == {b}
    meta.release_orphan(f.ino)
    with pytest.raises(FsError):
        meta.getattr(f.ino)
    assert meta.orphans() == {} and meta.stats().block_refs == 1
    meta.release_orphan(g.ino)  # not an orphan: nothing happens
    assert meta.getattr(g.ino).nlink == 1
    h = meta.publish_file(ROOT_INODE, b"h", mode=0o644, uid=0, gid=0, mtime_ns=1, size=4, blocks=[a])
    meta.rename(ROOT_INODE, b"g", ROOT_INODE, b"h", sustain=h.ino, session="host/1/1/x")  # replaced while open
    assert meta.getattr(h.ino).nlink == 0 and meta.orphans() == {h.ino: "host/1/1/x"}
    meta.unlink(ROOT_INODE, b"h", sustain=12345, session="host/1/1/x")  # another inode: goes at once
    assert meta.referenced_blocks() == {a}
    meta.close_session("host/1/1/x")
    assert meta.orphans() == {} and meta.sessions() == {} and meta.referenced_blocks() == set()


def test_dead_sessions_release_their_orphans(meta: MetaStore) -> None:
    now = time.time_ns()
    alive, remote_dead, local_dead = new_session_id(), "elsewhere/7/7/a", new_session_id().replace("/", "/9", 1)
    files = {}
    for name, session in ((b"a", alive), (b"r", remote_dead), (b"l", local_dead)):
        meta.open_session(session, now - int(2 * STALE_AFTER_S * 1e9) if session == remote_dead else now)
        f = meta.publish_file(ROOT_INODE, name, mode=0o644, uid=0, gid=0, mtime_ns=1, size=4, blocks=ids(name * 4))
        meta.unlink(ROOT_INODE, name, sustain=f.ino, session=session)
        files[session] = f.ino
    assert release_dead_sessions(meta, now) == 2
    assert meta.orphans() == {files[alive]: alive} and set(meta.sessions()) == {alive}


def test_entries_in_a_set_gid_directory_take_its_group(meta: MetaStore) -> None:
    d = meta.mkdir(ROOT_INODE, b"shared", 0o2775, 0, 4242, 0)
    made = [meta.create_file(d.ino, b"f", 0o644, 7, 8, 0), meta.mkdir(d.ino, b"sub", 0o755, 7, 8, 0),
            meta.symlink(d.ino, b"l", b"f", 7, 8, 0), meta.mknod(d.ino, b"p", stat.S_IFIFO | 0o644, 0, 7, 8, 0)]
    assert [(a.uid, a.gid) for a in made] == [(7, 4242)] * 4
    assert made[1].mode & stat.S_ISGID and not made[0].mode & stat.S_ISGID
    plain = meta.mkdir(ROOT_INODE, b"plain", 0o755, 0, 0, 0)
    assert meta.create_file(plain.ino, b"f", 0o644, 7, 8, 0).gid == 8

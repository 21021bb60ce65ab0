"""Snapshots: the engine contract on every metadata engine (SQLite, redis-server standalone,
TLS and cluster), then the CLI, dump/load, gc and fsck, and real mounts: a writable mount
changing the live tree while the snapshot stays as it was, and every write refused."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from chunkfs.blocklist import BlockList
from chunkfs.errors import FsError
from chunkfs.meta import ROOT_INODE, MetaStore, open_meta
from chunkfs.meta.base import SNAPSHOT_FORMAT_VERSION
from chunkfs.meta.dump import dump, load
from tests.conftest import VolumeFixture, chunkfs, mounted, tree_listing
from tests.test_cli import assert_one_line_error
from tests.test_meta_contract import ids
from tests.test_mount_posix import DATA
from tests.test_mount_write import rw_mount


def build_tree(meta: MetaStore) -> dict[str, int]:
    """/m with a file, a hard link, a symlink, a FIFO, xattrs and a subdirectory."""
    m = meta.mkdir(ROOT_INODE, b"m", 0o755, 1, 2, 10)
    sub = meta.mkdir(m.ino, b"sub", 0o750, 1, 2, 11)
    w = meta.publish_file(m.ino, b"w.bin", mode=0o644, uid=1, gid=2, mtime_ns=12, size=6, blocks=ids(b"abcd", b"ef"))
    meta.link(w.ino, sub.ino, b"w-link")
    meta.publish_file(sub.ino, b"c.json", mode=0o600, uid=3, gid=4, mtime_ns=13, size=3, blocks=ids(b"xyz"))
    meta.symlink(m.ino, b"l", b"w.bin", 1, 2, 14)
    meta.mknod(m.ino, b"fifo", stat.S_IFIFO | 0o644, 0, 1, 2, 15)
    meta.set_xattr(w.ino, b"user.tag", b"v1")
    return {"m": m.ino, "sub": sub.ino, "w": w.ino}


def listing(meta: MetaStore, ino: int, prefix: str = "") -> list[tuple]:
    """Everything below ``ino`` as (path, mode, uid, gid, size, mtime, nlink, blocks/target, xattrs)."""
    out = []
    for name, attr in meta.readdir(ino):
        path = f"{prefix}/{name.decode()}"
        content: object = None
        if attr.is_reg:
            content = list(meta.read_blocks(attr.ino))
        elif attr.is_link:
            content = meta.readlink(attr.ino)
        xattrs = {n: meta.get_xattr(attr.ino, n) for n in meta.list_xattrs(attr.ino)}
        out.append((path, attr.mode, attr.uid, attr.gid, attr.size, attr.mtime_ns, attr.nlink, content, xattrs))
        if attr.is_dir:
            out.extend(listing(meta, attr.ino, path))
    return out


def test_a_snapshot_copies_the_tree_in_the_metadata_only(meta: MetaStore) -> None:
    tree = build_tree(meta)
    before = meta.stats()
    snap = meta.snapshot(tree["m"], ROOT_INODE, b"m@v1", source="/m", created_ns=42)
    assert snap.is_dir and snap.ino != tree["m"] and meta.is_frozen(snap.ino) and not meta.is_frozen(tree["m"])
    assert listing(meta, snap.ino) == listing(meta, tree["m"])  # attributes, links, xattrs, block lists
    w_copy = meta.lookup(snap.ino, b"w.bin")
    assert w_copy.nlink == 2 and meta.lookup(meta.lookup(snap.ino, b"sub").ino, b"w-link").ino == w_copy.ino
    after = meta.stats()
    assert after.unique_blocks == before.unique_blocks and after.unique_bytes == before.unique_bytes  # no copy
    assert after.block_refs == 2 * before.block_refs and after.logical_bytes == 2 * before.logical_bytes
    assert after.directories == before.directories + 2 and after.files == before.files + 2
    [record] = meta.snapshots()
    assert (record.ino, record.source, record.created_ns) == (snap.ino, "/m", 42)
    assert meta.dir_path(snap.ino) == "/m@v1" and meta.getattr(ROOT_INODE).nlink == 4


def test_the_live_tree_changes_and_the_snapshot_does_not(meta: MetaStore) -> None:
    tree = build_tree(meta)
    snap = meta.snapshot(tree["m"], ROOT_INODE, b"m@v1", source="/m", created_ns=1)
    pinned = listing(meta, snap.ino)
    meta.publish_file(tree["m"], b"w.bin", mode=0o644, uid=1, gid=2, mtime_ns=99, size=4, blocks=ids(b"NEW!"))
    meta.commit_file(meta.lookup(tree["sub"], b"c.json").ino, size=0, blocks=BlockList(), mtime_ns=100)
    meta.unlink(tree["sub"], b"w-link")
    meta.set_attrs(tree["m"], mode=0o700)
    meta.remove_xattr(tree["w"], b"user.tag")
    assert listing(meta, snap.ino) == pinned
    assert set(ids(b"abcd", b"ef", b"xyz")) <= meta.referenced_blocks()  # gc keeps what the snapshot names
    meta.unlink(tree["m"], b"w.bin")
    meta.unlink(tree["sub"], b"c.json")
    assert set(ids(b"abcd", b"ef", b"xyz")) <= meta.referenced_blocks()
    assert not meta.freed_blocks(0) & set(ids(b"abcd", b"ef", b"xyz"))


def _every_change(meta: MetaStore, snap: int, live: int) -> list[tuple[str, Callable[[], object]]]:
    sub = meta.lookup(snap, b"sub").ino
    w = meta.lookup(snap, b"w.bin").ino
    return [
        ("mkdir", lambda: meta.mkdir(snap, b"new", 0o755, 0, 0, 0)),
        ("symlink", lambda: meta.symlink(snap, b"new", b"t", 0, 0, 0)),
        ("create", lambda: meta.create_file(sub, b"new", 0o644, 0, 0, 0)),
        ("mknod", lambda: meta.mknod(snap, b"new", stat.S_IFIFO | 0o644, 0, 0, 0, 0)),
        ("publish new", lambda: meta.publish_file(snap, b"new", mode=0o644, uid=0, gid=0, mtime_ns=0, size=0,
                                                  blocks=[])),
        ("publish over", lambda: meta.publish_file(snap, b"w.bin", mode=0o644, uid=0, gid=0, mtime_ns=0, size=0,
                                                   blocks=[])),
        ("commit", lambda: meta.commit_file(w, size=0, blocks=BlockList(), mtime_ns=0)),
        ("unlink", lambda: meta.unlink(snap, b"w.bin")),
        ("unlink special", lambda: meta.unlink(snap, b"fifo")),
        ("rmdir root", lambda: meta.rmdir(ROOT_INODE, b"m@v1")),
        ("rmdir inside", lambda: meta.rmdir(snap, b"sub")),
        ("rename inside", lambda: meta.rename(snap, b"w.bin", snap, b"moved")),
        ("rename out", lambda: meta.rename(snap, b"w.bin", live, b"stolen")),
        ("rename in", lambda: meta.rename(live, b"w.bin", snap, b"planted")),
        ("rename root", lambda: meta.rename(ROOT_INODE, b"m@v1", ROOT_INODE, b"elsewhere")),
        ("rename over root", lambda: meta.rename(ROOT_INODE, b"empty", ROOT_INODE, b"m@v1")),
        ("exchange", lambda: meta.exchange(snap, b"w.bin", live, b"w.bin")),
        ("exchange root", lambda: meta.exchange(ROOT_INODE, b"m@v1", ROOT_INODE, b"m")),
        ("link out", lambda: meta.link(w, live, b"hard")),
        ("link in", lambda: meta.link(meta.lookup(live, b"w.bin").ino, snap, b"hard")),
        ("chmod", lambda: meta.set_attrs(w, mode=0o777)),
        ("chown", lambda: meta.set_attrs(snap, uid=5)),
        ("utimes", lambda: meta.set_attrs(w, mtime_ns=1, atime_ns=1)),
        ("setxattr", lambda: meta.set_xattr(w, b"user.x", b"1")),
        ("removexattr", lambda: meta.remove_xattr(w, b"user.tag")),
        ("snapshot into", lambda: meta.snapshot(live, snap, b"nested", source="/m", created_ns=0)),
    ]


def test_every_change_to_a_snapshot_is_erofs(meta: MetaStore) -> None:
    tree = build_tree(meta)
    snap = meta.snapshot(tree["m"], ROOT_INODE, b"m@v1", source="/m", created_ns=1).ino
    meta.mkdir(ROOT_INODE, b"empty", 0o755, 0, 0, 0)
    pinned, stats = listing(meta, snap), meta.stats()
    for what, change in _every_change(meta, snap, tree["m"]):
        with pytest.raises(FsError) as info:
            change()
        assert info.value.errno == errno.EROFS, what
    assert listing(meta, snap) == pinned and meta.stats() == stats
    assert meta.snapshot(snap, ROOT_INODE, b"copy-of-copy", source="/m@v1", created_ns=2).is_dir  # reading is fine


def test_snapshot_errors(meta: MetaStore) -> None:
    tree = build_tree(meta)
    for call, code in [
        (lambda: meta.snapshot(tree["m"], tree["sub"], b"in-itself", source="/m", created_ns=0), errno.EINVAL),
        (lambda: meta.snapshot(tree["m"], tree["m"], b"in-itself", source="/m", created_ns=0), errno.EINVAL),
        (lambda: meta.snapshot(tree["m"], ROOT_INODE, b"m", source="/m", created_ns=0), errno.EEXIST),
        (lambda: meta.snapshot(tree["w"], ROOT_INODE, b"x", source="/m/w.bin", created_ns=0), errno.ENOTDIR),
        (lambda: meta.snapshot(tree["m"], tree["w"], b"x", source="/m", created_ns=0), errno.ENOTDIR),
        (lambda: meta.delete_snapshot(tree["m"]), errno.EINVAL),
    ]:
        with pytest.raises(FsError) as info:
            call()
        assert info.value.errno == code
    assert meta.snapshots() == []


def test_deleting_a_snapshot_drops_only_its_references(meta: MetaStore) -> None:
    tree = build_tree(meta)
    before = meta.stats()
    snap = meta.snapshot(tree["m"], ROOT_INODE, b"m@v1", source="/m", created_ns=1).ino
    meta.publish_file(tree["m"], b"w.bin", mode=0o644, uid=1, gid=2, mtime_ns=99, size=4, blocks=ids(b"NEW!"))
    meta.delete_snapshot(snap)
    assert meta.snapshots() == [] and [n for n, _ in meta.readdir(ROOT_INODE)] == [b"m"]
    assert meta.getattr(ROOT_INODE).nlink == 3
    with pytest.raises(FsError):
        meta.getattr(snap)
    # the old w.bin's blocks were the snapshot's alone: freed now; c.json's stay referenced
    assert set(ids(b"abcd", b"ef")) <= meta.freed_blocks(0) and not set(ids(b"abcd", b"ef")) & meta.referenced_blocks()
    assert set(ids(b"xyz", b"NEW!")) <= meta.referenced_blocks()
    after = meta.stats()
    assert (after.files, after.directories, after.symlinks, after.specials) == (
        before.files, before.directories, before.symlinks, before.specials)
    meta.mkdir(ROOT_INODE, b"m@v1", 0o755, 0, 0, 0)  # the name is free again, and writable


def test_freeze_tree_registers_a_loaded_snapshot(meta: MetaStore) -> None:
    tree = build_tree(meta)
    meta.freeze_tree(tree["m"], source="/elsewhere", created_ns=7)
    [record] = meta.snapshots()
    assert (record.ino, record.source, record.created_ns) == (tree["m"], "/elsewhere", 7)
    assert meta.is_frozen(tree["sub"]) and meta.is_frozen(meta.lookup(tree["sub"], b"c.json").ino)
    with pytest.raises(FsError) as info:
        meta.unlink(tree["m"], b"w.bin")
    assert info.value.errno == errno.EROFS


def test_dump_and_load_keep_snapshots(meta: MetaStore, tmp_path: Path) -> None:
    tree = build_tree(meta)
    meta.mkdir(ROOT_INODE, b"pins", 0o755, 0, 0, 0)
    pins = meta.lookup(ROOT_INODE, b"pins").ino
    meta.snapshot(tree["m"], pins, b"m@v1", source="/m", created_ns=5)
    out = io.StringIO()
    dump(meta, out)
    target = open_meta(f"sqlite://{tmp_path / 'loaded.db'}", create=True)
    try:
        load(target, io.StringIO(out.getvalue()))
        [record] = target.snapshots()
        assert (target.dir_path(record.ino), record.source, record.created_ns) == ("/pins/m@v1", "/m", 5)
        assert listing(target, record.ino) == listing(meta, meta.lookup(pins, b"m@v1").ino)
        w_copy = target.lookup(record.ino, b"w.bin").ino
        with pytest.raises(FsError) as info:
            target.set_attrs(w_copy, mode=0o777)
        assert info.value.errno == errno.EROFS
        assert not target.is_frozen(target.lookup(ROOT_INODE, b"m").ino)
    finally:
        target.close()


# -- the command line, gc, fsck and real mounts --------------------------------------------------

def snapshot_cli(vol: VolumeFixture, *args: str, check: bool = True):  # type: ignore[no-untyped-def]
    return chunkfs("snapshot", vol.meta_url, *args, check=check)


@pytest.mark.mount
def test_snapshot_through_a_writable_mount_and_gc(imported: VolumeFixture, source: Path) -> None:
    """The CLI makes a snapshot; a writable mount replaces, truncates and deletes the live
    files, and every write to the snapshot is EROFS; gc keeps the snapshot's blocks until
    it is deleted; fsck, status and --list know it."""
    vol = imported
    made = json.loads(snapshot_cli(vol, "/model", "/model@v1", "--json").stdout)
    assert made["path"] == "/model@v1" and made["source"] == "/model"
    status = json.loads(chunkfs("status", vol.meta_url, "--json").stdout)
    assert status["format"]["format_version"] == SNAPSHOT_FORMAT_VERSION
    assert [s["path"] for s in status["snapshots"]] == ["/model@v1"]
    assert "/model@v1\t" in snapshot_cli(vol, "--list").stdout
    with mounted(vol, name="ro-before") as ro:
        pinned = tree_listing(ro.path / "model@v1")
        assert pinned == tree_listing(ro.path / "model")
        contents = {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()
                    and not p.is_symlink()}
    files = sorted(contents)
    assert len(files) >= 2
    with rw_mount(vol, "rw") as mnt:
        live, snap = mnt / "model", mnt / "model@v1"
        (live / files[0]).write_bytes(b"replaced")
        os.truncate(live / files[1], 3)
        shutil.rmtree(live)
        for rel, data in contents.items():
            assert (snap / rel).read_bytes() == data, rel
        target = snap / files[0]
        for what, call in [
            ("open for writing", lambda: os.close(os.open(target, os.O_WRONLY))),
            ("write", lambda: target.write_bytes(b"x")),
            ("open for append", lambda: open(target, "ab").close()),
            ("truncate", lambda: os.truncate(target, 0)),
            ("create", lambda: (snap / "new").write_bytes(b"x")),
            ("mkdir", lambda: (snap / "newdir").mkdir()),
            ("unlink", lambda: target.unlink()),
            ("rename", lambda: target.rename(snap / "moved")),
            ("rename out", lambda: target.rename(mnt / "moved")),
            ("rmtree", lambda: shutil.rmtree(snap)),
            ("chmod", lambda: os.chmod(target, 0o777)),
            ("chown", lambda: os.chown(target, 1, 1)),
            ("utime", lambda: os.utime(target, (1, 1))),
            ("setxattr", lambda: os.setxattr(target, "user.x", b"1")),
            ("symlink", lambda: os.symlink("t", snap / "ln")),
            ("link", lambda: os.link(target, mnt / "hard")),
            ("mkfifo", lambda: os.mkfifo(snap / "fifo")),
        ]:
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EROFS, what
    pinned_blocks = json.loads(chunkfs("status", vol.meta_url, "--json").stdout)["stats"]["unique_blocks"]
    gc = json.loads(chunkfs("gc", vol.meta_url, "--grace", "0", "--force", "--json").stdout)
    assert gc["referenced"] == pinned_blocks > 0, gc  # only the live tree's new blocks went
    fsck = json.loads(chunkfs("fsck", vol.meta_url, "--check-content", "--json").stdout)
    assert fsck["clean"] and fsck["snapshots"] == 1, fsck
    with mounted(vol, name="ro-after") as ro:
        assert tree_listing(ro.path / "model@v1") == pinned
        for rel, data in contents.items():
            assert (ro.path / "model@v1" / rel).read_bytes() == data, rel
    deleted = snapshot_cli(vol, "--delete", "/model@v1").stdout
    assert "deleted snapshot /model@v1" in deleted
    assert json.loads(snapshot_cli(vol, "--list", "--json").stdout) == []
    gc = json.loads(chunkfs("gc", vol.meta_url, "--grace", "0", "--force", "--json").stdout)
    assert gc["deleted"] == pinned_blocks and gc["referenced"] == 0, gc
    assert json.loads(chunkfs("fsck", vol.meta_url, "--json").stdout)["clean"]


def test_snapshot_bad_input_is_one_line(imported: VolumeFixture) -> None:
    vol = imported
    snapshot_cli(vol, "/model", "/pinned")
    for args in [(), ("/model",), ("/model", "/a", "/b"), ("--list", "/model", "/x"), ("--delete", "/model"),
                 ("/nope", "/x"), ("/model", "/pinned"), ("/model", "/model/inside"), ("/model", "/"),
                 ("/model", "/pinned/nested"), ("/model/" + "x" * 300, "/y"), ("/model", "/no/such/dir/x")]:
        result = snapshot_cli(vol, *args, check=False)
        assert_one_line_error(result)
    assert [s["path"] for s in json.loads(snapshot_cli(vol, "--list", "--json").stdout)] == ["/pinned"]


@pytest.mark.mount
def test_a_previous_format_volume_takes_snapshots(tmp_path: Path) -> None:
    """tests/data/volume-v1 (made by chunkfs at 7d5a08d: format 1, no snapshot tables) on
    this code: a snapshot raises it to the snapshot format, and both trees read the same."""
    shutil.copytree(DATA / "volume-v1", tmp_path / "v1")
    db = tmp_path / "v1" / "meta.db"
    with sqlite3.connect(db) as conn:
        fmt = json.loads(conn.execute("SELECT value FROM settings WHERE key='format'").fetchone()[0])
        fmt["storage"] = f"file://{tmp_path / 'v1' / 'blocks'}"
        conn.execute("UPDATE settings SET value=? WHERE key='format'", (json.dumps(fmt),))
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert "frozen" not in tables and fmt["format_version"] == 1
    vol = VolumeFixture(f"sqlite://{db}", tmp_path / "v1" / "blocks", db, tmp_path)
    assert json.loads(snapshot_cli(vol, "--list", "--json").stdout) == []
    snapshot_cli(vol, "/models", "/models@old")
    assert json.loads(chunkfs("status", vol.meta_url, "--json").stdout)["format"]["format_version"] == 3
    expected = json.loads((DATA / "volume-v1-source.json").read_text())
    with mounted(vol, name="ro") as ro:
        for rel in expected:
            if rel.startswith("models/"):
                copy = ro.path / rel.replace("models/", "models@old/", 1)
                assert copy.read_bytes() == (ro.path / rel).read_bytes(), rel
    assert json.loads(chunkfs("fsck", vol.meta_url, "--check-content", "--json").stdout)["clean"]


def test_a_snapshot_copies_an_inode_with_thousands_of_xattrs(meta: MetaStore) -> None:
    """More xattrs than one Lua ``unpack`` takes (about 4000): copied whole, not half-made."""
    d = meta.mkdir(ROOT_INODE, b"d", 0o755, 0, 0, 0)
    f = meta.publish_file(d.ino, b"f", mode=0o644, uid=0, gid=0, mtime_ns=0, size=4, blocks=ids(b"abcd"))
    for i in range(5000):
        meta.set_xattr(f.ino, f"user.k{i}".encode(), b"v")
    snap = meta.snapshot(d.ino, ROOT_INODE, b"d@1", source="/d", created_ns=1)
    assert len(meta.list_xattrs(meta.lookup(snap.ino, b"f").ino)) == 5000

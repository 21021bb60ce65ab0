"""SQLite metadata engine: the embedded default (``sqlite:///path.db``, alias ``sqlite3://``).

Schema (one database file per volume):

    settings(key TEXT PRIMARY KEY, value TEXT)           'format' -> VolumeFormat JSON
    inodes(ino INTEGER PRIMARY KEY AUTOINCREMENT,        inode numbers are never reused
           mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, nlink,
           target BLOB,                                  symlink target, else NULL
           blocks BLOB,                                  BlockList.pack() (dense or sparse)
           rdev)                                         device number (added: 0 when missing)
    dentries(parent, name BLOB, ino, PRIMARY KEY(parent, name))
    blockrefs(id BLOB PRIMARY KEY, length, refs)         refs = (file, index) slots naming id
    xattrs(ino, name BLOB, value BLOB, PRIMARY KEY(ino, name))   extended attributes
    freed(id BLOB PRIMARY KEY, at)                       when a block lost its last reference
    upload_claims(id BLOB PRIMARY KEY, at)               when a writer last claimed a block's upload
    deleting(id BLOB PRIMARY KEY, at)                    blocks gc is deleting (since when)
    sessions(id TEXT PRIMARY KEY, heartbeat)             writable mounts alive (last heartbeat, ns)
    orphans(ino INTEGER PRIMARY KEY, session TEXT)       inodes unlinked while open, nlink 0
    frozen(ino INTEGER PRIMARY KEY)                      inodes of snapshots (read-only)
    snapshots(ino INTEGER PRIMARY KEY, info TEXT)        snapshot root -> SnapshotRecord JSON
    profiles(ino INTEGER PRIMARY KEY, data BLOB)         directory -> its access profile

Concurrency: one connection guarded by a lock (callers may be any thread); WAL journal so
an importer in one process and mounts in others work at once; every change runs inside
``BEGIN IMMEDIATE`` so read-modify-write sequences are atomic across processes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

from chunkfs.blocklist import BlockList
from chunkfs.blocks import block_length
from chunkfs.errors import ChunkfsError, FsError, NotFormatted
from chunkfs.meta.base import (
    BUSY,
    CLAIMED,
    DELETE_MARK_TTL_NS,
    KNOWN,
    ROOT_INODE,
    Attr,
    MetaStore,
    SnapshotRecord,
    VolumeFormat,
    VolumeStats,
    as_block_list,
    check_name,
    check_profile,
    check_special,
    check_xattr,
    is_device,
)

SCHEMA_VERSION = 1
_S_IFMT = 0o170000  # file type bits (stat.S_IFMT is a function)
_ATTR_COLS = "ino, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, nlink, rdev"
_I_ATTR_COLS = ", ".join("i." + c.strip() for c in _ATTR_COLS.split(","))
_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,
    mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    target BLOB, blocks BLOB, rdev INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dentries (
    parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blockrefs (
    id BLOB PRIMARY KEY, length INTEGER NOT NULL, refs INTEGER NOT NULL
) WITHOUT ROWID;
"""
# added for writable mounts: created on open if missing
_UPGRADES = """
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL, PRIMARY KEY (ino, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dentries_by_ino ON dentries(ino);
CREATE TABLE IF NOT EXISTS freed (id BLOB PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS upload_claims (id BLOB PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deleting (id BLOB PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, heartbeat INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS orphans (ino INTEGER PRIMARY KEY, session TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (address TEXT PRIMARY KEY, expires INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS frozen (ino INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS snapshots (ino INTEGER PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (ino INTEGER PRIMARY KEY, data BLOB NOT NULL);
"""


def sqlite_path(url: str) -> str:
    """``sqlite:///abs.db`` -> ``/abs.db``; ``sqlite://rel.db`` -> ``rel.db`` (query ignored)."""
    parts = urlsplit(url)
    path = unquote(parts.netloc + parts.path)
    if not path:
        raise ChunkfsError("sqlite URL needs a database path, e.g. sqlite:///var/lib/chunkfs/models.db")
    return path


def _now_ns() -> int:
    return time.time_ns()


class SqliteMeta(MetaStore):
    def __init__(self, url: str, *, create: bool = False) -> None:
        self.url = url
        self.path = sqlite_path(url)
        if os.path.isdir(self.path):
            raise ChunkfsError(f"{url}: {self.path} is a directory, not a database file")
        if not create and not os.path.exists(self.path):
            raise NotFormatted(f"no chunkfs volume at {url} (database file not found; run 'chunkfs format')")
        if create:
            parent = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise ChunkfsError(f"cannot create {parent} for {url}: {exc.strerror}") from exc
        mode = "rwc" if create else "rw"
        try:
            self._conn = sqlite3.connect(
                f"file:{self.path}?mode={mode}", uri=True, isolation_level=None,
                check_same_thread=False, timeout=30,
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            if create:
                self._conn.executescript(_SCHEMA)
            self._check_schema()
            with contextlib.suppress(sqlite3.OperationalError):  # a read-only database file
                self._conn.executescript(_UPGRADES)
                columns = {r[1] for r in self._conn.execute("PRAGMA table_info(inodes)")}
                if "rdev" not in columns:  # a volume made before special files
                    self._conn.execute("ALTER TABLE inodes ADD COLUMN rdev INTEGER NOT NULL DEFAULT 0")
        except sqlite3.DatabaseError as exc:
            raise ChunkfsError(f"cannot open {url}: {exc}") from exc
        self._lock = threading.RLock()

    def _check_schema(self) -> None:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"settings", "inodes", "dentries", "blockrefs"} <= tables:
            raise NotFormatted(f"no chunkfs volume at {self.url} (not a chunkfs database; run 'chunkfs format')")

    # -- plumbing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, serialised with other processes by BEGIN IMMEDIATE."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()

    def _attr_of(self, conn: sqlite3.Connection, ino: int) -> Attr:
        row = conn.execute(f"SELECT {_ATTR_COLS} FROM inodes WHERE ino=?", (ino,)).fetchone()
        if row is None:
            raise FsError(errno.ENOENT, f"inode {ino}")
        return Attr(*row)

    def _child(self, conn: sqlite3.Connection, parent: int, name: bytes) -> Attr | None:
        row = conn.execute(
            f"SELECT {_I_ATTR_COLS} "
            "FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.parent=? AND d.name=?",
            (parent, name),
        ).fetchone()
        return Attr(*row) if row else None

    def _parent_dir(self, conn: sqlite3.Connection, parent: int) -> Attr:
        attr = self._attr_of(conn, parent)
        if not attr.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {parent}")
        return attr

    @staticmethod
    def _refuse_frozen(conn: sqlite3.Connection, *inos: int | None) -> None:
        """EROFS if any of ``inos`` belongs to a snapshot."""
        wanted = [ino for ino in inos if ino is not None]
        try:
            row = conn.execute(f"SELECT ino FROM frozen WHERE ino IN ({','.join('?' * len(wanted))}) LIMIT 1",
                               wanted).fetchone()
        except sqlite3.OperationalError:  # a read-only database made before snapshots: none frozen
            return
        if row is not None:
            raise FsError(errno.EROFS, f"inode {row[0]} is in a snapshot (read-only)")

    def _change_refs(self, conn: sqlite3.Connection, blob: bytes | None, size: int, delta: int) -> None:
        bs = self.block_size
        for index, bid in BlockList.unpack(blob).stored():
            if delta > 0:
                conn.execute(
                    "INSERT INTO blockrefs(id, length, refs) VALUES (?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET refs = refs + excluded.refs",
                    (bid, block_length(index, size, bs), delta),
                )
            else:
                conn.execute("UPDATE blockrefs SET refs = refs + ? WHERE id=?", (delta, bid))
                if conn.execute("DELETE FROM blockrefs WHERE id=? AND refs <= 0", (bid,)).rowcount:
                    conn.execute("INSERT OR REPLACE INTO freed VALUES (?, ?)", (bid, _now_ns()))

    def _new_inode(self, conn: sqlite3.Connection, mode: int, uid: int, gid: int, size: int,
                   mtime_ns: int, nlink: int, target: bytes | None = None,
                   blocks: bytes | None = None, rdev: int = 0) -> int:
        now = _now_ns()
        cur = conn.execute(
            "INSERT INTO inodes(mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, nlink, target, blocks, rdev)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (mode, uid, gid, size, mtime_ns, mtime_ns, now, nlink, target, blocks, rdev),
        )
        assert cur.lastrowid is not None  # an INSERT into a rowid table
        return cur.lastrowid

    def _add_entry(self, parent: int, name: bytes, mode: int, uid: int, gid: int, size: int, mtime_ns: int,
                   target: bytes | None = None, blocks: bytes | None = None, rdev: int = 0) -> Attr:
        """A new inode named ``parent/name`` (mkdir, symlink, create, mknod), in one transaction:
        EEXIST if the name is taken; a new directory adds a link to its parent. In a set-gid
        parent the entry takes the parent's group, and a new directory its set-gid bit."""
        check_name(name)
        with self._tx() as conn:
            parent_attr = self._parent_dir(conn, parent)
            self._refuse_frozen(conn, parent)
            if parent_attr.mode & stat.S_ISGID:
                gid = parent_attr.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            if self._child(conn, parent, name) is not None:
                raise FsError(errno.EEXIST, repr(name))
            is_dir = stat.S_ISDIR(mode)
            ino = self._new_inode(conn, mode, uid, gid, size, mtime_ns, 2 if is_dir else 1, target, blocks, rdev)
            conn.execute("INSERT INTO dentries VALUES (?,?,?)", (parent, name, ino))
            self._touch_dir(conn, parent, nlink_delta=1 if is_dir else 0)
            return self._attr_of(conn, ino)

    @staticmethod
    def _referenced(conn: sqlite3.Connection, bid: bytes) -> bool:
        return conn.execute("SELECT 1 FROM blockrefs WHERE id=? AND refs > 0", (bid,)).fetchone() is not None

    def _touch_dir(self, conn: sqlite3.Connection, ino: int, nlink_delta: int = 0) -> None:
        now = _now_ns()
        conn.execute(
            "UPDATE inodes SET mtime_ns=?, ctime_ns=?, nlink=nlink+? WHERE ino=?", (now, now, nlink_delta, ino)
        )

    # -- volume ----------------------------------------------------------------------------
    def load_format(self) -> VolumeFormat | None:
        row = self._one("SELECT value FROM settings WHERE key='format'")
        return VolumeFormat.from_json(row[0]) if row else None

    def save_format(self, fmt: VolumeFormat) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO settings VALUES ('format', ?)", (fmt.to_json(),))
            conn.execute("INSERT OR REPLACE INTO settings VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            if conn.execute("SELECT 1 FROM inodes WHERE ino=?", (ROOT_INODE,)).fetchone() is None:
                now = _now_ns()
                conn.execute(
                    "INSERT INTO inodes(ino, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, nlink)"
                    " VALUES (?,?,?,?,0,?,?,?,2)",
                    (ROOT_INODE, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), now, now, now),
                )
        self._block_size = fmt.block_size

    def is_empty(self) -> bool:
        return self._one("SELECT 1 FROM dentries LIMIT 1") is None

    def stats(self) -> VolumeStats:
        with self._lock:
            counts = dict(
                self._conn.execute("SELECT mode & ?, count(*) FROM inodes GROUP BY 1", (_S_IFMT,))
            )
            logical = self._conn.execute(
                "SELECT coalesce(sum(size), 0) FROM inodes WHERE mode & ? = ?", (_S_IFMT, stat.S_IFREG)
            ).fetchone()[0]
            refs, unique, unique_bytes = self._conn.execute(
                "SELECT coalesce(sum(refs), 0), count(*), coalesce(sum(length), 0) FROM blockrefs"
            ).fetchone()
        return VolumeStats(
            files=counts.get(stat.S_IFREG, 0),
            directories=counts.get(stat.S_IFDIR, 0),
            symlinks=counts.get(stat.S_IFLNK, 0),
            specials=sum(n for kind, n in counts.items() if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)),
            logical_bytes=logical,
            block_refs=refs,
            unique_blocks=unique,
            unique_bytes=unique_bytes,
        )

    # -- reads -----------------------------------------------------------------------------
    def getattr(self, ino: int) -> Attr:
        with self._lock:
            return self._attr_of(self._conn, ino)

    def lookup(self, parent: int, name: bytes) -> Attr:
        with self._lock:
            attr = self._child(self._conn, parent, name)
            if attr is None:
                self._parent_dir(self._conn, parent)
                raise FsError(errno.ENOENT, f"{name!r} in inode {parent}")
            return attr

    def readdir(self, ino: int) -> list[tuple[bytes, Attr]]:
        with self._lock:
            self._parent_dir(self._conn, ino)
            rows = self._conn.execute(
                f"SELECT d.name, {_I_ATTR_COLS} FROM dentries d JOIN inodes i ON i.ino = d.ino "
                "WHERE d.parent=? ORDER BY d.name",
                (ino,),
            ).fetchall()
        return [(bytes(r[0]), Attr(*r[1:])) for r in rows]

    def readlink(self, ino: int) -> bytes:
        row = self._one("SELECT mode, target FROM inodes WHERE ino=?", (ino,))
        if row is None:
            raise FsError(errno.ENOENT, f"inode {ino}")
        if not stat.S_ISLNK(row[0]):
            raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
        return bytes(row[1])

    def read_blocks(self, ino: int) -> BlockList:
        row = self._one("SELECT blocks FROM inodes WHERE ino=?", (ino,))
        if row is None:
            raise FsError(errno.ENOENT, f"inode {ino}")
        return BlockList.unpack(row[0])

    def claim_upload(self, bid: bytes, now_ns: int) -> str:
        with self._tx() as conn:
            if self._referenced(conn, bid):
                return KNOWN
            mark = conn.execute("SELECT at FROM deleting WHERE id=?", (bid,)).fetchone()
            if mark is not None and now_ns - mark[0] < DELETE_MARK_TTL_NS:
                return BUSY
            conn.execute("INSERT OR REPLACE INTO upload_claims VALUES (?, ?)", (bid, now_ns))
            return CLAIMED

    def begin_delete(self, bid: bytes, intents_since_ns: int, now_ns: int) -> bool:
        with self._tx() as conn:
            if self._referenced(conn, bid):
                return False
            if conn.execute("SELECT 1 FROM upload_claims WHERE id=? AND at >= ?", (bid, intents_since_ns)).fetchone():
                return False
            if conn.execute("SELECT 1 FROM deleting WHERE id=? AND ? - at < ?",
                            (bid, now_ns, DELETE_MARK_TTL_NS)).fetchone():
                return False  # another gc is deleting it
            conn.execute("INSERT OR REPLACE INTO deleting VALUES (?, ?)", (bid, now_ns))
            return True

    def end_delete(self, bid: bytes) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM deleting WHERE id=?", (bid,))

    def referenced_blocks(self) -> set[bytes]:
        with self._lock:
            rows = self._conn.execute("SELECT id FROM blockrefs WHERE refs > 0").fetchall()
        return {bytes(r[0]) for r in rows}

    def freed_blocks(self, since_ns: int) -> set[bytes]:
        with self._lock:
            rows = self._conn.execute("SELECT id FROM freed WHERE at >= ?", (since_ns,)).fetchall()
        return {bytes(r[0]) for r in rows}

    def forget_freed(self, before_ns: int) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM freed WHERE at < ?", (before_ns,))
            conn.execute("DELETE FROM upload_claims WHERE at < ?", (before_ns,))
            conn.execute("DELETE FROM deleting WHERE at < ?", (before_ns - DELETE_MARK_TTL_NS,))

    # -- namespace changes -----------------------------------------------------------------
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> Attr:
        return self._add_entry(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid, 0, mtime_ns)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int, mtime_ns: int) -> Attr:
        return self._add_entry(parent, name, stat.S_IFLNK | 0o777, uid, gid, len(target), mtime_ns, target=target)

    def publish_file(self, parent: int, name: bytes, *, mode: int, uid: int, gid: int,
                     mtime_ns: int, size: int, blocks: BlockList | list[bytes]) -> Attr:
        check_name(name)
        blob = as_block_list(blocks).pack()
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        with self._tx() as conn:
            self._parent_dir(conn, parent)
            old = self._child(conn, parent, name)
            self._refuse_frozen(conn, parent, old.ino if old else None)
            if old is not None and old.is_dir:
                raise FsError(errno.EISDIR, repr(name))
            if old is not None and old.is_reg:
                (old_blob,) = conn.execute("SELECT blocks FROM inodes WHERE ino=?", (old.ino,)).fetchone()
                self._change_refs(conn, old_blob, old.size, -1)
                conn.execute(
                    "UPDATE inodes SET mode=?, uid=?, gid=?, size=?, mtime_ns=?, ctime_ns=?, blocks=? WHERE ino=?",
                    (mode, uid, gid, size, mtime_ns, _now_ns(), blob, old.ino),
                )
                ino = old.ino
            else:
                if old is not None:
                    self._drop_entry(conn, parent, name, old)
                ino = self._new_inode(conn, mode, uid, gid, size, mtime_ns, 1, blocks=blob)
                conn.execute("INSERT INTO dentries VALUES (?,?,?)", (parent, name, ino))
            self._change_refs(conn, blob, size, +1)
            self._touch_dir(conn, parent)
            return self._attr_of(conn, ino)

    def _drop_entry(self, conn: sqlite3.Connection, parent: int, name: bytes, attr: Attr, sustain: int = 0,
                    session: str = "") -> None:
        """Remove the entry; its inode goes with its last link, unless it is ``sustain``
        (open in ``session``'s mount), which is kept as an orphan with nlink 0."""
        conn.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
        if attr.nlink <= 1 and attr.ino != sustain:
            self._forget_inode(conn, attr)
        else:
            conn.execute("UPDATE inodes SET nlink=max(nlink-1, 0), ctime_ns=? WHERE ino=?", (_now_ns(), attr.ino))
            if attr.nlink <= 1:
                conn.execute("INSERT OR REPLACE INTO orphans VALUES (?, ?)", (attr.ino, session))

    def _forget_inode(self, conn: sqlite3.Connection, attr: Attr) -> None:
        """Delete an inode that has no name left, dropping its block references."""
        if attr.is_reg:
            (blob,) = conn.execute("SELECT blocks FROM inodes WHERE ino=?", (attr.ino,)).fetchone()
            self._change_refs(conn, blob, attr.size, -1)
        self._delete_inode(conn, attr.ino)

    def _delete_inode(self, conn: sqlite3.Connection, ino: int) -> None:
        conn.execute("DELETE FROM inodes WHERE ino=?", (ino,))
        conn.execute("DELETE FROM xattrs WHERE ino=?", (ino,))
        conn.execute("DELETE FROM profiles WHERE ino=?", (ino,))

    def unlink(self, parent: int, name: bytes, *, sustain: int = 0, session: str = "") -> None:
        with self._tx() as conn:
            self._parent_dir(conn, parent)
            attr = self._child(conn, parent, name)
            if attr is None:
                raise FsError(errno.ENOENT, repr(name))
            self._refuse_frozen(conn, parent, attr.ino)
            if attr.is_dir:
                raise FsError(errno.EISDIR, repr(name))
            self._drop_entry(conn, parent, name, attr, sustain, session)
            self._touch_dir(conn, parent)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int, mtime_ns: int) -> Attr:
        check_special(mode)
        return self._add_entry(parent, name, mode, uid, gid, 0, mtime_ns, rdev=rdev if is_device(mode) else 0)

    # -- sessions and orphans --------------------------------------------------------------
    def open_session(self, session: str, now_ns: int) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?)", (session, now_ns))

    def register_peer(self, address: str, expires_ns: int) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO peers VALUES (?, ?)", (address, expires_ns))
            conn.execute("DELETE FROM peers WHERE expires < ?", (_now_ns(),))

    def drop_peer(self, address: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM peers WHERE address = ?", (address,))

    def live_peers(self, now_ns: int) -> list[str]:
        with self._lock:
            try:
                rows = self._conn.execute("SELECT address FROM peers WHERE expires >= ?", (now_ns,)).fetchall()
            except sqlite3.OperationalError:  # a read-only volume made before peers: none registered
                return []
        return sorted(r[0] for r in rows)

    def sessions(self) -> dict[str, int]:
        with self._lock:
            return dict(self._conn.execute("SELECT id, heartbeat FROM sessions").fetchall())

    def orphans(self) -> dict[int, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT ino, session FROM orphans").fetchall())

    def release_orphan(self, ino: int) -> None:
        with self._tx() as conn:
            self._release_orphan(conn, ino)

    def _release_orphan(self, conn: sqlite3.Connection, ino: int) -> None:
        if not conn.execute("DELETE FROM orphans WHERE ino=?", (ino,)).rowcount:
            return
        row = conn.execute(f"SELECT {_ATTR_COLS} FROM inodes WHERE ino=?", (ino,)).fetchone()
        attr = None if row is None else Attr(*row)
        if attr is not None and attr.nlink == 0:  # not linked again meanwhile
            self._forget_inode(conn, attr)

    def close_session(self, session: str) -> None:
        with self._tx() as conn:
            for (ino,) in conn.execute("SELECT ino FROM orphans WHERE session=?", (session,)).fetchall():
                self._release_orphan(conn, ino)
            conn.execute("DELETE FROM sessions WHERE id=?", (session,))

    def set_attrs(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, mtime_ns: int | None = None, atime_ns: int | None = None) -> Attr:
        with self._tx() as conn:
            attr = self._attr_of(conn, ino)
            self._refuse_frozen(conn, ino)
            new_mode = attr.mode if mode is None else (stat.S_IFMT(attr.mode) | stat.S_IMODE(mode))
            conn.execute(
                "UPDATE inodes SET mode=?, uid=?, gid=?, mtime_ns=?, atime_ns=?, ctime_ns=? WHERE ino=?",
                (new_mode, attr.uid if uid is None else uid, attr.gid if gid is None else gid,
                 attr.mtime_ns if mtime_ns is None else mtime_ns, attr.atime_ns if atime_ns is None else atime_ns,
                 _now_ns(), ino),
            )
            return self._attr_of(conn, ino)

    # -- writable mounts ---------------------------------------------------------------------
    def create_file(self, parent: int, name: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> Attr:
        return self._add_entry(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid, 0, mtime_ns, blocks=b"")

    def commit_file(self, ino: int, *, size: int, blocks: BlockList, mtime_ns: int,
                    ctime_ns: int | None = None) -> Attr:
        blob = as_block_list(blocks).pack()
        with self._tx() as conn:
            attr = self._attr_of(conn, ino)
            self._refuse_frozen(conn, ino)
            if not attr.is_reg:
                raise FsError(errno.EISDIR if attr.is_dir else errno.EINVAL, f"inode {ino}")
            (old_blob,) = conn.execute("SELECT blocks FROM inodes WHERE ino=?", (ino,)).fetchone()
            self._change_refs(conn, old_blob, attr.size, -1)
            ctime = max(attr.ctime_ns, _now_ns() if ctime_ns is None else ctime_ns)
            conn.execute("UPDATE inodes SET size=?, blocks=?, mtime_ns=?, ctime_ns=? WHERE ino=?",
                         (size, blob, mtime_ns, ctime, ino))
            self._change_refs(conn, blob, size, +1)
            return self._attr_of(conn, ino)

    def rmdir(self, parent: int, name: bytes) -> None:
        with self._tx() as conn:
            self._parent_dir(conn, parent)
            attr = self._child(conn, parent, name)
            if attr is None:
                raise FsError(errno.ENOENT, repr(name))
            self._refuse_frozen(conn, parent, attr.ino)
            self._remove_empty_dir(conn, parent, name, attr)

    def _remove_empty_dir(self, conn: sqlite3.Connection, parent: int, name: bytes, attr: Attr) -> None:
        if not attr.is_dir:
            raise FsError(errno.ENOTDIR, repr(name))
        if conn.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (attr.ino,)).fetchone():
            raise FsError(errno.ENOTEMPTY, repr(name))
        conn.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
        self._delete_inode(conn, attr.ino)
        self._touch_dir(conn, parent, nlink_delta=-1)

    def _is_ancestor(self, conn: sqlite3.Connection, ancestor: int, ino: int) -> bool:
        """True if directory ``ancestor`` is ``ino`` or one of its ancestors."""
        while ino != ROOT_INODE:
            if ino == ancestor:
                return True
            row = conn.execute("SELECT parent FROM dentries WHERE ino=? LIMIT 1", (ino,)).fetchone()
            if row is None:
                return False
            ino = row[0]
        return ancestor == ROOT_INODE

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, *, noreplace: bool = False,
               sustain: int = 0, session: str = "") -> None:
        check_name(new_name)
        with self._tx() as conn:
            self._parent_dir(conn, parent)
            self._parent_dir(conn, new_parent)
            src = self._child(conn, parent, name)
            if src is None:
                raise FsError(errno.ENOENT, repr(name))
            dst = self._child(conn, new_parent, new_name)
            self._refuse_frozen(conn, parent, new_parent, src.ino, dst.ino if dst else None)
            if (parent, name) == (new_parent, new_name):
                return
            if src.is_dir and self._is_ancestor(conn, src.ino, new_parent):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            if dst is not None:
                if noreplace:
                    raise FsError(errno.EEXIST, repr(new_name))
                if dst.ino == src.ino:
                    return  # two names of one file: POSIX says do nothing
                if src.is_dir:
                    self._remove_empty_dir(conn, new_parent, new_name, dst)
                else:
                    if dst.is_dir:
                        raise FsError(errno.EISDIR, repr(new_name))
                    self._drop_entry(conn, new_parent, new_name, dst, sustain, session)
            conn.execute("UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?",
                         (new_parent, new_name, parent, name))
            moved_dir = src.is_dir and parent != new_parent
            self._touch_dir(conn, parent, nlink_delta=-1 if moved_dir else 0)
            self._touch_dir(conn, new_parent, nlink_delta=1 if moved_dir else 0)
            conn.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (_now_ns(), src.ino))

    def exchange(self, parent: int, name: bytes, other_parent: int, other_name: bytes) -> None:
        with self._tx() as conn:
            self._parent_dir(conn, parent)
            self._parent_dir(conn, other_parent)
            a, b = self._child(conn, parent, name), self._child(conn, other_parent, other_name)
            if a is None or b is None:
                raise FsError(errno.ENOENT, repr(name if a is None else other_name))
            self._refuse_frozen(conn, parent, other_parent, a.ino, b.ino)
            if a.ino == b.ino:
                return
            if parent != other_parent and ((a.is_dir and self._is_ancestor(conn, a.ino, other_parent)) or
                                           (b.is_dir and self._is_ancestor(conn, b.ino, parent))):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            conn.execute("UPDATE dentries SET ino=? WHERE parent=? AND name=?", (b.ino, parent, name))
            conn.execute("UPDATE dentries SET ino=? WHERE parent=? AND name=?", (a.ino, other_parent, other_name))
            delta = 0  # a directory that changes parent takes its '..' link along
            if parent != other_parent and a.is_dir != b.is_dir:
                delta = 1 if a.is_dir else -1
            self._touch_dir(conn, parent, nlink_delta=-delta)
            self._touch_dir(conn, other_parent, nlink_delta=delta)
            conn.execute("UPDATE inodes SET ctime_ns=? WHERE ino IN (?, ?)", (_now_ns(), a.ino, b.ino))

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        check_name(new_name)
        with self._tx() as conn:
            attr = self._attr_of(conn, ino)
            if attr.is_dir:
                raise FsError(errno.EPERM, "hard links to directories are not allowed")
            self._parent_dir(conn, new_parent)
            self._refuse_frozen(conn, ino, new_parent)
            if self._child(conn, new_parent, new_name) is not None:
                raise FsError(errno.EEXIST, repr(new_name))
            conn.execute("INSERT INTO dentries VALUES (?,?,?)", (new_parent, new_name, ino))
            conn.execute("UPDATE inodes SET nlink=nlink+1, ctime_ns=? WHERE ino=?", (_now_ns(), ino))
            self._touch_dir(conn, new_parent)
            return self._attr_of(conn, ino)

    def get_xattr(self, ino: int, name: bytes) -> bytes:
        with self._lock:
            self._attr_of(self._conn, ino)
            row = self._conn.execute("SELECT value FROM xattrs WHERE ino=? AND name=?", (ino, name)).fetchone()
        if row is None:
            raise FsError(errno.ENODATA, repr(name))
        return bytes(row[0])

    def list_xattrs(self, ino: int) -> list[bytes]:
        with self._lock:
            self._attr_of(self._conn, ino)
            rows = self._conn.execute("SELECT name FROM xattrs WHERE ino=? ORDER BY name", (ino,)).fetchall()
        return [bytes(r[0]) for r in rows]

    def set_xattr(self, ino: int, name: bytes, value: bytes, *, create: bool = False, replace: bool = False) -> None:
        check_xattr(name, value)
        with self._tx() as conn:
            self._attr_of(conn, ino)
            self._refuse_frozen(conn, ino)
            exists = conn.execute("SELECT 1 FROM xattrs WHERE ino=? AND name=?", (ino, name)).fetchone()
            if exists and create:
                raise FsError(errno.EEXIST, repr(name))
            if not exists and replace:
                raise FsError(errno.ENODATA, repr(name))
            conn.execute("INSERT OR REPLACE INTO xattrs VALUES (?,?,?)", (ino, name, value))
            conn.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (_now_ns(), ino))

    def remove_xattr(self, ino: int, name: bytes) -> None:
        with self._tx() as conn:
            self._attr_of(conn, ino)
            self._refuse_frozen(conn, ino)
            if conn.execute("DELETE FROM xattrs WHERE ino=? AND name=?", (ino, name)).rowcount == 0:
                raise FsError(errno.ENODATA, repr(name))
            conn.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (_now_ns(), ino))

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot(self, src: int, parent: int, name: bytes, *, source: str, created_ns: int) -> Attr:
        check_name(name)
        with self._tx() as conn:
            self._parent_dir(conn, parent)
            self._refuse_frozen(conn, parent)
            if not self._attr_of(conn, src).is_dir:
                raise FsError(errno.ENOTDIR, f"inode {src}")
            if self._is_ancestor(conn, src, parent):
                raise FsError(errno.EINVAL, "a snapshot cannot be placed inside its source")
            if self._child(conn, parent, name) is not None:
                raise FsError(errno.EEXIST, repr(name))
            copies = {src: self._copy_inode(conn, src)}  # source inode -> its copy
            links: dict[int, int] = {}  # a copied non-directory -> its names inside the copy
            queue = [src]
            while queue:
                old_dir = queue.pop()
                rows = conn.execute("SELECT d.name, d.ino, i.mode FROM dentries d JOIN inodes i ON i.ino = d.ino "
                                    "WHERE d.parent=?", (old_dir,)).fetchall()
                for child_name, child, mode in rows:
                    if child not in copies:
                        copies[child] = self._copy_inode(conn, child)
                        if stat.S_ISDIR(mode):
                            queue.append(child)
                    if not stat.S_ISDIR(mode):
                        links[copies[child]] = links.get(copies[child], 0) + 1
                    conn.execute("INSERT INTO dentries VALUES (?,?,?)", (copies[old_dir], child_name, copies[child]))
            conn.executemany("UPDATE inodes SET nlink=? WHERE ino=?", [(n, ino) for ino, n in links.items()])
            root = copies[src]
            conn.execute("INSERT INTO dentries VALUES (?,?,?)", (parent, name, root))
            self._touch_dir(conn, parent, nlink_delta=1)
            conn.executemany("INSERT INTO frozen VALUES (?)", [(ino,) for ino in copies.values()])
            conn.execute("INSERT INTO snapshots VALUES (?, ?)",
                         (root, SnapshotRecord(root, source, created_ns).to_json()))
            return self._attr_of(conn, root)

    def _copy_inode(self, conn: sqlite3.Connection, ino: int) -> int:
        """A new inode with ``ino``'s attributes, content and xattrs (its block references added)."""
        cur = conn.execute(
            "INSERT INTO inodes(mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, nlink, target, blocks, rdev) "
            "SELECT mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, nlink, target, blocks, rdev "
            "FROM inodes WHERE ino=?", (ino,))
        new = cur.lastrowid
        assert new is not None
        conn.execute("INSERT INTO xattrs SELECT ?, name, value FROM xattrs WHERE ino=?", (new, ino))
        conn.execute("INSERT INTO profiles SELECT ?, data FROM profiles WHERE ino=?", (new, ino))
        mode, size, blob = conn.execute("SELECT mode, size, blocks FROM inodes WHERE ino=?", (new,)).fetchone()
        if stat.S_ISREG(mode):
            self._change_refs(conn, blob, size, +1)
        return new

    def _subtree(self, conn: sqlite3.Connection, root: int) -> tuple[list[int], set[int]]:
        """(the directories, every other inode) of the tree below directory ``root`` (with it)."""
        dirs, others, i = [root], set(), 0
        while i < len(dirs):
            rows = conn.execute("SELECT d.ino, i.mode FROM dentries d JOIN inodes i ON i.ino = d.ino "
                                "WHERE d.parent=?", (dirs[i],)).fetchall()
            for child, mode in rows:
                if stat.S_ISDIR(mode):
                    dirs.append(child)
                else:
                    others.add(child)
            i += 1
        return dirs, others

    def freeze_tree(self, root: int, *, source: str, created_ns: int) -> None:
        with self._tx() as conn:
            if not self._attr_of(conn, root).is_dir:
                raise FsError(errno.ENOTDIR, f"inode {root}")
            dirs, others = self._subtree(conn, root)
            conn.executemany("INSERT OR IGNORE INTO frozen VALUES (?)", [(ino,) for ino in [*dirs, *others]])
            conn.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?)",
                         (root, SnapshotRecord(root, source, created_ns).to_json()))

    def delete_snapshot(self, root: int) -> None:
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM snapshots WHERE ino=?", (root,)).fetchone() is None:
                raise FsError(errno.EINVAL, f"inode {root} is not a snapshot")
            dirs, others = self._subtree(conn, root)
            for ino in others:
                self._forget_inode(conn, self._attr_of(conn, ino))
            for ino in dirs:
                conn.execute("DELETE FROM dentries WHERE parent=?", (ino,))
                self._delete_inode(conn, ino)
            conn.executemany("DELETE FROM frozen WHERE ino=?", [(ino,) for ino in [*dirs, *others]])
            for (parent,) in conn.execute("SELECT parent FROM dentries WHERE ino=?", (root,)).fetchall():
                self._touch_dir(conn, parent, nlink_delta=-1)
            conn.execute("DELETE FROM dentries WHERE ino=?", (root,))
            conn.execute("DELETE FROM snapshots WHERE ino=?", (root,))

    def snapshots(self) -> list[SnapshotRecord]:
        with self._lock:
            try:
                rows = self._conn.execute("SELECT ino, info FROM snapshots ORDER BY ino").fetchall()
            except sqlite3.OperationalError:  # a read-only database made before snapshots
                return []
        return [SnapshotRecord.from_json(ino, info) for ino, info in rows]

    def is_frozen(self, ino: int) -> bool:
        with self._lock:
            try:
                return self._conn.execute("SELECT 1 FROM frozen WHERE ino=?", (ino,)).fetchone() is not None
            except sqlite3.OperationalError:
                return False

    def get_profile(self, ino: int) -> bytes | None:
        with self._lock:
            try:
                row = self._conn.execute("SELECT data FROM profiles WHERE ino=?", (ino,)).fetchone()
            except sqlite3.OperationalError:  # a read-only database made before profiles
                return None
        return None if row is None else bytes(row[0])

    def set_profile(self, ino: int, data: bytes | None, *, replace: bool = True) -> bool:
        check_profile(data)
        try:
            with self._tx() as conn:
                if not self._attr_of(conn, ino).is_dir:
                    raise FsError(errno.ENOTDIR, f"inode {ino}")
                if data is None:
                    return conn.execute("DELETE FROM profiles WHERE ino=?", (ino,)).rowcount > 0
                verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
                return conn.execute(f"{verb} INTO profiles VALUES (?, ?)", (ino, data)).rowcount > 0
        except sqlite3.Error as exc:  # a read-only database file, one made before profiles, a lock
            raise ChunkfsError(f"{self.url}: cannot store an access profile: {exc}") from None

    def dir_path(self, ino: int) -> str | None:
        names: list[str] = []
        with self._lock:
            while ino != ROOT_INODE:
                row = self._conn.execute("SELECT parent, name FROM dentries WHERE ino=? LIMIT 1", (ino,)).fetchone()
                if row is None or len(names) > 4096:
                    return None
                ino = row[0]
                names.append(os.fsdecode(bytes(row[1])))
        return "/" + "/".join(reversed(names))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_url(url: str, create: bool) -> SqliteMeta:
    return SqliteMeta(url, create=create)

"""The MetaStore interface and the records it stores.

Layer: ``meta/`` knows nothing of FUSE, caches or object stores. Engines are blocking;
trio code goes through ``chunkfs.meta.aio.AsyncMeta``.

Contract (checked by ``tests/test_meta_contract.py`` for every engine):

- Inode 1 is the root directory and exists once a volume is formatted.
- ``publish_file`` is one transaction: the entry, the attributes and the ordered block list
  of a file change together, so a reader sees the old file or the new one, never a mix.
- Every namespace change (mkdir, symlink, unlink, publish) is one transaction.
- A new entry (mkdir, symlink, create_file, mknod) in a set-gid directory takes that
  directory's group, and a new directory there its set-gid bit, as ext4 does.
- Block reference counts (``blockrefs``) always equal the number of (file, index) slots
  that name the block; ``stats`` derives the dedup figures from them.
- Snapshots (``snapshot``) are read-only copies of a directory tree made in the metadata
  only: every inode of a snapshot is *frozen*, and every change that would alter a frozen
  inode or a frozen directory's entries raises ``FsError(EROFS)`` in the engine, whoever
  asks (a mount, an import, a load). Only ``delete_snapshot`` removes them. A frozen file
  references its blocks like any file, so gc keeps them.
- Per-operation failures raise ``FsError(errno)``; engine-level failures raise
  ``ChunkfsError`` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import stat
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from errno import E2BIG, EFBIG, EINVAL, ENAMETOOLONG, EOPNOTSUPP, ERANGE

from chunkfs.blocklist import BlockList
from chunkfs.blocks import HASH_NAME, HASHES
from chunkfs.errors import ChunkfsError, FsError, NotFormatted

ROOT_INODE = 1
#: 1: dense block lists only. 2: block lists may have holes (``BlockList``'s sparse form) and
#: inodes may be FIFOs, sockets or device nodes. Code reading version 1 would misread both,
#: so a writable mount raises a volume to 2 before it writes. 3: the volume may hold
#: snapshots (frozen inodes); code reading version 2 would let a writable mount change them,
#: so making a snapshot (or loading a dump with one) raises a volume to 3 first. This code
#: reads all three; new volumes are made at 2, so chunkfs before snapshots keeps reading
#: them until someone takes a snapshot.
FORMAT_VERSION = 3
#: what new volumes are made at and what a writable mount raises an older volume to
WRITABLE_FORMAT_VERSION = 2
#: the version a volume needs before it may hold snapshots
SNAPSHOT_FORMAT_VERSION = 3
NAME_MAX = 255
#: the largest file size: sizes travel as Lua numbers (doubles) in the Redis engine, exact
#: up to 2**53 (8 PiB). A larger truncate or write gets EFBIG.
MAX_FILE_SIZE = 1 << 53


@dataclass(frozen=True)
class VolumeFormat:
    """A volume's settings, fixed at format time (storage may be re-pointed with --force)."""

    name: str
    uuid: str
    storage: str
    block_size: int
    compression: str
    created: str
    hash: str = HASH_NAME
    format_version: int = WRITABLE_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> VolumeFormat:
        data = json.loads(text)
        version = data.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise ChunkfsError(
                f"volume format version {version} is newer than this chunkfs supports ({FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        fmt = cls(**{k: v for k, v in data.items() if k in known})
        if fmt.hash not in HASHES:
            raise ChunkfsError(f"volume uses block hash {fmt.hash!r}, which this chunkfs does not know "
                               f"({', '.join(HASHES)})")
        return fmt


@dataclass(frozen=True, slots=True)
class Attr:
    """An inode's attributes. ``mode`` includes the file type bits."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    rdev: int = 0  # device number of a character or block device node, else 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_special(self) -> bool:
        """A FIFO, socket or device node: metadata only, the kernel does its I/O."""
        return not (self.is_dir or self.is_reg or self.is_link)


@dataclass(frozen=True)
class VolumeStats:
    files: int
    directories: int
    symlinks: int
    logical_bytes: int  # sum of regular file sizes
    block_refs: int  # (file, index) slots
    unique_blocks: int  # distinct block ids referenced
    unique_bytes: int  # plain bytes of the distinct blocks
    specials: int = 0  # FIFOs, sockets and device nodes

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot as the engine registers it: its root directory's inode, the volume path it
    was copied from, and when (ns)."""

    ino: int
    source: str
    created_ns: int

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "created_ns": self.created_ns}, sort_keys=True)

    @classmethod
    def from_json(cls, ino: int, text: str | bytes) -> SnapshotRecord:
        data = json.loads(text)
        return cls(ino, str(data.get("source", "")), int(data.get("created_ns", 0)))


class MetaStore(ABC):
    """A volume's namespace, attributes and block lists."""

    #: the engine URL with any password masked: safe to print
    url: str
    #: the volume's block size once known (engines set it in ``save_format``)
    _block_size: int | None = None

    @property
    def block_size(self) -> int:
        """The volume's block size (needed to derive block lengths for reference counts)."""
        if self._block_size is None:
            fmt = self.load_format()
            if fmt is None:
                raise NotFormatted(f"no chunkfs volume at {self.url}")
            self._block_size = fmt.block_size
        return self._block_size

    # -- volume ---------------------------------------------------------------------------
    @abstractmethod
    def load_format(self) -> VolumeFormat | None:
        """The stored settings, or None if this engine holds no volume."""

    @abstractmethod
    def save_format(self, fmt: VolumeFormat) -> None:
        """Store the settings and create the root directory if it does not exist."""

    def raise_format(self, version: int) -> bool:
        """Raise the volume's format version to ``version`` before it holds what older code
        would misread (never lowers it); True if it was raised."""
        fmt = self.load_format()
        if fmt is None or fmt.format_version >= version:
            return False
        self.save_format(dataclasses.replace(fmt, format_version=version))
        return True

    @abstractmethod
    def stats(self) -> VolumeStats: ...

    @abstractmethod
    def is_empty(self) -> bool:
        """True when the volume holds nothing but its root directory."""

    # -- reads ----------------------------------------------------------------------------
    @abstractmethod
    def getattr(self, ino: int) -> Attr: ...

    @abstractmethod
    def lookup(self, parent: int, name: bytes) -> Attr: ...

    @abstractmethod
    def readdir(self, ino: int) -> list[tuple[bytes, Attr]]:
        """All entries of a directory, sorted by name."""

    @abstractmethod
    def readlink(self, ino: int) -> bytes: ...

    @abstractmethod
    def read_blocks(self, ino: int) -> BlockList:
        """The block list of a regular file (holes where nothing was written)."""

    def block_known(self, bid: bytes) -> bool:
        """True if some published file references the block (so it is in the store); for
        tests and tools (writers ask ``claim_upload``)."""
        return bid in self.referenced_blocks()

    @abstractmethod
    def claim_upload(self, bid: bytes, now_ns: int) -> str:
        """Before storing block ``bid`` for a file about to be published, in one transaction:
        ``KNOWN`` if a file references it (it is in the store: nothing to upload); ``BUSY``
        while gc is deleting its object (ask again shortly); else ``CLAIMED``: an upload
        intent with time ``now_ns`` is recorded, and gc leaves the object alone while the
        intent is within its grace period."""

    def claim_upload_waiting(self, bid: bytes) -> str:
        """``claim_upload`` now, asked again every ``CLAIM_RETRY_S`` while gc is deleting the
        block's object (blocking): ``KNOWN`` or ``CLAIMED``."""
        while (claim := self.claim_upload(bid, time.time_ns())) == BUSY:
            time.sleep(CLAIM_RETRY_S)
        return claim

    @abstractmethod
    def begin_delete(self, bid: bytes, intents_since_ns: int, now_ns: int) -> bool:
        """gc, before deleting block ``bid``'s object, in one transaction: True (and the
        block is marked as being deleted at ``now_ns``) only if no file references it and
        no upload was claimed at or after ``intents_since_ns`` and no other gc's mark is live.
        A mark older than ``DELETE_MARK_TTL_NS`` (a gc that died) no longer makes
        ``claim_upload`` or another gc wait."""

    @abstractmethod
    def end_delete(self, bid: bytes) -> None:
        """Remove the mark ``begin_delete`` set (the object is gone, or was kept)."""

    @abstractmethod
    def referenced_blocks(self) -> set[bytes]:
        """Every block some file references (for gc and fsck)."""

    @abstractmethod
    def freed_blocks(self, since_ns: int) -> set[bytes]:
        """Blocks whose last reference went away at or after ``since_ns`` (a reader that
        opened the file before may still need them: gc leaves them for a grace period)."""

    @abstractmethod
    def forget_freed(self, before_ns: int) -> None:
        """Drop the records of blocks freed, and of uploads claimed, before ``before_ns``,
        and delete marks older than that by ``DELETE_MARK_TTL_NS`` (left by a gc that died)."""

    # -- namespace changes (each one transaction) ------------------------------------------
    @abstractmethod
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> Attr: ...

    @abstractmethod
    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int, mtime_ns: int) -> Attr: ...

    @abstractmethod
    def publish_file(
        self,
        parent: int,
        name: bytes,
        *,
        mode: int,
        uid: int,
        gid: int,
        mtime_ns: int,
        size: int,
        blocks: BlockList | list[bytes],
    ) -> Attr:
        """Create the regular file ``parent/name`` or replace the content and attributes of
        the non-directory there, with its whole block list, in one transaction."""

    @abstractmethod
    def unlink(self, parent: int, name: bytes, *, sustain: int = 0, session: str = "") -> None:
        """Remove a non-directory entry (dropping its block references at nlink 0). When the
        entry is the last link of inode ``sustain`` (a file open in the caller's mount), the
        inode stays, with nlink 0 and its blocks referenced, as an orphan of ``session``
        until ``release_orphan`` (its last close) or the session is found dead."""

    @abstractmethod
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int, mtime_ns: int) -> Attr:
        """A FIFO, socket or device node (``mode`` carries the type); EEXIST if the name is taken."""

    # -- sessions and orphans (files unlinked while open) ------------------------------------
    @abstractmethod
    def open_session(self, session: str, now_ns: int) -> None:
        """Register a writable mount, or record that it is alive (a heartbeat)."""

    # -- peers serving this volume's blocks (``chunkfs.peer.membership``) ----------------------
    @abstractmethod
    def register_peer(self, address: str, expires_ns: int) -> None:
        """Record that a node serves peers at ``address`` until ``expires_ns`` (a refresh
        moves it on); expired entries may be dropped here."""

    @abstractmethod
    def drop_peer(self, address: str) -> None:
        """Forget ``address`` (a node that stops serving)."""

    @abstractmethod
    def live_peers(self, now_ns: int) -> list[str]:
        """Addresses registered and not expired at ``now_ns``, sorted."""

    @abstractmethod
    def sessions(self) -> dict[str, int]:
        """Every registered session and its last heartbeat (ns)."""

    @abstractmethod
    def orphans(self) -> dict[int, str]:
        """Inodes unlinked while open (nlink 0, blocks still referenced) -> their session."""

    @abstractmethod
    def release_orphan(self, ino: int) -> None:
        """The orphan's last handle closed: delete the inode and drop its block references
        (nothing if ``ino`` is not an orphan)."""

    @abstractmethod
    def close_session(self, session: str) -> None:
        """Release every orphan of ``session`` and forget the session."""

    @abstractmethod
    def set_attrs(
        self, ino: int, *, mode: int | None = None, uid: int | None = None,
        gid: int | None = None, mtime_ns: int | None = None, atime_ns: int | None = None,
    ) -> Attr:
        """Change the given attributes (the file type bits of ``mode`` are kept); ctime = now."""

    # -- writable mounts (each one transaction) ----------------------------------------------
    @abstractmethod
    def create_file(self, parent: int, name: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> Attr:
        """A new empty regular file; EEXIST if the name is taken."""

    @abstractmethod
    def commit_file(self, ino: int, *, size: int, blocks: BlockList, mtime_ns: int,
                    ctime_ns: int | None = None) -> Attr:
        """Replace a regular file's size and whole block list (a write, a truncate) at once.
        ctime becomes ``ctime_ns`` (when the edits were made; default now), never earlier
        than it is (a chmod since)."""

    @abstractmethod
    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty directory (ENOTEMPTY, ENOTDIR, ENOENT)."""

    @abstractmethod
    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, *,
               noreplace: bool = False, sustain: int = 0, session: str = "") -> None:
        """Move an entry, replacing a file at the destination (or an empty directory by a
        directory), as rename(2): EISDIR, ENOTDIR, ENOTEMPTY, EINVAL (into itself), EEXIST
        with ``noreplace``. A replaced file that is inode ``sustain`` becomes an orphan of
        ``session`` as in ``unlink``."""

    @abstractmethod
    def exchange(self, parent: int, name: bytes, other_parent: int, other_name: bytes) -> None:
        """Swap two existing entries at once, as renameat2(RENAME_EXCHANGE): each name then
        names the other's inode, of whatever types. ENOENT if either is missing; EINVAL if a
        directory would land inside itself."""

    @abstractmethod
    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        """A new name for a non-directory (nlink + 1); EPERM for directories."""

    @abstractmethod
    def get_xattr(self, ino: int, name: bytes) -> bytes:
        """ENODATA if absent."""

    @abstractmethod
    def list_xattrs(self, ino: int) -> list[bytes]: ...

    @abstractmethod
    def set_xattr(self, ino: int, name: bytes, value: bytes, *, create: bool = False,
                  replace: bool = False) -> None:
        """``create``: EEXIST if present; ``replace``: ENODATA if absent."""

    @abstractmethod
    def remove_xattr(self, ino: int, name: bytes) -> None:
        """ENODATA if absent."""

    # -- snapshots (read-only copies made in the metadata) ----------------------------------------
    @abstractmethod
    def snapshot(self, src: int, parent: int, name: bytes, *, source: str, created_ns: int) -> Attr:
        """In one transaction: copy directory ``src`` and everything below it to a new
        directory ``parent/name`` (new inodes with the same attributes, xattrs, symlink targets
        and block lists; hard links inside the tree stay links; no block is copied, each copied
        file adds its block references), freeze every new inode and register the copy as a
        snapshot of ``source``. ENOTDIR if ``src`` is not a directory, EEXIST if the name is
        taken, EINVAL if ``parent`` lies inside ``src``, EROFS if ``parent`` is frozen."""

    @abstractmethod
    def freeze_tree(self, root: int, *, source: str, created_ns: int) -> None:
        """Freeze directory ``root`` and everything below it and register it as a snapshot
        (``load`` of a dump that holds snapshots)."""

    @abstractmethod
    def delete_snapshot(self, root: int) -> None:
        """In one transaction: remove the snapshot whose root directory is ``root`` with all
        it holds, dropping its block references (gc may then collect blocks no one else
        uses). EINVAL if ``root`` is not a snapshot's root."""

    @abstractmethod
    def snapshots(self) -> list[SnapshotRecord]:
        """Every registered snapshot, by root inode."""

    @abstractmethod
    def is_frozen(self, ino: int) -> bool:
        """True if the inode belongs to a snapshot (never changes while the inode exists)."""

    # -- access profiles (``chunkfs.profile``): hints, so allowed on snapshots too -------------
    @abstractmethod
    def get_profile(self, ino: int) -> bytes | None:
        """The access profile stored for directory ``ino``, or None."""

    @abstractmethod
    def set_profile(self, ino: int, data: bytes | None, *, replace: bool = True) -> bool:
        """Store directory ``ino``'s access profile (None: drop it); with ``replace`` False
        only if it has none (the first recording mount wins). True if stored. An inode's
        profile goes with the inode, and a snapshot copies its directories' profiles."""

    @abstractmethod
    def dir_path(self, ino: int) -> str | None:
        """The volume path of directory ``ino`` (``/`` for the root), or None if it has none."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


#: the largest access profile an engine stores (a compressed profile is a few KB per model)
MAX_PROFILE_BYTES = 1 << 20


def check_profile(data: bytes | None) -> None:
    if data is not None and len(data) > MAX_PROFILE_BYTES:
        raise FsError(E2BIG, f"an access profile of {len(data)} bytes (at most {MAX_PROFILE_BYTES})")


XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536


#: answers of ``MetaStore.claim_upload``
KNOWN, BUSY, CLAIMED = "known", "busy", "claimed"
#: a gc delete mark older than this (its gc died mid-delete) no longer holds writers back
DELETE_MARK_TTL_NS = 600 * 10**9
#: seconds between two claims of a block gc is deleting (a delete takes milliseconds)
CLAIM_RETRY_S = 0.05
#: a writable mount claims again, this often, every block it stored for a file not yet published
#: (open for writing), so gc leaves the block alone however long the file stays open
CLAIM_RENEW_S = 300.0
#: the shortest grace ``chunkfs gc`` accepts without --force: longer than two renewals
MIN_GC_GRACE_S = 2 * CLAIM_RENEW_S + 60.0


def check_xattr(name: bytes, value: bytes) -> None:
    """Reject what Linux would (empty or too long names, values over 64 KiB) and ``system.*``
    names: chunkfs has no ACLs, so none is ever stored (mounts answer for them unasked).
    (Which namespaces a mount takes new names in is the VFS's rule: a dump of a volume that
    stored others before still loads.)"""
    if name.startswith(b"system."):
        raise FsError(EOPNOTSUPP, "system.* extended attributes are not supported (no ACLs)")
    if not name or len(name) > XATTR_NAME_MAX:
        raise FsError(ERANGE, f"xattr name of {len(name)} bytes")
    if len(value) > XATTR_SIZE_MAX:
        raise FsError(E2BIG, f"xattr value of {len(value)} bytes")


def as_block_list(blocks: BlockList | list[bytes]) -> BlockList:
    return blocks if isinstance(blocks, BlockList) else BlockList.dense(blocks)


def check_size(size: int) -> None:
    if size > MAX_FILE_SIZE:
        raise FsError(EFBIG, f"{size} bytes is past the largest file size ({MAX_FILE_SIZE})")


def is_device(mode: int) -> bool:
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def check_special(mode: int) -> None:
    """``mknod`` makes FIFOs, sockets and device nodes (regular files go through create)."""
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or is_device(mode)):
        raise FsError(EINVAL, f"mknod of file type {stat.S_IFMT(mode):o}")


def check_name(name: bytes) -> None:
    """Reject names POSIX does not allow in a directory entry."""
    if len(name) > NAME_MAX:
        raise FsError(ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FsError(EINVAL, f"invalid name {name!r}")

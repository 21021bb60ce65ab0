"""Vfs: the filesystem of one mount, in chunkfs terms, for any kernel adapter to translate.

Layer: ``vfs/``, between ``fuse/`` (which only translates pyfuse3 calls and errno values)
and ``meta/``, ``read/``, ``write/``. It owns handles and open files, the read-only policy,
the stats file, the names and parents seen (for ``..`` and log messages), and which of the
reader or the writer serves a read. It speaks ``Attr``, ``bytes`` and ``FsError``: no
pyfuse3 type crosses it, so its tests drive it without a kernel (``tests/test_vfs.py``).

One class serves both mount kinds: a read-only mount (``writer`` None) answers every
modifying call with EROFS. In a writable mount, a snapshot's inodes are refused by the
metadata engine (EROFS); opening one of its files for writing is refused here, at open.

Consistency of a writable mount: a file's content is published when a handle is closed
(flush) or fsync'd, so another mount that opens it afterwards sees it (close-to-open, as NFS
and JuiceFS give). Within this mount, every read of a file open for writing sees the
unpublished bytes, and ``getattr`` reports the size and times being written.

POSIX rules kept here (the kernel leaves them to the filesystem):

- ``O_TRUNC`` arrives in ``open`` (atomic O_TRUNC) and empties the file, marking mtime/ctime.
- A file unlinked (or renamed over) while open in this mount stays readable and writable
  through its handles: it becomes an orphan of this mount's session and goes at its last close.
- Set-uid/set-gid are cleared as the kernel would if it did not hand that to the filesystem:
  on chown of a non-directory, and on a write or truncate by a caller other than root
  (set-gid only with group-execute).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from chunkfs.blocklist import BlockList
from chunkfs.cache.images import FileImages, image_id
from chunkfs.errors import FsError
from chunkfs.meta.aio import AsyncMeta
from chunkfs.meta.base import NAME_MAX, ROOT_INODE, XATTR_NAME_MAX, Attr
from chunkfs.metrics import Metrics
from chunkfs.read.fetcher import BlockUnavailable
from chunkfs.read.reader import FileReader
from chunkfs.vfs.handles import Handles, OpenDir, OpenFile
from chunkfs.vfs.profiles import ProfileBook
from chunkfs.write.file_writer import FileWriter, WriteFailed

log = logging.getLogger(__name__)

#: A read-only file in the root of every mount with the daemon's metrics in Prometheus text
#: (what ``chunkfs stats MOUNTPOINT`` reads). Only ``lookup`` finds it: ``readdir`` does not
#: list it, and it hides a volume file of the same name.
STATS_NAME = b".chunkfs-stats"
STATS_INODE = (1 << 63) - 2
STATS_ATTR = Attr(STATS_INODE, stat.S_IFREG | 0o444, 0, 0, 0, 0, 0, 0, 1)  # size: generated at open
UNKNOWN_INODE = 0xFFFFFFFF  # FUSE_UNKNOWN_INO: what libfuse reports when it has no inode number
#: reads are answered from reused buffers of this size (the kernel asks for at most 1 MiB)
REPLY_BUFFER = 1 << 20
#: reply buffers kept for reuse: as many as reads are answered at once, at most
REPLY_BUFFERS_KEPT = 32
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
#: the renameat2 flags chunkfs honours (a whiteout, for overlayfs upper layers, is refused)
RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_WRITE_INTENT = os.O_WRONLY | os.O_RDWR


@dataclass(frozen=True, slots=True)
class MountOptions:
    read_only: bool = True
    attr_timeout: float = 300.0
    entry_timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class AttrChange:
    """What a setattr asks for (None: leave it)."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None
    ctime: bool = False  # mark the change time even if nothing else changes


#: the namespaces a mount takes new extended attributes in, as ext4 (``system.*``: no ACLs)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")

#: the times a volume stores: signed 64-bit nanoseconds (years 1677 to 2262)
TIME_NS_MIN, TIME_NS_MAX = -(1 << 63), (1 << 63) - 1


def clamp_time_ns(ns: int) -> int:
    """A time set by utimensat, clamped to what the volume stores (as ext4 clamps to its own
    range): a year-30000 mtime is kept as the latest time there is, not an I/O error."""
    return min(max(ns, TIME_NS_MIN), TIME_NS_MAX)


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    ino: int
    attr: Attr | None  # None for ``.`` and ``..`` (the kernel takes only their number and type)
    offset: int  # the offset of the entry after this one


@dataclass(frozen=True, slots=True)
class FsStats:
    block_size: int
    blocks: int
    free_blocks: int
    files: int
    free_files: int
    name_max: int = NAME_MAX


def without_privileges(mode: int) -> int:
    """``mode`` less set-uid, and less set-gid when group-execute is set (a set-gid file
    without group-execute is a mandatory-locking mark, which the kernel keeps)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


class Vfs:
    def __init__(self, meta: AsyncMeta, reader: FileReader, block_size: int, options: MountOptions,
                 metrics: Metrics, writer: FileWriter | None = None, session: str = "") -> None:
        """``writer``: a writable mount's (None: read-only; ``options.read_only`` must agree).
        ``session``: a writable mount's session (files unlinked while open are its orphans)."""
        if (writer is None) != options.read_only:
            raise ValueError("a read-only mount has no writer, a writable one needs one")
        self.meta = meta
        self.reader = reader
        self.writer = writer
        self.block_size = block_size
        self.images = FileImages(reader.fetcher.cache, block_size)
        self.options = options
        self.metrics = metrics
        self.session = session
        self.handles = Handles()
        self._names: dict[int, bytes] = {ROOT_INODE: b"/"}  # last name seen per inode, for log messages
        # directory or regular file -> the directory it was last seen in (a directory's '..', a
        # file's access profile)
        self._parents: dict[int, int] = {ROOT_INODE: ROOT_INODE}
        #: the mount's access profiles (recorded from reads, used for prefetch), if any
        self.profiles: ProfileBook | None = None
        self._sustained: set[int] = set()  # open inodes that lost a name while open: maybe orphans
        # Reply buffers for ``read``: one is back in the pool as ``read`` returns, and reused
        # only by a later request. That is safe as long as the adapter replies (copies the
        # bytes to the kernel) before any other task runs, as pyfuse3 does.
        self._reply_buffers: list[bytearray] = []

    # -- helpers -----------------------------------------------------------------------------
    def _writer(self) -> FileWriter:
        """The writer, or EROFS on a read-only mount."""
        if self.writer is None:
            raise FsError(errno.EROFS, "read-only mount")
        return self.writer

    def cache_timeout(self, ino: int) -> tuple[float, float]:
        """(entry, attribute) timeouts the kernel may cache an answer about ``ino`` for."""
        if ino == STATS_INODE:
            return 1.0, 1.0
        return self.options.entry_timeout, self.options.attr_timeout

    def _shown(self, attr: Attr) -> Attr:
        """The attributes readers of this mount see: for a file being written here, the size
        and times being written."""
        if self.writer is None:
            return attr
        size = self.writer.size_of(attr.ino)
        if size is None:
            return attr
        attr = dataclasses.replace(attr, size=size)
        times = self.writer.unpublished_times(attr.ino)
        if times is not None:
            attr = dataclasses.replace(attr, mtime_ns=times[0], ctime_ns=max(attr.ctime_ns, times[1]))
        return attr

    def _seen(self, parent: int, name: bytes, attr: Attr) -> Attr:
        """Remember what a lookup, listing or creation showed: the name (for log messages)
        and, for a directory, its parent (for its ``..`` entry)."""
        self._names[attr.ino] = name
        if attr.is_dir or attr.is_reg:
            self._parents[attr.ino] = parent
        return self._shown(attr)

    def name_of(self, ino: int) -> str:
        return self._names.get(ino, b"?").decode(errors="replace")

    def parent_of(self, ino: int) -> int | None:
        """The directory a lookup or listing last showed ``ino`` in (None: never seen)."""
        return self._parents.get(ino)

    # -- namespace reads ---------------------------------------------------------------------
    async def lookup(self, parent: int, name: bytes) -> Attr:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG, "name too long")
        if parent == ROOT_INODE and name == STATS_NAME:
            return STATS_ATTR
        return self._seen(parent, name, await self.meta.lookup(parent, name))

    async def getattr(self, ino: int) -> Attr:
        if ino == STATS_INODE:
            return STATS_ATTR
        return self._shown(await self.meta.getattr(ino))

    async def readlink(self, ino: int) -> bytes:
        return await self.meta.readlink(ino)

    async def opendir(self, ino: int) -> int:
        return self.handles.open_dir(OpenDir(ino, await self.meta.readdir(ino)))

    def readdir(self, fh: int, start: int) -> Iterator[DirEntry]:
        """Entries from offset ``start``, in order ``.``, ``..``, then the directory's; an
        entry's offset is its position plus one. A directory's parent is the one its last
        lookup, listing, creation or rename showed; one never seen (none is reached
        otherwise) gets FUSE's unknown inode number for ``..``."""
        d = self.handles.dirs[fh]
        for position in range(start, len(d.listing) + 2):
            if position == 0:
                yield DirEntry(b".", d.ino, None, 1)
            elif position == 1:
                yield DirEntry(b"..", self._parents.get(d.ino, UNKNOWN_INODE), None, 2)
            else:
                name, attr = d.listing[position - 2]
                yield DirEntry(name, attr.ino, self._seen(d.ino, name, attr), position + 1)

    def releasedir(self, fh: int) -> None:
        self.handles.dirs.pop(fh, None)

    async def statfs(self) -> FsStats:
        stats = await self.meta.stats()
        used = -(-stats.logical_bytes // self.block_size)
        free = 0 if self.options.read_only else (1 << 50) // self.block_size
        free_files = 0 if self.options.read_only else 1 << 30
        return FsStats(self.block_size, used + free, free,
                       stats.files + stats.directories + stats.symlinks + free_files, free_files)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if self.writer is None:
            # No extended attributes. ENOSYS makes the kernel remember that and answer every
            # later getxattr itself, instead of one round trip per call (``ls -l`` asks for
            # ACL and SELinux attributes of every file it lists).
            raise FsError(errno.ENOSYS, "no extended attributes")
        if ino == STATS_INODE or name.startswith(b"system."):
            # setxattr refuses system.* (ACLs): none can exist, so the kernel's ACL lookups
            # at every `ls -l` need not reach the metadata engine
            raise FsError(errno.ENODATA, "no such attribute")
        return await self.meta.call(self.meta.meta.get_xattr, ino, name)

    async def listxattr(self, ino: int) -> list[bytes]:
        if self.writer is None or ino == STATS_INODE:
            return []
        return await self.meta.call(self.meta.meta.list_xattrs, ino)

    # -- namespace changes -------------------------------------------------------------------
    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        self._writer()
        return self._seen(parent, name, await self.meta.change(
            self.meta.meta.mkdir, parent, name, mode, uid, gid, time.time_ns()))

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        self._writer()
        return self._seen(parent, name, await self.meta.change(
            self.meta.meta.symlink, parent, name, target, uid, gid, time.time_ns()))

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        """Regular files, FIFOs, sockets (bind) and device nodes; the kernel does the I/O of
        the special ones, chunkfs keeps their type, mode, owner, times and ``rdev``."""
        self._writer()
        if stat.S_ISREG(mode):
            return await self._new_file(parent, name, mode, uid, gid)
        return self._seen(parent, name, await self.meta.change(
            self.meta.meta.mknod, parent, name, mode, rdev, uid, gid, time.time_ns()))

    async def _new_file(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        """A new empty file owned by the caller (the engine gives a file in a set-gid
        directory that directory's group)."""
        return self._seen(parent, name, await self.meta.change(
            self.meta.meta.create_file, parent, name, mode, uid, gid, time.time_ns()))

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        self._writer()
        if ino == STATS_INODE:
            raise FsError(errno.EPERM, "the stats file")
        return self._shown(await self.meta.change(self.meta.meta.link, ino, new_parent, new_name))

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._writer()
        await self.meta.change(self.meta.meta.rmdir, parent, name)

    async def unlink(self, parent: int, name: bytes) -> None:
        self._writer()
        sustain = await self._open_inode_at(parent, name)
        await self.meta.change(self.meta.meta.unlink, parent, name, sustain=sustain, session=self.session)

    async def _open_inode_at(self, parent: int, name: bytes) -> int:
        """The inode named ``parent/name`` if it is open in this mount (its last name may go
        while it is open: it is then kept until its last close), else 0."""
        if not self.handles.opens:
            return 0
        try:
            ino = (await self.meta.lookup(parent, name)).ino
        except FsError:
            return 0  # the change itself reports the error
        if not self.handles.opens[ino]:
            return 0
        self._sustained.add(ino)
        return ino

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int) -> None:
        self._writer()
        if flags & ~RENAME_FLAGS:
            raise FsError(errno.EINVAL, f"renameat2 flags {flags:#x} (RENAME_WHITEOUT is not supported)")
        if flags & RENAME_EXCHANGE:
            await self._exchange(parent, name, new_parent, new_name, flags)
            return
        # a directory moved to another parent: its ``..`` must follow (kernels may keep the
        # moved entry cached and never look it up again)
        moved = await self.meta.lookup(parent, name) if parent != new_parent else None
        sustain = await self._open_inode_at(new_parent, new_name)
        await self.meta.change(self.meta.meta.rename, parent, name, new_parent, new_name,
                               noreplace=bool(flags & RENAME_NOREPLACE), sustain=sustain, session=self.session)
        if moved is not None:
            self._seen(new_parent, new_name, moved)

    async def _exchange(self, parent: int, name: bytes, other_parent: int, other_name: bytes, flags: int) -> None:
        """renameat2(RENAME_EXCHANGE): swap two entries; directories that change parent get
        their ``..`` remembered anew."""
        if flags & RENAME_NOREPLACE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE with RENAME_NOREPLACE")
        await self.meta.change(self.meta.meta.exchange, parent, name, other_parent, other_name)
        if parent != other_parent:
            for where, what in ((parent, name), (other_parent, other_name)):
                self._seen(where, what, await self.meta.lookup(where, what))

    # -- attributes --------------------------------------------------------------------------
    async def setattr(self, ino: int, change: AttrChange, caller_uid: int) -> Attr:
        writer = self._writer()
        if ino == STATS_INODE:
            raise FsError(errno.EPERM, "the stats file")
        changes: dict[str, int] = {}
        truncated = None
        if change.size is not None:
            truncated = await self._truncate(ino, change.size)  # EFBIG past MAX_FILE_SIZE
            if caller_uid != 0:
                await self._drop_privileges(ino, changes)
        if change.mode is not None:
            changes["mode"] = change.mode
        if change.uid is not None:
            changes["uid"] = change.uid
        if change.gid is not None:
            changes["gid"] = change.gid
        if (change.uid is not None or change.gid is not None) and change.mode is None:
            await self._drop_privileges(ino, changes)
        if change.mtime_ns is not None:
            changes["mtime_ns"] = clamp_time_ns(change.mtime_ns)
            writer.set_mtime(ino, changes["mtime_ns"])
        if change.atime_ns is not None:
            changes["atime_ns"] = clamp_time_ns(change.atime_ns)
        if changes or change.ctime:
            return self._shown(await self.meta.change(self.meta.meta.set_attrs, ino, **changes))
        return self._shown(truncated or await self.meta.getattr(ino))

    async def _drop_privileges(self, ino: int, changes: dict[str, int]) -> None:
        """Clear set-uid/set-gid of a non-directory into ``changes`` (chown, a write or a
        truncate by someone other than root), if it has any to clear."""
        current = await self.meta.getattr(ino)
        mode = changes.get("mode", current.mode)
        if not current.is_dir and without_privileges(mode) != mode:
            changes["mode"] = without_privileges(mode)

    async def _truncate(self, ino: int, size: int) -> Attr | None:
        """Truncate through the writer; a file not open for writing is opened for this and
        published at once (its new ``Attr``; failures reach the caller as EIO)."""
        writer = self._writer()
        if writer.is_open(ino):
            await writer.truncate(ino, size)
            return None
        await self._open_writer(ino)
        try:
            await writer.truncate(ino, size)
        except BaseException:
            await self._release_writer(ino)
            raise
        return await self._publish(ino, last_handle=True)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._writer()
        if ino == STATS_INODE:
            raise FsError(errno.EOPNOTSUPP, "the stats file")
        if 0 < len(name) <= XATTR_NAME_MAX and not name.startswith(XATTR_NAMESPACES):  # (else ERANGE, below)
            raise FsError(errno.EOPNOTSUPP, f"xattr {name[:40]!r} is in no namespace ext4 knows")
        await self.meta.change(self.meta.meta.set_xattr, ino, name, value)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._writer()
        await self.meta.change(self.meta.meta.remove_xattr, ino, name)

    # -- files -------------------------------------------------------------------------------
    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> tuple[int, Attr]:
        """A new file, open for writing: (its handle, its attributes)."""
        writer = self._writer()
        attr = await self._new_file(parent, name, mode, uid, gid)
        writer.opened(attr.ino, 0, BlockList())
        return self.handles.open_file(OpenFile(attr.ino, writable=True, drops_privileges=uid != 0)), attr

    async def open(self, ino: int, flags: int, caller_uid: int) -> tuple[int, bool]:
        """(a handle, whether the kernel may keep the file's pages cached across opens:
        False for the stats file, which is served directly)."""
        if self.writer is None and flags & _WRITE_FLAGS:
            raise FsError(errno.EROFS, "read-only mount")
        if ino == STATS_INODE:  # (never writable: a write to it is EBADF)
            return self.handles.open_file(OpenFile(ino, snapshot=self.metrics.text())), False
        if self.writer is not None and flags & _WRITE_INTENT:
            await self._open_writer(ino)
            if flags & os.O_TRUNC:  # marks mtime and ctime even of an empty file; published at close
                await self.writer.truncate(ino, 0)
            return self.handles.open_file(OpenFile(ino, writable=True, drops_privileges=caller_uid != 0)), False
        if flags & os.O_TRUNC:  # O_RDONLY|O_TRUNC truncates too
            await self._truncate(ino, 0)
        attr = await self.meta.getattr(ino)
        if attr.is_dir:
            raise FsError(errno.EISDIR, "a directory")
        name = self.name_of(ino)
        directory = self._parents.get(ino)
        covered, on_read = False, None
        if self.profiles is not None and directory is not None:
            covered, on_read = await self.profiles.on_open(directory, ino, os.fsdecode(self._names.get(ino, b"?")))
        blocks = await self.meta.read_blocks(ino)
        await self._note_image(attr.size, blocks)
        self.reader.opened(ino, name, attr.size, blocks, prefetch=not covered, on_read=on_read)
        return self.handles.open_file(OpenFile(ino)), self.writer is None

    async def _note_image(self, size: int, blocks: BlockList) -> None:
        """If the node cache holds an image of the file (``cache/images.py``: filled by a
        passed-through open or a warmup), note it, so that reads served here take its blocks
        from it instead of downloading them."""
        key = image_id(size, blocks) if size > 0 else None
        cache = self.images.cache
        if key is None or cache.image_noted(key):
            return
        if len(blocks) < 2 and not cache.indexed(key):
            # a one-block file: only an image this process's index knows is looked for, so an
            # open of a small file costs no system call here (measured: 0.2-0.4 ms more per open)
            return
        await trio.to_thread.run_sync(self.images.find, key, size, blocks)  # (notes it if usable)

    async def _open_writer(self, ino: int) -> None:
        """One more write handle on the inode (its state loaded when it is the first)."""
        writer = self._writer()
        if not writer.is_open(ino):
            attr = await self.meta.getattr(ino)
            if attr.is_dir:
                raise FsError(errno.EISDIR, "a directory")
            if await self.meta.call(self.meta.meta.is_frozen, ino):
                raise FsError(errno.EROFS, "a file of a snapshot")
            blocks = await self.meta.read_blocks(ino)
            await self._note_image(attr.size, blocks)  # (its unchanged blocks are read from there)
            writer.opened(ino, attr.size, blocks)
        else:
            writer.opened(ino, 0, BlockList())  # one more handle on the state already there

    def is_direct(self, fh: int) -> bool:
        """The handle serves the stats file: the kernel must not cache its pages."""
        return self.handles.files[fh].snapshot is not None

    async def read(self, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        """Up to ``size`` bytes at ``offset``. A view returned must be sent before the caller's
        next ``await`` (it may be a block buffer or a reply buffer reused afterwards)."""
        f = self.handles.files[fh]
        if f.snapshot is not None:
            return f.snapshot[offset : offset + size]
        if self.writer is not None and self.writer.is_open(f.ino):
            return await self.writer.read(f.ino, offset, size)
        held = self.reader.read_held(f.ino, offset, size)
        if held is not None:
            return held
        if size > REPLY_BUFFER:
            buffer = bytearray(size)  # larger than FUSE asks for: not kept
        else:
            buffer = self._reply_buffers.pop() if self._reply_buffers else bytearray(REPLY_BUFFER)
        try:
            return memoryview(buffer)[: await self.reader.read_into(f.ino, offset, memoryview(buffer)[:size])]
        except BlockUnavailable as exc:
            log.error("read of %r (inode %d) at offset %d failed: %s", self.name_of(f.ino), f.ino, offset, exc)
            raise FsError(errno.EIO, "block unavailable") from None
        finally:
            if len(buffer) == REPLY_BUFFER and len(self._reply_buffers) < REPLY_BUFFERS_KEPT:
                self._reply_buffers.append(buffer)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        writer = self._writer()
        f = self.handles.files[fh]
        if not f.writable:
            raise FsError(errno.EBADF, "not open for writing")
        if f.drops_privileges:  # the first write by a non-root opener clears set-uid/set-gid
            f.drops_privileges = False
            changes: dict[str, int] = {}
            await self._drop_privileges(f.ino, changes)
            if changes:
                await self.meta.change(self.meta.meta.set_attrs, f.ino, **changes)
        return await writer.write(f.ino, offset, data)

    async def flush(self, fh: int) -> None:
        """Publish what was written through the handle's file (close, fsync)."""
        f = self.handles.files.get(fh)
        if f is not None and f.writable:
            await self._publish(f.ino)

    async def _publish(self, ino: int, *, last_handle: bool = False) -> Attr | None:
        """Publish what was written (closing the last handle too with ``last_handle``): the
        new ``Attr``, or None if nothing changed or the file was unlinked; EIO if storing failed."""
        writer = self._writer()
        try:
            return await (writer.release if last_handle else writer.flush)(ino)
        except WriteFailed as exc:
            log.error("publishing inode %d failed: %s", ino, exc)
            raise FsError(errno.EIO, "publishing failed") from None
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return None  # unlinked while open: nothing to publish it under

    async def release(self, fh: int) -> None:
        f, last = self.handles.close_file(fh)
        if f is None or f.snapshot is not None:
            return
        try:
            if f.writable:
                await self._release_writer(f.ino)
            else:
                self.reader.released(f.ino)
                if self.profiles is not None:
                    self.profiles.on_release(f.ino)
        finally:
            if last and f.ino in self._sustained:
                self._sustained.discard(f.ino)
                await self.meta.change(self.meta.meta.release_orphan, f.ino)

    async def _release_writer(self, ino: int) -> None:
        try:
            await self._writer().release(ino)
        except (WriteFailed, FsError) as exc:
            log.error("publishing inode %d at its last close failed: %s", ino, exc)

"""pyfuse3 Operations of a writable mount: the read-only operations plus every modifying one.

Layer: thin, like ``ops.py``: namespace changes go to ``AsyncMeta.change`` (each one metadata
transaction), file content to ``FileWriter``. Errors reach the kernel as errno values.

Consistency: a file's content is published when a handle is closed (flush) or fsync'd, so
another mount that opens it afterwards sees it (close-to-open, as NFS and JuiceFS give).
Within this mount, every read of a file open for writing sees the unpublished bytes, and
``getattr`` reports the size and times being written.

POSIX rules kept here (the kernel leaves them to the filesystem):

- ``O_TRUNC`` arrives in ``open`` (atomic O_TRUNC) and empties the file, marking mtime/ctime.
- A file unlinked (or renamed over) while open in this mount stays readable and writable
  through its handles: it becomes an orphan of this mount's session and goes at its last close.
- Set-uid/set-gid are cleared as the kernel would if it did not hand that to the filesystem
  (libfuse asks for FUSE_CAP_HANDLE_KILLPRIV): on chown of a non-directory, and on a write or
  truncate by a caller other than root (set-gid only with group-execute).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from collections import Counter
from typing import Any

import pyfuse3

from chunkfs.blocklist import BlockList
from chunkfs.errors import FsError
from chunkfs.fuse.ops import STATS_INODE, ChunkfsOperations, OpenFile, _fuse_errors
from chunkfs.meta.aio import AsyncMeta
from chunkfs.meta.base import Attr
from chunkfs.metrics import Metrics
from chunkfs.read.reader import FileReader
from chunkfs.write.file_writer import FileWriter, WriteFailed

log = logging.getLogger(__name__)

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_WRITE_INTENT = os.O_WRONLY | os.O_RDWR


def without_privileges(mode: int) -> int:
    """``mode`` less set-uid, and less set-gid when group-execute is set (a set-gid file
    without group-execute is a mandatory-locking mark, which the kernel keeps)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


class WritableOperations(ChunkfsOperations):
    def __init__(self, meta: AsyncMeta, reader: FileReader, writer: FileWriter, block_size: int, options: Any,
                 metrics: Metrics, session: str = "") -> None:
        super().__init__(meta, reader, block_size, options, metrics)
        self.writer = writer
        self.session = session  # this mount's session: files unlinked while open are its orphans
        self._opens: Counter[int] = Counter()  # inode -> handles open in this mount
        self._sustained: set[int] = set()  # open inodes that lost a name while open: maybe orphans

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        size = self.writer.size_of(attr.ino)
        if size is not None:  # being written in this mount: the size and times readers of this mount see
            attr = dataclasses.replace(attr, size=size)
            times = self.writer.unpublished_times(attr.ino)
            if times is not None:
                attr = dataclasses.replace(attr, mtime_ns=times[0], ctime_ns=max(attr.ctime_ns, times[1]))
        return super()._entry(attr)

    # -- namespace -------------------------------------------------------------------------
    @_fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        m = self.meta.meta
        return self._new_entry(parent_inode, name, await self.meta.change(
            m.mkdir, parent_inode, name, mode, ctx.uid, ctx.gid, time.time_ns()))

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.meta.change(self.meta.meta.rmdir, parent_inode, name)

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        sustain = await self._open_inode_at(parent_inode, name)
        await self.meta.change(self.meta.meta.unlink, parent_inode, name, sustain=sustain, session=self.session)

    async def _open_inode_at(self, parent: int, name: bytes) -> int:
        """The inode named ``parent/name`` if it is open in this mount (its last name may go
        while it is open: it is then kept until its last close), else 0."""
        if not self._opens:
            return 0
        try:
            ino = (await self.meta.lookup(parent, name)).ino
        except FsError:
            return 0  # the change itself reports the error
        if not self._opens[ino]:
            return 0
        self._sustained.add(ino)
        return ino

    @_fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & RENAME_EXCHANGE:
            await self._exchange(parent_inode_old, name_old, parent_inode_new, name_new, flags)
            return
        # a directory moved to another parent: its ``..`` must follow (kernels may keep the
        # moved entry cached and never look it up again)
        moved = await self.meta.lookup(parent_inode_old, name_old) if parent_inode_old != parent_inode_new else None
        sustain = await self._open_inode_at(parent_inode_new, name_new)
        await self.meta.change(self.meta.meta.rename, parent_inode_old, name_old, parent_inode_new, name_new,
                               noreplace=bool(flags & RENAME_NOREPLACE), sustain=sustain, session=self.session)
        if moved is not None:
            self._seen(parent_inode_new, name_new, moved)

    async def _exchange(self, parent: int, name: bytes, other_parent: int, other_name: bytes, flags: int) -> None:
        """renameat2(RENAME_EXCHANGE): swap two entries; directories that change parent get
        their ``..`` remembered anew."""
        if flags & RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self.meta.change(self.meta.meta.exchange, parent, name, other_parent, other_name)
        if parent != other_parent:
            for where, what in ((parent, name), (other_parent, other_name)):
                self._seen(where, what, await self.meta.lookup(where, what))

    @_fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        m = self.meta.meta
        return self._new_entry(parent_inode, name, await self.meta.change(
            m.symlink, parent_inode, name, target, ctx.uid, ctx.gid, time.time_ns()))

    @_fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.EntryAttributes:
        if inode == STATS_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._entry(await self.meta.change(self.meta.meta.link, inode, new_parent_inode, new_name))

    @_fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        """Regular files, FIFOs, sockets (bind) and device nodes; the kernel does the I/O of
        the special ones, chunkfs keeps their type, mode, owner, times and ``rdev``."""
        if stat.S_ISREG(mode):
            return await self._new_file(parent_inode, name, mode, ctx)
        m = self.meta.meta
        return self._new_entry(parent_inode, name, await self.meta.change(
            m.mknod, parent_inode, name, mode, rdev, ctx.uid, ctx.gid, time.time_ns()))

    async def _new_file(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                        ) -> pyfuse3.EntryAttributes:
        return self._new_entry(parent, name, await self.meta.change(
            self.meta.meta.create_file, parent, name, mode, ctx.uid, ctx.gid, time.time_ns()))

    def _new_entry(self, parent: int, name: bytes, attr: Attr) -> pyfuse3.EntryAttributes:
        """The entry a mkdir, symlink, create_file or mknod call made (owned by the caller; the
        engine gives an entry in a set-gid directory that directory's group): remembered as
        seen, and answered."""
        self._seen(parent, name, attr)
        return self._entry(attr)

    # -- attributes ------------------------------------------------------------------------
    @_fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == STATS_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        changes: dict[str, int] = {}
        truncated = None
        if fields.update_size:
            truncated = await self._truncate(inode, attr.st_size)  # EFBIG past MAX_FILE_SIZE
            if ctx.uid != 0:
                await self._drop_privileges(inode, changes)
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if (fields.update_uid or fields.update_gid) and not fields.update_mode:
            await self._drop_privileges(inode, changes)
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
            self.writer.set_mtime(inode, attr.st_mtime_ns)
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if changes or fields.update_ctime:
            return self._entry(await self.meta.change(self.meta.meta.set_attrs, inode, **changes))
        return self._entry(truncated or await self.meta.getattr(inode))

    async def _drop_privileges(self, inode: int, changes: dict[str, int]) -> None:
        """Clear set-uid/set-gid of a non-directory into ``changes`` (chown, a write or a
        truncate by someone other than root), if it has any to clear."""
        current = await self.meta.getattr(inode)
        mode = changes.get("mode", current.mode)
        if not current.is_dir and without_privileges(mode) != mode:
            changes["mode"] = without_privileges(mode)

    async def _truncate(self, inode: int, size: int) -> Attr | None:
        """Truncate through the writer; a file not open for writing is opened for this and
        published at once (its new ``Attr``; failures reach the caller as EIO)."""
        if self.writer.is_open(inode):
            await self.writer.truncate(inode, size)
            return None
        await self._open_writer(inode)
        try:
            await self.writer.truncate(inode, size)
        except BaseException:
            await self._release_writer(inode)
            raise
        return await self._publish(inode, last_handle=True)

    async def _open_writer(self, inode: int) -> None:
        """One more write handle on the inode (its state loaded when it is the first)."""
        if not self.writer.is_open(inode):
            attr = await self.meta.getattr(inode)
            if attr.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            self.writer.opened(inode, attr.size, await self.meta.read_blocks(inode))
        else:
            self.writer.opened(inode, 0, BlockList())  # one more handle on the state already there

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == STATS_INODE or name.startswith(b"system."):
            # setxattr refuses system.* (ACLs): none can exist, so the kernel's ACL lookups
            # at every `ls -l` need not reach the metadata engine
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self.meta.call(self.meta.meta.get_xattr, inode, name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == STATS_INODE:
            return []
        return await self.meta.call(self.meta.meta.list_xattrs, inode)

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode == STATS_INODE:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        await self.meta.change(self.meta.meta.set_xattr, inode, name, value)

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.meta.change(self.meta.meta.remove_xattr, inode, name)

    # -- file content ----------------------------------------------------------------------
    @_fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        entry = await self._new_file(parent_inode, name, mode, ctx)
        self.writer.opened(entry.st_ino, 0, BlockList())
        return self._handle(OpenFile(entry.st_ino, writable=True, drops_privileges=ctx.uid != 0)), entry

    def _handle(self, f: OpenFile, **info: Any) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._files[fh] = f
        self._opens[f.ino] += 1
        return pyfuse3.FileInfo(fh=fh, **info)

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == STATS_INODE or not flags & _WRITE_INTENT:
            if inode != STATS_INODE and flags & os.O_TRUNC:  # O_RDONLY|O_TRUNC truncates too
                await self._truncate(inode, 0)
            info = await super().open.__wrapped__(self, inode, flags, ctx)  # type: ignore[attr-defined]
            if inode != STATS_INODE:
                self._opens[inode] += 1
            return info
        await self._open_writer(inode)
        if flags & os.O_TRUNC:  # marks mtime and ctime even of an empty file; published at close
            await self.writer.truncate(inode, 0)
        return self._handle(OpenFile(inode, writable=True, drops_privileges=ctx.uid != 0))

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        f = self._files[fh]
        if f.snapshot is None and self.writer.is_open(f.ino):
            return await self.writer.read(f.ino, off, size)
        return await super().read.__wrapped__(self, fh, off, size)  # type: ignore[attr-defined]

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._files[fh]
        if not f.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if f.drops_privileges:  # the first write by a non-root opener clears set-uid/set-gid
            f.drops_privileges = False
            changes: dict[str, int] = {}
            await self._drop_privileges(f.ino, changes)
            if changes:
                await self.meta.change(self.meta.meta.set_attrs, f.ino, **changes)
        return await self.writer.write(f.ino, off, buf)

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        f = self._files.get(fh)
        if f is not None and f.writable:
            await self._publish(f.ino)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self._files.get(fh)
        if f is not None and f.writable:
            await self._publish(f.ino)

    async def _publish(self, ino: int, *, last_handle: bool = False) -> Attr | None:
        """Publish what was written (closing the last handle too with ``last_handle``): the
        new ``Attr``, or None if nothing changed or the file was unlinked; EIO if storing failed."""
        try:
            return await (self.writer.release if last_handle else self.writer.flush)(ino)
        except WriteFailed as exc:
            log.error("publishing inode %d failed: %s", ino, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return None  # unlinked while open: nothing to publish it under

    @_fuse_errors
    async def release(self, fh: int) -> None:
        f = self._files.get(fh)
        if f is None:
            return
        try:
            if not f.writable:
                await super().release.__wrapped__(self, fh)  # type: ignore[attr-defined]
            else:
                del self._files[fh]
                await self._release_writer(f.ino)
        finally:
            if f.snapshot is None:
                await self._closed(f.ino)

    async def _closed(self, ino: int) -> None:
        """A handle of ``ino`` closed; at the last one, an inode unlinked meanwhile goes."""
        self._opens[ino] -= 1
        if self._opens[ino] > 0:
            return
        del self._opens[ino]
        if ino in self._sustained:
            self._sustained.discard(ino)
            await self.meta.change(self.meta.meta.release_orphan, ino)

    async def _release_writer(self, ino: int) -> None:
        try:
            await self.writer.release(ino)
        except (WriteFailed, FsError) as exc:
            log.error("publishing inode %d at its last close failed: %s", ino, exc)

"""pyfuse3 Operations for a chunkfs volume.

Layer: thin. Each handler translates one kernel request into calls on ``AsyncMeta`` and
``FileReader`` and maps failures to errno: ``FsError`` -> its errno, ``BlockUnavailable``
-> EIO (logged with the file and block). This is the only place ``FUSEError`` is raised.

A read-only mount answers every modifying request with EROFS (the kernel also does, for
most of them, because the mount carries the ``ro`` flag).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3

from chunkfs.errors import ChunkfsError, FsError
from chunkfs.meta.aio import AsyncMeta
from chunkfs.meta.base import NAME_MAX, ROOT_INODE, Attr
from chunkfs.metrics import Metrics
from chunkfs.read.fetcher import BlockUnavailable
from chunkfs.read.reader import FileReader

log = logging.getLogger(__name__)
T = TypeVar("T")
#: FUSE reads are answered from reused buffers of this size (the kernel asks for at most 1 MiB)
REPLY_BUFFER = 1 << 20
#: reply buffers kept for reuse: as many as reads are answered at once, at most
REPLY_BUFFERS_KEPT = 32
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


@dataclass(frozen=True, slots=True)
class MountOptions:
    read_only: bool = True
    attr_timeout: float = 300.0
    entry_timeout: float = 300.0


#: A read-only file in the root of every mount with the daemon's metrics in Prometheus text
#: (what ``chunkfs stats MOUNTPOINT`` reads). Only ``lookup`` finds it: ``readdir`` does not
#: list it, and it hides a volume file of the same name.
STATS_NAME = b".chunkfs-stats"
STATS_INODE = (1 << 63) - 2
UNKNOWN_INODE = 0xFFFFFFFF  # FUSE_UNKNOWN_INO: what libfuse reports when it has no inode number


@dataclass(slots=True)
class OpenFile:
    ino: int
    snapshot: bytes | None = None  # contents of the stats file at open
    writable: bool = False  # opened for writing (writable mounts)
    drops_privileges: bool = False  # opened for writing by someone other than root: a write clears set-uid/gid


def _fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Count and time the request, and translate exceptions into FUSEError at the boundary.
    An unexpected exception is logged and answered with EIO: one failed request must never
    end the daemon."""
    op = fn.__name__

    async def wrapper(self: ChunkfsOperations, *args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except ChunkfsError as exc:  # e.g. the metadata engine is unreachable after retries
            log.error("%s failed: %s", op, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", op)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.observe_op(op, time.perf_counter() - start)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]  # subclasses call the plain handler
    return wrapper


async def _refuse_read_only(*_args: Any) -> Any:
    """Every modifying request on a read-only mount."""
    raise pyfuse3.FUSEError(errno.EROFS)


class ChunkfsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, meta: AsyncMeta, reader: FileReader, block_size: int,
                 options: MountOptions, metrics: Metrics) -> None:
        super().__init__()
        self.meta = meta
        self.reader = reader
        self.block_size = block_size
        self.options = options
        self.metrics = metrics
        self._op_metrics: dict[str, tuple[Any, Any]] = {}
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, tuple[int, list[tuple[bytes, Attr]]]] = {}  # fh -> (inode, listing)
        self._next_fh = 1
        self._names: dict[int, bytes] = {ROOT_INODE: b"/"}  # last name seen per inode, for log messages
        self._parents: dict[int, int] = {ROOT_INODE: ROOT_INODE}  # directory -> its parent, as seen
        # Reply buffers for ``read``: one is back in the pool as ``read`` returns, and reused
        # only by a later request. That is safe because pyfuse3 replies (copies the bytes into
        # the kernel) as soon as the handler returns, before any other task can run.
        self._reply_buffers: list[bytearray] = []

    # -- helpers ---------------------------------------------------------------------------
    def observe_op(self, op: str, seconds: float) -> None:
        pair = self._op_metrics.get(op)
        if pair is None:
            pair = self._op_metrics[op] = (self.metrics.fuse_ops.labels(op), self.metrics.fuse_seconds.labels(op))
        pair[0].inc()
        pair[1].observe(seconds)

    def _stats_entry(self) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = STATS_INODE
        entry.st_mode = 0o100444
        entry.st_nlink = 1
        entry.st_size = 0  # generated at open; served with direct_io, so the size is not used
        entry.st_blksize = 4096
        entry.entry_timeout = entry.attr_timeout = 1.0
        return entry

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.generation = 0
        entry.entry_timeout = self.options.entry_timeout
        entry.attr_timeout = self.options.attr_timeout
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = self.block_size
        entry.st_blocks = -(-attr.size // 512)
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    def _seen(self, parent: int, name: bytes, attr: Attr) -> None:
        """Remember what a lookup, listing or creation showed: the name (for log messages)
        and, for a directory, its parent (for its ``..`` entry)."""
        self._names[attr.ino] = name
        if attr.is_dir:
            self._parents[attr.ino] = parent

    def _dot_entry(self, ino: int) -> pyfuse3.EntryAttributes:
        """A ``.`` or ``..`` listing entry: the kernel takes only its inode number and type."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.st_mode = stat.S_IFDIR
        return entry

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- namespace reads -------------------------------------------------------------------
    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if parent_inode == ROOT_INODE and name == STATS_NAME:
            return self._stats_entry()
        attr = await self.meta.lookup(parent_inode, name)
        self._seen(parent_inode, name, attr)
        return self._entry(attr)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == STATS_INODE:
            return self._stats_entry()
        return self._entry(await self.meta.getattr(inode))

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.meta.readlink(inode)

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self._new_fh()
        self._dirs[fh] = (inode, await self.meta.readdir(inode))
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries in order ``.``, ``..``, then the directory's; an entry's offset is its
        position plus one. A directory's parent is the one its last lookup, listing, creation
        or rename showed; one never seen (none is reached otherwise) gets FUSE's unknown inode
        number for ``..``."""
        inode, listing = self._dirs[fh]
        for position in range(start_id, len(listing) + 2):
            if position < 2:
                name = b"." if position == 0 else b".."
                entry = self._dot_entry(inode if position == 0 else self._parents.get(inode, UNKNOWN_INODE))
            else:
                name, attr = listing[position - 2]
                self._seen(inode, name, attr)
                entry = self._entry(attr)
            if not pyfuse3.readdir_reply(token, name, entry, position + 1):
                break

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = await self.meta.stats()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = self.block_size
        used = -(-stats.logical_bytes // self.block_size)
        free = 0 if self.options.read_only else (1 << 50) // self.block_size
        out.f_blocks = used + free
        out.f_bfree = out.f_bavail = free
        inodes = stats.files + stats.directories + stats.symlinks
        free_inodes = 0 if self.options.read_only else 1 << 30
        out.f_files = inodes + free_inodes
        out.f_ffree = out.f_favail = free_inodes
        out.f_namemax = NAME_MAX
        return out

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """No extended attributes. ENOSYS makes the kernel remember that and answer every
        later getxattr itself (EOPNOTSUPP), instead of one daemon round trip per call:
        ``ls -l`` asks for ACL and SELinux attributes of every file it lists."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        """Inodes live in the metadata engine; nothing is pinned per kernel lookup."""

    # -- file reads ------------------------------------------------------------------------
    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS and self.options.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._new_fh()
        if inode == STATS_INODE:
            self._files[fh] = OpenFile(inode, snapshot=self.metrics.text())
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        attr = await self.meta.getattr(inode)
        if attr.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        blocks = await self.meta.read_blocks(inode)
        name = self._names.get(inode, b"?").decode(errors="replace")
        self.reader.opened(inode, name, attr.size, blocks)
        self._files[fh] = OpenFile(inode)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.options.read_only)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        f = self._files[fh]
        if f.snapshot is not None:
            return f.snapshot[off : off + size]
        held = self.reader.read_held(f.ino, off, size)
        if held is not None:
            return held  # pyfuse3 sends it before any other task runs
        if size > REPLY_BUFFER:
            buffer = bytearray(size)  # larger than FUSE asks for: not kept
        else:
            buffer = self._reply_buffers.pop() if self._reply_buffers else bytearray(REPLY_BUFFER)
        try:
            return memoryview(buffer)[: await self.reader.read_into(f.ino, off, memoryview(buffer)[:size])]
        except BlockUnavailable as exc:
            name = self._names.get(f.ino, b"?").decode(errors="replace")
            log.error("read of %r (inode %d) at offset %d failed: %s", name, f.ino, off, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if len(buffer) == REPLY_BUFFER and len(self._reply_buffers) < REPLY_BUFFERS_KEPT:
                self._reply_buffers.append(buffer)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None and f.snapshot is None:
            self.reader.released(f.ino)

    # -- modifying requests: refused on a read-only mount ----------------------------------
    create = mkdir = mknod = rmdir = unlink = rename = symlink = link = _refuse_read_only
    setattr = setxattr = removexattr = write = _refuse_read_only

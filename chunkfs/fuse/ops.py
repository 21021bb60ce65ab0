"""pyfuse3 Operations for a chunkfs volume.

Layer: thin. Each handler translates one kernel request into calls on ``AsyncMeta`` and
``BlockFetcher`` and maps failures to errno: ``FsError`` -> its errno, ``BlockUnavailable``
-> EIO (logged with the file and block). This is the only place ``FUSEError`` is raised.

A read-only mount answers every modifying request with EROFS (the kernel also does, for
most of them, because the mount carries the ``ro`` flag).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3

from chunkfs.blocks import block_length, block_spans
from chunkfs.errors import ChunkfsError, FsError
from chunkfs.meta.aio import AsyncMeta
from chunkfs.meta.base import NAME_MAX, Attr
from chunkfs.read.fetcher import BlockFetcher, BlockUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


@dataclass(frozen=True, slots=True)
class MountOptions:
    read_only: bool = True
    attr_timeout: float = 300.0
    entry_timeout: float = 300.0


@dataclass(slots=True)
class OpenFile:
    ino: int
    size: int
    blocks: list[bytes]


def _fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Translate exceptions into FUSEError at the boundary. An unexpected exception is
    logged and answered with EIO: one failed request must never end the daemon."""

    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except ChunkfsError as exc:  # e.g. the metadata engine is unreachable after retries
            log.error("%s failed: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


async def _refuse_read_only(*_args: Any) -> Any:
    """Every modifying request on a read-only mount."""
    raise pyfuse3.FUSEError(errno.EROFS)


class ChunkfsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, meta: AsyncMeta, fetcher: BlockFetcher, block_size: int,
                 options: MountOptions) -> None:
        super().__init__()
        self.meta = meta
        self.fetcher = fetcher
        self.block_size = block_size
        self.options = options
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, list[tuple[bytes, Attr]]] = {}
        self._next_fh = 1
        self._names: dict[int, bytes] = {1: b"/"}  # last name seen per inode, for log messages

    # -- helpers ---------------------------------------------------------------------------
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
        entry.st_rdev = 0
        entry.st_size = attr.size
        entry.st_blksize = self.block_size
        entry.st_blocks = -(-attr.size // 512)
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
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
        attr = await self.meta.lookup(parent_inode, name)
        self._names[attr.ino] = name
        return self._entry(attr)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.meta.getattr(inode))

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.meta.readlink(inode)

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self._new_fh()
        self._dirs[fh] = await self.meta.readdir(inode)
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._dirs[fh]
        for index in range(start_id, len(listing)):
            name, attr = listing[index]
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), index + 1):
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
        attr = await self.meta.getattr(inode)
        if attr.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        blocks = await self.meta.read_blocks(inode)
        fh = self._new_fh()
        self._files[fh] = OpenFile(inode, attr.size, blocks)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.options.read_only)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files[fh]
        bs = self.block_size
        parts = []
        for index, start, end in block_spans(off, size, f.size, bs):
            bid = f.blocks[index]
            try:
                parts.append(await self.fetcher.read(bid, block_length(index, f.size, bs), start, end))
            except BlockUnavailable as exc:
                name = self._names.get(f.ino, b"?").decode(errors="replace")
                log.error("read of %r (inode %d) block %d failed: %s", name, f.ino, index, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    # -- modifying requests: refused on a read-only mount ----------------------------------
    create = mkdir = mknod = rmdir = unlink = rename = symlink = link = _refuse_read_only
    setattr = setxattr = removexattr = write = _refuse_read_only

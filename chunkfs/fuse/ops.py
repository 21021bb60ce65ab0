"""pyfuse3 Operations: translates kernel requests into ``Vfs`` calls and back.

Layer: thin. Each handler unpacks one pyfuse3 request, calls the mount's ``Vfs`` (which owns
handles, open files, the read-only policy and the reader/writer dispatch), and packs the
answer into pyfuse3 types. This is the only place ``FUSEError`` is raised, with the errno
``outcome.errno_for`` gives (the native transport, ``native.py``, uses it too).
Every request is counted and timed (``chunkfs_fuse_ops_total``, ``chunkfs_fuse_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from chunkfs.fuse.outcome import OpObserver, errno_for
from chunkfs.meta.base import Attr
from chunkfs.vfs.vfs import AttrChange, Vfs

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _translated(fn: F) -> F:
    """Count and time the request, and turn exceptions into FUSEError."""
    op = fn.__name__

    async def wrapper(self: FuseOperations, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(errno_for(exc, op)) from None
        finally:
            self._observe(op, time.perf_counter() - start)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


class FuseOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: Vfs) -> None:
        super().__init__()
        self.vfs = vfs
        self._observe = OpObserver(vfs.metrics)

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.generation = 0
        entry.entry_timeout, entry.attr_timeout = self.vfs.cache_timeout(attr.ino)
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = self.vfs.block_size
        entry.st_blocks = -(-attr.size // 512)
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    # -- namespace ---------------------------------------------------------------------------
    @_translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.lookup(parent_inode, name))

    @_translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.getattr(inode))

    @_translated
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.vfs.readlink(inode)

    @_translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.vfs.opendir(inode)

    @_translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for d in self.vfs.readdir(fh, start_id):
            if d.attr is None:  # ``.`` or ``..``: the kernel takes only the number and type
                entry = pyfuse3.EntryAttributes()
                entry.st_ino = d.ino
                entry.st_mode = 0o040000
            else:
                entry = self._entry(d.attr)
            if not pyfuse3.readdir_reply(token, d.name, entry, d.offset):
                break

    @_translated
    async def releasedir(self, fh: int) -> None:
        self.vfs.releasedir(fh)

    @_translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = await self.vfs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = stats.block_size
        out.f_blocks = stats.blocks
        out.f_bfree = out.f_bavail = stats.free_blocks
        out.f_files = stats.files
        out.f_ffree = out.f_favail = stats.free_files
        out.f_namemax = stats.name_max
        return out

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Inodes live in the metadata engine; nothing is pinned per kernel lookup."""

    @_translated
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_translated
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_translated
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_translated
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.link(inode, new_parent_inode, new_name))

    @_translated
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.rmdir(parent_inode, name)

    @_translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.unlink(parent_inode, name)

    @_translated
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- attributes --------------------------------------------------------------------------
    @_translated
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        change = AttrChange(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            ctime=bool(fields.update_ctime))
        return self._entry(await self.vfs.setattr(inode, change, ctx.uid))

    @_translated
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.vfs.getxattr(inode, name)

    @_translated
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self.vfs.listxattr(inode)

    @_translated
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.setxattr(inode, name, value)

    @_translated
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.removexattr(inode, name)

    # -- files -------------------------------------------------------------------------------
    @_translated
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self.vfs.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh), self._entry(attr)

    @_translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh, keep_cache = await self.vfs.open(inode, flags, ctx.uid)
        if self.vfs.is_direct(fh):
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @_translated
    async def read(  # type: ignore[override]  # pyfuse3 replies with any buffer, not only bytes
            self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        return await self.vfs.read(fh, off, size)  # pyfuse3 sends it before any other task runs

    @_translated
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.vfs.write(fh, off, buf)

    @_translated
    async def flush(self, fh: int) -> None:
        await self.vfs.flush(fh)

    @_translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.flush(fh)

    @_translated
    async def release(self, fh: int) -> None:
        await self.vfs.release(fh)

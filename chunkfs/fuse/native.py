"""The native FUSE transport: a read-only mount served on ``/dev/fuse`` without libfuse.

Layer: thin, like ``ops.py``. Each kernel request is decoded with ``abi.py``, answered by the
mount's ``Vfs`` and encoded back; ``outcome.errno_for`` turns failures into errno values as
the pyfuse3 path does. Why it exists: pyfuse3 drives Debian 12's libfuse 3.14, which cannot
negotiate FUSE passthrough (Linux 6.9+), the kernel reading a node-local file for the
daemon; speaking the protocol ourselves can (``scripts/probe_passthrough.py`` measures what
that gives). This transport does not pass anything through yet: it answers READ itself,
exactly as the pyfuse3 path does. ``chunkfs mount --fuse-transport native`` selects it.

Scope and invariants:

- Read-only mounts, mounted by root with mount(2) (passthrough needs CAP_SYS_ADMIN anyway).
  Requests that would change the volume get EROFS; requests the filesystem does not
  implement (locks, ioctl, poll, lseek, statx, copy_file_range, bmap) get ENOSYS, after
  which the kernel handles them itself or falls back, as it does for pyfuse3's.
- One trio task reads the device; each request is answered in a task of its own, at most
  ``workers`` at once (the reader waits for a free slot meanwhile: the kernel queues the
  rest). INIT, FORGET, BATCH_FORGET, INTERRUPT and DESTROY are handled by the reader.
- Every request but FORGET, BATCH_FORGET and INTERRUPT gets exactly one reply. A reply to a
  request the kernel dropped meanwhile (interrupted: ENOENT from the device) is discarded.
- A READ's reply is written with no ``await`` between ``Vfs.read`` returning and the write,
  so a view of a block buffer it returns is sent before any other task can reuse the buffer.
- The reader stops when the kernel says the mount is gone (ENODEV) or sends DESTROY.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from chunkfs.errors import ChunkfsError, FsError
from chunkfs.fuse import abi
from chunkfs.fuse.outcome import OpObserver, errno_for
from chunkfs.meta.base import Attr
from chunkfs.vfs.vfs import Vfs

log = logging.getLogger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOATIME, MNT_DETACH = 1, 2, 4, 1024, 2
MAX_WRITE = 1 << 20  # the largest request body the kernel may send (and our read buffer's size)
REQUEST_BUFFER = MAX_WRITE + (64 << 10)  # a WRITE's 1 MiB plus its headers, with room to spare
WANTED_FLAGS = abi.ASYNC_READ | abi.MAX_PAGES | abi.INIT_EXT | abi.PARALLEL_DIROPS | abi.AUTO_INVAL_DATA
_NANO = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request (``fuse_in_header``)."""
    uid: int
    gid: int
    pid: int


Handler = Callable[[int, Caller, bytes], Awaitable[Sequence[bytes | bytearray | memoryview]]]


def _split_seconds(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * _NANO)


def _split_ns(ns: int) -> tuple[int, int]:
    return divmod(ns, _NANO)


class NativeSession:
    """A read-only ``Vfs`` mounted at ``mountpoint`` and served on ``/dev/fuse``."""

    def __init__(self, vfs: Vfs, mountpoint: str, fsname: str, workers: int) -> None:
        self.vfs = vfs
        self.mountpoint = mountpoint
        self.fsname = fsname
        self.workers = max(1, workers)
        self._observe = OpObserver(vfs.metrics)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = -1
        self.initialized = False
        self._handlers: dict[int, tuple[str, Handler]] = {
            abi.Opcode.LOOKUP: ("lookup", self._lookup),
            abi.Opcode.GETATTR: ("getattr", self._getattr),
            abi.Opcode.READLINK: ("readlink", self._readlink),
            abi.Opcode.OPEN: ("open", self._open),
            abi.Opcode.READ: ("read", self._read),
            abi.Opcode.RELEASE: ("release", self._release),
            abi.Opcode.FLUSH: ("flush", self._flush),
            abi.Opcode.FSYNC: ("fsync", self._flush),
            abi.Opcode.OPENDIR: ("opendir", self._opendir),
            abi.Opcode.READDIR: ("readdir", self._readdir),
            abi.Opcode.RELEASEDIR: ("releasedir", self._releasedir),
            abi.Opcode.FSYNCDIR: ("fsyncdir", self._nothing),
            abi.Opcode.STATFS: ("statfs", self._statfs),
            abi.Opcode.GETXATTR: ("getxattr", self._getxattr),
            abi.Opcode.LISTXATTR: ("listxattr", self._listxattr),
        }

    # -- mounting ----------------------------------------------------------------------------
    def mount(self) -> None:
        """Open ``/dev/fuse`` and mount it read-only at ``mountpoint`` (root only)."""
        if os.geteuid() != 0:
            raise ChunkfsError("--fuse-transport native mounts with mount(2): run the mount as root")
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        data = (f"fd={self.fd},rootmode=40000,user_id={os.geteuid()},group_id={os.getegid()},"
                "default_permissions,allow_other")
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOATIME
        if self._libc.mount(self.fsname.encode(), self.mountpoint.encode(), b"fuse.chunkfs", flags,
                            data.encode()) != 0:
            code = ctypes.get_errno()
            os.close(self.fd)
            self.fd = -1
            raise ChunkfsError(f"cannot mount {self.mountpoint}: {os.strerror(code)}")

    def unmount(self) -> None:
        """Detach the mount (lazily: open files keep working until closed); the reader then
        sees ENODEV and ``serve`` returns."""
        self._libc.umount2(self.mountpoint.encode(), MNT_DETACH)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- serving -----------------------------------------------------------------------------
    async def serve(self) -> None:
        """Answer requests until the mount is gone."""
        os.set_blocking(self.fd, False)
        buffer = bytearray(REQUEST_BUFFER)
        view = memoryview(buffer)
        slots = trio.Semaphore(self.workers)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    n = os.readv(self.fd, [buffer])
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.fd)
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EINTR, errno.ENOENT):  # ENOENT: interrupted before we read it
                        continue
                    if exc.errno == errno.ENODEV:  # unmounted
                        break
                    raise
                _, opcode, unique, node, uid, gid, pid, _, _ = abi.IN_HEADER.unpack_from(buffer)
                body = bytes(view[abi.IN_HEADER.size:n])
                if opcode in abi.NO_REPLY:
                    continue
                if opcode == abi.Opcode.INIT:
                    self._init(unique, body)
                    continue
                if opcode == abi.Opcode.DESTROY:
                    self._reply(unique, 0, ())
                    break
                if opcode not in self._handlers:  # see the module docstring
                    self._reply(unique, errno.EROFS if opcode in abi.CHANGES else errno.ENOSYS, ())
                    continue
                await slots.acquire()
                nursery.start_soon(self._answer, slots, opcode, unique, node, Caller(uid, gid, pid), body)
            nursery.cancel_scope.cancel()

    def _reply(self, unique: int, error: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        header = abi.out_header(unique, sum(len(p) for p in parts), error)
        try:
            os.writev(self.fd, [header, *parts])
        except FileNotFoundError:  # the kernel dropped the request meanwhile (interrupted)
            pass
        except OSError as exc:
            if exc.errno != errno.ENODEV:  # unmounted meanwhile: nobody is waiting
                log.error("reply to FUSE request %d failed: %s", unique, exc.strerror)

    async def _answer(self, slots: trio.Semaphore, opcode: int, unique: int, node: int, caller: Caller,
                      body: bytes) -> None:
        start = time.perf_counter()
        name, handler = self._handlers[opcode]
        try:
            try:
                parts = await handler(node, caller, body)
            except Exception as exc:  # every failure becomes an errno, as in ops.py
                self._reply(unique, errno_for(exc, name), ())
            else:
                self._reply(unique, 0, parts)  # no await since the handler returned: views stay valid
        finally:
            slots.release()
            self._observe(name, time.perf_counter() - start)

    def _init(self, unique: int, body: bytes) -> None:
        major, minor, readahead, flags, _ = abi.INIT_IN.unpack_from(body.ljust(abi.INIT_IN.size, b"\0"))
        if major != abi.KERNEL_MAJOR:
            log.error("the kernel speaks FUSE %d.%d; chunkfs speaks %d", major, minor, abi.KERNEL_MAJOR)
            self._reply(unique, errno.EPROTO, ())
            return
        self.initialized = True
        reply = abi.INIT_OUT.pack(abi.KERNEL_MAJOR, min(minor, abi.KERNEL_MINOR), readahead, flags & WANTED_FLAGS,
                                  0, 0, MAX_WRITE, 1, MAX_WRITE // 4096, 0, 0, 0, 0)
        self._reply(unique, 0, (reply,))

    # -- answers -----------------------------------------------------------------------------
    def _attr(self, attr: Attr) -> bytes:
        (asec, ansec), (msec, mnsec), (csec, cnsec) = (_split_ns(attr.atime_ns), _split_ns(attr.mtime_ns),
                                                       _split_ns(attr.ctime_ns))
        return abi.ATTR.pack(attr.ino, attr.size, -(-attr.size // 512), asec, msec, csec, ansec, mnsec, cnsec,
                             attr.mode, attr.nlink, attr.uid, attr.gid, attr.rdev, self.vfs.block_size, 0)

    def _entry(self, attr: Attr) -> bytes:
        entry_timeout, attr_timeout = self.vfs.cache_timeout(attr.ino)
        (entry_s, entry_ns), (attr_s, attr_ns) = _split_seconds(entry_timeout), _split_seconds(attr_timeout)
        return abi.ENTRY_OUT.pack(attr.ino, 0, entry_s, attr_s, entry_ns, attr_ns) + self._attr(attr)

    async def _lookup(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        return (self._entry(await self.vfs.lookup(node, body.rstrip(b"\0"))),)

    async def _getattr(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        attr = await self.vfs.getattr(node)
        seconds, nanos = _split_seconds(self.vfs.cache_timeout(attr.ino)[1])
        return (abi.ATTR_OUT.pack(seconds, nanos, 0), self._attr(attr))

    async def _readlink(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        return (await self.vfs.readlink(node),)

    async def _open(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        fh, keep_cache = await self.vfs.open(node, flags, caller.uid)
        open_flags = abi.FOPEN_KEEP_CACHE if keep_cache else 0
        if self.vfs.is_direct(fh):  # the stats file: never cached
            open_flags = abi.FOPEN_DIRECT_IO
        return (abi.OPEN_OUT.pack(fh, open_flags, 0),)

    async def _read(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes | bytearray | memoryview]:
        fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
        return (await self.vfs.read(fh, offset, size),)

    async def _release(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        await self.vfs.release(abi.RELEASE_IN.unpack_from(body)[0])
        return ()

    async def _flush(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        await self.vfs.flush(abi.FH_FIRST.unpack_from(body)[0])
        return ()

    async def _opendir(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        return (abi.OPEN_OUT.pack(await self.vfs.opendir(node), 0, 0),)

    async def _readdir(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
        out = bytearray()
        for entry in self.vfs.readdir(fh, offset):
            kind = (entry.attr.mode if entry.attr is not None else 0o040000) >> 12
            record = abi.dirent(entry.ino, entry.offset, entry.name, kind)
            if len(out) + len(record) > size:
                break
            out += record
        return (bytes(out),)

    async def _releasedir(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        self.vfs.releasedir(abi.RELEASE_IN.unpack_from(body)[0])
        return ()

    async def _statfs(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        s = await self.vfs.statfs()
        return (abi.KSTATFS.pack(s.blocks, s.free_blocks, s.free_blocks, s.files, s.free_files, s.block_size,
                                 s.name_max, s.block_size, 0),)

    async def _getxattr(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        value = await self.vfs.getxattr(node, body[abi.GETXATTR_IN.size:].rstrip(b"\0"))
        return self._sized(value, size)

    async def _listxattr(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        return self._sized(b"".join(name + b"\0" for name in await self.vfs.listxattr(node)), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> Sequence[bytes]:
        """A getxattr/listxattr answer: the length alone when asked with size 0, else the
        value if it fits (ERANGE if not)."""
        if size == 0:
            return (abi.GETXATTR_OUT.pack(len(value), 0),)
        if len(value) > size:
            raise FsError(errno.ERANGE, "attribute larger than the caller's buffer")
        return (value,)

    async def _nothing(self, node: int, caller: Caller, body: bytes) -> Sequence[bytes]:
        return ()

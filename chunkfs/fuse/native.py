"""The native FUSE transport: a read-only mount served on ``/dev/fuse`` without libfuse,
passing opens of model files through to node-local file images.

Layer: thin, like ``ops.py``. Each kernel request is decoded with ``abi.py``, answered by the
mount's ``Vfs`` and encoded back; ``outcome.errno_for`` turns failures into errno values as
the pyfuse3 path does. Why it exists: pyfuse3 drives Debian 12's libfuse 3.14, which cannot
negotiate FUSE passthrough (Linux 6.9+); speaking the protocol ourselves can.
``--fuse-transport native`` selects it, and ``auto`` (the default) for read-only mounts run
as root. Mounting and the backing-file ioctls are in ``device.py``.

Passthrough (when the kernel offers it and ``images`` is given):

- An open of a regular file whose whole-file image (``cache/images.py``) is in the node
  cache is answered with ``FOPEN_PASSTHROUGH`` and a backing id for that image: the kernel
  then reads (and maps) the image itself, and no READ of that open reaches the daemon.
- An open of a model file (a ``--prefetch`` name) that has no image yet waits while its
  image is filled (``read/image_fill.py``: each block downloaded into the image, or copied
  there from its entry on the node), then is passed through. The first such open in a
  directory also queues the directory's other model files of the same kind (name suffix),
  in name order from the one opened, as far as half the cache holds: they are filled one
  at a time behind it, at prefetch priority, each once no fill an open waits for is
  running (a sibling filled beside the first shard slowed that shard's fill, which the
  loader waits for: its first open took 0.39-0.48 s against 0.32-0.33 s, 2 GiB in 4
  shards), so the next shard a loader opens is ready or on its way. A file whose image
  cannot be filled (no room, a block unavailable) is served by the daemon as before. Not
  while the mount records access profiles (``--access-profile record``, ``chunkfs profile
  record``): those need the loader's reads to reach the daemon. Loads passed through are
  not recorded (``auto`` records a directory's profile only from a load the daemon
  served).
- After a warmup through this mount, and after the last close of a model file read through
  the daemon, if all its blocks are on the node, its image is built in a worker thread (one
  at a time, once no READ has come for ``BUILD_AFTER_QUIET_S``, so a load in progress goes
  first), and the next open of it, by this daemon or a later one on the node, is passed
  through.
- The kernel refuses to mix cached and passed-through opens of one inode, so an inode with
  open handles of one kind gets the same kind for new opens; passed-through opens of an
  inode share one backing id, closed with the last of them.

Scope and invariants:

- Read-only mounts, mounted by root with mount(2) (passthrough needs CAP_SYS_ADMIN anyway).
  Requests that would change the volume get EROFS; requests the filesystem does not
  implement (locks, ioctl, poll, lseek, statx, bmap) get ENOSYS, after which the kernel
  handles them itself or falls back, as it does for pyfuse3's.
- One trio task reads the device; each request is answered in a task of its own, at most
  ``workers`` at once (the reader waits for a free slot meanwhile: the kernel queues the
  rest). INIT, FORGET, BATCH_FORGET, INTERRUPT and DESTROY are handled by the reader.
- Every request but FORGET, BATCH_FORGET and INTERRUPT gets exactly one reply. A reply to a
  request the kernel dropped meanwhile (interrupted: ENOENT from the device) is discarded.
  INTERRUPT stops only an open waiting for its file's image to be filled (EINTR: the
  caller's signal is handled, and the fill goes on); other requests are short and are
  answered as usual.
- A READ's reply is written with no ``await`` between ``Vfs.read`` returning and the write,
  so a view of a block buffer it returns is sent before any other task can reuse the buffer.
- The reader stops when the kernel says the mount is gone (ENODEV) or sends DESTROY.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from chunkfs.blocklist import BlockList
from chunkfs.cache.images import FileImages, image_id
from chunkfs.errors import ChunkfsError, FsError
from chunkfs.fuse import abi, device
from chunkfs.fuse.outcome import OpObserver, errno_for
from chunkfs.meta.base import Attr
from chunkfs.read.image_fill import OnBlock, fill_image
from chunkfs.read.slots import Priority
from chunkfs.vfs.vfs import STATS_INODE, Vfs

log = logging.getLogger(__name__)

#: the kernel's id of the request the current task answers
_REQUEST: contextvars.ContextVar[int] = contextvars.ContextVar("fuse_request", default=0)

MAX_WRITE = 1 << 20  # the largest request body the kernel may send (and our read buffer's size)
REQUEST_BUFFER = MAX_WRITE + (64 << 10)  # a WRITE's 1 MiB plus its headers, with room to spare
WANTED_FLAGS = abi.ASYNC_READ | abi.MAX_PAGES | abi.INIT_EXT | abi.PARALLEL_DIROPS | abi.AUTO_INVAL_DATA
_NANO = 1_000_000_000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
BUILD_AFTER_QUIET_S = 2.0  # an image is built once no READ has come for this long
PASSTHROUGH_FH = 1 << 62  # handles of passed-through opens count up from here (the Vfs's stay below)
SIBLINGS_QUEUED = 1024  # model files waiting to be filled behind the ones opened


@dataclass(slots=True)
class _Fill:
    """An image being filled; opens of its file wait for ``done``."""
    done: trio.Event
    filled: bool = False
    demand: bool = False  # an open waits for it (not only a sibling's or a warmup's prefetch)


@dataclass(slots=True)
class _Backing:
    """An image handed to the kernel for one inode's passed-through opens."""
    fd: int
    backing_id: int
    opens: int = 0


#: (node id, the caller's uid, the request's arguments) -> the parts of the reply
Handler = Callable[[int, int, bytes], Awaitable[Sequence[bytes | bytearray | memoryview]]]


def _split_seconds(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * _NANO)


def _split_ns(ns: int) -> tuple[int, int]:
    return divmod(ns, _NANO)


class NativeSession:
    """A read-only ``Vfs`` mounted at ``mountpoint`` and served on ``/dev/fuse``."""

    def __init__(self, vfs: Vfs, mountpoint: str, fsname: str, workers: int,
                 images: FileImages | None = None, *, fill_on_open: bool = True) -> None:
        self.vfs = vfs
        self.images = images  # None: no passthrough
        self.fill_on_open = fill_on_open  # off: only images made after daemon-served loads are used
        self.passthrough = False  # the kernel agreed to it (INIT)
        self._backings: dict[int, _Backing] = {}  # inode -> its image's backing
        self._passed: dict[int, int] = {}  # handle of a passed-through open -> inode
        self._next_passed = PASSTHROUGH_FH
        self._cached: dict[int, int] = {}  # inode -> opens answered by the Vfs
        self._building: set[bytes] = set()  # images being built
        self._fills: dict[bytes, _Fill] = {}  # images being filled (for opens waiting)
        self._queued: set[int] = set()  # model files in the siblings' queue or being filled from it
        self._siblings_send, self._siblings_receive = trio.open_memory_channel[int](SIBLINGS_QUEUED)
        self._waiting_fills: dict[int, trio.CancelScope] = {}  # request -> its wait for a fill
        self._builds = trio.Semaphore(1)
        self._last_read = 0.0  # trio time of the latest READ: builds wait for a quiet spell
        self._nursery: trio.Nursery | None = None
        self.mountpoint = mountpoint
        self.fsname = fsname
        self.workers = max(1, workers)
        self._observe = OpObserver(vfs.metrics)
        self.fd = -1
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
        try:
            self.fd = device.mount_device(self.mountpoint, self.fsname, "fuse.chunkfs", read_only=True)
        except OSError as exc:
            raise ChunkfsError(f"cannot mount {self.mountpoint}: {os.strerror(exc.errno or 0)}") from None

    def unmount(self) -> None:
        """Detach the mount (lazily: open files keep working until closed); the reader then
        sees ENODEV and ``serve`` returns."""
        device.detach(self.mountpoint)

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
            self._nursery = nursery
            if self.images is not None:
                nursery.start_soon(self._fill_siblings)
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
                _, opcode, unique, node, uid, *_ = abi.IN_HEADER.unpack_from(buffer)
                body = bytes(view[abi.IN_HEADER.size:n])
                if opcode == abi.Opcode.INTERRUPT:
                    self._interrupt(int.from_bytes(body[:8], "little"))
                    continue
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
                nursery.start_soon(self._answer, slots, opcode, unique, node, uid, body)
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

    async def _answer(self, slots: trio.Semaphore, opcode: int, unique: int, node: int, uid: int,
                      body: bytes) -> None:
        start = time.perf_counter()
        name, handler = self._handlers[opcode]
        _REQUEST.set(unique)
        try:
            try:
                parts = await handler(node, uid, body)
            except Exception as exc:  # every failure becomes an errno, as in ops.py
                self._reply(unique, errno_for(exc, name), ())
            else:
                self._reply(unique, 0, parts)  # no await since the handler returned: views stay valid
        finally:
            slots.release()
            self._observe(name, time.perf_counter() - start)

    def _init(self, unique: int, body: bytes) -> None:
        major, minor, readahead, flags, flags2 = abi.INIT_IN.unpack_from(body.ljust(abi.INIT_IN.size, b"\0"))
        if major != abi.KERNEL_MAJOR:
            log.error("the kernel speaks FUSE %d.%d; chunkfs speaks %d", major, minor, abi.KERNEL_MAJOR)
            self._reply(unique, errno.EPROTO, ())
            return
        self.passthrough = self.images is not None and bool(abi.split_flags(flags, flags2) & abi.PASSTHROUGH)
        if self.images is not None and not self.passthrough:
            log.info("this kernel offers no FUSE passthrough: every read is served by the daemon")
        wanted2 = abi.PASSTHROUGH >> 32 if self.passthrough else 0
        reply = abi.INIT_OUT.pack(abi.KERNEL_MAJOR, min(minor, abi.KERNEL_MINOR), readahead, flags & WANTED_FLAGS,
                                  0, 0, MAX_WRITE, 1, MAX_WRITE // 4096, 0, wanted2, 1 if self.passthrough else 0, 0)
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

    async def _lookup(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        return (self._entry(await self.vfs.lookup(node, body.rstrip(b"\0"))),)

    async def _getattr(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        attr = await self.vfs.getattr(node)
        seconds, nanos = _split_seconds(self.vfs.cache_timeout(attr.ino)[1])
        return (abi.ATTR_OUT.pack(seconds, nanos, 0), self._attr(attr))

    async def _readlink(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        return (await self.vfs.readlink(node),)

    async def _open(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        if self.passthrough and not flags & _WRITE_FLAGS and not self._cached.get(node) and self._imaged(node):
            passed = await self._open_passed(node)
            if passed is not None:
                return (passed,)
        fh, keep_cache = await self.vfs.open(node, flags, uid)
        self._cached[node] = self._cached.get(node, 0) + 1
        open_flags = abi.FOPEN_KEEP_CACHE if keep_cache else 0
        if self.vfs.is_direct(fh):  # the stats file: never cached
            open_flags = abi.FOPEN_DIRECT_IO
        return (abi.OPEN_OUT.pack(fh, open_flags, 0),)

    async def _read(self, node: int, uid: int, body: bytes) -> Sequence[bytes | bytearray | memoryview]:
        fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
        if not self.vfs.is_direct(fh):  # (reads of the stats file do not count)
            self._last_read = trio.current_time()
        return (await self.vfs.read(fh, offset, size),)

    async def _release(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        fh = abi.RELEASE_IN.unpack_from(body)[0]
        if fh >= PASSTHROUGH_FH:
            self._release_passed(fh)
            return ()
        f = self.vfs.handles.files.get(fh)
        await self.vfs.release(fh)
        if f is not None:
            ino = f.ino
            left = self._cached.get(ino, 1) - 1
            if left > 0:
                self._cached[ino] = left
            else:
                self._cached.pop(ino, None)
                if self.passthrough and self._imaged(ino) and self._nursery is not None:
                    self._nursery.start_soon(self._build_image, ino)
        return ()

    # -- passthrough -------------------------------------------------------------------------
    def _imaged(self, ino: int) -> bool:
        """Whether ``ino`` is a file that gets an image: a model file (a ``--prefetch`` name)."""
        return ino != STATS_INODE and self.vfs.reader.config.wants_prefetch(self.vfs.name_of(ino))

    async def _image_of(self, ino: int) -> tuple[bytes, int, BlockList] | None:
        """(image id, size, blocks) of a regular file that can have an image."""
        attr = await self.vfs.getattr(ino)
        if not attr.is_reg or attr.size == 0:
            return None
        blocks = await self.vfs.meta.read_blocks(ino)
        key = image_id(attr.size, blocks)
        return None if key is None else (key, attr.size, blocks)

    async def _open_passed(self, ino: int) -> bytes | None:
        """An open of ``ino`` passed through to its image (filled first if it has none), or
        None (then the daemon serves it)."""
        backing = self._backings.get(ino)
        if backing is None:
            path = await self._image_path(ino)
            backing = self._backings.get(ino)  # another open may have got there meanwhile
            if backing is None:
                if path is None or self._cached.get(ino):
                    return None
                backing = self._hand_over(path)
                if backing is None:
                    return None
                self._backings[ino] = backing
        backing.opens += 1
        self.vfs.metrics.passthrough_opens.inc()
        fh, self._next_passed = self._next_passed, self._next_passed + 1
        self._passed[fh] = ino
        return abi.OPEN_OUT.pack(fh, abi.FOPEN_PASSTHROUGH, backing.backing_id)

    async def _image_path(self, ino: int) -> str | None:
        """The path of the usable image of ``ino``; if it has none, the open waits while it
        is filled (unless fills are off, or the inode has daemon-served opens)."""
        assert self.images is not None
        found = await self._image_of(ino)
        if found is None:
            return None
        key, size, blocks = found
        path = await trio.to_thread.run_sync(self.images.find, key, size, blocks)
        if (path is None and self.fill_on_open and not self._cached.get(ino)
                and await self._fill(ino, found, Priority.DEMAND)):
            path = self.images.path(key)
        return path

    def _hand_over(self, path: str) -> _Backing | None:
        """Register the image at ``path`` with the kernel (``FUSE_DEV_IOC_BACKING_OPEN``)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # evicted since it was found
            return None
        try:
            return _Backing(fd, device.open_backing(self.fd, fd))
        except OSError as exc:
            log.warning("the kernel refused a passthrough backing file: %s", exc.strerror)
            os.close(fd)
            return None

    def _release_passed(self, fh: int) -> None:
        ino = self._passed.pop(fh, None)
        backing = self._backings.get(ino) if ino is not None else None
        if ino is None or backing is None:
            return
        backing.opens -= 1
        if backing.opens == 0:
            del self._backings[ino]
            device.close_backing(self.fd, backing.backing_id)
            os.close(backing.fd)

    async def _fill(self, ino: int, found: tuple[bytes, int, BlockList], priority: Priority, *,
                    siblings: bool = True) -> bool:
        """Fill the image of model file ``ino`` (``found``: its id, size and blocks), or wait
        for the fill already running; whether it is now on the node. Queues its siblings
        (see the module docstring)."""
        key, size, blocks = found
        fill, started = await self._fill_of(key, size, blocks, priority)
        if fill is None:
            return True
        if started and siblings:
            await self._queue_siblings(ino)
        await self._wait_interruptibly(fill.done)
        return fill.filled

    async def _fill_of(self, key: bytes, size: int, blocks: BlockList, priority: Priority,
                       on_block: OnBlock | None = None) -> tuple[_Fill | None, bool]:
        """(the fill of image ``key``, whether this call started it): the one running, else a
        new one in the background (``on_block`` told of the blocks it puts in); (None, False)
        if the image is on the node already. One registry for opens and warmups, so neither
        starts a second fill of an image the other is filling."""
        assert self.images is not None and self._nursery is not None
        fill = self._fills.get(key)
        if fill is None:
            if await trio.to_thread.run_sync(self.images.find, key, size, blocks) is not None:
                return None, False
            fill = self._fills.get(key)  # another open may have started it meanwhile
        if fill is not None:
            return fill, False
        fill = self._fills[key] = _Fill(trio.Event(), demand=priority is Priority.DEMAND)
        self._nursery.start_soon(self._run_fill, fill, key, size, blocks, priority, on_block)
        return fill, True

    async def _wait_interruptibly(self, done: trio.Event) -> None:
        """Wait for ``done`` unless the kernel interrupts the request (a signal to the
        caller, such as Ctrl-C): then ``EINTR`` (the fill goes on for later opens)."""
        unique = _REQUEST.get()
        with trio.CancelScope() as scope:
            self._waiting_fills[unique] = scope
            try:
                await done.wait()
            finally:
                del self._waiting_fills[unique]
        if scope.cancelled_caught:
            raise FsError(errno.EINTR, "interrupted while the file was being fetched")

    def _interrupt(self, unique: int) -> None:
        """The kernel interrupts request ``unique``: only an open waiting for a fill stops
        (other requests are short, and are answered as usual)."""
        scope = self._waiting_fills.get(unique)
        if scope is not None:
            scope.cancel()

    async def fill_for_warmup(self, key: bytes, size: int, blocks: BlockList, on_block: OnBlock) -> bool:
        """A warmup's fill of image ``key`` (``warmup/engine.py``), through the opens' registry
        (``_fill_of``: an open during the warmup joins it, and the other way round;
        ``on_block`` is told only of blocks a fill this call started puts in). Whether the
        image is on the node."""
        fill, _ = await self._fill_of(key, size, blocks, Priority.PREFETCH, on_block)
        if fill is None:
            return True
        await fill.done.wait()
        return fill.filled

    async def _run_fill(self, fill: _Fill, key: bytes, size: int, blocks: BlockList, priority: Priority,
                        on_block: OnBlock | None = None) -> None:
        assert self.images is not None
        fetcher = self.vfs.reader.fetcher
        try:
            fill.filled = await fill_image(fetcher, self.images, key, size, blocks, priority,
                                           parallel=2 * fetcher.slots.total, on_block=on_block)
        except Exception as exc:  # a background task: log, never end the daemon
            log.warning("filling an image of %d bytes failed: %s", size, exc)
        finally:
            self.vfs.metrics.file_images.labels("filled" if fill.filled else "failed").inc()
            del self._fills[key]
            fill.done.set()

    async def _queue_siblings(self, ino: int) -> None:
        """Queue the model files beside ``ino`` of its kind, in name order from it, as far as
        half the cache holds (never raises: they only load slower if not queued)."""
        assert self.images is not None
        parent = self.vfs.parent_of(ino)
        if parent is None:
            return
        try:
            listing = await self.vfs.meta.readdir(parent)
        except Exception as exc:
            log.info("not filling the files beside %s: %s", self.vfs.name_of(ino), exc)
            return
        name = self.vfs.name_of(ino)
        suffix = os.path.splitext(name)[1]
        wants = self.vfs.reader.config.wants_prefetch
        kin = sorted((n, attr) for n, attr in listing if attr.is_reg and attr.size
                     and os.path.splitext(n.decode(errors="replace"))[1] == suffix
                     and wants(n.decode(errors="replace")))
        after = [i for i, (n, _) in enumerate(kin) if n.decode(errors="replace") > name]
        start = after[0] if after else len(kin)
        room = self.images.cache.capacity // 2 - (await self.vfs.getattr(ino)).size
        for _, attr in kin[start:] + kin[:start]:
            if attr.ino in self._queued or attr.ino == ino:
                continue
            room -= attr.size
            if room < 0:
                break
            self._queued.add(attr.ino)
            try:
                self._siblings_send.send_nowait(attr.ino)
            except trio.WouldBlock:
                self._queued.discard(attr.ino)
                break

    async def _fill_siblings(self) -> None:
        """Fill the queued siblings one at a time (never raises)."""
        async for ino in self._siblings_receive:
            try:
                # the files loaders wait for first, at full speed
                while (demanded := next((f for f in self._fills.values() if f.demand), None)) is not None:
                    await demanded.done.wait()
                if not self._cached.get(ino) and ino not in self._backings:
                    found = await self._image_of(ino)
                    if found is not None:
                        await self._fill(ino, found, Priority.PREFETCH, siblings=False)
            except Exception as exc:
                log.info("not filling the image of %s: %s", self.vfs.name_of(ino), exc)
            finally:
                self._queued.discard(ino)  # (queued again if its image goes and a sibling is opened cold)

    def build_images(self, files: list[tuple[int, str]]) -> None:
        """Build the images of these (inode, name) files, model files only, in the background
        (after a warmup through this mount: the next load of them is then passed through)."""
        if not self.passthrough or self._nursery is None:
            return
        for ino, name in files:
            if self.vfs.reader.config.wants_prefetch(name):
                self._nursery.start_soon(self._build_image, ino)

    async def _build_image(self, ino: int) -> None:
        """Build the image of model file ``ino`` (after its last daemon-served close, or a
        warmup) if all its blocks are on the node (never raises: a file without an image is
        only slower)."""
        assert self.images is not None
        try:
            found = await self._image_of(ino)
            if found is None:
                return
            key, size, blocks = found
            if key in self._building or not self.images.complete_on_node(blocks):
                return
            self._building.add(key)
            try:
                async with self._builds:
                    while (quiet := trio.current_time() - self._last_read) < BUILD_AFTER_QUIET_S:
                        await trio.sleep(BUILD_AFTER_QUIET_S - quiet)  # a load in progress goes first
                    if await trio.to_thread.run_sync(self.images.find, key, size) is None:
                        built = await trio.to_thread.run_sync(self.images.build, key, size, blocks)
                        self.vfs.metrics.file_images.labels("built" if built else "failed").inc()
                        log.info("image of %s %s", self.vfs.name_of(ino), "built" if built else "not built")
            finally:
                self._building.discard(key)
        except Exception as exc:  # a background task: log, never end the daemon
            log.warning("building the image of inode %d failed: %s", ino, exc)

    async def _flush(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        await self.vfs.flush(abi.FH_FIRST.unpack_from(body)[0])
        return ()

    async def _opendir(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        return (abi.OPEN_OUT.pack(await self.vfs.opendir(node), 0, 0),)

    async def _readdir(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
        out = bytearray()
        for entry in self.vfs.readdir(fh, offset):
            kind = (entry.attr.mode if entry.attr is not None else 0o040000) >> 12
            record = abi.dirent(entry.ino, entry.offset, entry.name, kind)
            if len(out) + len(record) > size:
                break
            out += record
        return (bytes(out),)

    async def _releasedir(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        self.vfs.releasedir(abi.RELEASE_IN.unpack_from(body)[0])
        return ()

    async def _statfs(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        s = await self.vfs.statfs()
        return (abi.KSTATFS.pack(s.blocks, s.free_blocks, s.free_blocks, s.files, s.free_files, s.block_size,
                                 s.name_max, s.block_size, 0),)

    async def _getxattr(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        value = await self.vfs.getxattr(node, body[abi.GETXATTR_IN.size:].rstrip(b"\0"))
        return self._sized(value, size)

    async def _listxattr(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
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

    async def _nothing(self, node: int, uid: int, body: bytes) -> Sequence[bytes]:
        return ()

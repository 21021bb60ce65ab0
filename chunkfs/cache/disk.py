"""CacheDir: the block files of one cache directory (plain file I/O, no policy).

Layout (shared by every volume, mount and warmup on the node: a block id is the hash of its
plain bytes, so an entry is valid for any volume that names it)::

    blocks/<id[:2]>/<id hex>     plain block bytes, mode 0600, directories 0700; xattr
                                 ``user.chunkfs.seal`` (see below): SHA-256 ids
    blocks-blake3/<id[:2]>/<id hex>   the same for BLAKE3 ids (each algorithm has its own
                                 namespace, so an id is only ever checked with its own hash)
    tmp/<id hex>.<pid>.<rand>    being written; renamed into blocks*/ when complete
    locks/downloads[-blake3]     one byte per block id is write-locked (an OFD byte-range lock)
                                 by the one process on the node downloading that block

Invariants:

- An entry appears only by ``rename`` of a complete temporary file: a crash never leaves a
  partial file under ``blocks/``. Temporary files of dead processes are removed on open.
- A seal vouches for the bytes an entry was written with, within one boot of the machine.
  ``NewEntry.publish`` (of bytes already verified against their id) stamps the temporary file's
  mtime with the fine-grained clock, then records (boot id, block id, inode, size, that
  mtime) in the ``user.chunkfs.seal`` xattr before the rename; ``reseal`` does the same for
  an entry a process has just read whole and hashed, if it is unchanged since. Any later
  change through the filesystem (a write, a truncation, ``touch``, a copy over it, another
  block's file renamed onto the name) changes the inode, size or mtime, so ``sealed`` no
  longer matches. A reboot invalidates every seal: data the kernel had not yet written to
  disk when the power went may read back differently. Not covered, as for an entry a live
  process reads back: corruption below the filesystem that the disk does not report, and
  someone who rewrites a file and then restores its mtime (or forges a seal: both need the
  cache owner's rights).
- Filesystems that cannot hold a seal (no user xattrs, or mtimes coarser than a
  nanosecond) get none: ``sealing`` turns off and ``BlockCache`` hashes their entries.
- Download locks are advisory and only save work: a process that holds the byte of
  ``locks/downloads`` at the block's offset (from the id's first 62 bits) is downloading that
  block, so others wait for its entry instead of fetching the same bytes. Taking and
  dropping one is a single ``fcntl`` each: no file is created or removed per block. The
  kernel drops the locks of a dead holder; a lost race (or two ids sharing 62 bits) costs
  an extra download or a wait, never a wrong entry (entries are content-addressed and
  renamed whole). Within one ``CacheDir`` a held id is refused to a second taker too.
- Methods raise ``OSError``; deciding what a failure means (miss, drop, skip) is the job of
  ``BlockCache``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chunkfs.procs import pid_alive

log = logging.getLogger(__name__)

DOWNLOAD_LOCKS = "downloads"
SEAL_XATTR = "user.chunkfs.seal"
_SEAL = struct.Struct(">4s16s32sQqQ")  # magic, boot id, block id, inode, mtime in ns, size
_SEAL_MAGIC = b"CFS2"


def _boot_id() -> bytes | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return None


#: this boot of the machine (shared by every container on it); None: no seals are made or trusted
BOOT_ID = _boot_id()
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux: type, whence, start, len, pid
#: O_DIRECT writes are multiples of this, from memory aligned to it, at offsets aligned to it
#: (the page size: a multiple of every logical block size Linux filesystems use)
DIRECT_ALIGN = mmap.PAGESIZE
#: the staging buffer of a direct entry, for bytes that do not come aligned
DIRECT_STAGE = 1 << 20


#: buffers at least this large ask for transparent huge pages
HUGE_PAGE = 2 << 20


def aligned_up(length: int) -> int:
    """``length`` rounded up to a multiple of ``DIRECT_ALIGN``."""
    return -(-length // DIRECT_ALIGN) * DIRECT_ALIGN


def aligned_buffer(length: int) -> mmap.mmap:
    """Private anonymous memory of at least ``length`` bytes, page-aligned (for ``O_DIRECT``).
    From ``HUGE_PAGE`` up it asks for transparent huge pages (``MADV_HUGEPAGE``; a hint, so
    kernels with THP off give small pages): an ``O_DIRECT`` read or write of an 8 MiB block
    then pins 4 pages instead of 2048, and copies out of it miss the TLB less. Measured on
    warm loads through a mount (block buffers filled by ``O_DIRECT`` reads): median 1.48 s
    against 1.70 s, daemon CPU 0.78 s against 0.93 s. Its length is a whole number of
    pages, so a buffer of at least ``length`` bytes takes an aligned read of ``length``."""
    size = max(DIRECT_ALIGN, aligned_up(length))
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE_PAGE:
        with contextlib.suppress(AttributeError, OSError):  # no MADV_HUGEPAGE here: small pages
            buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def _libc_function(name: str, argtypes: list[Any], *, keep_gil: bool = False) -> Any:
    """libc's ``name`` through ctypes, returning a C int and setting ``ctypes.get_errno``;
    ``keep_gil``: called without giving the GIL up (``ctypes.PyDLL``), for calls that never
    block. None where libc cannot be loaded so."""
    try:
        function = (ctypes.PyDLL if keep_gil else ctypes.CDLL)(None, use_errno=True)[name]
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_FALLOCATE: Callable[[int, int, int, int], int] | None = _libc_function(
    "fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
_FALLOC_FL_KEEP_SIZE = 1


def _preallocate(fd: int, length: int) -> None:
    """Reserve ``length`` bytes of disk for the file without changing its size (best effort:
    Linux ``fallocate``, never glibc's emulation that writes zeros)."""
    if _FALLOCATE is not None and length > 0:
        _FALLOCATE(fd, _FALLOC_FL_KEEP_SIZE, 0, length)


#: libc's ``fcntl`` called with the GIL held, for the download locks (None: ``fcntl.fcntl``).
#: ``F_OFD_SETLK`` never blocks, and ``fcntl.fcntl`` gives the GIL up around it. Taking the
#: GIL back under load (16 threads hashing and receiving) cost 0.3 ms per call here, and done
#: under ``CacheDir._held_lock`` it queued every other taker behind it: a warmup's threads
#: waited 23-36 ms per lock and 29-39 ms per unlock, 25-35% of each block's download.
#: ``fcntl`` is variadic; its third argument, a pointer, is passed as a fixed one would be
#: on the x86-64 and aarch64 Linux ABIs, which is how it is declared here.
_GIL_FCNTL: Callable[[int, int, bytes], int] | None = _libc_function(
    "fcntl", [ctypes.c_int, ctypes.c_int, ctypes.c_char_p], keep_gil=True)


def _set_lock(fd: int, kind: int, offset: int) -> None:
    """Take (``F_WRLCK``) or drop (``F_UNLCK``) the one-byte OFD lock at ``offset`` of ``fd``
    without waiting; ``OSError`` (``EAGAIN``/``EACCES``: another holder)."""
    request = _flock(kind, offset)
    if _GIL_FCNTL is None:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
        return
    if _GIL_FCNTL(fd, fcntl.F_OFD_SETLK, request) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _lock_offset(bid: bytes) -> int:
    return int.from_bytes(bid[:8], "big") >> 2  # below 2**62: a valid, non-overflowing off_t


def _flock(kind: int, offset: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)


class NewEntry:
    """An entry being written: a temporary file that only ``publish`` makes visible, and only
    once its owner has checked that the bytes written are exactly the block.

    A direct entry (``O_DIRECT``, for blocks no reader waits for, as in a warmup) skips the
    page cache: bytes reach the disk without the kernel copying them, and without pushing
    useful pages out. ``O_DIRECT`` wants aligned memory and lengths, so an aligned piece
    (the fetcher's ``mmap`` buffers) is written as it is, and anything else goes through a
    small aligned staging buffer. Invariant: ``size - _staged`` bytes are in the file, a
    multiple of ``DIRECT_ALIGN``; the last ``_staged`` bytes are in ``_stage``, written (padded,
    then truncated back) by ``publish``. A filesystem that refuses such writes turns the entry,
    and its ``CacheDir``, back to buffered writes."""

    __slots__ = ("_direct", "_fd", "_length", "_positional", "_stage", "_staged", "bid", "cache_dir", "reserved",
                 "size", "tmp")

    def __init__(self, cache_dir: CacheDir, bid: bytes, tmp: str, fd: int, *, direct: bool = False,
                 length: int = 0) -> None:
        self.cache_dir = cache_dir
        self.bid = bid
        self.tmp = tmp
        self._fd = fd
        self._direct = direct
        self._length = length  # bytes preallocated (direct entries)
        self._stage: mmap.mmap | None = None
        self._staged = 0
        self._positional = threading.Lock()  # one positional write at a time (``write_at``)
        self.size = 0
        self.reserved = 0  # cache room held for it (``BlockCache``)

    @property
    def direct(self) -> bool:
        return self._direct

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._direct:
            view = self._write_aligned(view)
            if view:
                self._stage_bytes(view)
            return
        self._write_all(view)

    def allocate(self, length: int) -> None:
        """Give the file its ``length`` bytes of disk at once (for ``write_at``: writes into
        allocated space cost the filesystem less than delayed allocation, page by page;
        measured on ext4, 16 writers: 0.31 against 0.48 CPU-s/GiB). ``OSError`` if the disk
        is full; a filesystem without ``fallocate`` is left to allocate as it writes."""
        if _FALLOCATE is None or length <= 0:
            return
        if _FALLOCATE(self._fd, 0, 0, length) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err))

    def write_at(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``: buffered entries whose parts are written out of
        order, from several threads (file images); the owner sets ``size`` once whole.
        Thread-safe, one write at a time: the filesystem serializes writes to one file on
        its inode lock anyway, and writers spinning on that lock burn CPU (ext4, 16 writers
        against one: 0.30 against 0.18 CPU-s/GiB, the same time)."""
        assert not self._direct
        view = memoryview(data).cast("B")
        with self._positional:
            while view:
                done = os.pwrite(self._fd, view, offset)
                view, offset = view[done:], offset + done

    def copy_within(self, source: int, length: int, offset: int) -> None:
        """Copy ``length`` bytes already written at ``source`` to ``offset`` (a block that
        appears twice in a file image), in the kernel; thread-safe, like ``write_at``."""
        with self._positional:
            self._copy_range(self.tmp, length, source, offset)  # (the entry's own descriptor only writes)

    def copy_at(self, path: str, length: int, offset: int, source: int = 0) -> None:
        """Copy ``length`` bytes of the file at ``path``, from ``source``, to ``offset``, in
        the kernel (``copy_file_range``: nothing passes through this process; thread-safe).
        ``OSError`` if the file is shorter."""
        self._copy_range(path, length, source, offset)

    def _copy_range(self, path: str, length: int, source: int, offset: int) -> None:
        assert not self._direct
        reader = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < length:
                copied = os.copy_file_range(reader, self._fd, length - done, source + done, offset + done)
                if not copied:
                    raise OSError(errno.EIO, f"{path} holds fewer than {source + length} bytes")
                done += copied
        finally:
            os.close(reader)

    def _write_all(self, view: memoryview) -> None:
        while view:
            done = os.write(self._fd, view)
            self.size += done
            view = view[done:]

    def _write_aligned(self, view: memoryview) -> memoryview:
        """Write the aligned head of ``view`` straight from its memory if nothing is staged;
        returns what is left (all of it if the memory is not aligned)."""
        whole = len(view) - len(view) % DIRECT_ALIGN
        if self._staged or not whole:
            return view
        before = self.size
        try:
            self._write_all(view[:whole])
        except OSError as exc:
            if exc.errno != errno.EINVAL or self.size != before:
                raise
            return view  # memory not aligned: stage it
        return view[whole:]

    def _stage_bytes(self, view: memoryview) -> None:
        if self._stage is None:
            self._stage = aligned_buffer(DIRECT_STAGE)
        while view:
            take = min(len(view), DIRECT_STAGE - self._staged)
            self._stage[self._staged : self._staged + take] = view[:take]
            self._staged += take
            self.size += take
            view = view[take:]
            if self._staged == DIRECT_STAGE:
                self._flush_stage(DIRECT_STAGE)
                if not self._direct:  # the filesystem refused: the rest goes buffered
                    self._write_all(view)
                    return

    def _flush_stage(self, length: int) -> None:
        """Write ``length`` bytes of the stage (a multiple of ``DIRECT_ALIGN``, perhaps beyond
        ``_staged`` when padding the tail) at the end of the file written so far."""
        assert self._stage is not None
        staged, self._staged = self._staged, 0
        stage = memoryview(self._stage)
        try:
            written = 0
            while written < length:
                written += os.write(self._fd, stage[written:length])
        except OSError as exc:
            if exc.errno != errno.EINVAL or written:
                raise
            self._go_buffered()
            done = 0
            while done < staged:
                done += os.write(self._fd, stage[done:staged])
        finally:
            stage.release()

    def _go_buffered(self) -> None:
        """The filesystem refused an aligned ``O_DIRECT`` write: write through the page cache
        from now on (here and in new entries of this directory)."""
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self._direct = False
        self.cache_dir.direct = False
        log.info("cache: %s refuses O_DIRECT writes; writing through the page cache", self.cache_dir.root)

    def _finish(self) -> None:
        """Put the staged tail in the file (padded to the alignment, then cut back)."""
        if not self._staged:
            return
        padded = aligned_up(self._staged)
        self._flush_stage(padded)
        os.ftruncate(self._fd, self.size)

    def rewind(self) -> None:
        """Empty the file, to write it again from the start."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.size = 0
        self._staged = 0
        if self._direct:
            _preallocate(self._fd, self._length)  # the truncation gave the space back

    def publish(self) -> None:
        """Seal, close and rename into place (the bytes written must be the verified block)."""
        self._finish()
        self._drop_stage()
        self.cache_dir._seal(self._fd, self.bid)
        fd, self._fd = self._fd, -1
        os.close(fd)
        final = self.cache_dir.path(self.bid)
        try:
            os.rename(self.tmp, final)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
            os.rename(self.tmp, final)

    def discard(self) -> None:
        """Remove the temporary file (never raises)."""
        self._drop_stage()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def _drop_stage(self) -> None:
        if self._stage is not None:
            with contextlib.suppress(BufferError):  # a view still out: the collector frees it
                self._stage.close()
            self._stage = None


def namespace(algorithm: str) -> str:
    """The suffix of an algorithm's entry directory and lock file ('' for SHA-256, as before BLAKE3)."""
    return "" if algorithm == "sha256" else f"-{algorithm}"


class CacheDir:
    def __init__(self, root: str | Path, algorithm: str = "sha256") -> None:
        self.root = Path(root).absolute()
        self.blocks_dir = self.root / f"blocks{namespace(algorithm)}"
        self._locks_name = DOWNLOAD_LOCKS + namespace(algorithm)
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        for d in (self.root, self.blocks_dir, self.tmp_dir, self.locks_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        self.sealing = BOOT_ID is not None  # False once the filesystem showed it cannot hold seals
        self.nowait = True  # False once the filesystem refused an RWF_NOWAIT read
        self.direct = True  # False once the filesystem refused an O_DIRECT open or write
        self._remove_stale_tmp()
        self._remove_stale_locks()

    def __repr__(self) -> str:
        return f"<CacheDir {self.root}>"

    def _remove_stale_tmp(self) -> None:
        for entry in os.scandir(self.tmp_dir):
            parts = entry.name.split(".")
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
            if pid == os.getpid() or (pid and pid_alive(pid)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)

    def _remove_stale_locks(self) -> None:
        """Remove per-block lock files left by chunkfs versions before ``locks/downloads``
        (those nobody holds any more)."""
        for entry in os.scandir(self.locks_dir):
            if entry.name.startswith(DOWNLOAD_LOCKS):  # the shared lock files of each algorithm
                continue
            with contextlib.suppress(OSError):
                fd = os.open(entry.path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(entry.path)  # nobody holds it: its owner died
                except BlockingIOError:
                    pass
                finally:
                    os.close(fd)

    def _locks_fd(self) -> int:
        if self._lock_fd is None:
            self._lock_fd = os.open(self.locks_dir / self._locks_name, os.O_RDWR | os.O_CREAT, 0o600)
        return self._lock_fd

    def try_lock(self, bid: bytes) -> int | None:
        """Take the node-wide download lock of a block without waiting: a token to pass to
        ``unlock``, or None if another process (or another caller here) holds it."""
        offset = _lock_offset(bid)
        with self._held_lock:
            if offset in self._held:
                return None
            try:
                _set_lock(self._locks_fd(), fcntl.F_WRLCK, offset)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return None
                raise
            self._held.add(offset)
        return offset

    def unlock(self, token: int) -> None:
        """Release a lock from ``try_lock``."""
        with self._held_lock:
            self._held.discard(token)
            if self._lock_fd is not None:
                _set_lock(self._lock_fd, fcntl.F_UNLCK, token)

    def close(self) -> None:
        """Drop every download lock this object holds (the kernel does so at exit too)."""
        with self._held_lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self._held.clear()

    def entry_size(self, bid: bytes) -> int | None:
        """Size of the entry on disk, or None if there is none."""
        try:
            return os.stat(self.path(bid)).st_size
        except FileNotFoundError:
            return None

    def path(self, bid: bytes) -> str:
        hexid = bid.hex()
        return f"{self.blocks_dir}/{hexid[:2]}/{hexid}"

    def read_into(self, bid: bytes, start: int, out: memoryview, *, nowait: bool = False) -> int:
        """Read the entry from ``start`` into ``out``; the bytes read (fewer if it is shorter).
        With ``nowait``, only from the page cache: ``BlockingIOError`` if the read would
        wait for the disk (or the filesystem cannot tell)."""
        if nowait and not self.nowait:
            raise BlockingIOError(errno.EAGAIN, "no RWF_NOWAIT reads here")
        flags = os.RWF_NOWAIT if nowait else 0
        fd = os.open(self.path(bid), os.O_RDONLY)
        try:
            done = 0
            while done < len(out):
                try:
                    got = os.preadv(fd, [out[done:]], start + done, flags)
                except OSError as exc:
                    if nowait and exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        self.nowait = False
                        raise BlockingIOError(errno.EAGAIN, "no RWF_NOWAIT reads here") from None
                    raise
                if not got:
                    break
                done += got
            return done
        finally:
            os.close(fd)

    def read_whole_into(self, bid: bytes, length: int, out: memoryview, offset: int = 0) -> int:
        """Read the entry from ``offset`` (a multiple of ``DIRECT_ALIGN``; 0: its start) into
        ``out`` (page-aligned, at least ``length`` rounded up to ``DIRECT_ALIGN``), around the
        page cache (``O_DIRECT``) where the filesystem allows it; the bytes read, up to that
        rounded length (fewer if the entry is shorter)."""
        want = aligned_up(length)
        if offset % DIRECT_ALIGN:
            raise ValueError(f"offset {offset} is not a multiple of {DIRECT_ALIGN}")
        if len(out) < want:
            raise ValueError(f"a {len(out)}-byte buffer cannot take {want} bytes")
        direct = self.direct
        while True:
            try:
                return self._read_whole(bid, out[:want], direct, offset)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
            # the filesystem refused O_DIRECT (when opening, or at the first read): use the page cache
            direct = self.direct = False
            log.info("cache: %s refuses O_DIRECT reads; reading through the page cache", self.root)

    def _read_whole(self, bid: bytes, out: memoryview, direct: bool, offset: int = 0) -> int:
        fd = os.open(self.path(bid), os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            done = 0
            while done < len(out):
                got = os.preadv(fd, [out[done:]], offset + done)
                done += got
                if not got or done % DIRECT_ALIGN:
                    break  # the end of the file (an O_DIRECT read cannot go on from an unaligned offset)
            return done
        finally:
            os.close(fd)

    def advise(self, bid: bytes, length: int, offset: int = 0) -> None:
        """POSIX_FADV_WILLNEED on ``length`` bytes of the entry from ``offset``: the kernel
        reads them in the background."""
        fd = os.open(self.path(bid), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def read_whole(self, bid: bytes, limit: int) -> tuple[bytes, os.stat_result]:
        """The entry's bytes, reading at most ``limit + 1`` (enough to tell it is too long),
        and its status before they were read (for ``reseal``)."""
        with open(self.path(bid), "rb", buffering=0) as f:
            before = os.fstat(f.fileno())
            return f.read(limit + 1), before

    def create(self, bid: bytes, *, direct: bool = False, length: int = 0) -> NewEntry:
        """Open a temporary file for block ``bid``, to be filled with ``NewEntry.write`` and
        renamed into place by ``NewEntry.publish`` (or removed by ``discard``). ``direct``:
        write around the page cache (``O_DIRECT``) if this filesystem allows it; then the
        file's ``length`` bytes are allocated at once, so that entries written piece by
        piece side by side still lie in one extent each (as delayed allocation makes them
        through the page cache) and read back sequentially."""
        tmp = f"{self.tmp_dir}/{bid.hex()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if direct and self.direct:
            try:
                fd = os.open(tmp, flags | os.O_DIRECT, 0o600)
                _preallocate(fd, length)
                return NewEntry(self, bid, tmp, fd, direct=True, length=length)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                with contextlib.suppress(OSError):
                    os.unlink(tmp)  # the file may have been made before the flag was refused
                self.direct = False
                log.info("cache: %s refuses O_DIRECT; writing through the page cache", self.root)
        return NewEntry(self, bid, tmp, os.open(tmp, flags, 0o600))

    @staticmethod
    def _seal_value(bid: bytes, st: os.stat_result) -> bytes:
        assert BOOT_ID is not None
        return _SEAL.pack(_SEAL_MAGIC, BOOT_ID, bid, st.st_ino, st.st_mtime_ns, st.st_size)

    def _seal(self, fd: int, bid: bytes) -> None:
        """Seal a complete file whose bytes are block ``bid`` (see the module's invariants).
        Never raises: an entry left unsealed is only hashed by the next process to use it."""
        if not self.sealing:
            return
        now = time.time_ns()  # not the filesystem's coarse clock: a later write cannot repeat it
        try:
            os.utime(fd, ns=(now, now))
            st = os.fstat(fd)
            if st.st_mtime_ns != now:
                self._stop_sealing("it keeps mtimes coarser than a nanosecond")
                return
            os.setxattr(fd, SEAL_XATTR, self._seal_value(bid, st))
        except OSError as exc:
            if exc.errno in _NO_XATTRS:
                self._stop_sealing(f"it does not keep user xattrs ({exc.strerror})")
            else:
                log.debug("cache: block %s left unsealed: %s", bid.hex()[:16], exc.strerror)

    def _stop_sealing(self, why: str) -> None:
        self.sealing = False
        log.info("cache: no seals in %s: %s; processes will hash its entries before use", self.root, why)

    def reseal(self, bid: bytes, before: os.stat_result) -> None:
        """Seal an entry just read whole and found intact, unless it changed since ``before``
        (its status when the read began). Errors are ignored: the entry stays unsealed."""
        if not self.sealing:
            return
        try:
            fd = os.open(self.path(bid), os.O_RDONLY)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns):
                self._seal(fd, bid)
        except OSError:
            pass
        finally:
            os.close(fd)

    def sealed(self, bid: bytes, size: int, *, page_in: bool = True) -> bool:
        """True when the entry is one sealed in this boot and unchanged since: same inode,
        size and mtime, and the seal names this block. A sealed entry is then paged in with
        ``POSIX_FADV_WILLNEED`` (its reader is coming) unless ``page_in`` is off. Raises
        ``OSError`` (such as ``FileNotFoundError``) if the entry cannot be opened."""
        fd = os.open(self.path(bid), os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if st.st_size != size or BOOT_ID is None:
                return False
            try:
                seal = os.getxattr(fd, SEAL_XATTR)
            except OSError:
                return False
            if seal != self._seal_value(bid, st):
                return False
            if page_in:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
            return True
        finally:
            os.close(fd)

    def remove(self, bid: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(bid))

    def exists(self, bid: bytes) -> bool:
        return os.path.exists(self.path(bid))

    def scan(self) -> Iterator[tuple[bytes, int, float]]:
        """(block id, size, last access time) of every entry, in no particular order."""
        with os.scandir(self.blocks_dir) as fanout:
            for sub in fanout:
                if not sub.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(sub.path) as entries:
                    for entry in entries:
                        try:
                            bid = bytes.fromhex(entry.name)
                            st = entry.stat(follow_symlinks=False)
                        except (ValueError, OSError):
                            continue
                        if len(bid) == 32:
                            yield bid, st.st_size, max(st.st_atime, st.st_mtime)

    def free_space(self) -> tuple[int, int]:
        """(bytes available to this process, total bytes) of the filesystem holding the cache."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

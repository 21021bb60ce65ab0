"""The FUSE kernel protocol (``linux/fuse.h``) as ``struct`` layouts: what a process that
speaks ``/dev/fuse`` itself, without libfuse, reads and writes.

Layer: pure (no I/O). The native transport (``native.py``) and the passthrough probe
(``scripts/probe_passthrough.py``) speak the protocol this way: pyfuse3 and libfuse 3.14
cannot ask the kernel for FUSE passthrough (Linux 6.9+). The layouts are the kernel's, little-endian as on every machine
chunkfs runs on, and every one is as long as the kernel's struct (``tests/test_fuse_abi.py``
compiles the system header to check).

Invariants of the protocol kept here:

- A request is an ``IN_HEADER`` then the opcode's arguments; a reply is an ``OUT_HEADER``
  (length of the whole reply, ``-errno`` or 0, the request's ``unique``) then the answer.
  FORGET, BATCH_FORGET and INTERRUPT get no reply.
- ``fuse_init_in`` is 64 bytes since 7.36 (``flags2`` after ``flags`` when the kernel sets
  ``INIT_EXT``); ``fuse_init_out`` is 64 bytes and carries ``flags2`` and
  ``max_stack_depth``, which must be at least 1 for the kernel to accept ``PASSTHROUGH``.
- A passthrough open is answered with ``FOPEN_PASSTHROUGH`` and the id that
  ``FUSE_DEV_IOC_BACKING_OPEN`` returned (the ioctl's return value, not its buffer).
"""

from __future__ import annotations

from enum import IntEnum
from struct import Struct

KERNEL_MAJOR = 7
KERNEL_MINOR = 41  # the newest minor these layouts know; a reply names min(kernel's, this)

IN_HEADER = Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = Struct("<IiQ")  # len, error (-errno or 0), unique
ATTR = Struct("<QQQqqqIIIIIIIIII")  # ino size blocks atime mtime ctime (signed) *nsec mode nlink uid gid rdev
#   blksize flags
ENTRY_OUT = Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, *_nsec; then ATTR
ATTR_OUT = Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then ATTR
INIT_IN = Struct("<IIIII44x")  # major, minor, max_readahead, flags, flags2
INIT_OUT = Struct("<IIIIHHIIHHIIH22x")  # major minor max_readahead flags max_background
#   congestion_threshold max_write time_gran max_pages map_alignment flags2 max_stack_depth request_timeout
OPEN_IN = Struct("<II")  # flags, open_flags
OPEN_OUT = Struct("<QIi")  # fh, open_flags, backing_id
READ_IN = Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
RELEASE_IN = Struct("<QIIQ")  # fh, flags, release_flags, lock_owner
FH_FIRST = Struct("<Q")  # the fh that opens fuse_flush_in, fuse_fsync_in and fuse_release_in
GETXATTR_IN = Struct("<II")  # size, padding; then the name (NUL-terminated)
GETXATTR_OUT = Struct("<II")  # size, padding
DIRENT = Struct("<QQII")  # ino, off (of the next entry), namelen, type; then the name, padded to 8
KSTATFS = Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding
BACKING_MAP = Struct("<iIQ")  # fd, flags, padding


class Opcode(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    CREATE = 35
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    FALLOCATE = 43
    RENAME2 = 45
    COPY_FILE_RANGE = 47
    TMPFILE = 51


NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})
#: requests that would change the filesystem
CHANGES = frozenset({Opcode.SETATTR, Opcode.SYMLINK, Opcode.MKNOD, Opcode.MKDIR, Opcode.UNLINK, Opcode.RMDIR,
                     Opcode.RENAME, Opcode.LINK, Opcode.WRITE, Opcode.SETXATTR, Opcode.REMOVEXATTR, Opcode.CREATE,
                     Opcode.FALLOCATE, Opcode.RENAME2, Opcode.COPY_FILE_RANGE, Opcode.TMPFILE})

# fuse_init_in/out flags (the low 32 bits in ``flags``, the high ones in ``flags2``)
ASYNC_READ = 1 << 0
AUTO_INVAL_DATA = 1 << 12
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

# fuse_open_out open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PASSTHROUGH = 1 << 7

DT_DIR, DT_REG = 4, 8


def _iow(kind: int, number: int, size: int) -> int:
    """Linux's ``_IOW(kind, number, size)`` on x86-64 and arm64."""
    return (1 << 30) | (size << 16) | (kind << 8) | number


FUSE_DEV_IOC_MAGIC = 229
FUSE_DEV_IOC_BACKING_OPEN = _iow(FUSE_DEV_IOC_MAGIC, 1, BACKING_MAP.size)
FUSE_DEV_IOC_BACKING_CLOSE = _iow(FUSE_DEV_IOC_MAGIC, 2, 4)


def split_flags(flags: int, flags2: int) -> int:
    """The 64 init flags of a ``fuse_init_in``: ``flags2`` counts only with ``INIT_EXT``."""
    return flags | (flags2 << 32 if flags & INIT_EXT else 0)


def out_header(unique: int, body_length: int, error: int = 0) -> bytes:
    """The header of a reply to request ``unique`` with ``body_length`` bytes after it;
    ``error`` is a positive errno (the kernel gets it negated)."""
    return OUT_HEADER.pack(OUT_HEADER.size + body_length, -error, unique)


def dirent(ino: int, next_offset: int, name: bytes, kind: int) -> bytes:
    """One ``fuse_dirent`` of a READDIR reply, padded to 8 bytes."""
    record = DIRENT.pack(ino, next_offset, len(name), kind) + name
    return record + bytes(-len(record) % 8)

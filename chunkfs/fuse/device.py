"""The system calls that make a ``/dev/fuse`` connection without libfuse (root only).

Used by the native transport (``native.py``) and the passthrough probe
(``scripts/probe_passthrough.py``). Each raises ``OSError`` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import os

from chunkfs.fuse import abi

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOATIME, MNT_DETACH = 1, 2, 4, 1024, 2

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def mount_device(mountpoint: str, source: str, fstype: str, *, read_only: bool) -> int:
    """Open ``/dev/fuse`` and mount it at ``mountpoint`` (nosuid, nodev, noatime; other
    users may read it, the kernel checks modes); the device's descriptor."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = (f"fd={fd},rootmode=40000,user_id={os.geteuid()},group_id={os.getegid()},"
            "default_permissions,allow_other")
    flags = MS_NOSUID | MS_NODEV | MS_NOATIME | (MS_RDONLY if read_only else 0)
    if _libc.mount(source.encode(), mountpoint.encode(), fstype.encode(), flags, data.encode()) != 0:
        error = _fail(f"mount {mountpoint}")
        os.close(fd)
        raise error
    return fd


def detach(mountpoint: str) -> None:
    """Unmount lazily: open files keep working until closed; the server then reads ENODEV."""
    _libc.umount2(mountpoint.encode(), MNT_DETACH)


def open_backing(device: int, fd: int) -> int:
    """Register the open file ``fd`` as a passthrough backing file; its backing id (the
    ioctl's return value, not its buffer)."""
    request = ctypes.create_string_buffer(abi.BACKING_MAP.pack(fd, 0, 0))
    backing_id: int = _libc.ioctl(device, ctypes.c_ulong(abi.FUSE_DEV_IOC_BACKING_OPEN), request)
    if backing_id < 0:
        raise _fail("FUSE_DEV_IOC_BACKING_OPEN")
    return backing_id


def close_backing(device: int, backing_id: int) -> None:
    _libc.ioctl(device, ctypes.c_ulong(abi.FUSE_DEV_IOC_BACKING_CLOSE), ctypes.byref(ctypes.c_uint32(backing_id)))

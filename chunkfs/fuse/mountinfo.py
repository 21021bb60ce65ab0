"""Reading /proc/self/mountinfo and checking a mountpoint before mounting. No FUSE calls.

``check_mountpoint`` turns every way a mountpoint can be unusable into one ``ChunkfsError``
line: missing, not a directory, already mounted, a dead FUSE mount, not empty.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from chunkfs.errors import ChunkfsError

FUSE_DEVICE = "/dev/fuse"


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor"
    root: str = "/"  # the directory of the filesystem mounted here ("/x" for a bind mount of x)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def list_mounts() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 2:
                continue
            entries.append(MountEntry(_unescape(fields[4]), rfields[0], _unescape(rfields[1]), fields[2],
                                      _unescape(fields[3])))
    return entries


def find_mount(path: str) -> MountEntry | None:
    """The topmost mount whose mountpoint is exactly ``path`` (made absolute, and its parent's
    symlinks resolved as mountinfo shows them; ``path`` itself is never looked at, so a dead
    or hung FUSE mount there cannot block the call)."""
    path = os.path.abspath(path)
    if path != "/":
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    found = None
    for entry in list_mounts():
        if entry.mountpoint == path:
            found = entry
    return found


def chunkfs_mount_of(path: str) -> tuple[MountEntry, str] | None:
    """The chunkfs mount holding ``path`` (made absolute, links resolved) and the path inside
    the volume, or None if no chunkfs mount holds it. Bind mounts of a volume directory (as
    CSI publishes them) map back through mountinfo's root field."""
    real = os.path.realpath(path)
    best = None
    for entry in list_mounts():
        mp = entry.mountpoint
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mountpoint)):
            best = entry
    if best is None or best.fstype != "fuse.chunkfs":
        return None
    below = real[len(best.mountpoint):].lstrip("/")
    volume_path = "/" + "/".join(p for p in (best.root.strip("/"), below) if p)
    return best, volume_path


def check_mountpoint(path: str) -> str:
    """Return the absolute mountpoint if chunkfs can mount there, else raise ChunkfsError."""
    path = os.path.abspath(path)
    try:
        os.stat(path)
        entry = find_mount(path)
        if entry is not None:
            os.statvfs(path)  # never answered from the kernel's caches: a dead daemon shows here
            raise ChunkfsError(f"{path} is already mounted ({entry.fstype} from {entry.source})")
    except FileNotFoundError:
        raise ChunkfsError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise ChunkfsError(
                f"mountpoint {path} is a dead FUSE mount (transport endpoint is not connected); "
                f"run 'chunkfs umount --lazy {path}' first"
            ) from None
        raise ChunkfsError(f"mountpoint {path}: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise ChunkfsError(f"mountpoint {path} is not a directory")
    try:
        if any(os.scandir(path)):
            raise ChunkfsError(f"mountpoint {path} is not empty")
    except PermissionError:
        raise ChunkfsError(f"mountpoint {path}: permission denied") from None
    return path


def check_fuse_device() -> None:
    if not os.path.exists(FUSE_DEVICE):
        raise ChunkfsError(f"{FUSE_DEVICE} does not exist: load the fuse kernel module (modprobe fuse)")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise ChunkfsError(f"no permission to open {FUSE_DEVICE}: run as root or get access to the device")


def require_chunkfs_mount(path: str) -> str:
    """The absolute mountpoint, or a one-line ``ChunkfsError`` if no chunkfs mount is there."""
    mountpoint = os.path.abspath(path)
    entry = find_mount(mountpoint)
    if entry is None:
        raise ChunkfsError(f"{mountpoint} is not mounted")
    if entry.fstype != "fuse.chunkfs":
        raise ChunkfsError(f"{mountpoint} is not a chunkfs mount ({entry.fstype})")
    return mountpoint

"""Kernel-side tuning of a live FUSE mount: the readahead of its backing device.

The kernel gives every FUSE mount a BDI (``/sys/class/bdi/<major>:<minor>``) whose
``read_ahead_kb`` caps how far the page cache reads ahead of a sequential reader or an
mmap page fault, and so how large the reads the daemon receives are (up to the 1 MiB that
libfuse 3 negotiates with ``max_pages``). The default, 128 KiB, turns a multi-GB model load
into tens of thousands of small requests.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def bdi_path(mountpoint: str, dev: int | None = None) -> str:
    """The mount's readahead file; ``dev`` (its st_dev) saves a stat of the mountpoint, which
    the mount's own daemon must never make on its event loop (nothing would answer it)."""
    if dev is None:
        dev = os.stat(mountpoint).st_dev
    return f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"


def set_read_ahead(mountpoint: str, nbytes: int, dev: int | None = None) -> int | None:
    """Set the mount's kernel readahead to ``nbytes`` (rounded to KiB). Returns the value now
    in effect in KiB, or None if it cannot be read or set (not root, no sysfs): the mount
    still works, with the kernel's default."""
    path = bdi_path(mountpoint, dev)
    try:
        with open(path, "w") as f:
            f.write(str(max(4, nbytes // 1024)))
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError) as exc:
        log.info("kernel readahead of %s left at its default: %s", mountpoint, getattr(exc, "strerror", exc))
        return None

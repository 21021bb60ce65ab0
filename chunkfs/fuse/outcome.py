"""What becomes of one FUSE request, for both transports (``ops.py``, ``native.py``).

- ``errno_for``: a failure as the errno the kernel gets. ``FsError`` -> its errno;
  ``ChunkfsError`` (say, the metadata engine unreachable after its retries) -> EIO, logged
  on one line; anything else -> EIO, logged with its traceback. One failed request never
  ends the daemon.
- ``OpObserver``: every request counted and timed (``chunkfs_fuse_ops_total``,
  ``chunkfs_fuse_op_seconds``) under its operation's name.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from chunkfs.errors import ChunkfsError, FsError
from chunkfs.metrics import Metrics

log = logging.getLogger("chunkfs.fuse.ops")


def errno_for(exc: Exception, op: str) -> int:
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, ChunkfsError):
        log.error("%s failed: %s", op, exc)
    else:
        log.error("%s failed", op, exc_info=exc)
    return errno.EIO


class OpObserver:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._children: dict[str, tuple[Any, Any]] = {}

    def __call__(self, op: str, seconds: float) -> None:
        pair = self._children.get(op)
        if pair is None:
            pair = self._children[op] = (self.metrics.fuse_ops.labels(op), self.metrics.fuse_seconds.labels(op))
        pair[0].inc()
        pair[1].observe(seconds)

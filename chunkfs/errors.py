"""Exception types shared by every layer.

Two families, never mixed:

- ``ChunkfsError``: a failure a user can act on. Its message is one line, safe to print
  (no secrets, no traceback); the CLI prints ``chunkfs: <message>`` and exits non-zero.
- ``FsError``: a POSIX error for one filesystem operation, carrying an ``errno``. The
  metadata engines raise it; the FUSE layer is the only place that turns it into
  ``pyfuse3.FUSEError``.
"""

from __future__ import annotations

import errno as _errno
import os


class ChunkfsError(Exception):
    """A user-facing failure with a one-line message."""

    exit_code = 1


class UsageError(ChunkfsError):
    """The command line or a URL given by the user is malformed."""

    exit_code = 2


class NotFormatted(ChunkfsError):
    """The metadata engine holds no chunkfs volume."""


class FsError(Exception):
    """A POSIX error for one filesystem operation."""

    def __init__(self, errno: int, detail: str = "") -> None:
        self.errno = errno
        self.detail = detail
        super().__init__(f"{_errno.errorcode.get(errno, errno)}: {detail or os.strerror(errno)}")


def first_error(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups, else ``exc`` itself.

    trio wraps errors raised in nurseries in groups; callers that report one cause per
    failure (the CLI, per-file import errors) use this to get at it."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc

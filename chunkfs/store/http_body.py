"""Bodies of object GETs sent with urllib3 (``store/s3.py``, ``store/gcs.py``): streamed into a
``Sink`` piece by piece, or an error response's text.

Invariants: a body is read straight from the ``http.client`` response under urllib3's, into
the buffer given (or the memory the sink lends), with no copy of its own; a connection goes
back to its pool only once its body was read to the end, and is dropped otherwise.
"""

from __future__ import annotations

import http.client
from typing import Any

from chunkfs.store.base import Sink


def stream_body(raw: Any, expected: int | None, sink: Sink, buffer: memoryview) -> int:
    """Feed a GET response body (a urllib3 response, not yet read) to ``sink``; returns the
    bytes delivered. Reads straight into ``buffer`` from the ``http.client`` response under
    it when it is there, then hands the connection back to the pool (as urllib3 does once a
    body is read); through ``read`` otherwise."""
    direct = getattr(raw, "_fp", None)
    total = 0
    if isinstance(direct, http.client.HTTPResponse) and expected is not None and hasattr(raw, "release_conn"):
        while total < expected:
            want = min(len(buffer), expected - total)
            target = sink.lend(want) or buffer[:want]
            got = direct.readinto(target)
            if not got:
                break  # short body: the caller reports it
            sink.write(target[:got])
            total += got
        if total == expected and direct.isclosed():  # read to its end: the connection is reusable
            raw.release_conn()
        return total
    while chunk := raw.read(len(buffer)):
        sink.write(memoryview(chunk))
        total += len(chunk)
    raw.close()
    return total


class MemorySink:
    """A ``Sink`` keeping the body in memory (``get``)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def restart(self) -> None:
        self.data = bytearray()

    def lend(self, size: int) -> memoryview | None:
        return None

    def write(self, piece: memoryview) -> None:
        self.data += piece

    def finish(self) -> None:
        pass


def read_error_body(raw: Any) -> bytes:
    """An error response's body (a store's small XML or JSON document), at most 64 KiB; the connection is
    released or dropped."""
    try:
        return raw.read(64 << 10) or b""
    except Exception:  # the error is what matters, not its text
        return b""
    finally:
        raw.close()

"""Bodies of object GETs sent with urllib3 (``store/s3.py``, ``store/gcs.py``, and the peer
client's ``direct_readinto``): streamed into a ``Sink`` piece by piece, read whole for
``get``, or an error response's text.

Invariants: a body is read straight from the ``http.client`` response under urllib3's, into
the buffer given (or the memory the sink lends), with no copy of its own (urllib3 2.x's
``readinto`` reads into a new bytes object and copies it); a connection goes back to its
pool only once its body was read to the end, and is dropped otherwise. ``read_exactly``
delivers exactly the announced length or raises a temporary ``StoreError``.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

from chunkfs.store.base import Sink, StoreError

#: a GET's ``readinto``: fills the view given, returns how many bytes (0 at the end)
ReadInto = Callable[[memoryview], int]


class RangePastEnd(Exception):
    """A ranged read starting at or past the end of the object (``get`` returns no bytes)."""


def range_header(start: int, end: int | None) -> str | None:
    """The Range header of bytes [start, end) (``end`` None: to the end); None for the whole."""
    if not start and end is None:
        return None
    return f"bytes={start}-{'' if end is None else end - 1}"


def direct_readinto(raw: Any) -> ReadInto | None:
    """The ``readinto`` of the ``http.client`` response under urllib3 response ``raw``, or
    None (another transport: use ``raw``'s own)."""
    direct = _http_response(raw)
    return direct.readinto if direct is not None else None


def _http_response(raw: Any) -> http.client.HTTPResponse | None:
    direct = getattr(raw, "_fp", None)
    return direct if isinstance(direct, http.client.HTTPResponse) else None


def stream_body(raw: Any, expected: int | None, sink: Sink, buffer: memoryview) -> int:
    """Feed a GET response body (a urllib3 response, not yet read) to ``sink``; returns the
    bytes delivered. Reads straight into ``buffer`` from the ``http.client`` response under
    it when it is there, then hands the connection back to the pool (as urllib3 does once a
    body is read); through ``read`` otherwise."""
    direct = _http_response(raw)
    total = 0
    if direct is not None and expected is not None and hasattr(raw, "release_conn"):
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


def read_exactly(raw: Any, expected: int | None, sink: Sink, buffer: memoryview, where: str,
                 failed: Callable[[Exception], StoreError]) -> int:
    """Restart ``sink`` and feed it the body of GET response ``raw``: exactly ``expected``
    bytes (when known), or raise. A failure mid-body drops the connection and raises
    ``failed(exc)``; a short body drops it and raises a temporary ``StoreError`` naming
    ``where``."""
    sink.restart()
    try:
        total = stream_body(raw, expected, sink, buffer)
    except Exception as exc:
        raw.close()  # drops the connection: its body was not read to the end
        raise failed(exc) from None
    if expected is not None and total != expected:
        raw.close()
        raise StoreError(f"GET {where}: body has {total} of {expected} bytes", temporary=True)
    return total


def read_whole(read: Callable[[Sink, memoryview], int]) -> bytes:
    """The body ``read`` delivers into a sink, in memory (``get``); no bytes for a range
    past the end (``RangePastEnd``)."""
    sink = MemorySink()
    try:
        read(sink, memoryview(bytearray(1 << 16)))
    except RangePastEnd:
        return b""
    return bytes(sink.data)


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

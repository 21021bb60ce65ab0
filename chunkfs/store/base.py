"""The ObjectStore interface every storage backend implements.

Layer: ``store/`` knows nothing of FUSE, caches or metadata. Backends are blocking (the
SDKs are); async callers go through ``chunkfs.store.aio.AsyncStore``.

Contract (checked by ``tests/test_store_contract.py`` for every backend):

- ``put`` is atomic: a concurrent or later ``get`` sees the whole object or none of it.
- ``get(key, start, end)`` returns bytes [start, end) (``end=None``: to the end); a missing
  key raises ``ObjectNotFound``.
- ``get_into(key, sink, buffer)`` streams the whole object to ``sink`` in pieces read into
  ``buffer`` and returns its length; every attempt starts with ``sink.restart()``, and a
  body shorter than announced is a temporary error, never a short result. ``RetryingStore``
  then asks ``sink.finish()``, which may reject a body damaged in transit (``BodyRejected``):
  that attempt failed like any other, under the one retry policy.
- ``head`` returns ``None`` for a missing key; ``delete`` of a missing key is not an error.
- ``list(prefix)`` yields every object whose key starts with ``prefix``, in key order.
- Errors are ``StoreError``; ``StoreError.temporary`` says whether a retry may succeed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from chunkfs.errors import ChunkfsError


class StoreError(ChunkfsError):
    """A storage request failed. ``temporary`` failures may succeed when retried."""

    def __init__(self, message: str, *, temporary: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary


class BodyRejected(StoreError):
    """A body arrived whole but is not the object asked for (it failed its check): a
    temporary failure, retried like a reset connection."""

    def __init__(self, message: str) -> None:
        super().__init__(message, temporary=True)

class ObjectNotFound(StoreError):
    """The key does not exist in the store."""


class Sink(Protocol):
    """Where ``ObjectStore.get_into`` delivers an object, piece by piece."""

    def restart(self) -> None:
        """A (new) attempt begins: forget every piece an earlier attempt delivered."""

    def lend(self, size: int) -> memoryview | None:
        """Memory to receive the next piece into (up to ``size`` bytes), where the sink would
        copy it anyway; the caller then passes that view, or a prefix of it, to ``write``,
        and the sink keeps the bytes without a copy. None: use your own buffer."""

    def write(self, piece: memoryview) -> None:
        """Take the next piece. It is a view of the caller's buffer (or of what ``lend``
        gave), valid only during the call. Must not raise: a sink that cannot keep a piece
        remembers that itself."""

    def finish(self) -> None:
        """The whole body arrived: raise ``BodyRejected`` if it is not what was asked for."""


class RequestObserver(Protocol):
    """Told of every request attempt a backend makes (``ObservedStore``), e.g. metrics."""

    def observe_request(self, op: str, seconds: float, nbytes: int, failed: bool) -> None: ...


@dataclass(frozen=True)
class StoreOptions:
    """How a node talks to its store. Not part of the volume: each command may set them."""

    concurrency: int = 32  # HTTP connections per client: N concurrent requests really are N connections
    timeout: float = 30.0  # seconds per request (connect and each read)
    attempts: int = 5  # tries per request for temporary failures (1 = no retry)
    observer: RequestObserver | None = None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float | None = None  # seconds since the epoch, when the store reports it


class ObjectStore(ABC):
    """A flat key space of immutable objects (blocks and the volume marker)."""

    #: the location, printable: never contains a secret
    url: str

    @abstractmethod
    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes: ...

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def get_into(self, key: str, sink: Sink, buffer: memoryview) -> int:
        """Stream the whole object to ``sink`` (see the module contract); returns its length.
        This default reads it whole with ``get`` (for stores that cannot stream); the
        file, S3 and GCS backends override it, so a block never needs a buffer of its size."""
        data = memoryview(self.get(key))
        sink.restart()
        step = len(buffer)
        for offset in range(0, len(data), step):
            sink.write(data[offset : offset + step])
        return len(data)

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default holds none."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

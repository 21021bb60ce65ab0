"""ObservedStore: reports every request of a backend to a ``RequestObserver`` (metrics).

It sits between ``RetryingStore`` and the backend, so each attempt is one observation: a
request retried three times counts as three requests and up to three errors. A missing
key is an answer, not an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from chunkfs.store.base import ObjectInfo, ObjectNotFound, ObjectStore, RequestObserver, Sink

T = TypeVar("T")


class ObservedStore(ObjectStore):
    def __init__(self, inner: ObjectStore, observer: RequestObserver) -> None:
        self.inner = inner
        self.url = inner.url
        self.observer = observer

    def _timed(self, op: str, fn: Callable[[], T], size: Callable[[T], int]) -> T:
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:
            self.observer.observe_request(op, time.perf_counter() - start, 0, not isinstance(exc, ObjectNotFound))
            raise
        self.observer.observe_request(op, time.perf_counter() - start, size(result), False)
        return result

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        return self._timed("get", lambda: self.inner.get(key, start, end), len)

    def get_into(self, key: str, sink: Sink, buffer: memoryview) -> int:
        return self._timed("get", lambda: self.inner.get_into(key, sink, buffer), lambda n: n)

    def put(self, key: str, data: bytes) -> None:
        self._timed("put", lambda: self.inner.put(key, data), lambda _: len(data))

    def head(self, key: str) -> ObjectInfo | None:
        return self._timed("head", lambda: self.inner.head(key), lambda _: 0)

    def delete(self, key: str) -> None:
        self._timed("delete", lambda: self.inner.delete(key), lambda _: 0)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Streams the listing; the whole listing is one observation, made when it ends."""
        start = time.perf_counter()
        failed = False
        try:
            yield from self.inner.list(prefix)
        except Exception:
            failed = True
            raise
        finally:
            self.observer.observe_request("list", time.perf_counter() - start, 0, failed)

    def close(self) -> None:
        self.inner.close()

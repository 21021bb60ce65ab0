"""One retry policy for every backend: exponential backoff with full jitter.

``RetryingStore`` wraps a backend; ``open_store`` applies it to all of them, so backends
only classify failures (``StoreError.temporary``) and never loop themselves. Timeouts,
connection errors, 5xx, S3 SlowDown, GCS 429 and bodies their sink rejects (``BodyRejected``:
a block that fails its hash) are temporary; 403/404 and bad credentials are not and fail at
once. It is the only retry loop for store requests: nothing above it retries them again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from chunkfs.store.base import ObjectInfo, ObjectStore, Sink, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


def backoff_delays(attempts: int, base: float = 0.1, cap: float = 3.0,
                   rng: random.Random | None = None) -> Iterator[float]:
    """Sleep before each retry: full jitter over an exponentially growing window."""
    rng = rng or random.Random()
    for retry in range(attempts - 1):
        yield rng.uniform(0, min(cap, base * 2**retry))


class RetryingStore(ObjectStore):
    def __init__(self, inner: ObjectStore, attempts: int, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.inner = inner
        self.url = inner.url
        self.attempts = attempts
        self._sleep = sleep

    def _retry(self, op: str, key: str, fn: Callable[[], T]) -> T:
        delays = backoff_delays(self.attempts)
        while True:
            try:
                return fn()
            except StoreError as exc:
                if not exc.temporary:
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise StoreError(f"{exc} (gave up after {self.attempts} attempts)", temporary=True) from exc
                log.debug("%s %s failed (%s); retrying in %.2fs", op, key, exc, delay)
                self._sleep(delay)

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        return self._retry("GET", key, lambda: self.inner.get(key, start, end))

    def get_into(self, key: str, sink: Sink, buffer: memoryview) -> int:
        """Each attempt streams the body and has the sink check it (``sink.finish``): a body
        damaged in transit is retried here, in the same attempts as a failed request."""
        def attempt() -> int:
            size = self.inner.get_into(key, sink, buffer)
            sink.finish()
            return size

        return self._retry("GET", key, attempt)

    def put(self, key: str, data: bytes) -> None:
        self._retry("PUT", key, lambda: self.inner.put(key, data))

    def head(self, key: str) -> ObjectInfo | None:
        return self._retry("HEAD", key, lambda: self.inner.head(key))

    def delete(self, key: str) -> None:
        self._retry("DELETE", key, lambda: self.inner.delete(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Retried as a whole while nothing has been yielded yet."""
        yielded = False
        delays = backoff_delays(self.attempts)
        while True:
            try:
                for info in self.inner.list(prefix):
                    yielded = True
                    yield info
                return
            except StoreError as exc:
                delay = next(delays, None)
                if yielded or not exc.temporary or delay is None:
                    raise
                self._sleep(delay)

    def close(self) -> None:
        self.inner.close()

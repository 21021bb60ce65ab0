"""Async access to a blocking ObjectStore for trio code.

Every call runs in a worker thread under one ``trio.CapacityLimiter``, so the event loop
never blocks on storage and the number of requests in flight never exceeds the limit.
"""

from __future__ import annotations

import trio

from chunkfs.store.base import ObjectInfo, ObjectStore


class AsyncStore:
    def __init__(self, store: ObjectStore, concurrency: int) -> None:
        self.store = store
        self.limiter = trio.CapacityLimiter(concurrency)

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        return await trio.to_thread.run_sync(self.store.get, key, start, end, limiter=self.limiter)

    async def put(self, key: str, data: bytes) -> None:
        await trio.to_thread.run_sync(self.store.put, key, data, limiter=self.limiter)

    async def head(self, key: str) -> ObjectInfo | None:
        return await trio.to_thread.run_sync(self.store.head, key, limiter=self.limiter)

"""Async access to a blocking MetaStore for trio code, with an optional immutable cache.

Every engine call runs in a worker thread under one ``trio.CapacityLimiter``. With
``immutable=True`` (read-only mounts treat the volume as frozen while mounted), attributes,
directory listings, symlink targets and block lists are kept in memory after first use, so
a model load makes one metadata round trip per object, not one per FUSE request.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import trio

from chunkfs.blocklist import BlockList
from chunkfs.meta.base import Attr, MetaStore, VolumeStats

T = TypeVar("T")
P = ParamSpec("P")


class AsyncMeta:
    def __init__(self, meta: MetaStore, concurrency: int = 8, *, immutable: bool = False) -> None:
        self.meta = meta
        self.immutable = immutable
        self._limiter = trio.CapacityLimiter(concurrency)
        self._attrs: dict[int, Attr] = {}
        self._entries: dict[tuple[int, bytes], Attr] = {}
        self._listings: dict[int, list[tuple[bytes, Attr]]] = {}
        self._links: dict[int, bytes] = {}
        self._blocks: dict[int, BlockList] = {}

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _remember(self, attr: Attr) -> Attr:
        if self.immutable:
            self._attrs[attr.ino] = attr
        return attr

    async def getattr(self, ino: int) -> Attr:
        cached = self._attrs.get(ino)
        if cached is not None:
            return cached
        return self._remember(await self._call(self.meta.getattr, ino))

    async def lookup(self, parent: int, name: bytes) -> Attr:
        cached = self._entries.get((parent, name))
        if cached is not None:
            return cached
        attr = self._remember(await self._call(self.meta.lookup, parent, name))
        if self.immutable:
            self._entries[(parent, name)] = attr
        return attr

    async def readdir(self, ino: int) -> list[tuple[bytes, Attr]]:
        cached = self._listings.get(ino)
        if cached is not None:
            return cached
        listing = await self._call(self.meta.readdir, ino)
        if self.immutable:
            self._listings[ino] = listing
            for name, attr in listing:
                self._remember(attr)
                self._entries[(ino, name)] = attr
        return listing

    async def readlink(self, ino: int) -> bytes:
        cached = self._links.get(ino)
        if cached is not None:
            return cached
        target = await self._call(self.meta.readlink, ino)
        if self.immutable:
            self._links[ino] = target
        return target

    async def read_blocks(self, ino: int) -> BlockList:
        cached = self._blocks.get(ino)
        if cached is not None:
            return cached
        blocks = await self._call(self.meta.read_blocks, ino)
        if self.immutable:
            self._blocks[ino] = blocks
        return blocks

    async def stats(self) -> VolumeStats:
        return await self._call(self.meta.stats)

    async def change(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a modifying call of this engine (``meta.meta.rename``, ``meta.meta.commit_file``,
        ...; a bound method, so a type checker checks the arguments) in a worker thread.
        Only for mutable use: an immutable cache would go stale."""
        if self.immutable:
            raise RuntimeError("AsyncMeta(immutable=True) is for read-only mounts")
        return await self._call(functools.partial(method, *args, **kwargs))

    async def call(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A read of this engine the cache does not cover (``meta.meta.get_xattr``, ...)."""
        return await self._call(functools.partial(method, *args, **kwargs))

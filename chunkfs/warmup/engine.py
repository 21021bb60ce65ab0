"""Warmup, check and evict: put a plan's blocks in the node cache, report or drop them.

Layer: above ``read/`` (``BlockFetcher``) and ``cache/``; the same code runs in the
``chunkfs warmup`` process (no mount) and inside a mount daemon (``warmup`` through a mount).

Invariants:

- Every block goes through ``BlockFetcher.warm``: verified against its id, written tmp +
  rename, one download per block on the node (in-process single-flight plus the cache's
  node-wide download lock), so a mount reading the same model never fetches it twice.
- A block whose entry is already on disk with the right size counts as cached and is not
  fetched again (a damaged one is caught and refetched by whoever reads it); so does every
  block of a file whose image for FUSE passthrough is usable (``cache/images.py``: the
  image holds them, and opens of the file are passed through to it).
- Every block of the plan, and every image counted, is pinned while the warmup runs: making
  room evicts other entries, never the model being warmed. If the plan cannot fit (cache size, or free space
  above the free-space ratio), the warmup refuses before fetching anything unless ``force``.
- ``complete`` is true only if, at the end, every block of the plan is on disk (in an entry or
  a usable image).
- With ``fill`` (a native transport's model files; ``chunkfs warmup --file-images``), the
  other files' blocks are fetched into entries first (small files, blocks shared with them),
  then each file ``wants_image`` names, without holes and without a usable image, is filled
  as a file image (``read/image_fill.py``: each block once, into the image only, no entry of
  its own), which a passed-through open reads as it is and every other reader takes blocks
  from (``BlockCache.note_image``), then any block still on no disk (a file whose image could
  not be made) is fetched into an entry. An image's blocks count as done once it is
  published. An image being filled is lost if the warmup is killed: a rerun fills that file
  again. Access profiles order only the blocks fetched into entries (a passed-through open
  waits for its whole image anyway).
"""

from __future__ import annotations

import functools
import posixpath
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from chunkfs.blocklist import BlockList
from chunkfs.blocks import block_count
from chunkfs.cache.block_cache import BlockCache
from chunkfs.cache.images import FileImages, cached_blocks, image_id
from chunkfs.errors import ChunkfsError
from chunkfs.read.fetcher import BlockFetcher, BlockUnavailable, Source
from chunkfs.read.image_fill import OnBlock, fill_image
from chunkfs.read.slots import Priority
from chunkfs.units import format_size
from chunkfs.warmup.plan import WarmFile, WarmPlan

MAX_LISTED_FAILURES = 20
#: file images filled at once by a warmup
IMAGE_FILLS = 2

#: fills image (id, size, blocks), telling ``OnBlock`` of each block it puts in; whether the
#: image is on the node (``image_filler``, or a native mount's ``fill_for_warmup``)
Filler = Callable[[bytes, int, BlockList, OnBlock], Awaitable[bool]]


def image_filler(fetcher: BlockFetcher, images: FileImages, parallel: int) -> Filler:
    """A warmup's fills without a mount: ``fill_image`` at prefetch priority."""
    async def fill(key: bytes, size: int, blocks: BlockList, on_block: OnBlock) -> bool:
        filled = await fill_image(fetcher, images, key, size, blocks, Priority.PREFETCH, parallel, on_block)
        fetcher.metrics.file_images.labels("filled" if filled else "failed").inc()
        return filled

    return fill


class CacheTooSmall(ChunkfsError):
    """The paths do not fit in the cache (the message says how much is needed)."""


@dataclass
class WarmupReport:
    paths: list[str]
    files: int = 0
    files_done: int = 0
    blocks: int = 0
    bytes_total: int = 0  # distinct block bytes of the paths
    bytes_cached_before: int = 0
    bytes_fetched: int = 0  # downloaded by this warmup (from the store or peers)
    bytes_from_peers: int = 0  # of those, from peers
    bytes_done: int = 0  # on disk so far (cached before + fetched + planted by others)
    failures: list[str] = field(default_factory=list)
    failed_blocks: int = 0
    seconds: float = 0.0
    complete: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PathCoverage:
    path: str
    files: int
    bytes: int
    cached_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.cached_bytes / self.bytes if self.bytes else 100.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "percent": round(self.percent, 2)}


class Warmup:
    def __init__(self, fetcher: BlockFetcher, plan: WarmPlan, *, threads: int = 32, force: bool = False,
                 fill: Filler | None = None, wants_image: Callable[[str], bool] | None = None) -> None:
        """``fill``/``wants_image``: fill the files it names (by base name) as file images."""
        self.fetcher = fetcher
        self.fill = fill
        self.wants_image = wants_image
        self.cache: BlockCache = fetcher.cache
        self.plan = plan
        self.threads = threads
        self.force = force
        files = plan.files()
        self.report = WarmupReport([p.path for p in plan.paths], files=len(files))
        self._started = time.monotonic()
        self._target = plan.unique_blocks()
        self._owners: dict[bytes, list[int]] = {}  # block -> indexes of files holding it
        self._left: list[int] = []  # distinct blocks not yet done, per file
        self._files = files
        self._failed: set[bytes] = set()
        self._imaged: set[bytes] = set()  # blocks held by usable file images (found when the run starts)
        self._images: dict[bytes, int] = {}  # those images, and those filled -> size (pinned while the run lasts)
        self._done: set[bytes] = set()  # blocks counted in ``bytes_done``
        for index, f in enumerate(files):
            distinct = {bid for bid, _ in f.blocks}
            self._left.append(len(distinct))
            for bid in distinct:
                self._owners.setdefault(bid, []).append(index)
        self.report.blocks = len(self._target)
        self.report.bytes_total = sum(self._target.values())

    def snapshot(self) -> dict[str, Any]:
        self.report.seconds = round(time.monotonic() - self._started, 3)
        return self.report.as_dict()

    async def run(self) -> WarmupReport:
        while not self.cache.index_loaded.is_set():  # a mount indexes its cache in the background
            await trio.sleep(0.05)
        for bid in self._target:
            self.cache.pin(bid)
        try:
            await self._run_pinned()
        finally:
            for bid in [*self._target, *self._images]:
                self.cache.unpin(bid)
            self.snapshot()
        return self.report

    def _find_images(self) -> None:
        self._imaged, found = cached_blocks(self.cache, self.plan.block_size, _sizes_and_ids(self._files))
        for key, size in found.items():
            self.cache.pin(key)
            self._images[key] = size

    def _missing(self) -> dict[bytes, int]:
        """The plan's blocks neither in an entry nor in a usable image (blocking)."""
        return {bid: n for bid, n in self.cache.missing(self._target).items()
                if bid not in self._imaged and not self.cache.in_image(bid)}

    async def _run_pinned(self) -> None:
        await trio.to_thread.run_sync(self._find_images)
        missing = await trio.to_thread.run_sync(self._missing)
        shortfalls = await trio.to_thread.run_sync(self.cache.shortfalls, self._target, missing)
        if shortfalls and not self.force:
            raise CacheTooSmall(
                f"the cache cannot hold {', '.join(self.report.paths)} ({format_size(self.report.bytes_total)}): "
                + "; ".join(str(s) for s in shortfalls) + " (use --force to warm what fits)"
            )
        for bid, length in self._target.items():
            if bid not in missing:
                self.report.bytes_cached_before += length
                self._block_done(bid, length)
        images = self._image_files(missing)
        if images:
            filled = {f.ino for _, f in images}
            elsewhere = {bid for f in self._files if f.ino not in filled for bid, _ in f.blocks}
            only_imaged = {bid for _, f in images for bid, _ in f.blocks} - elsewhere
            await self._fetch({bid: n for bid, n in missing.items() if bid not in only_imaged})
            await self._fill_images(images)
            missing = await trio.to_thread.run_sync(self._missing)  # what no image took
        await self._fetch(missing)
        await trio.to_thread.run_sync(self._final_check)

    async def _fetch(self, blocks: dict[bytes, int]) -> None:
        """Fetch these blocks into entries, ``threads`` at a time."""
        queue = iter(blocks.items())
        async with trio.open_nursery() as nursery:
            for _ in range(min(self.threads, len(blocks))):
                nursery.start_soon(self._worker, queue)

    def _image_files(self, missing: dict[bytes, int]) -> list[tuple[bytes, WarmFile]]:
        """(image id, file) of the files to fill as images: named by ``wants_image``, whole
        (no holes), not empty, with a block missing and no usable image."""
        if self.fill is None or self.wants_image is None:
            return []
        out = []
        keys = set(self._images)  # (usable already, or named by another file of the plan)
        for f in self._files:
            if f.size == 0 or len(f.blocks) != block_count(f.size, self.plan.block_size):
                continue  # empty, or holes (they have no block): no image
            if not self.wants_image(posixpath.basename(f.path)) or not any(bid in missing for bid, _ in f.blocks):
                continue
            key = image_id(f.size, [bid for bid, _ in f.blocks])
            if key is not None and key not in keys:
                keys.add(key)
                out.append((key, f))
        return out

    async def _fill_images(self, files: list[tuple[bytes, WarmFile]]) -> None:
        """Fill these files' images, ``IMAGE_FILLS`` at a time (a killed warmup loses at most
        those); a file whose image cannot be made is left to the block workers. Its blocks
        count as done once the image is published (until then they are in no usable file)."""
        fill = self.fill
        todo = iter(files)

        async def filler() -> None:
            for key, f in todo:
                assert fill is not None  # (files are named only with it)
                arrived: list[tuple[int, Source]] = []
                ids = BlockList.dense([bid for bid, _ in f.blocks])
                if await fill(key, f.size, ids, functools.partial(_arrived, arrived)):
                    self.cache.pin(key)
                    self._images[key] = f.size
                    for length, source in arrived:
                        self._count_fetched(length, source)
                    for bid, length in f.blocks:
                        self._block_done(bid, length)

        async with trio.open_nursery() as nursery:
            for _ in range(IMAGE_FILLS):
                nursery.start_soon(filler)

    async def _worker(self, queue: Any) -> None:
        for bid, length in queue:
            try:
                source = await self.fetcher.warm(bid, length)
            except BlockUnavailable as exc:
                self._fail(bid, str(exc))
                continue
            self._block_in(bid, length, source)

    def _block_in(self, bid: bytes, length: int, source: Source) -> None:
        """A block is in an entry, from ``source``: counted once."""
        if bid in self._done:
            return
        self._count_fetched(length, source)
        self._block_done(bid, length)

    def _count_fetched(self, length: int, source: Source) -> None:
        if source is not Source.NODE:
            self.report.bytes_fetched += length
        if source is Source.PEER:
            self.report.bytes_from_peers += length

    def _block_done(self, bid: bytes, length: int) -> None:
        if bid in self._done:
            return
        self._done.add(bid)
        self.report.bytes_done += length
        for index in self._owners.get(bid, ()):
            self._left[index] -= 1
            if self._left[index] == 0:
                self.report.files_done += 1

    def _fail(self, bid: bytes, why: str) -> None:
        self._failed.add(bid)
        self.report.failed_blocks += 1
        if len(self.report.failures) < MAX_LISTED_FAILURES:
            owner = self._files[self._owners[bid][0]].path
            self.report.failures.append(f"{owner}: {why}")

    def _final_check(self) -> None:
        """Count what is really on disk: a block the cache declined is not warm, nor is one
        held only by an image another process removed meanwhile."""
        gone = [key for key, size in self._images.items() if self.cache.entry_size(key) != size]
        for key in gone:
            self.cache.drop(key)  # (its blocks are forgotten with it)
        if gone:
            self._imaged, _ = cached_blocks(self.cache, self.plan.block_size, _sizes_and_ids(self._files))
        absent = list(self._missing())
        for bid in absent:
            if bid not in self._failed:
                self._fail(bid, f"block {bid.hex()[:16]} is not in the cache after its download "
                                "(no room, or the cache disk refused it)")
        self.report.complete = not absent


def _arrived(into: list[tuple[int, Source]], _bid: bytes, length: int, source: Source) -> None:
    into.append((length, source))


def _sizes_and_ids(files: Iterable[WarmFile]) -> Iterator[tuple[int, list[bytes]]]:
    """(size, block ids) of each file: what file images are keyed by."""
    for f in files:
        yield f.size, [bid for bid, _ in f.blocks]


def coverage(cache: BlockCache, plan: WarmPlan) -> list[PathCoverage]:
    """How much of each path is on disk in the cache, in block entries or file images
    (blocking: one stat per block)."""
    imaged, _ = cached_blocks(cache, plan.block_size, _sizes_and_ids(plan.files()))
    missing = {bid for bid in cache.missing(plan.unique_blocks()) if bid not in imaged}
    out = []
    for entry in plan.paths:
        # holes (never written, read as zeros) have no block: they count as cached
        cached = entry.size - sum(length for f in entry.files for bid, length in f.blocks if bid in missing)
        out.append(PathCoverage(entry.path, len(entry.files), entry.size, cached))
    return out


def evict(cache: BlockCache, plan: WarmPlan) -> dict[str, int]:
    """Drop every block of the plan from the cache, and the files' images for FUSE
    passthrough (``cache/images.py``) (blocking)."""
    images = {key for size, ids in _sizes_and_ids(plan.files()) if (key := image_id(size, ids)) is not None}
    count, size = cache.drop_blocks([*plan.unique_blocks(), *images])
    return {"blocks_removed": count, "bytes_removed": size}


def inspect(op: str, cache: BlockCache, plan: WarmPlan) -> dict[str, Any]:
    """``check`` (coverage per path) or ``evict`` as a JSON-able answer (blocking)."""
    if op == "check":
        return {"paths": [c.as_dict() for c in coverage(cache, plan)], "skipped_links": plan.skipped_links}
    return evict(cache, plan)

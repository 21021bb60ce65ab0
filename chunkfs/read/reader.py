"""FileReader: (inode, offset, length) -> bytes, with readahead and model-file prefetch.

Layer: ``read/``. Knows files as (size, ordered block ids) and the ``BlockFetcher``; nothing
of FUSE handles or metadata engines.

State is kept per open inode (not per handle: several processes mapping one file share one
stream detector and one prefetch) and dropped at the last close, which also cancels the
file's background fetches.

- Readahead: each demand read feeds the file's ``StreamDetector``; the blocks it returns are
  fetched in the background at ``READAHEAD`` priority.
- Blocks already in the node cache are fetched ahead (read from disk) only when the furthest
  read comes within ``BlockFetcher.stage_ahead`` blocks: into block buffers just in time,
  however far the readahead window runs. The prefetch never waits for that: it skips
  such blocks beyond that distance (the readahead reads them in; an entry that needs
  hashing, after a reboot, is hashed then too) and goes on downloading the ones not on
  the node.
- Prefetch: opening a file whose name matches ``prefetch_patterns`` starts ``prefetch_workers``
  tasks that fetch the whole file in order at ``PREFETCH`` priority, never more than
  ``prefetch_limit`` bytes beyond the furthest block read so far (so a file larger than the
  cache does not evict its own unread blocks), and stop when the cache declines a block of
  that file (other files' prefetches go on).
- Profiles (``vfs/profiles.py``): a file whose directory has an access profile is opened
  with ``prefetch=False``; the profile's own prefetch fetches the directory's blocks in the
  recorded order through ``prefetch_block``. A file opened with an ``on_read`` hook has it
  called with every block a reader asks for (recording a profile, pacing its prefetch).
- Demand reads run at ``DEMAND`` priority and so jump both queues.
- Accounting: a block fetched ahead that no reader asked for before the last close counts as
  wasted (``chunkfs_readahead_wasted_blocks_total``, ``chunkfs_prefetch_wasted_blocks_total``).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from chunkfs.blocklist import HOLE, BlockList
from chunkfs.blocks import block_length, block_spans
from chunkfs.metrics import Metrics
from chunkfs.read.fetcher import BlockFetcher, BlockUnavailable, Fetched
from chunkfs.read.slots import Priority
from chunkfs.read.streams import StreamDetector

log = logging.getLogger(__name__)

DEFAULT_PREFETCH_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx")


@dataclass(frozen=True)
class ReadConfig:
    block_size: int
    readahead_max: int = 512 << 20  # bytes a sequential stream may fetch ahead
    prefetch_patterns: tuple[str, ...] = DEFAULT_PREFETCH_PATTERNS
    prefetch_workers: int = 16
    prefetch_limit: int = 1 << 62  # bytes prefetch may run ahead of the furthest read

    def wants_prefetch(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.prefetch_patterns)


@dataclass(eq=False)
class _OpenInode:
    ino: int
    name: str
    size: int
    blocks: BlockList  # holes read as zeros and are never fetched
    detector: StreamDetector
    opens: int = 0
    furthest: int = -1  # furthest block index a reader asked for
    progress: trio.Event = field(default_factory=trio.Event)
    ahead: dict[int, str] = field(default_factory=dict)  # block -> "readahead"/"prefetch", unread
    to_prefetch: list[int] = field(default_factory=list)  # indexes of the stored blocks, in file order
    next_prefetch: int = 0  # position in ``to_prefetch``
    declined: bool = False  # the node cache declined a block of this file: its prefetch stops
    scopes: set[trio.CancelScope] = field(default_factory=set)
    on_read: Callable[[int], None] | None = None  # hears of every block index a reader asks for


_ZEROS = bytes(1 << 20)


def _zeros(length: int) -> bytes | memoryview:
    """``length`` zero bytes (a hole), without allocating for FUSE-sized reads."""
    return memoryview(_ZEROS)[:length] if length <= len(_ZEROS) else bytes(length)


class FileReader:
    def __init__(self, fetcher: BlockFetcher, config: ReadConfig, metrics: Metrics | None = None) -> None:
        self.fetcher = fetcher
        self.config = config
        self.metrics = metrics or fetcher.metrics
        self._files: dict[int, _OpenInode] = {}
        self._nursery: trio.Nursery | None = None
        self._max_window = max(1, config.readahead_max // config.block_size)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background fetches; runs until cancelled (the mount's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- open / close ----------------------------------------------------------------------
    def opened(self, ino: int, name: str, size: int, blocks: BlockList, *, prefetch: bool = True,
               on_read: Callable[[int], None] | None = None) -> None:
        """One more handle on the inode. ``prefetch`` False: its whole-file prefetch is left to
        someone else (an access profile); ``on_read``: called with each block index a reader
        of the inode asks for (the first handle's hook is kept)."""
        self.refresh(ino, size, blocks)  # changed by a writer since another handle opened it
        state = self._files.get(ino)
        if state is None:
            detector = StreamDetector(initial=1, maximum=self._max_window)
            state = self._files[ino] = _OpenInode(ino, name, size, blocks, detector, on_read=on_read)
            if prefetch and len(blocks) and self.config.wants_prefetch(name):
                state.to_prefetch = [index for index, _ in blocks.stored()]
                for _ in range(min(self.config.prefetch_workers, len(state.to_prefetch))):
                    self._spawn(state, self._prefetch_worker, state)
        state.opens += 1

    def refresh(self, ino: int, size: int, blocks: BlockList) -> None:
        """The file was rewritten in this mount: handles still open read the new content."""
        state = self._files.get(ino)
        if state is not None and blocks is not state.blocks and (state.size, state.blocks) != (size, blocks):
            state.size, state.blocks = size, blocks
            state.ahead.clear()
            state.next_prefetch = len(state.to_prefetch)

    def released(self, ino: int) -> None:
        state = self._files.get(ino)
        if state is None:
            return
        state.opens -= 1
        if state.opens > 0:
            return
        del self._files[ino]
        for scope in state.scopes:
            scope.cancel()
        for kind in state.ahead.values():
            (self.metrics.prefetch_wasted if kind == "prefetch" else self.metrics.readahead_wasted).inc()

    # -- reads -----------------------------------------------------------------------------
    def read_held(self, ino: int, offset: int, size: int) -> memoryview | None:
        """The open inode's bytes [offset, offset+size) when they lie in one block held in a
        block buffer, without a copy; None otherwise (then use ``read_into``). The view is
        valid only until the caller's next ``await``."""
        state = self._files[ino]
        bs = self.config.block_size
        index, start = divmod(offset, bs)
        end = min(start + size, state.size - index * bs)  # clipped at the end of the file
        if end <= start or end > bs:  # past the end, or into the next block
            return None
        bid = state.blocks[index]
        if bid == HOLE:
            return None
        view = self.fetcher.held_view(bid, start, end)
        if view is not None:
            self._note_read(state, index)
            self.metrics.fuse_read_bytes.inc(end - start)
        return view

    async def read_into(self, ino: int, offset: int, out: memoryview) -> int:
        """Fill ``out`` with an open inode's bytes from ``offset``; returns how many there
        were (fewer at the end of the file). ``BlockUnavailable`` if a block cannot be had."""
        state = self._files[ino]
        bs = self.config.block_size
        done = 0
        for index, start, end in block_spans(offset, len(out), state.size, bs):
            self._note_read(state, index)
            bid = state.blocks[index]
            if bid == HOLE:
                out[done : done + end - start] = _zeros(end - start)
            else:
                length = block_length(index, state.size, bs)
                await self.fetcher.read_into(bid, length, start, out[done : done + end - start])
            done += end - start
        self.metrics.fuse_read_bytes.inc(done)
        return done

    def _note_read(self, state: _OpenInode, index: int) -> None:
        if state.on_read is not None:
            state.on_read(index)
        state.ahead.pop(index, None)
        if index > state.furthest:
            state.furthest = index
            state.progress.set()
            state.progress = trio.Event()
        for ahead in state.detector.on_read(index, len(state.blocks)):
            if ahead in state.ahead:
                continue
            bid = state.blocks[ahead]
            if bid == HOLE:
                continue
            if not self.fetcher.is_local(bid):
                state.ahead[ahead] = "readahead"
            self._spawn(state, self._fetch_ahead, state, ahead, Priority.READAHEAD)

    # -- background fetches ----------------------------------------------------------------
    def start_background(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Run ``fn(*args)`` among the reader's background fetches (until done or unmount);
        False when the reader is not running."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    async def prefetch_block(self, bid: bytes, length: int, label: str, *, ahead: int = 0) -> Fetched:
        """Download one block ahead of its readers at ``PREFETCH`` priority (a profile's
        order); ``ahead``: how many blocks before the readers it is in that order. A block
        within ``stage_ahead`` of them stays in a block buffer for them (as the file prefetch
        does); a block already on this node is left for the readahead to read in."""
        if self.fetcher.is_local(bid) or self.fetcher.on_node(bid):
            return Fetched()
        near = self.fetcher.stage_ahead is None or ahead <= self.fetcher.stage_ahead
        try:
            fetched = await self.fetcher.ensure(bid, length, Priority.PREFETCH, near=near)
        except BlockUnavailable as exc:
            log.debug("prefetching a block of %s failed: %s", label, exc)
            return Fetched()
        if fetched.worked:
            self.metrics.prefetch_blocks.inc()
        return fetched

    def _spawn(self, state: _OpenInode, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is None:
            return  # not running (unit use without ``run``): no background work

        async def guarded() -> None:
            with trio.CancelScope() as scope:
                state.scopes.add(scope)
                try:
                    await fn(*args)
                finally:
                    state.scopes.discard(scope)

        self._nursery.start_soon(guarded)

    async def _fetch_ahead(self, state: _OpenInode, index: int, priority: Priority) -> Fetched:
        """Fetch one block ahead of readers. A block on this node (already, or once downloaded
        without a block buffer) is read into a block buffer when the furthest read comes
        within ``BlockFetcher.stage_ahead`` blocks of it: shortly before its reader, rather
        than filling the buffers with blocks nobody reads for a while. The readahead waits
        for that moment; the prefetch never waits (it has the rest of the file to download):
        it leaves such blocks to the readahead."""
        bid = state.blocks[index]
        length = block_length(index, state.size, self.config.block_size)
        waits = priority != Priority.PREFETCH
        try:
            if waits:
                await self._until_near(state, index, bid)
            fetched = await self.fetcher.ensure(bid, length, priority, near=self._near(state, index))
            if waits and self.fetcher.stage_ahead is not None and self.fetcher.on_disk_only(bid):
                await self._until_near(state, index, bid)
                await self.fetcher.bring_near(bid, length)
        except BlockUnavailable as exc:
            log.debug("fetching block %d of %r ahead failed: %s", index, state.name, exc)
            state.ahead.pop(index, None)
            return Fetched()
        if fetched.declined:
            state.declined = True
        if not fetched.worked:
            state.ahead.pop(index, None)
        elif priority == Priority.PREFETCH:
            self.metrics.prefetch_blocks.inc()
        else:
            self.metrics.readahead_blocks.inc()
        return fetched

    def _near(self, state: _OpenInode, index: int) -> bool:
        """Block ``index`` is within ``stage_ahead`` blocks of the furthest read (always,
        without block buffers)."""
        ahead = self.fetcher.stage_ahead
        return ahead is None or index - state.furthest <= ahead

    async def _until_near(self, state: _OpenInode, index: int, bid: bytes) -> None:
        """Wait while block ``index`` is on this node and not ``_near``."""
        while not self._near(state, index) and self.fetcher.on_node(bid):
            await state.progress.wait()

    async def _prefetch_worker(self, state: _OpenInode) -> None:
        bs = self.config.block_size
        limit_blocks = max(1, self.config.prefetch_limit // bs)
        while state.next_prefetch < len(state.to_prefetch):
            index = state.to_prefetch[state.next_prefetch]
            state.next_prefetch += 1
            while index - state.furthest > limit_blocks:
                await state.progress.wait()
            if index in state.ahead:
                continue
            if not self._near(state, index) and self.fetcher.on_node(state.blocks[index]):
                continue  # on this node: the readahead reads it in when the reader comes near
            if not self.fetcher.is_local(state.blocks[index]):
                state.ahead[index] = "prefetch"
            await self._fetch_ahead(state, index, Priority.PREFETCH)
            if state.declined:
                log.info("prefetch of %r stopped at block %d: the cache declined a block", state.name, index)
                state.next_prefetch = len(state.to_prefetch)
                return

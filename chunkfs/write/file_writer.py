"""FileWriter: writes through a writable mount, cut into content-addressed blocks.

Layer: ``write/``. Sees files as (size, block ids), the store through ``AsyncStore``, block
bytes through ``BlockFetcher`` (verified), and metadata through ``AsyncMeta``; nothing of FUSE.

A file open for writing has one ``_Dirty`` state per inode (shared by its handles):

- ``blocks`` is a ``BlockList``: ``blocks[i]`` is the id of block ``i`` as stored (``HOLE``
  where nothing was ever written: holes cost no memory, no object and no metadata, so a
  file's cost follows the bytes written, never its size), ``pending[i]`` the bytes of a block
  changed since (exactly ``block_length(i, size)`` bytes: the invariant every write, truncate
  and extension keeps, so a block is always cut where import cuts it and identical content
  gets identical ids: writing a model the volume holds stores nothing). A block filled only
  by appends is an ``_Appended`` (the written pieces, joined once for its upload, instead of
  a bytearray regrown and copied at each write); any other change first turns it into a
  bytearray.
- A block that a write fills to its end is uploaded in the background (at most ``uploads``
  at once; writers wait beyond that); a block rewritten while its upload runs stays pending
  (a version number tells). With more than ``max_pending`` pending blocks in a file, its
  oldest are uploaded too; with more than ``max_pending`` in all files together, a writer
  uploads the oldest whole blocks waiting in any file, else waits for an upload to end, and
  uploads a file's growing last block only when nothing else can make room. So memory stays
  bounded whatever the write pattern and however many files are written at once (while
  uploads succeed: a block whose upload failed stays pending, and a writer stops waiting for
  room once an upload has failed since it began, so that a dead store fails the flush rather
  than hanging every write).
- ``flush`` (close, fsync) uploads what is pending and publishes size + block list in one
  metadata transaction (``commit_file``): another mount that opens the file afterwards sees
  the new content (close-to-open). Before that, the volume still holds the previous version:
  a crash loses unflushed writes, never a file closed before.
- An upload is claimed in the metadata first (``claim_upload``) and skipped when the volume
  already references the block (dedup); the claim keeps gc off the object for gc's grace
  period. ``run`` claims every block stored for a file not yet published again each
  ``claim_renew_s`` (``CLAIM_RENEW_S``, well within gc's shortest grace), so a file may stay
  open for writing as long as it likes. Should gc delete such a block all the same (a gc run
  with ``--force`` and a shorter grace), the next flush fails instead of publishing a file
  that names a missing object. With
  ``cache_writes`` the block also goes to the node cache, so reading it back on this node is
  local; off by default: the node that writes a model is rarely the one that serves it, and
  the extra copy costs about a tenth of the write path's CPU.
- Blocks uploaded but never committed (a crash, a rewrite) are garbage for ``chunkfs gc``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from chunkfs.blocklist import HOLE, BlockList
from chunkfs.blocks import BlockCodec, block_count, block_length, block_spans, object_key
from chunkfs.cache.block_cache import BlockCache
from chunkfs.meta.aio import AsyncMeta
from chunkfs.meta.base import BUSY, CLAIM_RENEW_S, KNOWN, Attr, check_size
from chunkfs.read.fetcher import BlockFetcher
from chunkfs.store.aio import AsyncStore

log = logging.getLogger(__name__)


class WriteFailed(Exception):
    """A block could not be stored; the file's new content was not published."""


class _Appended:
    """The pending bytes of a block written only by appends: references to the pieces of the
    writes (immutable bytes from FUSE), not copies."""

    __slots__ = ("pieces",)

    def __init__(self, piece: memoryview) -> None:
        self.pieces = [piece]

    def extend(self, piece: memoryview) -> None:
        self.pieces.append(piece)

    def joined(self) -> bytes:
        """The bytes, joined once: the pieces are replaced by a view of them, so a block
        being uploaded is not held twice."""
        data = b"".join(self.pieces)
        self.pieces = [memoryview(data)]
        return data


@dataclass(eq=False)
class _Dirty:
    ino: int
    size: int
    blocks: BlockList
    pending: dict[int, bytearray | _Appended] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)
    uploading: int = 0
    in_flight: dict[int, int] = field(default_factory=dict)  # block index -> version being uploaded
    idle: trio.Event = field(default_factory=trio.Event)  # replaced when uploads start, set when they end
    handles: int = 0
    edits: int = 0  # writes and truncates so far
    published_edits: int = 0  # of those, how many the last commit published
    mtime_ns: int = 0  # of the last edit, or as set by utimensat since
    ctime_ns: int = 0  # of the last edit or mtime change
    error: str | None = None  # a background upload failed: the next flush reports it
    stored: set[bytes] = field(default_factory=set)  # ids stored and claimed for this file, not yet published
    lost: set[bytes] = field(default_factory=set)  # of those, ids gc deleted: no flush publishes them


class FileWriter:
    def __init__(self, meta: AsyncMeta, store: AsyncStore, fetcher: BlockFetcher, block_size: int, *,
                 uploads: int = 8, max_pending: int = 32, cache_writes: bool = False,
                 on_publish: Callable[[int, int, BlockList], None] | None = None,
                 claim_renew_s: float | None = CLAIM_RENEW_S) -> None:
        self.meta = meta
        self.store = store
        self.fetcher = fetcher
        self.codec: BlockCodec = fetcher.codec
        self.cache: BlockCache = fetcher.cache
        self.block_size = block_size
        self.max_pending = max_pending
        self.cache_writes = cache_writes
        self.on_publish = on_publish  # (ino, size, blocks) after each commit: readers of this mount follow
        self.claim_renew_s = claim_renew_s  # None: never (tests of what gc does without renewals)
        self._upload_slots = trio.Semaphore(uploads)
        self._files: dict[int, _Dirty] = {}
        self._upload_ended = trio.Event()  # set (and replaced) each time an upload ends
        self._upload_failures = 0
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background uploads and claim renewals; runs until cancelled (the mount's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.claim_renew_s is not None:
                nursery.start_soon(self._renew_claims_forever, self.claim_renew_s)
            task_status.started()
            await trio.sleep_forever()

    async def _renew_claims_forever(self, every_s: float) -> None:
        while True:
            await trio.sleep(every_s)
            try:
                await self.renew_claims()
            except Exception as exc:  # metadata unreachable: the claims are still within gc's grace
                log.warning("renewing upload claims failed, trying again in %.0f s: %s", every_s, exc)

    async def renew_claims(self) -> int:
        """Claim again every block stored for a file still open for writing; return how many.
        A block gc is deleting at this moment (BUSY: its claim had aged past a forced short
        grace) is lost to the file: its next flush fails rather than publish it."""
        renewed = 0
        for state in list(self._files.values()):
            for bid in list(state.stored):
                if await self.meta.change(self.meta.meta.claim_upload, bid, time.time_ns()) == BUSY:
                    log.error("block %s of inode %d was deleted by gc before the file was published",
                              bid.hex(), state.ino)
                    state.stored.discard(bid)
                    state.lost.add(bid)
                else:
                    renewed += 1
        return renewed

    # -- handles ---------------------------------------------------------------------------
    def opened(self, ino: int, size: int, blocks: BlockList) -> None:
        state = self._files.get(ino)
        if state is None:
            state = self._files[ino] = _Dirty(ino, size, blocks.copy())
        state.handles += 1

    def is_open(self, ino: int) -> bool:
        return ino in self._files

    def size_of(self, ino: int) -> int | None:
        state = self._files.get(ino)
        return None if state is None else state.size

    def unpublished_times(self, ino: int) -> tuple[int, int] | None:
        """(mtime, ctime) of edits not yet published, which ``stat`` must show at once."""
        state = self._files.get(ino)
        if state is None or state.edits == state.published_edits:
            return None
        return state.mtime_ns, state.ctime_ns

    def set_mtime(self, ino: int, mtime_ns: int) -> None:
        """utimensat on a file being written: the next publish carries this mtime (until a
        later write sets its own)."""
        state = self._files.get(ino)
        if state is not None:
            state.mtime_ns = mtime_ns
            state.ctime_ns = time.time_ns()

    async def release(self, ino: int) -> Attr | None:
        """A handle closed; the last one flushes and forgets the state."""
        state = self._files[ino]
        state.handles -= 1
        if state.handles > 0:
            return None
        try:
            return await self.flush(ino)
        finally:
            if state.handles == 0:
                self._files.pop(ino, None)

    # -- reads and writes ------------------------------------------------------------------
    async def read(self, ino: int, offset: int, length: int) -> bytes | bytearray | memoryview:
        state = self._files[ino]
        parts: list[bytes | bytearray] = []
        for index, start, end in block_spans(offset, length, state.size, self.block_size):
            buf = state.pending.get(index)
            if buf is not None:
                parts.append(self._bytearray(state, index)[start:end])  # a copy: the block may change
            elif state.blocks[index] == HOLE:
                parts.append(bytes(end - start))
            else:
                parts.append(await self.fetcher.read(state.blocks[index], self._length(state, index), start, end))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        state = self._files[ino]
        check_size(offset + len(data))
        if offset == state.size and (offset % self.block_size == 0 or offset // self.block_size in state.pending):
            await self._append(state, data)  # cp, downloads, checkpoints: no zero-fill, one copy
        else:
            await self._write_at(state, offset, data)
        self._edited(state)
        await self._bound_pending(state)
        await self._bound_all_files()
        return len(data)

    async def _append(self, state: _Dirty, data: bytes) -> None:
        """Write at the end of the file whose last block is pending or complete: extend the
        pending block and start new ones, keeping every pending block exactly as long as the
        size says."""
        bs = self.block_size
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            index, start = divmod(state.size, bs)
            take = min(len(data) - pos, bs - start)
            piece = view[pos:pos + take]
            if start == 0:
                state.blocks.append(HOLE)  # placeholder until the block is uploaded
                state.pending[index] = _Appended(piece)
            elif isinstance(buf := state.pending[index], _Appended):
                buf.extend(piece)
            else:
                buf += piece
            self._bump(state, index)
            state.size += take
            pos += take
            if start + take == bs:
                await self._start_upload(state, index)

    async def _write_at(self, state: _Dirty, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > state.size:
            await self._resize(state, end)
        view = memoryview(data)
        pos = 0
        bs = self.block_size
        while pos < len(data):
            index, start = divmod(offset + pos, bs)
            take = min(len(data) - pos, self._length(state, index) - start)
            buf = await self._editable(state, index)
            buf[start:start + take] = view[pos:pos + take]
            self._bump(state, index)
            pos += take
            if start + take == bs:  # filled to its end: final unless rewritten
                await self._start_upload(state, index)

    async def truncate(self, ino: int, size: int) -> None:
        """Set the size (holes beyond the old end) and mark mtime/ctime, even when the size
        stays the same (as ext4 does for truncate(2), ftruncate and O_TRUNC)."""
        check_size(size)
        state = self._files[ino]
        await self._resize(state, size)
        self._edited(state)

    @staticmethod
    def _edited(state: _Dirty) -> None:
        state.edits += 1
        state.mtime_ns = state.ctime_ns = time.time_ns()

    async def flush(self, ino: int) -> Attr | None:
        """Store what is pending and publish the file; None if nothing changed."""
        state = self._files.get(ino)
        if state is None:
            return None
        while True:
            for index in sorted(state.pending):
                await self._start_upload(state, index)
            await self._wait_uploads(state)
            if state.error is not None:
                error, state.error = state.error, None
                raise WriteFailed(error)
            if not state.pending:
                break  # else: rewritten while uploading, go again
        if state.edits == state.published_edits:
            return None
        # One snapshot, taken with nothing pending: a write landing during the awaits below
        # changes ``state`` but not what this flush publishes (the next flush publishes it).
        edits, size, mtime_ns, ctime_ns = state.edits, state.size, state.mtime_ns, state.ctime_ns
        blocks = state.blocks.copy()
        blocks.resize(block_count(size, self.block_size))
        if lost := state.lost.intersection(blocks.ids()):
            raise WriteFailed(f"block {min(lost).hex()} was deleted by chunkfs gc (run with --force and a "
                              f"short --grace) before the file was published; write the file again")
        attr = await self.meta.change(self.meta.meta.commit_file, ino, size=size, blocks=blocks, mtime_ns=mtime_ns,
                                      ctime_ns=ctime_ns)
        state.published_edits = edits
        state.stored.difference_update(blocks.ids())
        if self.on_publish is not None:
            self.on_publish(ino, size, blocks)
        return attr

    # -- block bookkeeping -----------------------------------------------------------------
    @staticmethod
    def _bytearray(state: _Dirty, index: int) -> bytearray:
        """The pending block ``index`` as a bytearray to edit in place (joining an appended one)."""
        buf = state.pending[index]
        if isinstance(buf, _Appended):
            buf = state.pending[index] = bytearray().join(buf.pieces)
        return buf

    def _length(self, state: _Dirty, index: int) -> int:
        return block_length(index, state.size, self.block_size)

    def _bump(self, state: _Dirty, index: int) -> None:
        state.versions[index] = state.versions.get(index, 0) + 1

    async def _editable(self, state: _Dirty, index: int) -> bytearray:
        """The pending bytes of block ``index``, loading the stored block first if needed."""
        if index in state.pending:
            return self._bytearray(state, index)
        length = self._length(state, index)
        if state.blocks[index] == HOLE:
            buf = state.pending[index] = bytearray(length)
        else:
            buf = state.pending[index] = await self.fetcher.read(state.blocks[index], length, 0, length)
        return buf

    async def _resize(self, state: _Dirty, size: int) -> None:
        """Change the size, keeping every block's length right: the old last block is cut or
        zero-padded, and new blocks are holes (zeros that cost nothing until written)."""
        bs = self.block_size
        old_count, new_count = block_count(state.size, bs), block_count(size, bs)
        if size < state.size:
            for index in [i for i in state.pending if i >= new_count]:
                del state.pending[index]
                self._bump(state, index)
            state.blocks.resize(new_count)
            last = new_count - 1
            if size % bs and last >= 0:
                buf = await self._editable(state, last)
                del buf[size - last * bs:]
                self._bump(state, last)
            state.size = size
            return
        if size == state.size:
            return
        last = old_count - 1
        if last >= 0 and state.size % bs:  # the old last block grows to full (or to the new end)
            buf = await self._editable(state, last)
            buf.extend(bytes(min(bs, size - last * bs) - len(buf)))
            self._bump(state, last)
        state.size = size
        state.blocks.resize(new_count)

    async def _bound_pending(self, state: _Dirty) -> None:
        if len(state.pending) <= self.max_pending:
            return
        waiting = [i for i in sorted(state.pending) if not self._uploading_now(state, i)]
        for index in waiting[: len(state.pending) - self.max_pending]:
            await self._start_upload(state, index)

    async def _bound_all_files(self) -> None:
        """Make room while more than ``max_pending`` blocks are pending in all files together:
        upload the oldest waiting whole block of any file, else wait for an upload to end, else
        upload the oldest waiting last block (one that may still grow, uploaded again if so)."""
        failures = self._upload_failures
        while sum(len(s.pending) for s in self._files.values()) > self.max_pending:
            if self._upload_failures != failures:
                return  # the store is failing: the flush reports it
            whole, growing = self._waiting_blocks()
            if whole:
                await self._start_upload(*whole[0])
            elif any(s.uploading for s in self._files.values()):
                await self._upload_ended.wait()
            elif growing:
                await self._start_upload(*growing[0])
            else:
                return

    def _waiting_blocks(self) -> tuple[list[tuple[_Dirty, int]], list[tuple[_Dirty, int]]]:
        """Pending blocks no upload is running for, oldest first: (whole ones, growing last ones)."""
        whole, growing = [], []
        for state in self._files.values():
            last = (state.size - 1) // self.block_size
            for index in sorted(state.pending):
                if self._uploading_now(state, index):
                    continue
                if index == last and state.size % self.block_size:
                    growing.append((state, index))
                else:
                    whole.append((state, index))
        return whole, growing

    # -- uploads ---------------------------------------------------------------------------
    @staticmethod
    def _uploading_now(state: _Dirty, index: int) -> bool:
        """An upload of the block's current version is running (starting another is waste)."""
        return state.in_flight.get(index) == state.versions.get(index, 0)

    async def _start_upload(self, state: _Dirty, index: int) -> None:
        if index not in state.pending or self._uploading_now(state, index):
            return
        await self._upload_slots.acquire()  # backpressure: writers wait for upload slots
        buf = state.pending.get(index)
        if buf is None or self._uploading_now(state, index):  # changed while this waited for a slot
            self._upload_slots.release()
            return
        version = state.versions.get(index, 0)
        data = buf.joined() if isinstance(buf, _Appended) else bytes(buf)
        state.in_flight[index] = version
        if state.uploading == 0:
            state.idle = trio.Event()  # a flush waiting on the current event keeps it until uploads end
        state.uploading += 1
        assert self._nursery is not None, "FileWriter.run must be running"
        self._nursery.start_soon(self._upload, state, index, version, data)

    async def _upload(self, state: _Dirty, index: int, version: int, data: bytes) -> None:
        try:
            bid = await self._store(data)
            state.stored.add(bid)
            state.lost.discard(bid)  # stored again after gc deleted it
            if state.versions.get(index, 0) == version and index < len(state.blocks):
                state.blocks[index] = bid
                state.pending.pop(index, None)
        except Exception as exc:  # reported by the next flush; the data stays pending
            log.error("storing block %d of inode %d failed: %s", index, state.ino, exc)
            state.error = f"storing block {index} failed: {exc}"
            self._upload_failures += 1
        finally:
            self._upload_slots.release()
            if state.in_flight.get(index) == version:
                del state.in_flight[index]
            state.uploading -= 1
            if state.uploading == 0:
                state.idle.set()
            ended, self._upload_ended = self._upload_ended, trio.Event()
            ended.set()

    async def _wait_uploads(self, state: _Dirty) -> None:
        while state.uploading:
            await state.idle.wait()

    async def _store(self, plain: bytes) -> bytes:
        """Upload a block unless the volume already has it; also put it in the node cache.
        The upload is claimed in the metadata first, so gc cannot delete the object before
        the file naming it is published (it waits while gc is deleting an older copy)."""
        bid = await trio.to_thread.run_sync(self.codec.block_id, plain)
        if await self.meta.change(self.meta.meta.claim_upload_waiting, bid) != KNOWN:
            stored = await trio.to_thread.run_sync(self.codec.encode, plain)
            await self.store.put(object_key(bid), stored)
        if self.cache_writes:
            await trio.to_thread.run_sync(self.cache.put, bid, plain)
        return bid

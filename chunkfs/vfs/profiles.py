"""ProfileBook: a mount's access profiles, recorded from its readers and used for prefetch.

Layer: ``vfs/``, between the ``Vfs`` (which tells it which file of which directory is
opened and closed, and hands the ``FileReader`` the per-file read hook ``on_open`` returns:
only files being recorded or prefetched by profile have one) and the ``FileReader`` (whose
``prefetch_block`` fetches ahead). Profiles are stored per directory in the
metadata (``chunkfs.profile``).

Modes (``--access-profile``):

- ``auto`` (default): a directory with a profile is prefetched in the profile's order when
  one of its files is first opened; a directory without one is recorded, and the recording
  is stored once its readers have read nothing new for ``IDLE_SAVE_S`` seconds (or at
  unmount), unless another mount stored one first, and only if it covers at least half the
  blocks of the directory's model files (those ``--prefetch`` names): a probe that reads a
  config file or a header does not stand in for a load.
- ``use``: prefetch by profiles, never record. ``record``: record and replace whatever is
  stored, never use. ``off``: neither.

The profile prefetch replaces the whole-file prefetch for the files the profile names (the
others keep theirs): ``prefetch_workers`` tasks walk the recorded (file, block) order, then
the rest of those files' blocks front to back, and never run more than ``prefetch_limit``
bytes ahead of the furthest position a reader has reached in that order (so a model larger
than the cache does not evict its own unread blocks). It stops when the cache declines a
block. Everything here is a hint: a failure to read or store a profile is logged and the
mount goes on as without one.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from chunkfs.blocklist import HOLE, BlockList
from chunkfs.blocks import block_length
from chunkfs.errors import ChunkfsError, FsError
from chunkfs.meta.aio import AsyncMeta
from chunkfs.profile import AccessProfile, ProfileDamaged, ProfileRecorder
from chunkfs.read.reader import FileReader

log = logging.getLogger(__name__)

PROFILE_MODES = ("auto", "use", "record", "off")
#: what the reader calls with each block index a reader of one file asks for
ReadHook = Callable[[int], None]
#: a recording is stored once its readers read no new block for this long
IDLE_SAVE_S = 10.0
#: how often recordings are checked for that
CHECK_S = 1.0


@dataclass(eq=False)
class _Directory:
    ino: int
    loaded: trio.Event = field(default_factory=trio.Event)
    profile: AccessProfile | None = None
    recorder: ProfileRecorder | None = None
    opens: int = 0  # handles open on its files (opened through ``on_open``)
    prefetch: trio.CancelScope | None = None  # the running profile prefetch, if any
    # the profile prefetch's order: (file name, block index) -> position, and bytes before each position
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    offsets: list[int] = field(default_factory=list)
    furthest: int = -1  # furthest position in that order a reader asked for
    progress: trio.Event = field(default_factory=trio.Event)


class ProfileBook:
    def __init__(self, meta: AsyncMeta, reader: FileReader, block_size: int, mode: str = "auto", *,
                 prefetch_limit: int = 1 << 62, name_of: Callable[[int], str] = str) -> None:
        if mode not in PROFILE_MODES:
            raise ValueError(f"access profile mode {mode!r}")
        self.meta = meta
        self.reader = reader
        self.block_size = block_size
        self.mode = mode
        self.prefetch_limit = prefetch_limit
        self.name_of = name_of
        self._dirs: dict[int, _Directory] = {}  # directories with open files, a profile or a recording
        self._handles: Counter[int] = Counter()  # open inode -> its handles counted by ``on_open``
        self._dir_of: dict[int, _Directory] = {}  # open inode -> its directory

    # -- the vfs tells it about opens and closes ----------------------------------------------
    async def on_open(self, directory: int, ino: int, name: str) -> tuple[bool, ReadHook | None]:
        """File ``name`` (inode ``ino``) of ``directory`` is being opened for reading:
        (whether a profile covers its prefetch: the reader then does not prefetch it whole,
        the hook the reader calls with each block index read, if any). Only files the reader
        would prefetch (model files) start a recording or a prefetch."""
        if self.mode == "off" or not self.reader.config.wants_prefetch(name):
            return False, None
        d = self._dirs.get(directory)
        if d is None:
            d = self._dirs[directory] = _Directory(directory)  # before awaiting: one per directory
            try:
                await self._load(d)
            finally:
                d.loaded.set()
        await d.loaded.wait()
        if d.profile is None and d.recorder is None:
            return False, None
        self._dir_of[ino] = d
        self._handles[ino] += 1
        d.opens += 1
        hook = functools.partial(self._on_read, d, name)
        if d.profile is None:
            return False, hook
        if d.prefetch is None:
            d.prefetch = trio.CancelScope()
            d.furthest = -1
            self.reader.start_background(self._prefetch, d, d.prefetch)
        return name in d.profile.names, hook

    def on_release(self, ino: int) -> None:
        """A read handle on ``ino`` closed. When none of its directory's files is open any
        more, the directory's prefetch stops (the next open starts it again) and a directory
        with nothing to keep is forgotten."""
        d = self._dir_of.get(ino)
        if d is None:
            return
        self._handles[ino] -= 1
        if self._handles[ino] <= 0:
            del self._handles[ino], self._dir_of[ino]
        d.opens -= 1
        if d.opens > 0:
            return
        if d.prefetch is not None:
            d.prefetch.cancel()
            d.prefetch = None
        if d.profile is None and (d.recorder is None or not len(d.recorder)):
            self._dirs.pop(d.ino, None)

    async def _load(self, d: _Directory) -> None:
        if self.mode in ("auto", "use"):
            try:
                data = await self.meta.call(self.meta.meta.get_profile, d.ino)
                d.profile = None if data is None else AccessProfile.from_bytes(data)
            except (ChunkfsError, ProfileDamaged) as exc:
                log.warning("access profile of %s not used: %s", self.name_of(d.ino), exc)
        if d.profile is None and self.mode in ("auto", "record"):
            d.recorder = ProfileRecorder()

    def _on_read(self, d: _Directory, name: str, index: int) -> None:
        """A reader asked for block ``index`` of file ``name`` of ``d`` (once per FUSE read)."""
        if d.recorder is not None:
            d.recorder.note(name, index)
        if not d.positions:
            return
        position = d.positions.get((name, index))
        if position is not None and position > d.furthest:
            d.furthest = position
            d.progress.set()
            d.progress = trio.Event()

    # -- prefetch in the profile's order -------------------------------------------------------
    async def _prefetch(self, d: _Directory, scope: trio.CancelScope) -> None:
        with scope:
            await self._prefetch_in_order(d)
        if d.prefetch is scope:
            d.prefetch = None  # done (or stopped): the next open may start it again

    async def _prefetch_in_order(self, d: _Directory) -> None:
        assert d.profile is not None
        files = await self._resolve(d)
        order: list[tuple[bytes, int]] = []
        placed: dict[bytes, int] = {}  # block id -> its position (a block in several places: the first)
        d.positions = {}

        def add(name: str, index: int) -> None:
            size, blocks = files[name]
            if index >= len(blocks) or blocks[index] == HOLE:
                return
            bid = blocks[index]
            if bid not in placed:
                placed[bid] = len(order)
                order.append((bid, block_length(index, size, self.block_size)))
            d.positions.setdefault((name, index), placed[bid])

        for name, index in d.profile.entries():
            if name in files:
                add(name, index)
        for name, (_, blocks) in files.items():  # then the rest of the files the profile names
            for index, _bid in blocks.stored():
                add(name, index)
        d.offsets = [0]
        for _, length in order:
            d.offsets.append(d.offsets[-1] + length)
        label = f"{self.name_of(d.ino)} (access profile)"
        log.info("prefetching %s: %d blocks in the recorded order", label, len(order))
        cursor = iter(range(len(order)))
        stop = trio.Event()

        async def worker() -> None:
            for position in cursor:
                if stop.is_set():
                    return
                while d.offsets[position] - d.offsets[max(d.furthest, 0)] > self.prefetch_limit:
                    await d.progress.wait()
                bid, length = order[position]
                if (await self.reader.prefetch_block(bid, length, label, ahead=position - d.furthest)).declined:
                    log.info("prefetch of %s stopped at block %d of %d: the cache declined a block", label,
                             position, len(order))
                    stop.set()

        async with trio.open_nursery() as nursery:
            for _ in range(max(1, min(self.reader.config.prefetch_workers, len(order)))):
                nursery.start_soon(worker)

    async def _resolve(self, d: _Directory) -> dict[str, tuple[int, BlockList]]:
        """(size, blocks) of each regular file the profile names that is still there."""
        assert d.profile is not None
        files = {}
        for name in d.profile.names:
            try:
                attr = await self.meta.lookup(d.ino, os.fsencode(name))
                if attr.is_reg:
                    files[name] = (attr.size, await self.meta.read_blocks(attr.ino))
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("access profile of %s: %s: %s", self.name_of(d.ino), name, exc)
            except ChunkfsError as exc:
                log.warning("access profile of %s: %s: %s", self.name_of(d.ino), name, exc)
        return files

    # -- storing recordings --------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Store recordings once idle (``auto``; ``record`` stores at the end only, so a
        loader's pause does not cut its recording short); at the end (unmount) store what
        is left."""
        task_status.started()
        try:
            while True:
                await trio.sleep(CHECK_S)
                if self.mode != "auto":
                    continue
                for d in list(self._dirs.values()):
                    r = d.recorder
                    if r is not None and r.last_note != r.checked and time.monotonic() - r.last_note >= IDLE_SAVE_S:
                        await self._store(d)
        finally:
            with trio.move_on_after(10) as scope:
                scope.shield = True
                for d in list(self._dirs.values()):
                    if d.recorder is not None and d.recorder.last_note != d.recorder.checked:
                        await self._store(d)

    async def _coverage(self, directory: int, profile: AccessProfile) -> tuple[int, int]:
        """(blocks of the directory's model files the profile names, blocks they have)."""
        wanted = Counter(name for name, _ in profile.entries())
        read = total = 0
        for name, attr in await self.meta.readdir(directory):
            text = os.fsdecode(name)
            if attr.is_reg and self.reader.config.wants_prefetch(text):
                blocks = await self.meta.read_blocks(attr.ino)
                count = len(blocks) - blocks.holes
                total += count
                read += min(count, wanted.get(text, 0))
        return read, total

    async def _store(self, d: _Directory) -> None:
        """Store the directory's recording (a hint: any failure is logged, never raised)."""
        recorder = d.recorder
        assert recorder is not None
        profile = recorder.finished()
        replace = self.mode == "record"
        try:
            if not replace:
                read, total = await self._coverage(d.ino, profile)
                if read * 2 < total:
                    log.info("not storing the access profile of %s yet: its readers read %d of the %d blocks of "
                             "its model files", self.name_of(d.ino), read, total)
                    recorder.checked = recorder.last_note  # checked again after more reads
                    return
            d.recorder = None  # one recording per directory and mount
            stored = await self.meta.call(self.meta.meta.set_profile, d.ino, profile.to_bytes(), replace=replace)
        except Exception as exc:  # a profile is a hint: the mount goes on without it
            d.recorder = None
            log.warning("could not store the access profile of %s: %s", self.name_of(d.ino), exc)
            return
        if stored:
            log.info("recorded the access profile of %s: %d blocks of %d files in %d runs", self.name_of(d.ino),
                     profile.blocks, len(profile.names), len(profile.runs))

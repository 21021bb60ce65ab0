"""Import a local directory tree (or one file) into a volume.

Layer: ``write/``; uses ``Volume`` (meta + store + codec) and knows nothing of FUSE.

Invariants:

- A file's metadata is published (``MetaStore.publish_file``, one transaction) only after
  every one of its blocks is in the store, so an interrupted import never leaves a file
  that reads wrong; running the import again finishes the job.
- A block already referenced by the volume or already present in the store is not
  uploaded again (dedup across files, models and interrupted runs).
- Work is bounded: at most ``threads`` blocks are being read, hashed and uploaded at once
  (memory ~ threads x block size), and at most ``threads`` files are open.
- A file whose size and mtime already match the volume's copy is skipped (like rsync's
  quick check); ``checksum=True`` re-reads it instead.
- Directories get their source mode, owner and mtime after their children are in place.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from chunkfs.blocks import block_count, block_length, object_key
from chunkfs.errors import ChunkfsError, FsError, UsageError, first_error
from chunkfs.meta.base import KNOWN, ROOT_INODE, Attr
from chunkfs.progress import Progress
from chunkfs.volume import Volume

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    unchanged_files: int = 0
    bytes_total: int = 0
    blocks_uploaded: int = 0
    bytes_uploaded: int = 0
    blocks_deduplicated: int = 0
    skipped: list[str] = field(default_factory=list)  # sockets, fifos, devices
    failed: list[str] = field(default_factory=list)  # "path: reason"


@dataclass(frozen=True)
class _Item:
    source: Path
    parts: tuple[bytes, ...]  # path components inside the volume
    st: os.stat_result


def split_volume_path(path: str) -> tuple[bytes, ...]:
    """``/a/b`` -> (b'a', b'b'); the destination must be absolute and free of '..'."""
    if not path.startswith("/"):
        raise UsageError(f"destination {path!r} must be an absolute path inside the volume, e.g. /llama-3-8b")
    parts = tuple(os.fsencode(p) for p in path.split("/") if p and p != ".")
    if b".." in parts:
        raise UsageError(f"destination {path!r} must not contain '..'")
    return parts


class Importer:
    def __init__(self, volume: Volume, *, threads: int = 16, checksum: bool = False,
                 show_progress: bool = False) -> None:
        if threads < 1:
            raise UsageError("--threads must be at least 1")
        self.volume = volume
        self.meta = volume.meta
        self.store = volume.store
        self.codec = volume.codec
        self.block_size = volume.fmt.block_size
        self.threads = threads
        self.checksum = checksum
        self.show_progress = show_progress
        self.report = ImportReport()
        self._dir_inodes: dict[tuple[bytes, ...], int] = {(): ROOT_INODE}
        self._uploading: dict[bytes, trio.Event] = {}
        self._uploaded: set[bytes] = set()  # stored during this run

    # -- planning --------------------------------------------------------------------------
    def _plan(self, source: Path, dest: tuple[bytes, ...]) -> list[_Item]:
        """Every source entry, parents before children, in a stable order."""
        try:
            root_st = source.lstat()
        except FileNotFoundError:
            raise ChunkfsError(f"source {source} does not exist") from None
        except OSError as exc:
            raise ChunkfsError(f"source {source}: {exc.strerror}") from None
        if stat.S_ISLNK(root_st.st_mode):
            root_st = source.stat()
        items = [_Item(source, dest, root_st)]
        if not stat.S_ISDIR(root_st.st_mode):
            return items

        def on_error(exc: OSError) -> None:
            self.report.failed.append(f"{exc.filename}: {exc.strerror}")

        for dirpath, dirnames, filenames in os.walk(source, onerror=on_error):
            dirnames.sort()
            rel = Path(dirpath).relative_to(source)
            prefix = dest + tuple(os.fsencode(p) for p in rel.parts)
            for name in sorted(dirnames + filenames):
                path = Path(dirpath, name)
                try:
                    st = path.lstat()
                except OSError as exc:
                    self.report.failed.append(f"{path}: {exc.strerror}")
                    continue
                items.append(_Item(path, (*prefix, os.fsencode(name)), st))
        return items

    # -- running ---------------------------------------------------------------------------
    def run(self, source: str | Path, dest: str) -> ImportReport:
        source = Path(source).absolute()
        dest_parts = split_volume_path(dest)
        items = self._plan(source, dest_parts)
        if not items[0].parts and not stat.S_ISDIR(items[0].st.st_mode):
            raise UsageError("a single file needs a destination file path, e.g. /models/file.bin")
        if not stat.S_ISDIR(items[0].st.st_mode):
            existing = self._lookup_path(dest_parts)
            if existing is not None and existing.is_dir:  # cp semantics: into the directory
                items = [_Item(source, (*dest_parts, os.fsencode(source.name)), items[0].st)]
        self.report.bytes_total = sum(i.st.st_size for i in items if stat.S_ISREG(i.st.st_mode))
        trio.run(self._run, items)
        return self.report

    def _lookup_path(self, parts: tuple[bytes, ...]) -> Attr | None:
        ino = ROOT_INODE
        attr = self.meta.getattr(ino)
        for name in parts:
            try:
                attr = self.meta.lookup(ino, name)
            except FsError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    return None
                raise
            ino = attr.ino
        return attr

    async def _run(self, items: list[_Item]) -> None:
        files = [i for i in items if stat.S_ISREG(i.st.st_mode)]
        progress = Progress("import", self.report.bytes_total, len(files), enabled=self.show_progress)
        self._limiter = trio.CapacityLimiter(self.threads)
        dirs = [i for i in items if stat.S_ISDIR(i.st.st_mode)]
        await self._sync(self._ensure_parents, items[0].parts[:-1])
        for item in dirs:
            await self._sync(self._ensure_dir, item)
        file_slots = trio.Semaphore(self.threads)
        try:
            async with trio.open_nursery() as nursery:
                for item in items:
                    mode = item.st.st_mode
                    if stat.S_ISREG(mode):
                        await file_slots.acquire()
                        nursery.start_soon(self._import_file, item, file_slots, progress)
                    elif stat.S_ISLNK(mode):
                        await self._sync(self._import_symlink, item)
                    elif not stat.S_ISDIR(mode):
                        self.report.skipped.append(str(item.source))
            for item in reversed(dirs):  # children first: their publishing touches the parent
                await self._sync(self._finish_dir, item)
        finally:
            progress.finish()

    async def _sync(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- namespace -------------------------------------------------------------------------
    def _ensure_parents(self, parts: tuple[bytes, ...]) -> None:
        for depth in range(1, len(parts) + 1):
            self._dir_ino(parts[:depth], None)

    def _dir_ino(self, parts: tuple[bytes, ...], st: os.stat_result | None) -> int:
        """Inode of the volume directory ``parts``, created if missing."""
        known = self._dir_inodes.get(parts)
        if known is not None:
            return known
        parent = self._dir_ino(parts[:-1], None)
        name = parts[-1]
        attr = self._existing(parent, name)
        if attr is None:
            mode, uid, gid = (st.st_mode, st.st_uid, st.st_gid) if st else (0o755, os.getuid(), os.getgid())
            mtime = st.st_mtime_ns if st else time.time_ns()
            try:
                attr = self.meta.mkdir(parent, name, mode, uid, gid, mtime)
                self.report.directories += 1
            except FsError as race:  # another importer made it between our lookup and mkdir
                if race.errno != errno.EEXIST:
                    raise
                attr = self.meta.lookup(parent, name)
        if not attr.is_dir:
            raise ChunkfsError(f"/{os.fsdecode(b'/'.join(parts))} exists in the volume and is not a directory")
        self._dir_inodes[parts] = attr.ino
        return attr.ino

    def _ensure_dir(self, item: _Item) -> None:
        self._dir_ino(item.parts, item.st)

    def _finish_dir(self, item: _Item) -> None:
        st = item.st
        self.meta.set_attrs(self._dir_inodes[item.parts], mode=st.st_mode, uid=st.st_uid,
                            gid=st.st_gid, mtime_ns=st.st_mtime_ns)

    def _import_symlink(self, item: _Item) -> None:
        target = os.fsencode(os.readlink(item.source))
        parent, name = self._dir_inodes[item.parts[:-1]], item.parts[-1]
        old = self._existing(parent, name)
        if old is not None:
            if old.is_dir:
                self.report.failed.append(f"{item.source}: a directory of that name is in the volume")
                return
            if old.is_link and self.meta.readlink(old.ino) == target:
                return
            self.meta.unlink(parent, name)
        self.meta.symlink(parent, name, target, item.st.st_uid, item.st.st_gid, item.st.st_mtime_ns)
        self.report.symlinks += 1

    # -- files -----------------------------------------------------------------------------
    async def _import_file(self, item: _Item, file_slots: trio.Semaphore, progress: Progress) -> None:
        try:
            await self._import_file_inner(item, progress)
        except Exception as group:
            exc = first_error(group)
            if not isinstance(exc, OSError | ChunkfsError | FsError):
                raise
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.report.failed.append(f"{item.source}: {reason}")
            log.debug("import of %s failed", item.source, exc_info=True)
        finally:
            file_slots.release()

    async def _import_file_inner(self, item: _Item, progress: Progress) -> None:
        st = item.st
        parent, name = self._dir_inodes[item.parts[:-1]], item.parts[-1]
        if not self.checksum:
            existing = await self._sync(self._existing, parent, name)
            if existing is not None and existing.is_reg and existing.size == st.st_size \
                    and existing.mtime_ns == st.st_mtime_ns:
                self.report.unchanged_files += 1
                progress.advance(st.st_size, items=1)
                return
        fd = os.open(item.source, os.O_RDONLY)
        try:
            nblocks = block_count(st.st_size, self.block_size)
            ids: list[bytes] = [b""] * nblocks

            async def one_block(index: int) -> None:
                ids[index], uploaded = await self._store_block(fd, index, st.st_size)
                if uploaded:
                    self.report.blocks_uploaded += 1
                    self.report.bytes_uploaded += uploaded
                else:
                    self.report.blocks_deduplicated += 1
                progress.advance(block_length(index, st.st_size, self.block_size))

            async with trio.open_nursery() as nursery:
                for index in range(nblocks):
                    nursery.start_soon(one_block, index)
            now = os.fstat(fd)
            if now.st_size != st.st_size or now.st_mtime_ns != st.st_mtime_ns:
                raise ChunkfsError("file changed while it was being imported; run the import again")
        finally:
            os.close(fd)
        await self._sync(self._publish, parent, name, st, ids)
        self.report.files += 1
        progress.advance(items=1)

    def _existing(self, parent: int, name: bytes) -> Attr | None:
        try:
            return self.meta.lookup(parent, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    async def _store_block(self, fd: int, index: int, size: int) -> tuple[bytes, int]:
        """Read, hash and (unless already stored) upload one block; returns (id, bytes uploaded).

        Single-flight per block id: a block that another task is uploading right now is
        waited for, not uploaded twice (identical blocks are common: zeros, copies)."""
        bid, data = await self._sync(self._read_block, fd, index, size)
        while (pending := self._uploading.get(bid)) is not None:
            await pending.wait()
        if bid in self._uploaded:
            return bid, 0
        self._uploading[bid] = done = trio.Event()
        try:
            uploaded = await self._sync(self._upload_block, bid, data)
            self._uploaded.add(bid)
        finally:
            del self._uploading[bid]
            done.set()
        return bid, len(data) if uploaded else 0

    def _read_block(self, fd: int, index: int, size: int) -> tuple[bytes, bytes]:
        length = block_length(index, size, self.block_size)
        data = os.pread(fd, length, index * self.block_size)
        if len(data) != length:
            raise ChunkfsError("file shrank while it was being imported; run the import again")
        return self.codec.block_id(data), data

    def _upload_block(self, bid: bytes, data: bytes) -> bool:
        """Upload unless the volume or the store already has the block; True if uploaded.
        The upload is claimed first, so a concurrent gc cannot delete the object between
        this check and the publish of the file that names it."""
        key = object_key(bid)
        if self.meta.claim_upload_waiting(bid) == KNOWN or self.store.exists(key):
            return False
        self.store.put(key, self.codec.encode(data))
        return True

    def _publish(self, parent: int, name: bytes, st: os.stat_result, ids: list[bytes]) -> None:
        self.meta.publish_file(parent, name, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                               mtime_ns=st.st_mtime_ns, size=st.st_size, blocks=ids)

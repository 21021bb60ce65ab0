"""gc and fsck: keep a volume's object store and metadata in agreement.

Layer: above ``volume`` (metadata + store); used by the CLI only.

gc deletes block objects no file references, but never one that someone may still need:

- a block whose last reference went away less than ``grace`` ago (a mount may have the file
  open from before the unlink or rewrite, and keeps reading its blocks), and
- an object written less than ``grace`` ago (a writer uploads blocks before it publishes
  the file that names them; a crash leaves them behind, and a later gc removes them).

Right before deleting, gc marks the block in the metadata (``begin_delete``), in one
transaction that fails if a file references it now or a writer claimed its upload within the
grace period; a writer's claim (``claim_upload``) in turn waits while the mark is there. So a
file published, or a block re-uploaded, while gc runs keeps its object: there is no window
between gc's last check and its delete.

Files unlinked while open (orphans, ``meta.sessions``) are files like any other until their
last close; gc first releases the orphans of writable mounts that are gone (a crash), so
their blocks become garbage like those of any deleted file.

fsck walks every file (orphans included) and reports blocks that are missing from the store, of the wrong
size, or (with ``check_content``) whose bytes do not match their hash; reference counts
that disagree with the files; snapshots that lost their path or hold an inode that is not
frozen; and objects no file uses (which gc removes). It changes nothing.

Snapshots need nothing of gc: their files reference their blocks like any file.
"""

from __future__ import annotations

import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from chunkfs.blocks import BlockCorrupt, block_length, object_key
from chunkfs.meta.base import ROOT_INODE
from chunkfs.meta.sessions import release_dead_sessions
from chunkfs.store.base import ObjectNotFound
from chunkfs.volume import Volume

MAX_LISTED = 50


def _block_objects(volume: Volume) -> dict[bytes, Any]:
    """Block id -> ObjectInfo of every block object in the store."""
    found = {}
    for info in volume.store.list("blocks/"):
        name = info.key.rsplit("/", 1)[-1]
        try:
            bid = bytes.fromhex(name)
        except ValueError:
            continue
        if len(bid) == 32 and info.key == object_key(bid):
            found[bid] = info
    return found


@dataclass
class GcReport:
    objects: int = 0
    referenced: int = 0
    kept_recent: int = 0  # unreferenced, but freed or written within the grace period
    deleted: int = 0
    deleted_bytes: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_garbage(volume: Volume, *, grace: float, dry_run: bool, threads: int = 16) -> GcReport:
    cutoff = time.time() - grace
    cutoff_ns = int(cutoff * 1e9)
    meta = volume.meta
    if not dry_run:
        release_dead_sessions(meta)
    referenced = meta.referenced_blocks()
    recently_freed = meta.freed_blocks(cutoff_ns)
    objects = _block_objects(volume)
    report = GcReport(objects=len(objects), dry_run=dry_run)
    doomed = []
    for bid, info in objects.items():
        if bid in referenced:
            report.referenced += 1
        elif bid in recently_freed or info.mtime is None or info.mtime > cutoff:
            report.kept_recent += 1
        else:
            doomed.append((bid, info))

    def delete(item: tuple[bytes, Any]) -> int:
        bid, info = item
        if not meta.begin_delete(bid, cutoff_ns, time.time_ns()):
            return 0  # published, or its upload claimed, while gc ran
        try:
            volume.store.delete(info.key)
        finally:
            meta.end_delete(bid)
        return info.size

    if dry_run:
        report.deleted, report.deleted_bytes = len(doomed), sum(info.size for _, info in doomed)
    else:
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(delete, doomed))
        report.deleted = sum(1 for s in sizes if s)
        report.deleted_bytes = sum(sizes)
        meta.forget_freed(cutoff_ns)
    return report


@dataclass
class FsckReport:
    files: int = 0
    blocks: int = 0  # distinct blocks the files name
    objects: int = 0
    missing: list[str] = field(default_factory=list)  # "path: block id"
    wrong_size: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    refcount_errors: int = 0
    orphans: int = 0  # objects no file uses (gc removes them)
    orphan_bytes: int = 0
    content_checked: bool = False
    snapshots: int = 0
    snapshot_errors: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.wrong_size or self.corrupt or self.refcount_errors
                    or self.snapshot_errors)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clean": self.clean}


def _walk_files(volume: Volume) -> list[tuple[str, int, int]]:
    """(path, inode, size) of every regular file, each inode once."""
    files, seen, stack = [], set(), [("/", ROOT_INODE)]
    while stack:
        path, ino = stack.pop()
        for name, attr in volume.meta.readdir(ino):
            child = posixpath.join(path, name.decode(errors="surrogateescape"))
            if attr.is_dir:
                stack.append((child, attr.ino))
            elif attr.is_reg and attr.ino not in seen:
                seen.add(attr.ino)
                files.append((child, attr.ino, attr.size))
    for ino in volume.meta.orphans():  # unlinked while open: still files until their last close
        if ino not in seen:
            files.append((f"<inode {ino}, unlinked while open>", ino, volume.meta.getattr(ino).size))
    return sorted(files)


def _note(bucket: list[str], entry: str) -> None:
    if len(bucket) < MAX_LISTED:
        bucket.append(entry)


def _check_snapshots(volume: Volume, report: FsckReport) -> None:
    """Every snapshot has a path, and every inode of its tree is frozen."""
    meta = volume.meta
    for record in meta.snapshots():
        report.snapshots += 1
        path = meta.dir_path(record.ino)
        if path is None:
            _note(report.snapshot_errors, f"snapshot of {record.source} (inode {record.ino}) has no path")
            continue
        stack = [(path, record.ino)]
        while stack:
            where, ino = stack.pop()
            if not meta.is_frozen(ino):
                _note(report.snapshot_errors, f"{where}: in snapshot {path} but not frozen (writable)")
            if meta.getattr(ino).is_dir:
                stack.extend((posixpath.join(where, name.decode(errors="surrogateescape")), attr.ino)
                             for name, attr in meta.readdir(ino))


def check_volume(volume: Volume, *, check_content: bool = False, threads: int = 16) -> FsckReport:
    meta, bs = volume.meta, volume.fmt.block_size
    report = FsckReport(content_checked=check_content)
    _check_snapshots(volume, report)
    objects = _block_objects(volume)
    report.objects = len(objects)
    lengths: dict[bytes, tuple[int, str]] = {}
    for path, ino, size in _walk_files(volume):
        report.files += 1
        for index, bid in meta.read_blocks(ino).stored():
            length = block_length(index, size, bs)
            lengths.setdefault(bid, (length, path))
            info = objects.get(bid)
            if info is None:
                _note(report.missing, f"{path}: block {index} ({bid.hex()[:16]}) is not in the store")
            elif volume.fmt.compression == "none" and info.size != length:
                _note(report.wrong_size, f"{path}: block {index} ({bid.hex()[:16]}) has {info.size} bytes, "
                                         f"expected {length}")
    report.blocks = len(lengths)
    report.refcount_errors = len(lengths.keys() ^ meta.referenced_blocks())
    orphans = [info for bid, info in objects.items() if bid not in lengths]
    report.orphans, report.orphan_bytes = len(orphans), sum(info.size for info in orphans)
    if check_content:
        def verify(bid: bytes) -> str | None:
            length, path = lengths[bid]
            try:
                volume.codec.decode(bid, volume.store.get(object_key(bid)), length)
            except ObjectNotFound:
                return None  # already reported as missing
            except BlockCorrupt as exc:
                return f"{path}: {exc}"
            return None

        with ThreadPoolExecutor(threads) as pool:
            for problem in pool.map(verify, [bid for bid in lengths if bid in objects]):
                if problem:
                    _note(report.corrupt, problem)
    return report

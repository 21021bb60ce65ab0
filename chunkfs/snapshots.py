"""Snapshots: pinned, read-only versions of a directory tree, made in the metadata only.

``chunkfs snapshot META /llama-3-8b /llama-3-8b@2026-12-06`` copies the tree's metadata in
one engine transaction (``MetaStore.snapshot``): no block is copied or uploaded, and the
copy's files reference the same blocks, so gc keeps every block a snapshot names until the
snapshot is deleted. Every inode of the copy is frozen: the engine refuses any change to it
with EROFS, whatever asks (a writable mount, ``import``, another snapshot's placement).
A snapshot is a directory like any other for readers: a mount, ``warmup`` and a CSI volume's
``path`` name it by its path.

Invariants: a snapshot's bytes never change while it exists; deleting it (only through
``delete``) drops its references, and gc collects the blocks no one else uses after its
grace period; the first snapshot raises the volume to ``SNAPSHOT_FORMAT_VERSION`` so that
older chunkfs, which would let a writable mount change frozen inodes, refuses the volume.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass

from chunkfs.errors import ChunkfsError, UsageError
from chunkfs.meta.base import ROOT_INODE, SNAPSHOT_FORMAT_VERSION, Attr, FsError, MetaStore, SnapshotRecord
from chunkfs.warmup.plan import normalize_volume_path


@dataclass(frozen=True)
class Snapshot:
    """A snapshot as users see it: where it is now, what it was copied from, when."""

    path: str
    source: str
    created_ns: int
    ino: int

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "source": self.source, "created": _iso(self.created_ns),
                "created_ns": self.created_ns}


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def lookup_path(meta: MetaStore, path: str) -> Attr:
    """The attributes of the volume path ``path`` (no symlink is followed)."""
    attr = meta.getattr(ROOT_INODE)
    walked = ""
    for part in normalize_volume_path(path).split("/")[1:]:
        if not part:
            continue
        if not attr.is_dir:
            raise ChunkfsError(f"{path}: {walked} is not a directory in the volume")
        try:
            attr = meta.lookup(attr.ino, part.encode(errors="surrogateescape"))
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                raise ChunkfsError(f"{path}: no such file or directory in the volume") from None
            raise
        walked += "/" + part
    return attr


def create(meta: MetaStore, source: str, dest: str) -> Snapshot:
    """Snapshot the directory at volume path ``source`` as the new directory ``dest``."""
    source, dest = normalize_volume_path(source), normalize_volume_path(dest)
    if dest == "/":
        raise UsageError("a snapshot needs a name: the destination cannot be the volume root")
    src = lookup_path(meta, source)
    if not src.is_dir:
        raise UsageError(f"{source}: not a directory (a snapshot copies a directory tree)")
    parent_path, _, name = dest.rpartition("/")
    parent = lookup_path(meta, parent_path or "/")
    if not parent.is_dir:
        raise ChunkfsError(f"{parent_path}: not a directory in the volume")
    meta.raise_format(SNAPSHOT_FORMAT_VERSION)
    created = time.time_ns()
    try:
        root = meta.snapshot(src.ino, parent.ino, name.encode(errors="surrogateescape"), source=source,
                             created_ns=created)
    except FsError as exc:
        reason = {errno.EEXIST: "already exists", errno.EROFS: "lies inside a snapshot (read-only)",
                  errno.EINVAL: f"lies inside {source}, the tree being copied",
                  errno.ENAMETOOLONG: "has a name that is too long"}.get(exc.errno or 0, str(exc))
        raise ChunkfsError(f"cannot snapshot {source} as {dest}: {dest} {reason}") from None
    return Snapshot(dest, source, created, root.ino)


def list_all(meta: MetaStore) -> list[Snapshot]:
    """Every snapshot, by path."""
    out = [_shown(meta, record) for record in meta.snapshots()]
    return sorted(out, key=lambda s: s.path)


def _shown(meta: MetaStore, record: SnapshotRecord) -> Snapshot:
    path = meta.dir_path(record.ino) or f"<inode {record.ino}, path unknown>"
    return Snapshot(path, record.source, record.created_ns, record.ino)


def delete(meta: MetaStore, path: str) -> Snapshot:
    """Delete the snapshot whose root is at volume path ``path``."""
    attr = lookup_path(meta, path)
    records = {r.ino: r for r in meta.snapshots()}
    if attr.ino not in records:
        raise UsageError(f"{normalize_volume_path(path)} is not a snapshot (see 'chunkfs snapshot META --list')")
    shown = _shown(meta, records[attr.ino])
    meta.delete_snapshot(attr.ino)
    return shown

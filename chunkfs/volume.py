"""A volume: one metadata engine, one object store, and the settings that bind them.

Layer: above ``meta/``, ``store/`` and ``blocks``; below the read/write paths, FUSE and CLI.

Invariants:

- The store holds a marker object (``MARKER_KEY``) naming the volume UUID. A store location
  belongs to exactly one volume: ``format`` refuses a location whose marker names another
  volume, and ``open_volume`` refuses a store whose marker disagrees with the metadata.
- Re-formatting an existing volume (``--force``) keeps its UUID and files; it may re-point
  the storage URL or rename the volume, but never changes block size or compression of a
  volume that holds files (that would make existing block lists unreadable).
- The storage URL saved in metadata never contains credentials.
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid as uuidlib
from dataclasses import dataclass, replace

from chunkfs.blocks import (
    COMPRESSIONS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_HASH,
    HASHES,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    BlockCodec,
)
from chunkfs.errors import ChunkfsError, NotFormatted, UsageError
from chunkfs.meta import MetaStore, VolumeFormat, open_meta
from chunkfs.store import ObjectNotFound, ObjectStore, StoreError, StoreOptions, normalize_storage_url, open_store
from chunkfs.units import format_size
from chunkfs.urls import mask_url

log = logging.getLogger(__name__)

MARKER_KEY = "chunkfs.volume.json"


@dataclass
class Volume:
    meta: MetaStore
    store: ObjectStore
    fmt: VolumeFormat

    @property
    def codec(self) -> BlockCodec:
        return BlockCodec(self.fmt.compression, self.fmt.hash)

    def close(self) -> None:
        self.store.close()
        self.meta.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: reads of the volume marker before a damaged one (or another volume's) is believed
MARKER_READS = 5


def read_marker(store: ObjectStore, expect_uuid: str | None = None) -> dict | None:
    """The store's volume marker, or None if it has none. A body that does not parse, or
    names another volume than ``expect_uuid``, may be a transfer gone wrong: it is read
    again (``MARKER_READS`` reads in all) before it is believed, so only a marker that is
    damaged (or foreign) on every read is refused."""
    marker: dict | None = None
    for _ in range(MARKER_READS):
        try:
            marker = json.loads(store.get(MARKER_KEY))
        except ObjectNotFound:
            return None
        except ValueError:
            marker = None
            continue
        if not isinstance(marker, dict):
            marker = None
            continue
        if expect_uuid is None or marker.get("uuid") == expect_uuid:
            return marker
    if marker is None:
        raise ChunkfsError(f"{store.url} holds a damaged {MARKER_KEY} (on {MARKER_READS} reads); refusing to use it")
    return marker


def _write_marker(store: ObjectStore, fmt: VolumeFormat) -> None:
    marker = {"uuid": fmt.uuid, "name": fmt.name, "format_version": fmt.format_version}
    store.put(MARKER_KEY, json.dumps(marker, sort_keys=True).encode())


def _check_settings(block_size: int, compression: str, storage: str, hash: str = DEFAULT_HASH) -> None:
    if hash not in HASHES:
        raise UsageError(f"hash must be one of {', '.join(HASHES)}, not {hash!r}")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(
            f"block size {format_size(block_size)} must be a power of two from "
            f"{format_size(MIN_BLOCK_SIZE)} to {format_size(MAX_BLOCK_SIZE)}"
        )
    if compression not in COMPRESSIONS:
        raise UsageError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    if mask_url(storage) != storage:
        raise UsageError(
            "do not put credentials in the storage URL; use the SDK's environment variables or profiles"
        )


def existing_format(meta_url: str) -> VolumeFormat | None:
    """The settings of the volume at ``meta_url``, or None if there is none (yet)."""
    try:
        meta = open_meta(meta_url)
    except NotFormatted:
        return None
    try:
        return meta.load_format()
    finally:
        meta.close()


def format_volume(meta_url: str, storage_url: str, *, name: str | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE, compression: str = "none",
                  hash: str = DEFAULT_HASH, force: bool = False) -> VolumeFormat:
    """Create a volume (or, with ``force``, update an existing one's settings).

    Every check runs before anything is written, so a refused format leaves the metadata
    engine and the store as they were."""
    storage_url = normalize_storage_url(storage_url)
    _check_settings(block_size, compression, storage_url, hash)
    existing = existing_format(meta_url)
    if existing is not None and not force:
        raise ChunkfsError(
            f"{mask_url(meta_url)} already holds volume {existing.name!r} ({existing.uuid}); "
            "use --force to change its settings"
        )
    store = open_store(storage_url, create=True)
    try:
        own_uuid = existing.uuid if existing else None
        marker = read_marker(store, own_uuid)
        if marker is not None and marker.get("uuid") != own_uuid:
            raise ChunkfsError(
                f"{store.url} already holds another volume ({marker.get('name')!r}, "
                f"{marker.get('uuid')}); choose another storage location"
            )
        meta = open_meta(meta_url, create=True)
        try:
            if existing is not None and not meta.is_empty() and (
                existing.block_size != block_size or existing.compression != compression or existing.hash != hash
            ):
                raise ChunkfsError(
                    f"volume {existing.name!r} holds files: its block size "
                    f"({format_size(existing.block_size)}), compression ({existing.compression}) and hash "
                    f"({existing.hash}) cannot change"
                )
            if existing is not None:
                fmt = replace(existing, storage=storage_url, name=name or existing.name,
                              block_size=block_size, compression=compression, hash=hash)
            else:
                fmt = VolumeFormat(
                    name=name or "chunkfs",
                    uuid=str(uuidlib.uuid4()),
                    storage=storage_url,
                    block_size=block_size,
                    compression=compression,
                    hash=hash,
                    created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                )
            _write_marker(store, fmt)
            meta.save_format(fmt)
            return fmt
        finally:
            meta.close()
    finally:
        store.close()


def open_volume(meta_url: str, store_options: StoreOptions | None = None, *,
                store_may_be_down: bool = False) -> Volume:
    """Open a formatted volume and its store, checking that they belong together.

    With ``store_may_be_down`` (read-only mounts, which can serve from the node cache), a
    store that cannot be reached at all is logged and the check skipped; a store that
    answers with another volume's marker is still refused."""
    meta = open_meta(meta_url)
    store = None
    try:
        fmt = meta.load_format()
        if fmt is None:
            raise NotFormatted(f"no chunkfs volume at {meta.url} (run 'chunkfs format' first)")
        store = open_store(fmt.storage, options=store_options)
        try:
            marker = read_marker(store, fmt.uuid)
        except StoreError as exc:
            if not (store_may_be_down and exc.temporary):
                raise
            log.warning("storage %s cannot be reached (%s); serving what the node cache holds until it answers",
                        store.url, exc)
            return Volume(meta=meta, store=store, fmt=fmt)
        if marker is None:
            raise ChunkfsError(f"storage {store.url} of volume {fmt.name!r} holds no chunkfs volume marker")
        if marker.get("uuid") != fmt.uuid:
            raise ChunkfsError(
                f"storage {store.url} belongs to volume {marker.get('uuid')}, not {fmt.uuid} ({fmt.name!r})"
            )
    except BaseException:
        if store is not None:
            store.close()
        meta.close()
        raise
    return Volume(meta=meta, store=store, fmt=fmt)

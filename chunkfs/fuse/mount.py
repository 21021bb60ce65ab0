"""Mount lifecycle: build the read path for a volume, mount it, serve until unmounted.

``serve`` owns everything it starts: the block cache, the metrics endpoint, the FUSE
session (pyfuse3's, or with ``--fuse-transport native`` our own ``NativeSession``) and the
trio nursery holding the FUSE workers, the reader's background fetches, the
cache index scan and the signal watcher. Teardown happens in reverse order in ``finally``
blocks: stop serving, unmount (if still mounted), stop the metrics endpoint.

SIGTERM, SIGINT and SIGHUP end the session cleanly (unmount, exit 0). ``fusermount3 -u``
(what ``chunkfs umount`` runs) ends it the same way from outside.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from chunkfs.cache.block_cache import BlockCache
from chunkfs.cache.images import FileImages
from chunkfs.errors import ChunkfsError
from chunkfs.fuse.kernel import set_read_ahead
from chunkfs.fuse.mountinfo import find_mount
from chunkfs.fuse.native import NativeSession
from chunkfs.fuse.ops import FuseOperations
from chunkfs.meta.aio import AsyncMeta
from chunkfs.meta.base import WRITABLE_FORMAT_VERSION
from chunkfs.meta.sessions import HEARTBEAT_S, new_session_id, release_dead_sessions
from chunkfs.metrics import Metrics
from chunkfs.peer.setup import Peers, PeerSettings, open_peers, owner_load, serve_cache
from chunkfs.read.fetcher import BlockFetcher
from chunkfs.read.reader import DEFAULT_PREFETCH_PATTERNS, FileReader, ReadConfig
from chunkfs.store.aio import AsyncStore
from chunkfs.vfs.profiles import ProfileBook
from chunkfs.vfs.vfs import MountOptions, Vfs
from chunkfs.volume import Volume
from chunkfs.warmup.control import ControlServer, socket_path
from chunkfs.write.file_writer import FileWriter

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    mountpoint: str
    cache_dirs: list[Path]
    cache_size: int = 100 << 30
    free_space_ratio: float = 0.1
    verify_cache: str = "seal"  # "seal": trust sealed entries of other processes; "full": hash them
    options: MountOptions = field(default_factory=MountOptions)
    max_downloads: int = 32
    buffer_size: int = 128 << 20  # memory for blocks in flight
    readahead_max: int = 512 << 20
    prefetch_patterns: tuple[str, ...] = DEFAULT_PREFETCH_PATTERNS
    kernel_readahead: int = 16 << 20
    metrics_address: tuple[str, int] | None = None
    fuse_workers: int = 64
    cache_writes: bool = False  # read-write mounts: also put written blocks in the node cache
    metrics: Metrics = field(default_factory=Metrics)
    peers: PeerSettings | None = None  # fetch from (and with a listener, serve) other nodes' caches
    access_profile: str = "auto"  # record and use access profiles (``vfs/profiles.py``)
    fuse_transport: str = "libfuse"  # "native": serve /dev/fuse ourselves (``native.py``; read-only, root)

    def download_slots(self, block_size: int, compressed: bool) -> int:
        """Concurrent downloads: ``max_downloads``, fewer if their blocks would not fit in
        ``buffer_size`` (a compressed block briefly needs twice its size)."""
        per_block = block_size * (2 if compressed else 1)
        return max(1, min(self.max_downloads, self.buffer_size // per_block))


def fuse_mount_options(volume: Volume, options: MountOptions) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {f"fsname=chunkfs:{volume.fmt.name}", "subtype=chunkfs", "noatime"}
    if options.read_only:
        opts.add("ro")
    if os.geteuid() == 0:
        opts.add("allow_other")  # pods and other users read the models too
    return opts


def serve(volume: Volume, config: ServeConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Mount ``volume`` at ``config.mountpoint`` and serve requests until unmounted."""
    metrics = config.metrics
    block_size = volume.fmt.block_size
    slots = config.download_slots(block_size, volume.codec.compression != "none")
    try:
        cache = BlockCache(config.cache_dirs, config.cache_size, config.free_space_ratio, metrics,
                           trust_seals=config.verify_cache == "seal", hash=volume.fmt.hash)
    except OSError as exc:
        raise ChunkfsError(f"cannot use cache directory {exc.filename}: {exc.strerror}") from None
    # each download for a reader fills a whole-block buffer, written to the cache around the
    # page cache, from which its readers are served; half as many again (at least one) keep
    # finished blocks for readers a little behind
    peers = open_peers(config.peers, volume.fmt.uuid, volume.meta, metrics, connections=slots) \
        if config.peers else None
    fetcher = BlockFetcher(AsyncStore(volume.store, slots), volume.codec, cache, downloads=slots,
                           block_buffers=slots + max(1, slots // 2), metrics=metrics,
                           peers=peers.client if peers else None)
    reader = FileReader(fetcher, ReadConfig(
        block_size=block_size, readahead_max=config.readahead_max, prefetch_patterns=config.prefetch_patterns,
        prefetch_workers=slots, prefetch_limit=max(block_size, config.cache_size // 2)), metrics)
    meta = AsyncMeta(volume.meta, immutable=config.options.read_only)
    writer = None
    if config.options.read_only:
        vfs = Vfs(meta, reader, block_size, config.options, metrics)
    else:
        # a few uploads at once keep the store busy; more threads only fight over the GIL.
        # Written blocks waiting for upload hold at most --buffer-size in all files together (at
        # least 4 blocks).
        uploads = max(1, min(8, slots // 2))
        writer = FileWriter(meta, AsyncStore(volume.store, slots), fetcher, block_size,
                            uploads=uploads, max_pending=max(4, config.buffer_size // block_size),
                            cache_writes=config.cache_writes, on_publish=reader.refresh)
        session = _begin_session(volume)
        vfs = Vfs(meta, reader, block_size, config.options, metrics, writer, session)
    vfs.profiles = ProfileBook(meta, reader, block_size, config.access_profile,
                               prefetch_limit=reader.config.prefetch_limit, name_of=vfs.name_of)
    # recording access profiles needs the loader's reads: no open waits for an image then
    native = NativeSession(vfs, config.mountpoint, f"chunkfs:{volume.fmt.name}", config.fuse_workers,
                           FileImages(cache, block_size), fill_on_open=config.access_profile != "record",
                           ) if config.fuse_transport == "native" else None
    fills = native is not None and native.fill_on_open  # warmups fill model files' images, as opens do
    control = ControlServer(fetcher, meta, block_size, on_warmed=native.build_images if native else None,
                            fill=native.fill_for_warmup if fills and native else None,
                            wants_image=lambda name: bool(native and native.passthrough)
                            and reader.config.wants_prefetch(name))
    http = None
    if config.metrics_address is not None:
        host, port = config.metrics_address
        try:
            http = metrics.serve(host, port)
        except OSError as exc:
            raise ChunkfsError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    try:
        if native is not None:
            native.mount()
        else:
            try:
                pyfuse3.init(FuseOperations(vfs), config.mountpoint, fuse_mount_options(volume, config.options))
            except RuntimeError as exc:
                raise ChunkfsError(f"cannot mount {config.mountpoint}: {exc}") from None
        unmounted = False
        try:
            trio.run(_run_session, config, cache, reader, writer, control, on_ready,
                     None if writer is None else (volume, session), peers, vfs.profiles, native)
            unmounted = find_mount(config.mountpoint) is None
        finally:
            if native is not None:
                if not unmounted:
                    native.unmount()
                native.close()
            else:
                pyfuse3.close(unmount=not unmounted)
            log.info("unmounted %s", config.mountpoint)
            if writer is not None:
                _end_session(volume, session)
    finally:
        if http is not None:
            http.shutdown()
            http.server_close()
        if peers is not None:
            peers.close()


def _begin_session(volume: Volume) -> str:
    """Before a writable mount: raise the volume to the current format (its writes may use
    what older chunkfs cannot read), release the orphans of dead sessions, register ours."""
    meta = volume.meta
    if meta.raise_format(WRITABLE_FORMAT_VERSION):
        log.info("volume raised to format version %d", WRITABLE_FORMAT_VERSION)
    released = release_dead_sessions(meta)
    if released:
        log.info("released %d file(s) unlinked while open in mounts that are gone", released)
    session = new_session_id()
    meta.open_session(session, time.time_ns())
    return session


def _end_session(volume: Volume, session: str) -> None:
    try:
        volume.meta.close_session(session)
    except ChunkfsError as exc:  # the next mount or gc releases its orphans
        log.error("closing session %s failed: %s", session, exc)


async def _heartbeat(volume: Volume, session: str) -> None:
    while True:
        await trio.sleep(HEARTBEAT_S)
        try:
            await trio.to_thread.run_sync(volume.meta.open_session, session, time.time_ns())
        except ChunkfsError as exc:
            log.warning("session heartbeat failed: %s", exc)


async def _run_session(config: ServeConfig, cache: BlockCache, reader: FileReader, writer: FileWriter | None,
                       control: ControlServer, on_ready: Callable[[], None] | None,
                       session: tuple[Volume, str] | None, peers: Peers | None = None,
                       profiles: ProfileBook | None = None, native: NativeSession | None = None) -> None:
    mountpoint = config.mountpoint
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, nursery.cancel_scope,
                           native.unmount if native is not None else pyfuse3.terminate)
        await nursery.start(reader.run)
        if profiles is not None:
            await nursery.start(profiles.run)
        if writer is not None:
            await nursery.start(writer.run)
        if session is not None:
            nursery.start_soon(_heartbeat, *session)

        async def fuse_main() -> None:
            if native is not None:
                await native.serve()
            else:
                await pyfuse3.main(min_tasks=4, max_tasks=config.fuse_workers)
            nursery.cancel_scope.cancel()  # unmounted from outside

        nursery.start_soon(fuse_main)
        # The mount answers once a stat through it succeeds (served by fuse_main above). This
        # thread never touches the mountpoint itself: a request it made would wait for itself
        # (a deadlock as soon as the kernel's cached attributes of the root have expired).
        root = await trio.to_thread.run_sync(os.stat, mountpoint)
        if config.kernel_readahead:
            set_read_ahead(mountpoint, config.kernel_readahead, dev=root.st_dev)
        nursery.start_soon(_load_cache_index, cache)
        if peers is not None:
            serve_cache(peers, cache, owner_load(reader.fetcher))
        await _start_control(nursery, control, mountpoint)
        log.info("mounted at %s", mountpoint)
        if on_ready is not None:
            on_ready()


async def _start_control(nursery: trio.Nursery, control: ControlServer, mountpoint: str) -> None:
    """Serve warmup/check/evict on the mount's control socket; a mount without one still works."""
    entry = find_mount(mountpoint)
    if entry is None:
        return
    path = socket_path(entry.device)
    try:
        await nursery.start(control.serve, path)
    except OSError as exc:
        log.warning("no control socket at %s (%s): 'chunkfs warmup %s' will not work", path, exc.strerror,
                    mountpoint)


async def _load_cache_index(cache: BlockCache) -> None:
    count = await trio.to_thread.run_sync(cache.load_index)
    log.info("cache index: %d blocks on disk, %d MiB indexed", count, cache.used_bytes >> 20)


async def _stop_on_signals(scope: trio.CancelScope, terminate: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            terminate()
            scope.cancel()
            return

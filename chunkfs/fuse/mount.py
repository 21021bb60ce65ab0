"""Mount lifecycle: build the read path for a volume, mount it, serve until unmounted.

``serve`` owns everything it starts: the pyfuse3 session, the trio nursery with the FUSE
workers and the signal watcher. Teardown happens in reverse order in ``finally`` blocks:
stop serving, unmount (if still mounted), close the volume.

SIGTERM, SIGINT and SIGHUP end the session cleanly (unmount, exit 0). ``fusermount3 -u``
(what ``chunkfs umount`` runs) ends it the same way from outside.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from chunkfs.cache.disk import DiskCache
from chunkfs.errors import ChunkfsError
from chunkfs.fuse.mountinfo import find_mount
from chunkfs.fuse.ops import ChunkfsOperations, MountOptions
from chunkfs.meta.aio import AsyncMeta
from chunkfs.read.fetcher import BlockFetcher
from chunkfs.store.aio import AsyncStore
from chunkfs.volume import Volume

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    mountpoint: str
    cache_dir: Path
    options: MountOptions = field(default_factory=MountOptions)
    max_downloads: int = 16
    fuse_workers: int = 64


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
    cache = DiskCache(config.cache_dir)
    fetcher = BlockFetcher(AsyncStore(volume.store, config.max_downloads), volume.codec, cache)
    meta = AsyncMeta(volume.meta, immutable=config.options.read_only)
    ops = ChunkfsOperations(meta, fetcher, volume.fmt.block_size, config.options)
    try:
        pyfuse3.init(ops, config.mountpoint, fuse_mount_options(volume, config.options))
    except RuntimeError as exc:
        raise ChunkfsError(f"cannot mount {config.mountpoint}: {exc}") from None
    unmounted = False
    try:
        trio.run(_run_session, config.mountpoint, config.fuse_workers, on_ready)
        unmounted = find_mount(config.mountpoint) is None
    finally:
        pyfuse3.close(unmount=not unmounted)
        log.info("unmounted %s", config.mountpoint)


async def _run_session(mountpoint: str, workers: int, on_ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, nursery.cancel_scope)

        async def fuse_main() -> None:
            await pyfuse3.main(min_tasks=4, max_tasks=workers)
            nursery.cancel_scope.cancel()  # unmounted from outside

        nursery.start_soon(fuse_main)
        # The mount answers once a stat through it succeeds (served by fuse_main above).
        await trio.to_thread.run_sync(os.stat, mountpoint)
        log.info("mounted at %s", mountpoint)
        if on_ready is not None:
            on_ready()


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            scope.cancel()
            return

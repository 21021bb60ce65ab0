"""warmup: pre-plant files' blocks in the node cache; --check reports, --evict drops them.

Two ways in, one engine (``chunkfs.warmup.engine``):

- ``chunkfs warmup META_URL /path ... --cache-dir DIR``: no mount needed. This process opens
  the volume and the cache itself; a mount sharing the cache directory picks the blocks up
  at once, and the cache's node-wide download lock keeps the two from fetching a block twice.
- ``chunkfs warmup /mnt/models/x``: paths inside a running chunkfs mount. The mount's daemon
  does the work over its control socket, with its own volume, credentials and cache.

Exit status: 0 only when every block of every path is in the cache (for ``--check``: when
every path is fully cached); 1 otherwise, naming what failed; 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

from chunkfs.cli.options import cache_dirs, store_options
from chunkfs.errors import ChunkfsError, NotFormatted, UsageError
from chunkfs.progress import format_duration
from chunkfs.units import format_size
from chunkfs.urls import is_env_name, resolve_meta_arg

PLAIN_PROGRESS_INTERVAL = 5.0
WAIT_BACKOFF_MAX_S = 30.0


class Stopped(ChunkfsError):
    exit_code = 143


def cmd_warmup(args: argparse.Namespace) -> int:
    if args.check and args.evict:
        raise UsageError("--check and --evict do not go together")
    targets = list(args.targets) + _read_list_files(args.list_file or [])
    op = "check" if args.check else "evict" if args.evict else "warmup"
    if getattr(args, "keep_serving", False) and not getattr(args, "peer_listen", None):
        raise UsageError("--keep-serving needs --peer-listen")
    if op != "warmup" and getattr(args, "peer_listen", None):
        raise UsageError("--peer-listen serves peers while warming; not with --check or --evict")
    wait, timeout = getattr(args, "wait", False), getattr(args, "timeout", None)
    if (wait or timeout is not None) and op != "warmup":
        raise UsageError("--wait and --timeout are for warming; not with --check or --evict")
    if timeout is not None and timeout <= 0:
        raise UsageError("--timeout must be positive")
    args.deadline = time.monotonic() + timeout if timeout is not None else None
    if targets and _names_volume(targets[0]):
        meta_url, paths = resolve_meta_arg(targets[0]), targets[1:]
        if not paths:
            raise UsageError("name at least one path inside the volume to warm, e.g. "
                             f"chunkfs warmup {targets[0]} /llama-3-8b")
        result = _until_complete(args, lambda: _standalone(args, op, meta_url, paths))
    else:
        if not targets:
            raise UsageError("name what to warm: META_URL /path ... (no mount needed) or paths inside a chunkfs mount")
        for flag, value in (("--cache-dir", args.cache_dir), ("--cache-size", args.cache_size),
                            ("--free-space-ratio", args.free_space_ratio), ("--file-images", args.file_images)):
            if value is not None:
                raise UsageError(f"{flag} is for warming without a mount; a mount warms its own cache")
        if getattr(args, "peer_listen", None) or getattr(args, "keep_serving", False):
            raise UsageError("--peer-listen and --keep-serving are for warming without a mount; a mount serves "
                             "peers with its own --peer-listen")
        result = _until_complete(args, lambda: _through_mount(args, op, targets))
    return _report(args, op, result)


def _until_complete(args: argparse.Namespace, attempt: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One warmup; with ``--wait``, again (backing off) while blocks failed, until every
    block is cached or ``args.deadline`` passes."""
    backoff = 1.0
    while True:
        result = attempt()
        if not getattr(args, "wait", False) or result.get("complete", True):
            return result
        if args.deadline is not None and time.monotonic() + backoff > args.deadline:
            return result
        print(f"chunkfs: warmup: {result['failed_blocks']} of {result['blocks']} blocks failed; trying again in "
              f"{backoff:.0f} s", file=sys.stderr, flush=True)
        time.sleep(backoff)
        backoff = min(backoff * 2, WAIT_BACKOFF_MAX_S)


def _timed_out(args: argparse.Namespace, snapshot: dict[str, Any]) -> ChunkfsError:
    from chunkfs.warmup.control import cached_so_far

    return ChunkfsError(f"warmup timed out after {args.timeout:.0f} s (--timeout): {cached_so_far(snapshot)} is "
                        "cached; run it again to resume")


def _remaining(args: argparse.Namespace) -> float:
    """Seconds left before ``--timeout`` (infinite without one)."""
    deadline = getattr(args, "deadline", None)
    return float("inf") if deadline is None else max(0.0, deadline - time.monotonic())


def _names_volume(text: str) -> bool:
    """A metadata URL, or an upper-case environment variable name that is not a local path."""
    return "://" in text or (is_env_name(text) and not os.path.exists(text))


def _read_list_files(names: list[str]) -> list[str]:
    paths = []
    for name in names:
        try:
            text = sys.stdin.read() if name == "-" else open(name).read()  # noqa: SIM115 - read at once
        except OSError as exc:
            raise ChunkfsError(f"cannot read list file {name}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ChunkfsError(f"list file {name} is not text") from None
        paths += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return paths


# -- without a mount ---------------------------------------------------------------------------
def _standalone(args: argparse.Namespace, op: str, meta_url: str, paths: list[str]) -> dict[str, Any]:
    from chunkfs.cache.block_cache import DEFAULT_CACHE_SIZE, BlockCache
    from chunkfs.meta import open_meta
    from chunkfs.metrics import Metrics

    dirs = cache_dirs(args.cache_dir)

    def node_cache(algorithm: str) -> BlockCache:
        """The node cache, in the namespace of the volume's block hash."""
        try:
            return BlockCache(dirs, args.cache_size or DEFAULT_CACHE_SIZE,
                              0.1 if args.free_space_ratio is None else args.free_space_ratio, Metrics(),
                              hash=algorithm)
        except OSError as exc:
            raise ChunkfsError(f"cannot use cache directory {exc.filename}: {exc.strerror}") from None

    if op != "warmup":  # metadata only: works with the object store down
        meta = open_meta(meta_url)
        try:
            fmt = meta.load_format()
            if fmt is None:
                raise NotFormatted(f"no chunkfs volume at {meta.url}")
            return trio.run(_plan_and_run, meta, fmt.block_size, paths, _inspect(op, node_cache(fmt.hash)))
        finally:
            meta.close()

    from chunkfs.peer.setup import PeerSettings, open_peers
    from chunkfs.read.fetcher import BlockFetcher
    from chunkfs.store.aio import AsyncStore
    from chunkfs.volume import open_volume

    settings = PeerSettings.from_args(args)
    with open_volume(meta_url, store_options(args, args.threads)) as volume:
        cache = node_cache(volume.fmt.hash)
        peers = open_peers(settings, volume.fmt.uuid, volume.meta, cache.metrics, connections=args.threads) \
            if settings else None
        try:
            fetcher = BlockFetcher(AsyncStore(volume.store, args.threads), volume.codec, cache,
                                   downloads=args.threads, peers=peers.client if peers else None)
            runner = _warm(args, fetcher, peers)
            return trio.run(_plan_and_run, volume.meta, volume.fmt.block_size, paths, runner)
        finally:
            if peers is not None:
                peers.close()


async def _plan_and_run(meta: Any, block_size: int, paths: list[str], runner: Callable[..., Any]) -> dict[str, Any]:
    from chunkfs.meta.aio import AsyncMeta
    from chunkfs.warmup.plan import Planner

    plan = await Planner(AsyncMeta(meta, immutable=True), block_size).plan(paths)
    return await runner(plan)


def _inspect(op: str, cache: Any) -> Callable[..., Any]:
    from chunkfs.warmup.engine import inspect

    async def run(plan: Any) -> dict[str, Any]:
        return await trio.to_thread.run_sync(inspect, op, cache, plan)

    return run


def _warm(args: argparse.Namespace, fetcher: Any, peers: Any = None) -> Callable[..., Any]:
    """The standalone warmup: with ``peers.server`` (``--peer-listen``) it answers peers from
    the cache it fills, and loads the blocks it owns for them, while it warms; with
    ``--keep-serving`` it goes on answering after a complete warmup until stopped."""
    from chunkfs.cache.images import FileImages
    from chunkfs.cli.mount import prefetch_patterns
    from chunkfs.peer.setup import owner_load, serve_cache
    from chunkfs.read.reader import ReadConfig
    from chunkfs.warmup.engine import Warmup, image_filler

    patterns = prefetch_patterns(getattr(args, "file_images", None) or "")

    async def run(plan: Any) -> dict[str, Any]:
        await trio.to_thread.run_sync(fetcher.cache.load_index)
        if peers is not None and peers.server is not None:
            serve_cache(peers, fetcher.cache, owner_load(fetcher))
        fill = image_filler(fetcher, FileImages(fetcher.cache, plan.block_size), args.threads) if patterns else None
        wants = ReadConfig(plan.block_size, prefetch_patterns=patterns).wants_prefetch
        job = Warmup(fetcher, plan, threads=args.threads, force=args.force, fill=fill, wants_image=wants)
        show = _progress_printer(args)
        stopped_by: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope, stopped_by)
            nursery.start_soon(_show_progress, job, show)
            try:
                with trio.move_on_after(_remaining(args)) as bound:
                    await job.run()
            finally:
                nursery.cancel_scope.cancel()
        if bound.cancelled_caught:
            snapshot = job.snapshot()  # downloads in flight when time ran out have finished meanwhile
            if snapshot["bytes_done"] < snapshot["bytes_total"]:
                raise _timed_out(args, snapshot)
            job.report.complete = True
        if stopped_by:
            raise Stopped(f"warmup stopped by {stopped_by[0]}; run it again to resume")
        show(job.snapshot(), final=True)
        report = job.report.as_dict()
        if getattr(args, "keep_serving", False) and report["complete"]:
            await _serve_until_stopped(peers.membership.own)
        return report

    return run


async def _serve_until_stopped(address: str) -> None:
    print(f"chunkfs: warmup complete; serving peers as {address} until stopped", file=sys.stderr, flush=True)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
        async for signum in signals:
            print(f"chunkfs: stopped serving peers ({signal.Signals(signum).name})", file=sys.stderr, flush=True)
            return


async def _stop_on_sigterm(scope: trio.CancelScope, stopped_by: list[str]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            stopped_by.append(signal.Signals(signum).name)
            scope.cancel()
            return


async def _show_progress(job: Any, show: Callable[..., None]) -> None:
    while True:
        await trio.sleep(0.25)
        show(job.snapshot())


# -- through a mount ---------------------------------------------------------------------------
def _through_mount(args: argparse.Namespace, op: str, targets: list[str]) -> dict[str, Any]:
    from chunkfs.fuse.mountinfo import chunkfs_mount_of
    from chunkfs.warmup.control import WarmupTimedOut, run, socket_path

    mount = None
    volume_paths = []
    for target in targets:
        found = chunkfs_mount_of(target)
        if found is None:
            if not os.path.exists(target):
                raise ChunkfsError(f"{target}: no such file or directory (to warm without a mount, give the "
                                   "metadata URL first: chunkfs warmup META_URL /path --cache-dir DIR)")
            raise ChunkfsError(f"{target} is not inside a chunkfs mount (to warm without a mount: "
                               "chunkfs warmup META_URL /path --cache-dir DIR)")
        entry, volume_path = found
        if mount is not None and entry.device != mount.device:
            raise UsageError(f"{target} is in another chunkfs mount than {targets[0]}; warm one mount at a time")
        mount = entry
        volume_paths.append(volume_path)
    assert mount is not None
    message = {"op": op, "paths": volume_paths, "threads": args.threads, "force": args.force}
    show = _progress_printer(args)
    try:
        result = run(socket_path(mount.device), message, mount.mountpoint, deadline=args.deadline,
                     silence=None if args.deadline is None else max(1.0, _remaining(args)), on_progress=show)
    except WarmupTimedOut as exc:
        raise _timed_out(args, exc.snapshot) from None
    if op == "warmup":
        show(result, final=True)
    return result


# -- output ------------------------------------------------------------------------------------
def _progress_printer(args: argparse.Namespace) -> Callable[..., None]:
    """A function taking warmup snapshots: a redrawn bar on a terminal, a plain line every few
    seconds otherwise, nothing with --quiet."""
    terminal = sys.stderr.isatty()
    last = [0.0]

    def show(snap: dict[str, Any], final: bool = False) -> None:
        if args.quiet:
            return
        now = time.monotonic()
        if not final and now - last[0] < (0.25 if terminal else PLAIN_PROGRESS_INTERVAL):
            return
        last[0] = now
        total, done = snap["bytes_total"], snap["bytes_done"]
        fetched = snap["bytes_fetched"]
        rate = fetched / snap["seconds"] if snap["seconds"] > 0 else 0.0
        pct = 100.0 * done / total if total else 100.0
        eta = (total - done) / rate if rate > 0 else 0.0
        text = (f"{pct:5.1f}% {format_size(done)}/{format_size(total)}, files {snap['files_done']}/{snap['files']}, "
                f"{format_size(rate)}/s, ETA {format_duration(eta)}")
        if terminal:
            width = 24
            bar = "#" * int(width * pct / 100)
            sys.stderr.write(f"\rwarmup [{bar:-<{width}}] {text}  " + ("\n" if final else ""))
        elif not final:
            sys.stderr.write(f"warmup: {text}\n")
        sys.stderr.flush()

    return show


def _report(args: argparse.Namespace, op: str, result: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    if op == "check":
        return _report_check(args, result)
    if op == "evict":
        if not args.json:
            print(f"evicted {result['blocks_removed']} blocks ({format_size(result['bytes_removed'])}) from the cache")
        return 0
    if not args.json:
        rate = result["bytes_fetched"] / result["seconds"] if result["seconds"] > 0 else 0.0
        print(f"warmup of {', '.join(result['paths'])}: {result['files']} files, {format_size(result['bytes_total'])}; "
              f"fetched {format_size(result['bytes_fetched'])}{_from_peers(result)}, already cached "
              f"{format_size(result['bytes_cached_before'])}, {result['failed_blocks']} blocks failed, "
              f"{result['seconds']:.1f} s ({format_size(rate)}/s)")
    if not result["complete"]:
        for failure in result["failures"]:
            print(f"chunkfs: failed: {failure}", file=sys.stderr)
        raise ChunkfsError(f"warmup incomplete: {result['failed_blocks']} of {result['blocks']} blocks are not "
                           "in the cache; run it again to finish")
    return 0


def _from_peers(result: dict[str, Any]) -> str:
    peers = result.get("bytes_from_peers", 0)
    return f" ({format_size(peers)} from peers)" if peers else ""


def _report_check(args: argparse.Namespace, result: dict[str, Any]) -> int:
    rows = result["paths"]
    if not args.json:
        print(f"{'cached':>10} {'size':>10} {'percent':>8}  path")
        for row in rows:
            print(f"{format_size(row['cached_bytes']):>10} {format_size(row['bytes']):>10} {row['percent']:7.1f}%  "
                  f"{row['path']}")
    partial = [f"{row['path']} ({row['percent']:.1f}%)" for row in rows if row["cached_bytes"] < row["bytes"]]
    if partial:
        raise ChunkfsError(f"not fully cached: {', '.join(partial)}")
    return 0

"""The ``chunkfs`` command line: argument parsing, logging set-up and error reporting.

Every failure a user can cause ends as one line on stderr (``chunkfs: ...``) and a
non-zero exit; a traceback is printed only with ``--debug``. Command bodies live in
``commands.py`` (volume commands) and ``mount.py`` (mount, umount).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from chunkfs import __version__
from chunkfs.blocks import COMPRESSIONS, DEFAULT_BLOCK_SIZE, DEFAULT_HASH, HASHES
from chunkfs.cache.block_cache import DEFAULT_CACHE_SIZE, VERIFY_CACHE_MODES
from chunkfs.errors import ChunkfsError, UsageError, first_error
from chunkfs.read.reader import DEFAULT_PREFETCH_PATTERNS
from chunkfs.store.base import StoreOptions
from chunkfs.units import parse_size
from chunkfs.urls import resolve_meta_arg

EXIT_INTERNAL = 70
#: gc thresholds of every command (generation 0 allocations, then collections of the younger one)
GC_THRESHOLDS = (20_000, 20, 20)


def default_cache_dir() -> str:
    if os.geteuid() == 0:
        return "/var/cache/chunkfs"
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chunkfs")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ChunkfsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 30m, 1h or 2d, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a duration cannot be negative: {text}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 up to (not including) 1, got {text}")
    return value


def _add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--io-retries", type=_positive_int, default=5,
                   help="tries per object-store request for temporary failures (default 5)")
    p.add_argument("--io-timeout", type=float, default=30.0, help="seconds per object-store request (default 30)")


def store_options(args: argparse.Namespace, concurrency: int) -> StoreOptions:
    if args.io_timeout <= 0:
        raise UsageError("--io-timeout must be positive")
    return StoreOptions(concurrency=concurrency, timeout=args.io_timeout, attempts=args.io_retries)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chunkfs", description="A chunked POSIX filesystem for ML model weights over object storage."
    )
    parser.add_argument("--version", action="version", version=f"chunkfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("format", help="create a volume (or update its settings with --force)")
    p.add_argument("meta", metavar="META_URL",
                   help="metadata engine, e.g. sqlite:///var/lib/chunkfs/models.db, or the name of an environment "
                        "variable holding the URL (e.g. CHUNKFS_META_URL), for every command")
    p.add_argument("--storage", help="object store URL, e.g. file:///var/lib/chunkfs/blocks or s3://bucket/prefix")
    p.add_argument("--name", help="volume name (default: chunkfs)")
    p.add_argument("--block-size", type=_size, default=None,
                   help=f"block size, 64K to 64M (default {DEFAULT_BLOCK_SIZE >> 20}M)")
    p.add_argument("--compress", choices=COMPRESSIONS, default=None, help="per-block compression (default none)")
    p.add_argument("--hash", choices=HASHES, default=None,
                   help=f"block hash of a new volume (default {DEFAULT_HASH}; an existing volume keeps its own)")
    p.add_argument("--force", action="store_true", help="update the settings of an existing volume")

    p = sub.add_parser("import", help="copy a local directory or file into the volume")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("source", metavar="SOURCE", help="local directory or file")
    p.add_argument("dest", metavar="DEST", help="absolute path inside the volume, e.g. /llama-3-8b")
    p.add_argument("--threads", type=_positive_int, default=16, help="blocks processed in parallel (default 16)")
    p.add_argument("--checksum", action="store_true", help="re-read files whose size and mtime are unchanged")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    _add_store_options(p)

    p = sub.add_parser("mount", help="mount a volume with FUSE")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--read-only", action="store_true",
                   help="refuse every write with EROFS (what pods use); without it the mount is read-write")
    p.add_argument("--cache-dir", action="append", default=None, metavar="DIR",
                   help=f"block cache directory; repeat it or join with ':' for several disks "
                        f"(default {default_cache_dir()})")
    p.add_argument("--cache-size", type=_size, default=DEFAULT_CACHE_SIZE,
                   help="most bytes the cache may hold; least recently used blocks are evicted "
                        f"(default {DEFAULT_CACHE_SIZE >> 30}G)")
    p.add_argument("--free-space-ratio", type=_ratio, default=0.1,
                   help="keep at least this fraction of each cache disk free (default 0.1)")
    p.add_argument("--verify-cache", choices=VERIFY_CACHE_MODES, default="seal",
                   help="cache entries written by another process (a warmup, an earlier mount): 'seal' "
                        "serves those unchanged since chunkfs sealed them, 'full' hashes each one whole "
                        "first (default seal)")
    p.add_argument("--background", "-d", action="store_true", help="return once mounted; serve in the background")
    p.add_argument("--log-file", default=None, help="log file of a background mount")
    p.add_argument("--max-downloads", type=_positive_int, default=32, help="concurrent block downloads (default 32)")
    p.add_argument("--buffer-size", type=_size, default=128 << 20,
                   help="memory for blocks being downloaded; limits --max-downloads. Blocks just downloaded, "
                        "or read in from the node cache ahead of a reader, stay in memory for their readers, in "
                        "up to half as much again, and at least one block (default 128M)")
    p.add_argument("--max-readahead", type=_size, default=512 << 20,
                   help="how far a sequential reader is read ahead, at most (default 512M)")
    p.add_argument("--prefetch", default=",".join(DEFAULT_PREFETCH_PATTERNS), metavar="PATTERNS",
                   help="comma-separated file-name patterns fetched whole, in parallel, when opened; "
                        "'none' turns it off (default: %(default)s)")
    p.add_argument("--kernel-readahead", type=_size, default=16 << 20,
                   help="the kernel's readahead for this mount, 0 to keep the kernel default (default 16M)")
    p.add_argument("--cache-writes", action="store_true",
                   help="read-write mounts: also keep written blocks in the node cache (for reading them back here)")
    p.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9567")
    p.add_argument("--attr-timeout", type=float, default=None,
                   help="kernel attribute cache seconds (default 300 read-only, 1 read-write)")
    p.add_argument("--entry-timeout", type=float, default=None,
                   help="kernel entry cache seconds (default 300 read-only, 1 read-write)")
    _add_store_options(p)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--meta-fd", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("warmup", help="pre-plant files' blocks in the node cache (no mount needed)",
                       description="Download every block of the named files and directories into the node "
                                   "cache. Give the metadata URL first to work without a mount, or paths inside "
                                   "a running chunkfs mount to have its daemon do it. Exit status 0 only when "
                                   "every block is cached.")
    p.add_argument("targets", nargs="*", metavar="[META_URL] PATH",
                   help="META_URL then paths inside the volume (e.g. /llama-3-8b), or paths inside a mount")
    p.add_argument("--list-file", "-f", action="append", default=None, metavar="FILE",
                   help="read more paths from FILE, one per line ('-' for stdin)")
    p.add_argument("--cache-dir", action="append", default=None, metavar="DIR",
                   help=f"cache directory, as for mount (default {default_cache_dir()}); not with a mount's paths")
    p.add_argument("--cache-size", type=_size, default=None,
                   help=f"the cache size the node's mounts use (default {DEFAULT_CACHE_SIZE >> 30}G); "
                        "not with a mount's paths")
    p.add_argument("--free-space-ratio", type=_ratio, default=None,
                   help="keep this fraction of each cache disk free (default 0.1); not with a mount's paths")
    p.add_argument("--threads", type=_positive_int, default=32, help="blocks downloaded in parallel (default 32)")
    p.add_argument("--check", action="store_true", help="report how much of each path is cached; download nothing")
    p.add_argument("--evict", action="store_true", help="remove the paths' blocks from the cache")
    p.add_argument("--force", action="store_true", help="warm what fits even if the paths exceed the cache")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    _add_store_options(p)

    p = sub.add_parser("csi", help="serve the Kubernetes CSI node plugin csi.chunkfs.io on a unix socket")
    p.add_argument("--endpoint", default="unix:///csi/csi.sock", help="gRPC socket (default unix:///csi/csi.sock)")
    p.add_argument("--node-id", default=os.environ.get("NODE_NAME"),
                   help="this node's name, as kubelet knows it (default $NODE_NAME)")
    p.add_argument("--state-dir", default="/run/chunkfs/csi",
                   help="where staged volumes are recorded, so a restarted plugin re-adopts them "
                        "(default /run/chunkfs/csi)")
    p.add_argument("--cache-dir", action="append", default=None, metavar="DIR",
                   help="node cache of every mount, as for mount (default /var/cache/chunkfs)")
    p.add_argument("--cache-size", default=f"{DEFAULT_CACHE_SIZE >> 30}G",
                   help=f"cache size of each mount (default {DEFAULT_CACHE_SIZE >> 30}G)")
    p.add_argument("--check-interval", type=float, default=5.0,
                   help="seconds between checks that every mount daemon is alive (default 5)")
    p.add_argument("--verify-cache", choices=VERIFY_CACHE_MODES, default="seal",
                   help="--verify-cache of each mount (default seal)")

    p = sub.add_parser("stats", help="live view of a mount's throughput, cache hits and store requests")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between lines (default 1)")
    p.add_argument("--count", type=_positive_int, default=None, help="stop after this many lines")

    p = sub.add_parser("umount", help="unmount a chunkfs mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", "-z", action="store_true", help="detach now even if busy (also clears dead mounts)")

    p = sub.add_parser("objbench", help="measure an object store's latency and throughput from this node")
    p.add_argument("storage", metavar="STORAGE_URL", help="e.g. s3://bucket/prefix or gs://bucket/prefix")
    p.add_argument("--block-size", type=_size, default=DEFAULT_BLOCK_SIZE,
                   help=f"object size (default {DEFAULT_BLOCK_SIZE >> 20}M, the default block size)")
    p.add_argument("--objects", type=_positive_int, default=64, help="objects per level (default 64)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default 1,8,32)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_store_options(p)

    p = sub.add_parser("gc", help="delete block objects no file uses (after a grace period)")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted; delete nothing")
    p.add_argument("--grace", type=_duration, default=3600.0,
                   help="keep blocks freed or written less than this long ago, e.g. 30m, 1h, 2d (default 1h; "
                        "at least 11m unless --force)")
    p.add_argument("--force", action="store_true",
                   help="accept a grace under 11m: blocks of files that writable mounts have open may be deleted")
    p.add_argument("--threads", type=_positive_int, default=16, help="parallel deletes (default 16)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_store_options(p)

    p = sub.add_parser("fsck", help="check that every file's blocks are in the store (changes nothing)")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("--check-content", action="store_true", help="also download every block and verify its hash")
    p.add_argument("--threads", type=_positive_int, default=16, help="parallel downloads (default 16)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_store_options(p)

    p = sub.add_parser("dump", help="write a volume's metadata as JSON Lines (to stdout or -o FILE)")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("--output", "-o", default="-", help="file to write (default stdout)")

    p = sub.add_parser("load", help="load a dump into an empty metadata engine (from stdin or -i FILE)")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("--input", "-i", default="-", help="file to read (default stdin)")

    p = sub.add_parser("status", help="show volume settings and usage")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _setup_logging(debug: bool, command: str) -> None:
    level = logging.DEBUG if debug else (logging.INFO if command in ("mount", "csi") else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.debug, args.command)
    meta = getattr(args, "meta", None)
    if meta and getattr(args, "meta_fd", None) is None:  # a daemon gets its URL through --meta-fd
        args.meta = resolve_meta_arg(meta)
        args.meta_arg = meta if meta != args.meta else None  # an environment variable's name
    from chunkfs.cli import commands, csi_node, mount, stats, warmup

    # The data paths allocate many short-lived objects per request (botocore's above all) and
    # make few cycles: keep what start-up loaded out of the collector's scans, and collect
    # the young generation less often.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    handlers = {
        "format": commands.cmd_format,
        "import": commands.cmd_import,
        "status": commands.cmd_status,
        "objbench": commands.cmd_objbench,
        "gc": commands.cmd_gc,
        "fsck": commands.cmd_fsck,
        "dump": commands.cmd_dump,
        "load": commands.cmd_load,
        "mount": mount.cmd_mount,
        "umount": mount.cmd_umount,
        "stats": stats.cmd_stats,
        "warmup": warmup.cmd_warmup,
        "csi": csi_node.cmd_csi,
    }
    return handlers[args.command](args)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        try:
            code = run(argv)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    except ChunkfsError as exc:
        print(f"chunkfs: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("chunkfs: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 141
    except Exception as exc:
        if debug:
            raise
        print(f"chunkfs: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
              file=sys.stderr)
        code = EXIT_INTERNAL
    sys.exit(code)

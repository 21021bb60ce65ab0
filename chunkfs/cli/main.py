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
from chunkfs.cache.block_cache import DEFAULT_CACHE_SIZE
from chunkfs.cli import commands, csi_node, mount, profile, stats, warmup
from chunkfs.cli.csi_node import CSI_CACHE_DIR
from chunkfs.cli.options import (
    CACHE_DIR,
    CACHE_SIZE,
    CSI_MOUNT_OPTIONS,
    FREE_SPACE_RATIO,
    MOUNT_OPTIONS,
    PEER_OPTIONS,
    STORE_OPTIONS,
    add_options,
    default_cache_dir,
    duration,
    positive_int,
    size,
)
from chunkfs.errors import ChunkfsError, first_error
from chunkfs.urls import resolve_meta_arg

EXIT_INTERNAL = 70
#: gc thresholds of every command (generation 0 allocations, then collections of the younger one)
GC_THRESHOLDS = (20_000, 20, 20)


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
    p.add_argument("--block-size", type=size, default=None,
                   help=f"block size, 64K to 64M (default {DEFAULT_BLOCK_SIZE >> 20}M)")
    p.add_argument("--compress", choices=COMPRESSIONS, default=None, help="per-block compression (default none)")
    p.add_argument("--hash", choices=HASHES, default=None,
                   help=f"block hash of a new volume (default {DEFAULT_HASH}; an existing volume keeps its own)")
    p.add_argument("--force", action="store_true", help="update the settings of an existing volume")

    p = sub.add_parser("import", help="copy a local directory or file into the volume")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("source", metavar="SOURCE", help="local directory or file")
    p.add_argument("dest", metavar="DEST", help="absolute path inside the volume, e.g. /llama-3-8b")
    p.add_argument("--threads", type=positive_int, default=16, help="blocks processed in parallel (default 16)")
    p.add_argument("--checksum", action="store_true", help="re-read files whose size and mtime are unchanged")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    add_options(p, STORE_OPTIONS)

    p = sub.add_parser("mount", help="mount a volume with FUSE")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_options(p, MOUNT_OPTIONS)  # every one is handed on to a background daemon
    p.add_argument("--background", "-d", action="store_true", help="return once mounted; serve in the background")
    p.add_argument("--log-file", default=None, help="log file of a background mount")
    p.add_argument("--pid-file", default=None, help="with --background: write the daemon's pid here once mounted")
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
    CACHE_DIR.add_to(p, help=f"cache directory, as for mount (default {default_cache_dir()}); not with a "
                             "mount's paths")
    CACHE_SIZE.add_to(p, default=None, help=f"the cache size the node's mounts use (default "
                                            f"{DEFAULT_CACHE_SIZE >> 30}G); not with a mount's paths")
    FREE_SPACE_RATIO.add_to(p, default=None, help="keep this fraction of each cache disk free (default 0.1); not "
                                                  "with a mount's paths")
    p.add_argument("--threads", type=positive_int, default=32, help="blocks downloaded in parallel (default 32)")
    p.add_argument("--file-images", default=None, metavar="PATTERNS",
                   help="without a mount: warm the files whose names match these comma-separated patterns (e.g. "
                        "'*.safetensors') as whole-file images, which mounts pass through to the kernel from the "
                        "first open, rather than as block entries (default: none). A file being filled when the "
                        "warmup stops is filled again by the next one; a mount reading the model meanwhile may "
                        "fetch some blocks too. A mount's paths follow that mount (images on the native "
                        "transport)")
    add_options(p, PEER_OPTIONS)  # without a mount: fetch from peers first, and serve them while warming
    p.add_argument("--wait", action="store_true",
                   help="try blocks that failed again (backing off up to 30 s) until every one is cached: exit 0 "
                        "means the model is on this node (an init container's gate)")
    p.add_argument("--timeout", type=duration, default=None, metavar="DURATION",
                   help="give up after this long (90s, 30m, 1h) and exit 1 saying how much is cached (what is "
                        "cached stays; running it again resumes)")
    p.add_argument("--keep-serving", action="store_true",
                   help="with --peer-listen: once every block is cached, go on serving peers until SIGTERM or "
                        "Ctrl-C (exit 0), so a node pool warming together stays seeded (a warmup DaemonSet)")
    p.add_argument("--check", action="store_true", help="report how much of each path is cached; download nothing")
    p.add_argument("--evict", action="store_true", help="remove the paths' blocks from the cache")
    p.add_argument("--force", action="store_true", help="warm what fits even if the paths exceed the cache")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_options(p, STORE_OPTIONS)

    p = sub.add_parser("csi", help="serve the Kubernetes CSI node plugin csi.chunkfs.io on a unix socket")
    p.add_argument("--endpoint", default="unix:///csi/csi.sock", help="gRPC socket (default unix:///csi/csi.sock)")
    p.add_argument("--node-id", default=os.environ.get("NODE_NAME"),
                   help="this node's name, as kubelet knows it (default $NODE_NAME)")
    p.add_argument("--state-dir", default="/run/chunkfs/csi",
                   help="where staged volumes are recorded, so a restarted plugin re-adopts them "
                        "(default /run/chunkfs/csi)")
    p.add_argument("--check-interval", type=float, default=5.0,
                   help="seconds between checks that every mount daemon is alive (default 5)")
    for option in CSI_MOUNT_OPTIONS:  # handed to the mount of every volume the plugin stages
        text = (f"for every mount: block cache directory, repeat it or join with ':' (default {CSI_CACHE_DIR})"
                if option is CACHE_DIR else f"for every mount: {option.help}")
        option.add_to(p, help=text)

    p = sub.add_parser("stats", help="live view of a mount's throughput, cache hits and store requests")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between lines (default 1)")
    p.add_argument("--count", type=positive_int, default=None, help="stop after this many lines")

    p = sub.add_parser("umount", help="unmount a chunkfs mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", "-z", action="store_true", help="detach now even if busy (also clears dead mounts)")

    p = sub.add_parser("objbench", help="measure an object store's latency and throughput from this node")
    p.add_argument("storage", metavar="STORAGE_URL", help="e.g. s3://bucket/prefix or gs://bucket/prefix")
    p.add_argument("--block-size", type=size, default=DEFAULT_BLOCK_SIZE,
                   help=f"object size (default {DEFAULT_BLOCK_SIZE >> 20}M, the default block size)")
    p.add_argument("--objects", type=positive_int, default=64, help="objects per level (default 64)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default 1,8,32)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_options(p, STORE_OPTIONS)

    p = sub.add_parser("gc", help="delete block objects no file uses (after a grace period)")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted; delete nothing")
    p.add_argument("--grace", type=duration, default=3600.0,
                   help="keep blocks freed or written less than this long ago, e.g. 30m, 1h, 2d (default 1h; "
                        "at least 11m unless --force)")
    p.add_argument("--force", action="store_true",
                   help="accept a grace under 11m: blocks of files that writable mounts have open may be deleted")
    p.add_argument("--threads", type=positive_int, default=16, help="parallel deletes (default 16)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_options(p, STORE_OPTIONS)

    p = sub.add_parser("fsck", help="check that every file's blocks are in the store (changes nothing)")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("--check-content", action="store_true", help="also download every block and verify its hash")
    p.add_argument("--threads", type=positive_int, default=16, help="parallel downloads (default 16)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_options(p, STORE_OPTIONS)

    p = sub.add_parser("dump", help="write a volume's metadata as JSON Lines (to stdout or -o FILE)")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("--output", "-o", default="-", help="file to write (default stdout)")

    p = sub.add_parser("load", help="load a dump into an empty metadata engine (from stdin or -i FILE)")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("--input", "-i", default="-", help="file to read (default stdin)")

    p = sub.add_parser("snapshot", help="pin a directory tree as a read-only version (metadata only); "
                                        "list or delete snapshots",
                       description="chunkfs snapshot META SRC DST copies the tree SRC as the read-only "
                                   "directory DST (no block is copied); --list shows every snapshot; "
                                   "--delete DST removes one (gc then collects blocks nothing else uses).")
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("paths", nargs="*", metavar="PATH", help="SRC DST: volume paths, e.g. /llama /llama@v1")
    p.add_argument("--list", action="store_true", help="list every snapshot")
    p.add_argument("--delete", metavar="PATH", help="delete the snapshot at this volume path")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("profile", help="show, delete or record a model directory's access profile (the order "
                                       "its loader reads blocks; mounts and warmups fetch in that order)",
                       description="chunkfs profile show META /llama; chunkfs profile delete META /llama; "
                                   "chunkfs profile record META /llama -- python load.py {} (an argument {} "
                                   "becomes the directory's path in a temporary read-only mount that records the "
                                   "load)")
    p.add_argument("action", choices=("show", "delete", "record"))
    p.add_argument("meta", metavar="META_URL")
    p.add_argument("path", metavar="PATH", help="the model directory in the volume, e.g. /llama-3-8b")
    p.add_argument("program", nargs="*", metavar="-- COMMAND",
                   help="record: -- COMMAND ARGS... that loads the model")
    p.add_argument("--json", action="store_true", help="show: machine-readable output")
    p.add_argument("--cache-dir", action="append", metavar="DIR", help="record: the mount's cache directory")

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
    # The data paths allocate many short-lived objects per request (botocore's above all) and
    # make few cycles: keep what start-up loaded out of the collector's scans, and collect
    # the young generation less often.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    handlers = {
        "format": commands.cmd_format,
        "import": commands.cmd_import,
        "status": commands.cmd_status,
        "snapshot": commands.cmd_snapshot,
        "profile": profile.cmd_profile,
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


def one_line(message: str) -> str:
    """An error message on one line: a library's multi-line text joined with '; '."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        try:
            code = run(argv)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    except ChunkfsError as exc:
        print(f"chunkfs: {one_line(str(exc))}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("chunkfs: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 141
    except Exception as exc:
        if debug:
            raise
        print(f"chunkfs: internal error: {type(exc).__name__}: {one_line(str(exc))} (rerun with --debug for details)",
              file=sys.stderr)
        code = EXIT_INTERNAL
    sys.exit(code)

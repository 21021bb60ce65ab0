"""csi: run the Kubernetes CSI node plugin (the ``csi`` package) from the chunkfs CLI."""

from __future__ import annotations

import argparse

from chunkfs.cli.mount import cache_dirs
from chunkfs.errors import ChunkfsError, UsageError
from chunkfs.units import parse_size


def cmd_csi(args: argparse.Namespace) -> int:
    if not args.node_id:
        raise UsageError("--node-id is required (or set NODE_NAME)")
    if args.check_interval <= 0:
        raise UsageError("--check-interval must be positive")
    parse_size(args.cache_size)  # a bad size fails here, not in every mount
    try:
        from csi.mounter import DaemonSettings
        from csi.plugin import serve
    except ImportError as exc:
        raise ChunkfsError(f"the CSI plugin needs gRPC: pip install 'chunkfs[csi]' ({exc})") from None
    dirs = tuple(cache_dirs(args.cache_dir or ["/var/cache/chunkfs"]))
    settings = DaemonSettings(dirs, args.cache_size, ("--verify-cache", args.verify_cache))
    serve(args.endpoint, args.node_id, args.state_dir, settings, args.check_interval)
    return 0

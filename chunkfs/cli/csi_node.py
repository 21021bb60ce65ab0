"""csi: run the Kubernetes CSI node plugin (the ``csi`` package) from the chunkfs CLI."""

from __future__ import annotations

import argparse

from chunkfs.cli.options import CSI_MOUNT_OPTIONS, cache_dirs, to_argv
from chunkfs.errors import ChunkfsError, UsageError

#: where the plugin's mounts keep their node cache unless --cache-dir says otherwise
CSI_CACHE_DIR = "/var/cache/chunkfs"


def mount_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``chunkfs mount`` options of every volume the plugin stages: its own mount options
    (``CSI_MOUNT_OPTIONS``) as given, in command-line form."""
    args.cache_dir = cache_dirs(args.cache_dir, CSI_CACHE_DIR)
    return tuple(to_argv(args, CSI_MOUNT_OPTIONS))


def cmd_csi(args: argparse.Namespace) -> int:
    if not args.node_id:
        raise UsageError("--node-id is required (or set NODE_NAME)")
    if args.check_interval <= 0:
        raise UsageError("--check-interval must be positive")
    if args.io_timeout <= 0:
        raise UsageError("--io-timeout must be positive")
    try:
        from csi.mounter import DaemonSettings
        from csi.plugin import serve
    except ImportError as exc:
        raise ChunkfsError(f"the CSI plugin needs gRPC: pip install 'chunkfs[csi]' ({exc})") from None
    serve(args.endpoint, args.node_id, args.state_dir, DaemonSettings(mount_args(args)), args.check_interval)
    return 0

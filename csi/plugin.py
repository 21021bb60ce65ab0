"""``chunkfs csi``: serve the Identity and Node services on a unix socket, and supervise.

Start-up re-adopts every volume in the state directory: live mounts are kept as they are
(their daemons run in their own sessions, so a plugin restart does not touch them); dead ones
are brought back and their targets re-bound. A supervisor thread repeats that check every
``check_interval`` seconds, so a mount daemon that dies (OOM kill, crash) is replaced without
restarting the pods that use it. SIGTERM stops serving and leaves the mounts running.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from chunkfs import __version__
from chunkfs.errors import ChunkfsError, UsageError
from csi import csi_pb2_grpc
from csi.mounter import DaemonSettings
from csi.node import ChunkfsController, ChunkfsIdentity, ChunkfsNode
from csi.state import StateStore

log = logging.getLogger(__name__)


def socket_path(endpoint: str) -> str:
    """``unix:///csi/csi.sock`` (or ``unix:/csi/csi.sock``, or a bare path) -> ``/csi/csi.sock``."""
    path = endpoint.removeprefix("unix://") if endpoint.startswith("unix://") else endpoint.removeprefix("unix:")
    if not path.startswith("/"):
        raise UsageError(f"--endpoint must be a unix socket like unix:///csi/csi.sock, not {endpoint!r}")
    return path


def readiness_problem() -> str | None:
    """Why this node cannot mount chunkfs volumes, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (the plugin container must be privileged)"
    for tool in ("fusermount3", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed in the plugin image"
    return None


def serve(endpoint: str, node_id: str, state_dir: str, settings: DaemonSettings, check_interval: float) -> None:
    path = socket_path(endpoint)
    state = StateStore(state_dir)
    node = ChunkfsNode(node_id, state, settings)
    log.info("re-adopting %d staged volumes from %s", len(node.records), state_dir)
    node.check_all()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by a plugin that was killed
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    csi_pb2_grpc.add_IdentityServicer_to_server(ChunkfsIdentity(__version__, readiness_problem), server)
    csi_pb2_grpc.add_NodeServicer_to_server(node, server)
    csi_pb2_grpc.add_ControllerServicer_to_server(ChunkfsController(), server)
    if server.add_insecure_port(f"unix://{path}") == 0:
        raise ChunkfsError(f"cannot listen on {path}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    log.info("csi.chunkfs.io %s serving on %s for node %s", __version__, path, node_id)
    try:
        while not stop.wait(check_interval):
            node.check_all()
    finally:
        server.stop(grace=5).wait()
        log.info("stopped; mount daemons keep running")

"""Peers for one process: settings from the command line, then the member list, the client
and (for a mount with ``--peer-listen``) the server.

Layer: ``peer/``; the CLI builds ``PeerSettings``, the mount and the warmup call ``open_peers``.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from chunkfs.cache.block_cache import BlockCache
from chunkfs.errors import ChunkfsError, UsageError
from chunkfs.metrics import Metrics
from chunkfs.peer import auth
from chunkfs.peer.client import DEFAULT_BASE_TIMEOUT_S, PeerClient
from chunkfs.peer.membership import Membership, PeerRegistry, check_address, host_port, membership
from chunkfs.peer.server import Load, PeerServer, tls_context
from chunkfs.read.fetcher import BlockFetcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerSettings:
    peers: str | None = None  # --peers; None with a listener means "meta"
    secret_file: str | None = None
    ca: str | None = None
    timeout: float = DEFAULT_BASE_TIMEOUT_S
    listen: str | None = None
    advertise: str | None = None
    max_uploads: int = 8
    max_rate: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PeerSettings | None:
        """The settings of ``args``, or None when they ask for no peers at all."""
        def get(name: str, default: Any = None) -> Any:
            return getattr(args, name, default)

        settings = cls(peers=get("peers"), secret_file=get("peer_secret_file"), ca=get("peer_ca"),
                       timeout=float(DEFAULT_BASE_TIMEOUT_S if get("peer_timeout") is None else get("peer_timeout")),
                       listen=get("peer_listen"), advertise=get("peer_advertise"),
                       max_uploads=int(get("peer_max_uploads", 8) or 8), max_rate=int(get("peer_max_rate", 0) or 0),
                       tls_cert=get("peer_tls_cert"), tls_key=get("peer_tls_key"))
        if settings.peers is None and settings.listen is None:
            for flag, value in (("--peer-advertise", settings.advertise), ("--peer-tls-cert", settings.tls_cert),
                                ("--peer-tls-key", settings.tls_key), ("--peer-ca", settings.ca)):
                if value:
                    raise UsageError(f"{flag} needs --peers or --peer-listen")
            return None
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise UsageError("--peer-tls-cert and --peer-tls-key go together")
        if settings.timeout <= 0:
            raise UsageError("--peer-timeout must be positive")
        return settings

    @property
    def spec(self) -> str:
        return self.peers or "meta"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.ca)


def own_address(listen: str, port: int, advertise: str | None) -> str:
    """The address other nodes reach this one at."""
    if advertise:
        return check_address(advertise)
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = os.environ.get("POD_IP", "") or _primary_ip()
    return host_port(host, port)


def _primary_ip() -> str:
    """The address of the interface with the default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks a route
            return str(probe.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


class Peers:
    """What one process runs for peers: the member list, the client, maybe the server."""

    def __init__(self, membership: Membership, client: PeerClient, server: PeerServer | None) -> None:
        self.membership = membership
        self.client = client
        self.server = server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.membership.close()
        self.client.close()


def open_peers(settings: PeerSettings, volume_uuid: str, registry: PeerRegistry | None, metrics: Metrics,
               *, connections: int = 32) -> Peers:
    """Load the secret, bind the listener (if any), and start the member list. The server is
    returned unstarted (``Peers.server.load`` is set and ``start`` called by the mount once
    its event loop runs)."""
    secret = auth.load_secret(settings.secret_file)
    node_token = secrets.token_hex(16)
    server = None
    own = None
    if settings.listen:
        host, _, port = settings.listen.rpartition(":")
        context: ssl.SSLContext | None = None
        if settings.tls_cert and settings.tls_key:
            try:
                context = tls_context(settings.tls_cert, settings.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"cannot load --peer-tls-cert/--peer-tls-key: {exc}") from None
        try:
            server = PeerServer((host.strip("[]") or "0.0.0.0", int(port)), volume_uuid, secret, None, metrics,
                                max_uploads=settings.max_uploads, max_rate=settings.max_rate, tls=context,
                                node_token=node_token)
        except OSError as exc:
            raise ChunkfsError(f"cannot serve peers on {settings.listen}: {exc.strerror}") from None
        own = own_address(settings.listen, server.port, settings.advertise)
    members = membership(settings.spec, own, registry)
    client = PeerClient(members, volume_uuid, secret, metrics, tls=settings.tls, ca_file=settings.ca,
                        connections=connections, base_timeout=settings.timeout, node_token=node_token)
    members.start()
    log.info("peers: %s%s", members.describe, f", serving as {own}" if own else "")
    return Peers(members, client, server)


def serve_cache(peers: Peers, cache: BlockCache, load: Load | None) -> None:
    """Start answering peers from ``cache`` (and ``load`` for blocks this node owns)."""
    if peers.server is not None:
        peers.server.cache = cache
        peers.server.load = load
        peers.server.start()


def owner_load(fetcher: BlockFetcher) -> Load:
    """For the peer server's threads: put a block this node owns in its cache (one download
    on the node however many peers ask), outside the fetcher's download slots, which this
    node's own downloads may hold while they wait on other owners; whether it is there."""
    return fetcher.load_for_peer

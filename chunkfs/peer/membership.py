"""Who the peers are: a static list, a DNS name (a Kubernetes headless Service) or the volume's
metadata engine, where serving nodes register themselves with a TTL.

Layer: ``peer/``; sees the metadata engine only through ``PeerRegistry`` (three methods).

``--peers`` takes one of:

- ``meta`` (the default when ``--peer-listen`` is given): each serving node writes its address
  into the volume's metadata with an expiry and refreshes it; a node that dies drops out when
  its entry expires. It needs nothing but what every node already has (the volume), works the
  same on and off Kubernetes, and sees exactly the nodes serving this volume.
- ``dns:NAME:PORT``: the addresses ``NAME`` resolves to (a headless Service lists its ready
  pods), each with ``PORT``. No metadata writes; the Service decides who is in.
- ``HOST:PORT,HOST:PORT,...``: a fixed list.

Invariants: ``members()`` never blocks on the network (it answers the last list a background
thread fetched), never raises, and includes this node's own address when it serves, so every
node computes the same owners. A source that fails keeps the last list it had.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from chunkfs.errors import ChunkfsError, UsageError

log = logging.getLogger(__name__)

#: seconds between refreshes of the member list (and of this node's registration)
REFRESH_S = 5.0
#: seconds a registration lives without a refresh: a dead node drops out after this
TTL_S = 20.0


class PeerRegistry(Protocol):
    """The part of a metadata engine that keeps serving peers (``MetaStore``)."""

    def register_peer(self, address: str, expires_ns: int) -> None: ...

    def drop_peer(self, address: str) -> None: ...

    def live_peers(self, now_ns: int) -> list[str]: ...


def check_address(text: str) -> str:
    """``HOST:PORT`` as given (``UsageError`` if malformed); IPv6 hosts in brackets."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/?#@ "):
        raise UsageError(f"expected a peer address HOST:PORT, got {text!r}")
    return f"{host}:{int(port)}"


class Membership:
    """The live peers of one node (``members``), kept fresh by a background thread."""

    def __init__(self, fetch: Callable[[], list[str]], describe: str, own: str | None = None, *,
                 register: Callable[[], None] | None = None, unregister: Callable[[], None] | None = None,
                 refresh_s: float = REFRESH_S) -> None:
        self._fetch = fetch
        self.describe = describe
        self.own = own
        self._register = register
        self._unregister = unregister
        self.refresh_s = refresh_s
        self._members: list[str] = [own] if own else []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def members(self) -> list[str]:
        return self._members

    def refresh(self) -> None:
        """Register (when serving) and fetch the list once; failures are logged, not raised."""
        try:
            if self._register is not None:
                self._register()
            found = {check_address(a) for a in self._fetch()}
        except Exception as exc:  # a registry or resolver failing must not take the node down
            log.warning("peers (%s): keeping %d known: %s", self.describe, len(self._members), exc)
            return
        if self.own:
            found.add(self.own)
        members = sorted(found)
        if members != self._members:
            log.info("peers (%s): %d live: %s", self.describe, len(members), ", ".join(members[:8]))
        self._members = members

    def start(self) -> Membership:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="peer-membership", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._unregister is not None:
            try:
                self._unregister()
            except (ChunkfsError, OSError) as exc:
                log.warning("peers: could not unregister %s: %s", self.own, exc)


def host_port(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def static_members(addresses: list[str]) -> Callable[[], list[str]]:
    fixed = [check_address(a) for a in addresses]
    return lambda: fixed


def dns_members(name: str, port: int) -> Callable[[], list[str]]:
    def resolve() -> list[str]:
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ChunkfsError(f"cannot resolve {name}: {exc.strerror}") from None
        hosts = {str(info[4][0]) for info in infos}
        return [host_port(h, port) for h in hosts]
    return resolve


def membership(spec: str, own: str | None, registry: PeerRegistry | None, *,
               refresh_s: float = REFRESH_S, ttl_s: float = TTL_S) -> Membership:
    """The ``Membership`` a ``--peers`` value names (see the module docstring). ``own``: this
    node's advertised address when it serves peers (registered with ``meta``)."""
    spec = spec.strip()
    if spec == "meta":
        if registry is None:
            raise UsageError("--peers meta needs the volume's metadata engine")
        reg = registry

        def register() -> None:
            if own:
                reg.register_peer(own, time.time_ns() + int(ttl_s * 1e9))

        def unregister() -> None:
            if own:
                reg.drop_peer(own)

        return Membership(lambda: reg.live_peers(time.time_ns()), "metadata", own, register=register,
                          unregister=unregister, refresh_s=refresh_s)
    if spec.startswith("dns:"):
        name, sep, port = spec[4:].rpartition(":")
        if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--peers dns:NAME:PORT expected, got {spec!r}")
        return Membership(dns_members(name, int(port)), f"dns {name}", own, refresh_s=refresh_s)
    addresses = [a for a in spec.split(",") if a.strip()]
    if not addresses:
        raise UsageError("--peers: expected meta, dns:NAME:PORT or HOST:PORT[,HOST:PORT...]")
    return Membership(static_members(addresses), "static list", own, refresh_s=refresh_s)


def check_spec(spec: str) -> str:
    """``spec`` stripped, if it is a valid ``--peers`` value; ``UsageError`` otherwise."""
    spec = spec.strip()
    if spec != "meta":
        membership(spec, None, None)  # parses; starts nothing
    return spec

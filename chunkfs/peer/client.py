"""PeerClient: a block from the peer that owns it, before the object store.

Layer: ``peer/``. ``BlockDownload`` asks ``fetch`` first; False means "use the store". It
sees the bytes only as a ``Sink`` (``BlockSink``: decodes, verifies against the block id and
writes the cache entry on the way), exactly as a store GET would deliver them.

Invariants:

- A peer is never trusted: its body goes through the same sink and check as the store's, and
  nothing is kept unless the whole block matches its id. A peer that sends bytes that fail
  the check is not asked again for ``BAD_PEER_S`` seconds; one that is down, refuses or is
  too slow (silent for ``base_timeout``, or a body not done within ``base_timeout`` plus the
  block's length at ``min_rate``) for ``DOWN_PEER_S`` seconds (``REFUSED_PEER_S`` when it
  refused the connection: nothing listens yet). An owner loading the block
  for us is not silent: it sends interim answers while it loads.
- A busy owner (503: every upload slot taken, after the request queued for one) has the block
  and is serving the fleet: it is asked again ``BUSY_RETRY_S`` later, until the block's
  deadline (``deadline``) has passed since the first request, rather than fetching from the
  store what the fleet already holds (each such retry counts as ``busy``).
- A read never fails because of a peer: every failure is counted and answered with False.
- At most ``tries`` peers are asked per block, in rendezvous order; when this node is the
  first in that order, it is the owner and goes to the store itself (and then holds the block
  for the others) after asking the next live peers in that order (up to ``tries`` in all) for
  the block only if they hold it already (``held=1``: such a peer answers 404 rather than load
  it). Those are the peers its askers turned to, or that went to the store themselves, while
  this node was not up yet (a fleet whose nodes start seconds apart), so a late owner does not
  fetch from the store what the fleet already has. The 404 is the usual answer and counts as
  no error.
- Loads a node makes to answer a peer (``ORIGIN_ONLY`` set) never ask peers in turn, so a
  request cannot travel in circles between nodes whose member lists differ.
"""

from __future__ import annotations

import contextvars
import http.client
import logging
import secrets
import threading
import time
from typing import Any

import urllib3

from chunkfs.metrics import Metrics
from chunkfs.peer import auth
from chunkfs.peer.membership import Membership
from chunkfs.peer.ring import owners
from chunkfs.store.base import BodyRejected, Sink
from chunkfs.store.http_body import direct_readinto

log = logging.getLogger(__name__)

#: set while a node loads a block to answer a peer: that load goes to the store
ORIGIN_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("chunkfs_peer_origin_only", default=False)
#: seconds a peer that answered bytes failing their check is skipped
BAD_PEER_S = 300.0
#: seconds a peer that was down, refused or too slow is skipped
DOWN_PEER_S = 10.0
#: seconds a peer that refused the connection is skipped: a member still starting (its pod is
#: listed before it listens) costs a few blocks from the store, not ten seconds' worth
REFUSED_PEER_S = 1.0
#: seconds before a busy owner (503) is asked again
BUSY_RETRY_S = 0.5
CONNECT_TIMEOUT_S = 2.0
#: seconds an owner waits for the first answer to a ``held=1`` ask (the peer answers such an
#: ask at once: 404, 503 or the block), so a stalled peer costs the owner's own blocks little
HELD_ANSWER_S = 1.0
DEFAULT_BASE_TIMEOUT_S = 10.0
#: header naming the asking process (a random token): a server that finds its own answers 508
NODE_HEADER = "X-Chunkfs-Node"
DEFAULT_MIN_RATE = 8 << 20  # bytes/s a peer must sustain beyond the base timeout


def _caused_by(exc: BaseException, *kinds: type[BaseException]) -> bool:
    """``exc`` is, or was caused by, one of ``kinds`` (urllib3 wraps the socket's error in
    ``__cause__``/``__context__`` or in its second argument, once or twice)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, kinds):
            return True
        wrapped = seen.args[1] if len(seen.args) > 1 and isinstance(seen.args[1], BaseException) else None
        seen = seen.__cause__ or seen.__context__ or wrapped
    return False


def _refused(exc: BaseException) -> bool:
    """The peer's host answered that nothing listens there (not a timeout)."""
    return _caused_by(exc, ConnectionRefusedError)


def _closed_unanswered(exc: BaseException) -> bool:
    """The peer closed the connection before answering at all (not a timeout, not a refusal)."""
    return _caused_by(exc, http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class PeerFailed(Exception):
    def __init__(self, reason: str, message: str, *, hold_off: float = DOWN_PEER_S) -> None:
        super().__init__(message)
        self.reason = reason
        self.hold_off = hold_off


def block_path(volume_uuid: str, bid: bytes) -> str:
    return f"/v1/volumes/{volume_uuid}/blocks/{bid.hex()}"


class PeerClient:
    def __init__(self, membership: Membership, volume_uuid: str, secret: bytes, metrics: Metrics, *,
                 tls: bool = False, ca_file: str | None = None, connections: int = 32, tries: int = 2,
                 base_timeout: float = DEFAULT_BASE_TIMEOUT_S, min_rate: int = DEFAULT_MIN_RATE,
                 node_token: str | None = None) -> None:
        """``node_token``: names this process in every request (``NODE_HEADER``; random if
        None): the peer server of the same process is given it too."""
        self.membership = membership
        self.volume_uuid = volume_uuid
        self._secret = secret
        self.metrics = metrics
        self.scheme = "https" if tls else "http"
        self.tries = tries
        self.base_timeout = base_timeout
        self.min_rate = min_rate
        tls_args: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED", "ca_certs": ca_file} if tls else {}
        self._pool = urllib3.PoolManager(num_pools=256, maxsize=connections, retries=False, **tls_args)
        self._skip_until: dict[str, float] = {}
        self._lock = threading.Lock()
        #: sent with every request; this process's peer server answers it with 508
        self.node_token = node_token or secrets.token_hex(16)
        self._selves: set[str] = set()  # members that turned out to be this process (508)

    # -- which peers ---------------------------------------------------------------------------
    def candidates(self, bid: bytes) -> list[tuple[str, bool]]:
        """The peers to ask for ``bid``, in order, each with whether it is asked only for a
        block it holds (empty: none is up)."""
        now = time.monotonic()
        out: list[tuple[str, bool]] = []
        owning = False
        for peer in owners(bid, self.membership.members()):
            if peer == self.membership.own or peer in self._selves:
                owning = True  # this node owns it (or takes over from those skipped): the store,
                continue  # but first the next peers, should they hold the block already
            if self._skip_until.get(peer, 0.0) > now:
                continue
            out.append((peer, owning))
            if len(out) == self.tries:
                break
        return out

    def _is_self(self, peer: str) -> None:
        with self._lock:
            if peer in self._selves:
                return
            self._selves.add(peer)
        log.info("peer %s is this node: its blocks are fetched from the store, as this node's own", peer)

    def _hold_off(self, peer: str, seconds: float) -> None:
        with self._lock:
            self._skip_until[peer] = max(self._skip_until.get(peer, 0.0), time.monotonic() + seconds)

    # -- fetching ------------------------------------------------------------------------------
    def fetch(self, bid: bytes, length: int, sink: Sink, buffer: memoryview) -> bool:
        """Stream ``bid`` from its owner into ``sink`` and have it verified (blocking): True
        if a peer delivered the whole, verified block; False: use the store."""
        if ORIGIN_ONLY.get():
            return False
        give_up = time.monotonic() + self.deadline(length)
        for peer, held_only in self.candidates(bid):
            while True:
                try:
                    self._get(peer, bid, length, sink, buffer, held_only=held_only)
                except PeerFailed as exc:
                    if exc.reason == "not_held":
                        break
                    if exc.reason == "self":
                        self._is_self(peer)
                        break
                    self.metrics.peer_errors.labels(exc.reason).inc()
                    log.info("peer %s: block %s: %s", peer, bid.hex()[:16], exc)
                    if exc.reason == "busy" and time.monotonic() + BUSY_RETRY_S < give_up:
                        time.sleep(BUSY_RETRY_S)
                        continue
                    if exc.hold_off:
                        self._hold_off(peer, exc.hold_off)
                    break
                self.metrics.peer_fetched_blocks.inc()
                self.metrics.peer_fetched_bytes.inc(length)
                return True
        return False

    def deadline(self, length: int) -> float:
        return self.base_timeout + length / self.min_rate

    def _request(self, peer: str, query: str, headers: dict[str, str], held_only: bool = False) -> Any:
        """The response's head. A pooled keep-alive connection the peer closed as it was
        reused (it closes idle ones after its request timeout) fails before any answer: the
        request is sent once more, on a new connection, and does not count against the peer."""
        # the read timeout is per socket read: an owner loading the block for us sends an
        # interim answer every few seconds (server.HEARTBEAT_S), so only silence times out
        timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT_S,
                                  read=min(self.base_timeout, HELD_ANSWER_S) if held_only else self.base_timeout)
        url = f"{self.scheme}://{peer}{query}"
        for last in (False, True):
            try:
                return self._pool.request("GET", url, headers=headers, preload_content=False, redirect=False,
                                          timeout=timeout)
            except urllib3.exceptions.ProtocolError as exc:
                if last or not _closed_unanswered(exc):
                    raise
        raise AssertionError("unreachable")  # the second try returns or raises

    def _get(self, peer: str, bid: bytes, length: int, sink: Sink, buffer: memoryview, *,
             held_only: bool = False) -> None:
        path = block_path(self.volume_uuid, bid)
        query = f"{path}?length={length}" + ("&held=1" if held_only else "")
        headers = {"Authorization": auth.sign(self._secret, "GET", query), NODE_HEADER: self.node_token}
        try:
            response = self._request(peer, query, headers, held_only)
        except urllib3.exceptions.NewConnectionError as exc:  # (a ConnectTimeoutError to urllib3)
            raise PeerFailed("unreachable", f"cannot connect: {exc}",
                             hold_off=REFUSED_PEER_S if _refused(exc) else DOWN_PEER_S) from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise PeerFailed("timeout", f"silent for {self.base_timeout:.1f} s") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise PeerFailed("unreachable", f"{type(exc).__name__}: {exc}") from exc
        whole = False
        try:
            if response.status == 508 and response.headers.get(NODE_HEADER) == self.node_token:
                raise PeerFailed("self", "is this process", hold_off=0.0)
            if response.status == 503:  # busy: it holds the block (asked again, see fetch)
                raise PeerFailed("busy", "answered 503: every upload slot is taken", hold_off=0.0)
            if response.status == 404 and held_only:
                raise PeerFailed("not_held", "does not hold it", hold_off=0.0)
            if response.status != 200:
                # without the block (404) says nothing about its other blocks
                hold = 0.0 if response.status == 404 else DOWN_PEER_S
                raise PeerFailed("refused", f"answered {response.status}", hold_off=hold)
            announced = response.headers.get("Content-Length")
            if announced != str(length):
                raise PeerFailed("corrupt", f"announced {announced} bytes for a block of {length}",
                                 hold_off=BAD_PEER_S)
            self._stream(response, length, sink, buffer, time.monotonic() + self.deadline(length))
            whole = True
        finally:
            if not whole:
                response.close()  # the connection may hold the rest of a body: never reuse it
            response.release_conn()
        try:
            sink.finish()
        except BodyRejected as exc:
            raise PeerFailed("corrupt", f"sent bytes that are not the block ({exc})", hold_off=BAD_PEER_S) from exc

    @staticmethod
    def _stream(response: Any, length: int, sink: Sink, buffer: memoryview, give_up: float) -> None:
        """Read the body into the sink piece by piece, straight from the ``http.client``
        response under urllib3's where it is there (``store/http_body.direct_readinto``:
        0.30-0.33 CPU-s/GiB here against 0.35-0.43 through urllib3's ``readinto``)."""
        sink.restart()
        got = 0
        readinto = direct_readinto(response) or response.readinto
        try:
            while got < length:
                if time.monotonic() > give_up:
                    raise PeerFailed("timeout", f"too slow: {got} of {length} bytes in time")
                want = min(len(buffer), length - got)
                target = sink.lend(want) or buffer[:want]
                n = readinto(target)
                if not n:
                    raise PeerFailed("unreachable", f"closed after {got} of {length} bytes")
                sink.write(target[:n])
                got += n
        except (urllib3.exceptions.TimeoutError, TimeoutError) as exc:
            raise PeerFailed("timeout", f"stalled after {got} of {length} bytes") from exc
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise PeerFailed("unreachable", f"{type(exc).__name__} after {got} of {length} bytes") from exc

    def close(self) -> None:
        self._pool.clear()

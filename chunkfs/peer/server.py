"""PeerServer: this node's verified cache blocks, over HTTP, to the other nodes of the fleet.

Layer: ``peer/``. Sees the node cache (``BlockCache``) and, to answer for a block it owns but
does not hold yet, one blocking ``load(bid, length)`` callable (the mount's fetcher: one
single-flight download per block however many peers ask; run with ``ORIGIN_ONLY`` so that
load never asks a peer in turn).

The protocol is one request: ``GET /v1/volumes/<volume uuid>/blocks/<64 hex>?length=<bytes>``
signed by ``auth.sign``. Answers: 200 with exactly ``length`` bytes (preceded by an interim ``100 Continue`` every
``HEARTBEAT_S`` while this node loads a block it owns for the asker); 401 (no valid signature,
checked first, with an empty body whatever else is wrong); 400 (malformed); 404 (another
volume, or a block this node neither holds nor could load; with ``held=1``, one it does not
hold, never loaded); 405 (any other method); 503 (all
upload slots stayed busy for ``BUSY_WAIT_S``: ask the store); 508 (the request came from
this very process, by its ``NODE_HEADER``: a member list naming this node under an address
it does not know as its own, such as ``127.0.0.1``; the asker then treats that member as
itself, instead of waiting on its own download of the block).

Invariants:

- Only whole entries the cache has verified (hashed or sealed by a chunkfs process) are sent,
  from an open file descriptor (``sendfile`` on plain HTTP), so an entry evicted meanwhile
  still goes out whole. The requester verifies them again anyway.
- Nothing but block bytes is served: no listing, metadata or file names; a block id is 64 hex
  digits, never a path.
- Bounded: at most ``max_connections`` connections (more are closed at once), ``max_uploads``
  blocks sent at a time (more wait up to ``BUSY_WAIT_S``, then get 503; a block being loaded
  for the asker holds no slot: the mount's fetcher bounds its own downloads),
  ``max_rate`` bytes/s over all uploads, and a request line and headers read within
  ``REQUEST_TIMEOUT_S``. Memory per connection is a
  thread and one 1 MiB buffer under TLS.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from chunkfs.blocks import HASH_LEN, MAX_BLOCK_SIZE
from chunkfs.cache.block_cache import BlockCache
from chunkfs.metrics import Metrics
from chunkfs.peer import auth
from chunkfs.peer.client import NODE_HEADER, ORIGIN_ONLY

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
#: seconds a request waits for an upload slot before it is told to use the store (503): a
#: short queue keeps a fleet's requests at their owners instead of spilling to the store
BUSY_WAIT_S = 3.0
SEND_PIECE = 1 << 20
#: seconds between the interim answers that tell an asker a block it asked for is being loaded
HEARTBEAT_S = 2.0
#: seconds a request waits for this node to load a block before it is answered 404
LOAD_WAIT_S = 120.0
_PATH = re.compile(rf"^/v1/volumes/([0-9a-f-]{{1,64}})/blocks/([0-9a-f]{{{2 * HASH_LEN}}})$")

Load = Callable[[bytes, int], bool]


class TokenBucket:
    """``rate`` bytes/s shared by every upload (0: unlimited), bursts up to one second's worth."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate) - n
            self._stamp = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


class PeerServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], volume_uuid: str, secret: bytes, cache: BlockCache | None,
                 metrics: Metrics, *, load: Load | None = None, max_uploads: int = 8, max_rate: int = 0,
                 max_connections: int = 256, tls: ssl.SSLContext | None = None, node_token: str = "") -> None:
        """``node_token``: this process's (``PeerClient.node_token``): a request carrying it
        is this process asking itself (508)."""
        self.node_token = node_token
        self.volume_uuid = volume_uuid
        self.secret = secret
        self.cache = cache
        self.metrics = metrics
        self.load = load
        self.uploads = threading.BoundedSemaphore(max_uploads)
        self.bucket = TokenBucket(max_rate)
        self.max_connections = max_connections
        self.tls = tls
        self._connections = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__(address, PeerHandler)

    @property
    def node_cache(self) -> BlockCache:
        if self.cache is None:
            raise RuntimeError("peer server started without a cache")
        return self.cache

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> PeerServer:
        self._thread = threading.Thread(target=self.serve_forever, name="peer-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    # -- bounded connections -------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
        if full:
            self.metrics.peer_refused.labels("connections").inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_done()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_done()

    def _connection_done(self) -> None:
        with self._lock:
            self._connections -= 1

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:  # the handshake runs in the connection's thread, not the accept loop
            request.settimeout(REQUEST_TIMEOUT_S)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.debug("peer TLS handshake with %s failed: %s", client_address, exc)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("peer connection from %s failed", client_address, exc_info=True)


class PeerHandler(BaseHTTPRequestHandler):
    server: PeerServer
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    server_version = "chunkfs-peer"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("peer %s: " + format, self.address_string(), *args)

    def _empty(self, status: int, reason: str, **headers: str) -> None:
        self.server.metrics.peer_refused.labels(reason).inc()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _authenticated(self) -> bool:
        if auth.check(self.server.secret, self.headers.get("Authorization"), self.command, self.path):
            return True
        self._empty(401, "unauthenticated")
        return False

    def do_GET(self) -> None:
        if not self._authenticated():
            return
        parts = urlsplit(self.path)
        match = _PATH.match(parts.path)
        query = parse_qs(parts.query)
        length_text = query.get("length", [""])[-1]
        if match is None or not length_text.isdigit() or not 0 < int(length_text) <= MAX_BLOCK_SIZE:
            self._empty(400, "malformed")
            return
        if match.group(1) != self.server.volume_uuid:
            self._empty(404, "other_volume")
            return
        if self.server.node_token and self.headers.get(NODE_HEADER) == self.server.node_token:
            self._empty(508, "self", **{NODE_HEADER: self.server.node_token})  # (echoed: the asker checks it)
            return
        bid, length = bytes.fromhex(match.group(2)), int(length_text)
        held_only = query.get("held", [""])[-1] == "1"  # an owner checking whether the fleet has it
        if not self._held(bid, length):
            if held_only:
                self._empty(404, "not_held")  # never loaded for such an ask
                return
            # loading takes no upload slot: the fetcher bounds and single-flights its downloads,
            # and while the store is the bottleneck a fleet's requests queue here, not at it
            load = self.server.load
            if load is None or not self._load_with_heartbeats(load, bid, length) or not self._held(bid, length):
                self._empty(404, "missing")
                return
        if not self.server.uploads.acquire(timeout=0 if held_only else BUSY_WAIT_S):  # held_only: answer at once
            self._empty(503, "busy", **{"Retry-After": "1"})
            return
        try:
            self._send_block(bid, length)
        finally:
            self.server.uploads.release()

    def _load_with_heartbeats(self, load: Load, bid: bytes, length: int) -> bool:
        """Load ``bid`` for the asker, sending it an interim ``100 Continue`` every
        ``HEARTBEAT_S`` meanwhile: a load queued behind a busy store is slow, not dead, and
        the asker's inactivity timeout only has to outlast a heartbeat. Gives up (False)
        after ``LOAD_WAIT_S``; the load itself goes on and keeps the block."""
        done = threading.Event()
        result: list[bool] = []

        def run() -> None:
            try:
                result.append(_origin_only(load, bid, length))
            finally:
                done.set()

        threading.Thread(target=run, name="peer-load", daemon=True).start()
        give_up = time.monotonic() + LOAD_WAIT_S
        while not done.wait(HEARTBEAT_S):
            if time.monotonic() > give_up:
                return False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # any HTTP/1.1 client skips 1xx answers
            self.wfile.flush()
        return bool(result and result[0])

    def _held(self, bid: bytes, length: int) -> bool:
        cache = self.server.node_cache
        return cache.is_verified(bid) or cache.in_image(bid) or cache.admit(bid, length, page_in=False)

    def _send_block(self, bid: bytes, length: int) -> None:
        """Send the block from its entry, or from its place in a file image this node holds."""
        source = self.server.node_cache.block_source(bid)
        if source is None:
            self._empty(404, "missing")
            return
        key, start, in_image = source
        if in_image is not None and in_image != length:
            self._empty(404, "missing")
            return
        cache = self.server.node_cache
        try:
            entry = open(cache.dir_for(key).path(key), "rb", buffering=0)  # noqa: SIM115
        except OSError:  # removed by another process: forgotten, so the next ask loads it again
            cache.drop(key)
            self._empty(404, "missing")
            return
        with entry:
            size = os.fstat(entry.fileno()).st_size
            whole = size == length if in_image is None else size >= start + length
            if not whole:
                self._empty(404, "missing")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.flush()
            sent = 0
            while sent < length:  # sendfile on plain HTTP; socket.sendfile copies under TLS
                n = min(SEND_PIECE, length - sent)
                self.server.bucket.take(n)
                done = self.connection.sendfile(entry, start + sent, n)
                if not done:
                    raise ConnectionError("the entry shrank while being sent")
                sent += done
        self.server.metrics.peer_served_blocks.inc()
        self.server.metrics.peer_served_bytes.inc(length)

    def _not_allowed(self) -> None:
        if self._authenticated():
            self._empty(405, "method", Allow="GET")

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


def _origin_only(load: Load, bid: bytes, length: int) -> bool:
    token = ORIGIN_ONLY.set(True)
    try:
        return load(bid, length)
    finally:
        ORIGIN_ONLY.reset(token)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context

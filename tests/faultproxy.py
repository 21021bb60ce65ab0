"""A fault-injecting HTTP proxy for an S3 server, on a free loopback port.

Each proxied request may, at configurable rates: be delayed (slow first byte), answered
with 503 SlowDown, have its connection reset, have its body truncated (the full
Content-Length is promised, fewer bytes are sent), or have one body byte flipped. Faults
apply to GETs of block objects only (``/blocks/`` in the path) unless ``all_requests``.

The Host header is forwarded unchanged, so SigV4 signatures made for the proxy's address
still verify at the server. Rates can be changed while a mount is reading.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("delay", "slowdown", "reset", "truncate", "bitflip")
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class FaultConfig:
    rate: float = 0.0  # probability that a block GET gets a fault
    kinds: tuple[str, ...] = FAULTS
    delay: float = 0.3
    all_requests: bool = False
    seed: int = 1
    counts: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    block_gets: int = 0  # GETs of block objects (the store-side download count)
    gets_by_block: dict[str, int] = field(default_factory=dict)  # block object path -> GETs
    get_order: list[str] = field(default_factory=list)  # block object paths, in the order GETs arrived
    get_spans: list[tuple[str, float, float]] = field(default_factory=list)  # (path, arrived, answered) per block GET
    connections: set = field(default_factory=set)  # client (host, port) pairs seen
    in_flight: int = 0
    max_in_flight: int = 0


class FaultProxy:
    def __init__(self, upstream: str, config: FaultConfig | None = None) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.config = config or FaultConfig()
        self._rng = random.Random(self.config.seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                cfg = proxy.config
                with proxy._lock:
                    cfg.connections.add(self.client_address)
                    cfg.in_flight += 1
                    cfg.max_in_flight = max(cfg.max_in_flight, cfg.in_flight)
                try:
                    proxy._proxy(self)
                finally:
                    with proxy._lock:
                        cfg.in_flight -= 1

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _pick_fault(self, method: str, path: str) -> str | None:
        cfg = self.config
        with self._lock:
            cfg.requests += 1
            block_get = method == "GET" and "/blocks/" in path
            if block_get:
                cfg.block_gets += 1
                key = path.split("?", 1)[0]
                cfg.gets_by_block[key] = cfg.gets_by_block.get(key, 0) + 1
                cfg.get_order.append(key)
            if not (cfg.all_requests or block_get):
                return None
            if self._rng.random() >= cfg.rate:
                return None
            kind = self._rng.choice(cfg.kinds)
            cfg.counts[kind] = cfg.counts.get(kind, 0) + 1
            return kind

    def _proxy(self, h: BaseHTTPRequestHandler) -> None:
        arrived = time.monotonic()
        self._answer(h)
        if h.command == "GET" and "/blocks/" in h.path:
            with self._lock:
                self.config.get_spans.append((h.path.split("?", 1)[0], arrived, time.monotonic()))

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        fault = self._pick_fault(h.command, h.path)
        if fault == "delay":
            time.sleep(self.config.delay)
        if fault == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if fault == "slowdown":
            h.send_response(503)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(_SLOWDOWN)))
            h.end_headers()
            h.wfile.write(_SLOWDOWN)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, resp_headers = resp.status, resp.getheaders()
        finally:
            conn.close()
        ok_body = h.command == "GET" and status in (200, 206) and data
        if fault == "bitflip" and ok_body:
            pos = self._rng.randrange(len(data))
            data = data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1:]
        h.send_response(status)
        for key, value in resp_headers:
            if key.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "truncate" and ok_body:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)

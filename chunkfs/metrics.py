"""Prometheus metrics of one mount (or one command), in a registry of its own.

Layer: a leaf. Components receive a ``Metrics`` object; nothing here is a module-level
global, so several mounts (or tests) in one process never mix their counts. prometheus-client
collectors are thread-safe: the trio thread and worker threads update them directly.

The names below are the public contract of ``--metrics`` and ``chunkfs stats``:

=========================================  =========  ============================================
name                                       type       meaning
=========================================  =========  ============================================
chunkfs_cache_hits_total                   counter    block reads served from the node (disk/memory)
chunkfs_cache_misses_total                 counter    block reads that waited for a download
chunkfs_cache_hit_bytes_total              counter    bytes of those hits
chunkfs_cache_miss_bytes_total             counter    bytes of those misses
chunkfs_cache_bytes                        gauge      bytes of block files this process indexes
chunkfs_cache_blocks                       gauge      block files this process indexes
chunkfs_cache_evictions_total              counter    block files removed to stay within limits
chunkfs_cache_write_errors_total           counter    blocks the cache could not store (full/failing)
chunkfs_cache_corrupt_total                counter    cache files dropped (wrong size or hash)
chunkfs_cache_entry_checks_total{how}      counter    entries from other processes admitted: by
                                                      ``seal`` (no read) or ``hash`` (read whole)
chunkfs_object_requests_total{op}          counter    object-store requests (each attempt)
chunkfs_object_request_bytes_total{op}     counter    bytes moved by them
chunkfs_object_errors_total{op}            counter    failed attempts
chunkfs_object_request_seconds{op}         histogram  latency of each attempt
chunkfs_fuse_ops_total{op}                 counter    FUSE requests
chunkfs_fuse_op_seconds{op}                histogram  time to answer them
chunkfs_fuse_read_bytes_total              counter    bytes returned by FUSE reads
chunkfs_passthrough_opens_total            counter    opens passed through to a file image (the
                                                      kernel reads it; native transport only)
chunkfs_file_images_total{outcome}         counter    file images for passthrough: filled as a cold
                                                      open waited (``filled``), built from blocks on
                                                      the node (``built``), or given up (``failed``)
chunkfs_readahead_blocks_total             counter    blocks fetched ahead of a sequential stream
chunkfs_readahead_wasted_blocks_total      counter    of those, never read before the file closed
chunkfs_prefetch_blocks_total              counter    blocks fetched by whole-file model prefetch
chunkfs_prefetch_wasted_blocks_total       counter    of those, never read before the file closed
chunkfs_origin_blocks_total                counter    blocks downloaded from the object store
chunkfs_origin_bytes_total                 counter    bytes of those blocks
chunkfs_peer_fetched_blocks_total          counter    blocks downloaded from peers (verified)
chunkfs_peer_fetched_bytes_total           counter    bytes of those blocks
chunkfs_peer_errors_total{reason}          counter    failed peer requests: ``timeout``,
                                                      ``unreachable``, ``refused`` (missing or
                                                      an error), ``corrupt`` (then the next peer
                                                      or the store), ``busy`` (asked again)
chunkfs_peer_served_blocks_total           counter    blocks this node sent to peers
chunkfs_peer_served_bytes_total            counter    bytes of those blocks
chunkfs_peer_requests_refused_total{reason}  counter  peer requests answered without a block:
                                                      ``unauthenticated``, ``malformed``, ``busy``,
                                                      ``missing``, ``other_volume``, ``method``,
                                                      ``connections``
=========================================  =========  ============================================
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import MetricsHandler

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.cache_hits = Counter("chunkfs_cache_hits", "Block reads served from the node", registry=r)
        self.cache_misses = Counter("chunkfs_cache_misses", "Block reads that waited for a download", registry=r)
        self.cache_hit_bytes = Counter("chunkfs_cache_hit_bytes", "Bytes of cache hits", registry=r)
        self.cache_miss_bytes = Counter("chunkfs_cache_miss_bytes", "Bytes of cache misses", registry=r)
        self.cache_bytes = Gauge("chunkfs_cache_bytes", "Bytes of block files indexed", registry=r)
        self.cache_blocks = Gauge("chunkfs_cache_blocks", "Block files indexed", registry=r)
        self.cache_evictions = Counter("chunkfs_cache_evictions", "Block files evicted", registry=r)
        self.cache_write_errors = Counter("chunkfs_cache_write_errors", "Blocks the cache could not store",
                                          registry=r)
        self.cache_corrupt = Counter("chunkfs_cache_corrupt", "Cache files dropped as damaged", registry=r)
        self.cache_entry_checks = Counter("chunkfs_cache_entry_checks", "Cache entries admitted before first use",
                                          ["how"], registry=r)
        self.object_requests = Counter("chunkfs_object_requests", "Object-store requests", ["op"], registry=r)
        self.object_bytes = Counter("chunkfs_object_request_bytes", "Object-store bytes", ["op"], registry=r)
        self.object_errors = Counter("chunkfs_object_errors", "Failed object-store requests", ["op"], registry=r)
        self.object_seconds = Histogram("chunkfs_object_request_seconds", "Object-store request latency", ["op"],
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.fuse_ops = Counter("chunkfs_fuse_ops", "FUSE requests", ["op"], registry=r)
        self.fuse_seconds = Histogram("chunkfs_fuse_op_seconds", "FUSE request latency", ["op"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.fuse_read_bytes = Counter("chunkfs_fuse_read_bytes", "Bytes returned by FUSE reads", registry=r)
        self.passthrough_opens = Counter("chunkfs_passthrough_opens", "Opens the kernel passes through to a file "
                                         "image (native transport)", registry=r)
        self.file_images = Counter("chunkfs_file_images", "File images made for passthrough, by outcome",
                                   ["outcome"], registry=r)
        self.readahead_blocks = Counter("chunkfs_readahead_blocks", "Blocks fetched by readahead", registry=r)
        self.readahead_wasted = Counter("chunkfs_readahead_wasted_blocks", "Readahead blocks never read",
                                        registry=r)
        self.prefetch_blocks = Counter("chunkfs_prefetch_blocks", "Blocks fetched by model prefetch", registry=r)
        self.prefetch_wasted = Counter("chunkfs_prefetch_wasted_blocks", "Prefetched blocks never read",
                                       registry=r)

        self.origin_blocks = Counter("chunkfs_origin_blocks", "Blocks downloaded from the object store", registry=r)
        self.origin_bytes = Counter("chunkfs_origin_bytes", "Bytes of blocks downloaded from the object store",
                                    registry=r)
        self.peer_fetched_blocks = Counter("chunkfs_peer_fetched_blocks", "Blocks downloaded from peers",
                                           registry=r)
        self.peer_fetched_bytes = Counter("chunkfs_peer_fetched_bytes", "Bytes of blocks downloaded from peers",
                                          registry=r)
        self.peer_errors = Counter("chunkfs_peer_errors", "Failed peer requests", ["reason"],
                                   registry=r)
        self.peer_served_blocks = Counter("chunkfs_peer_served_blocks", "Blocks sent to peers", registry=r)
        self.peer_served_bytes = Counter("chunkfs_peer_served_bytes", "Bytes of blocks sent to peers", registry=r)
        self.peer_refused = Counter("chunkfs_peer_requests_refused", "Peer requests answered without a block",
                                    ["reason"], registry=r)

    # -- object-store observer (``chunkfs.store.observed.RequestObserver``) -------------------
    def observe_request(self, op: str, seconds: float, nbytes: int, failed: bool) -> None:
        self.object_requests.labels(op).inc()
        self.object_seconds.labels(op).observe(seconds)
        if nbytes:
            self.object_bytes.labels(op).inc(nbytes)
        if failed:
            self.object_errors.labels(op).inc()

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; the caller shuts it down."""
        handler = MetricsHandler.factory(self.registry)
        server = ThreadingHTTPServer((host, port), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT``, meaning loopback) -> (host, port); ValueError if malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:9567, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)

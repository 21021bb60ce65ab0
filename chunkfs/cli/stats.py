"""``chunkfs stats MOUNTPOINT``: one line per interval of a live mount's activity.

It reads the mount's ``.chunkfs-stats`` file (the daemon's Prometheus metrics, generated at
open) every interval and prints the differences: bytes read through FUSE, FUSE requests,
the cache hit ratio, object-store GETs (rate, bytes, mean latency, errors), blocks fetched
ahead, the cache's size, and the fleet cache: bytes from peers, bytes served to peers, and
peer fetches that failed over to the store.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from chunkfs.errors import ChunkfsError
from chunkfs.fuse.mountinfo import require_chunkfs_mount
from chunkfs.units import format_size

STATS_FILE = ".chunkfs-stats"
HEADER = (f"{'time':>8} {'read MiB/s':>10} {'ops/s':>7} {'hit %':>6} {'get/s':>6} {'get MiB/s':>9} "
          f"{'get ms':>7} {'errors':>6} {'ahead/s':>7} {'cache':>9} {'peer MiB/s':>10} {'served MiB/s':>12} "
          f"{'peer err':>8}")


@dataclass
class Sample:
    at: float
    values: dict[str, float]

    def get(self, name: str) -> float:
        return self.values.get(name, 0.0)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name (labels as ``name{k=v,...}``): value}; histogram
    buckets are left out (only their ``_sum`` and ``_count`` are used)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" in sample.labels:
                continue
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def read_sample(path: str) -> Sample:
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except OSError as exc:
        raise ChunkfsError(f"cannot read {path}: {exc.strerror}") from None
    return Sample(time.monotonic(), parse_metrics(text))


def format_line(prev: Sample, cur: Sample) -> str:
    dt = max(cur.at - prev.at, 1e-6)

    def rate(name: str) -> float:
        return (cur.get(name) - prev.get(name)) / dt

    def delta(name: str) -> float:
        return cur.get(name) - prev.get(name)

    fuse_ops = sum(v - prev.values.get(k, 0.0) for k, v in cur.values.items()
                   if k.startswith("chunkfs_fuse_ops_total{"))
    hits, misses = delta("chunkfs_cache_hits_total"), delta("chunkfs_cache_misses_total")
    hit = f"{100 * hits / (hits + misses):.0f}" if hits + misses else "-"
    gets = delta("chunkfs_object_requests_total{op=get}")
    get_seconds = delta("chunkfs_object_request_seconds_sum{op=get}")
    latency = f"{1000 * get_seconds / gets:.1f}" if gets else "-"
    ahead = rate("chunkfs_readahead_blocks_total") + rate("chunkfs_prefetch_blocks_total")
    peer_errors = sum(v - prev.values.get(k, 0.0) for k, v in cur.values.items()
                      if k.startswith("chunkfs_peer_errors_total{"))
    return (f"{time.strftime('%H:%M:%S'):>8} {rate('chunkfs_fuse_read_bytes_total') / 2**20:>10.1f} "
            f"{fuse_ops / dt:>7.0f} {hit:>6} {gets / dt:>6.1f} "
            f"{rate('chunkfs_object_request_bytes_total{op=get}') / 2**20:>9.1f} {latency:>7} "
            f"{delta('chunkfs_object_errors_total{op=get}'):>6.0f} {ahead:>7.1f} "
            f"{format_size(cur.get('chunkfs_cache_bytes')):>9} "
            f"{rate('chunkfs_peer_fetched_bytes_total') / 2**20:>10.1f} "
            f"{rate('chunkfs_peer_served_bytes_total') / 2**20:>12.1f} {peer_errors:>8.0f}")


def cmd_stats(args: argparse.Namespace) -> int:
    mountpoint = require_chunkfs_mount(args.mountpoint)
    if args.interval <= 0:
        raise ChunkfsError("--interval must be positive")
    path = os.path.join(mountpoint, STATS_FILE)
    prev = read_sample(path)
    lines = 0
    try:
        while args.count is None or lines < args.count:
            if lines % 20 == 0:
                print(HEADER)
            time.sleep(args.interval)
            cur = read_sample(path)
            print(format_line(prev, cur), flush=True)
            prev = cur
            lines += 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0

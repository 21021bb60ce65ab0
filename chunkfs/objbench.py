"""``chunkfs objbench``: measure an object store from this node.

PUTs then GETs ``objects`` objects of ``size`` bytes at each concurrency level, and
reports latency percentiles and throughput, so an operator can tell whether the store or
the node is the bottleneck. Objects live under ``objbench/<random>/`` and are deleted at
the end (also when interrupted); nothing else in the store is touched.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from chunkfs.store.base import ObjectStore


@dataclass(frozen=True)
class BenchRow:
    op: str
    concurrency: int
    count: int
    bytes: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.seconds / 2**20 if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "mib_per_s": round(self.mib_per_s, 1)}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_objbench(store: ObjectStore, *, size: int, objects: int, levels: list[int]) -> list[BenchRow]:
    prefix = f"objbench/{uuid.uuid4().hex[:12]}"
    payload = os.urandom(size)
    rows: list[BenchRow] = []
    written: list[str] = []
    try:
        for level in levels:
            keys = [f"{prefix}/{level}-{i}" for i in range(max(objects, level))]
            with ThreadPoolExecutor(level) as pool:
                for op, fn in (("put", lambda k: store.put(k, payload)), ("get", store.get)):
                    start = time.perf_counter()
                    latencies = sorted(pool.map(lambda k, fn=fn: _timed(fn, k), keys))
                    elapsed = time.perf_counter() - start
                    if op == "put":
                        written.extend(keys)
                    rows.append(BenchRow(op, level, len(keys), len(keys) * size, elapsed,
                                         *(round(percentile(latencies, q) * 1000, 1) for q in (0.5, 0.9, 0.99))))
    finally:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(store.delete, written))
    return rows

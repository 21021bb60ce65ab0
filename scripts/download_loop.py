#!/usr/bin/env python3
"""chunkfs's block download layer alone, for the benchmark's floor row ``ck_download_loop``.

    download_loop.py META_URL CACHE_DIR [--path /model] [--threads 32]

Downloads every block of PATH into CACHE_DIR exactly as a warmup's block entries are made
(``BlockDownload.download``: GET, verify, write around the page cache, seal, rename), from
plain threads: no trio, no fetcher (slots, single-flight, pins), no warmup engine. It prints
one JSON line: the loop's seconds and CPU seconds (this process, from ``getrusage``), and
the CPU seconds of everything before the loop (interpreter, imports, volume, plan), which
the bench leaves out. Its difference from ``chunkfs warmup`` is what the engine and the
process start cost; the loop itself is what fetching, verifying and writing cost here.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from collections.abc import Iterator

import trio

from chunkfs.cache.block_cache import DEFAULT_CACHE_SIZE, BlockCache
from chunkfs.cache.disk import aligned_buffer
from chunkfs.cli.options import cache_dirs
from chunkfs.meta.aio import AsyncMeta
from chunkfs.metrics import Metrics
from chunkfs.read.download import PIECE, BlockDownload
from chunkfs.store.base import StoreOptions
from chunkfs.volume import open_volume
from chunkfs.warmup.plan import Planner, WarmPlan


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("meta")
    parser.add_argument("cache_dir")
    parser.add_argument("--path", default="/model")
    parser.add_argument("--threads", type=int, default=32, help="as `chunkfs warmup` (default 32)")
    args = parser.parse_args()
    with open_volume(args.meta, StoreOptions(concurrency=args.threads)) as volume:
        cache = BlockCache(cache_dirs([args.cache_dir]), DEFAULT_CACHE_SIZE, 0.1, Metrics(), hash=volume.fmt.hash)

        async def plan() -> WarmPlan:
            return await Planner(AsyncMeta(volume.meta, immutable=True), volume.fmt.block_size).plan([args.path])

        blocks = list(trio.run(plan).unique_blocks().items())
        downloader = BlockDownload(volume.store.get_into, volume.codec, cache)
        todo: Iterator[tuple[bytes, int]] = iter(blocks)
        taking = threading.Lock()
        failures: list[str] = []

        def work() -> None:
            piece = memoryview(aligned_buffer(PIECE))
            while True:
                with taking:
                    block = next(todo, None)
                if block is None:
                    return
                try:
                    downloader.download(block[0], block[1], piece, around=True, page_in=False)
                except Exception as exc:  # (reported; the bench refuses the row)
                    failures.append(f"{block[0].hex()[:16]}: {exc}")

        setup_cpu = cpu_seconds()
        start = time.perf_counter()
        threads = [threading.Thread(target=work) for _ in range(args.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
        loop_cpu = cpu_seconds() - setup_cpu
    print(json.dumps({"seconds": seconds, "cpu_s": loop_cpu, "setup_cpu_s": setup_cpu, "blocks": len(blocks),
                      "bytes": sum(length for _, length in blocks), "failures": failures[:5]}))


if __name__ == "__main__":
    main()

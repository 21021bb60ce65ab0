"""The read path through real mounts: node cache reuse, damage, single-flight, prefetch,
a full cache disk, metrics, ``chunkfs stats`` and the kernel readahead setting.

Requests are counted at the store through the daemon's own metrics (``--metrics``), read
over HTTP exactly as Prometheus would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkfs.cli.stats import parse_metrics
from chunkfs.fuse.kernel import bdi_path
from tests.conftest import BLOCK, VolumeFixture, chunkfs, fill_up, format_volume, mounted, tmpfs, wait_for
from tests.servers import free_port

pytestmark = pytest.mark.mount

MODEL_BLOCKS = 40
TEXT_BLOCKS = 6


@pytest.fixture
def model_volume(tmp_path: Path) -> VolumeFixture:
    src = tmp_path / "src"
    src.mkdir()
    rng = __import__("random").Random(7)
    (src / "model.safetensors").write_bytes(rng.randbytes(MODEL_BLOCKS * BLOCK - 100))
    (src / "notes.txt").write_bytes(rng.randbytes(TEXT_BLOCKS * BLOCK))
    vol = format_volume(tmp_path / "vol")
    chunkfs("import", vol.meta_url, str(src), "/m")
    vol.src = src  # type: ignore[attr-defined]
    return vol


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return parse_metrics(resp.read().decode())


def gets(metrics: dict[str, float]) -> int:
    """Block GETs: every GET but the one that reads the volume marker when mounting."""
    return int(metrics.get("chunkfs_object_requests_total{op=get}", 0)) - 1


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.mark.parametrize("verify_cache", ["seal", "full"])
def test_restarted_mount_reuses_its_cache(model_volume: VolumeFixture, port: int, verify_cache: str) -> None:
    src = model_volume.src  # type: ignore[attr-defined]
    with mounted(model_volume, "--metrics", f"127.0.0.1:{port}", "--prefetch", "none") as m:
        for name in ("model.safetensors", "notes.txt"):
            assert sha(m.path / "m" / name) == sha(src / name)
        first = scrape(port)
        assert gets(first) == MODEL_BLOCKS + TEXT_BLOCKS  # one GET per block, no more
        assert first["chunkfs_cache_misses_total"] > 0
        assert first["chunkfs_cache_blocks"] == MODEL_BLOCKS + TEXT_BLOCKS
    with mounted(model_volume, "--metrics", f"127.0.0.1:{port}", "--prefetch", "none",
                 "--verify-cache", verify_cache) as m:
        for name in ("model.safetensors", "notes.txt"):
            assert sha(m.path / "m" / name) == sha(src / name)
        again = scrape(port)
        assert gets(again) == 0
        assert again["chunkfs_cache_misses_total"] == 0 and again["chunkfs_cache_hits_total"] > 0
        # the entries this mount found were admitted by their seals, or hashed with "full"
        how, other = ("seal", "hash") if verify_cache == "seal" else ("hash", "seal")
        assert again[f"chunkfs_cache_entry_checks_total{{how={how}}}"] == MODEL_BLOCKS + TEXT_BLOCKS
        assert again.get(f"chunkfs_cache_entry_checks_total{{how={other}}}", 0) == 0
        wait_for(lambda: scrape(port)["chunkfs_cache_blocks"] == MODEL_BLOCKS + TEXT_BLOCKS)  # index rebuilt


def test_damaged_cache_files_are_refetched(model_volume: VolumeFixture, port: int) -> None:
    src = model_volume.src  # type: ignore[attr-defined]
    cache = model_volume.tmp / "cache"
    with mounted(model_volume, "--prefetch", "none") as m:
        sha(m.path / "m" / "notes.txt")
    files = sorted((cache / "blocks-blake3").glob("*/*"))
    assert len(files) == TEXT_BLOCKS
    files[0].write_bytes(files[0].read_bytes()[:-1])  # truncated
    data = bytearray(files[1].read_bytes())
    data[100] ^= 1  # one bit flipped
    files[1].write_bytes(bytes(data))
    with mounted(model_volume, "--metrics", f"127.0.0.1:{port}", "--prefetch", "none") as m:
        assert sha(m.path / "m" / "notes.txt") == sha(src / "notes.txt")
        metrics = scrape(port)
        assert gets(metrics) == 2 and metrics["chunkfs_cache_corrupt_total"] == 2
    assert len(sorted((cache / "blocks-blake3").glob("*/*"))) == TEXT_BLOCKS  # both stored again, intact


MMAP_READER = """
import hashlib, mmap, sys
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    step = int(sys.argv[2])
    # each reader walks the file from its own starting point, as loader ranks do
    order = list(range(0, len(m), step))
    start = int(sys.argv[3]) % len(order)
    h = {}
    for off in order[start:] + order[:start]:
        h[off] = m[off:off + step]
    print(hashlib.sha256(b"".join(h[o] for o in order)).hexdigest())
"""


def test_concurrent_mmap_readers_share_one_download_per_block(model_volume: VolumeFixture, port: int) -> None:
    src = model_volume.src  # type: ignore[attr-defined]
    with mounted(model_volume, "--metrics", f"127.0.0.1:{port}", "--prefetch", "none") as m:
        path = m.path / "m" / "model.safetensors"
        procs = [subprocess.Popen([sys.executable, "-c", MMAP_READER, str(path), str(BLOCK), str(i * 7)],
                                  stdout=subprocess.PIPE, text=True) for i in range(6)]
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
        assert outs == [sha(src / "model.safetensors")] * 6
        assert gets(scrape(port)) == MODEL_BLOCKS


def test_opening_a_model_file_prefetches_all_of_it(model_volume: VolumeFixture, port: int) -> None:
    # the daemon-served path (libfuse; the native transport passes model files through to
    # file images instead, see test_passthrough.py, and takes this path when it cannot)
    with mounted(model_volume, "--metrics", f"127.0.0.1:{port}", "--kernel-readahead", "0",
                 "--fuse-transport", "libfuse") as m:
        with open(m.path / "m" / "notes.txt", "rb") as f:  # not a model file: no prefetch
            f.read(10)
            time.sleep(0.5)  # a negative check: nothing is prefetched for a while (no event to wait for)
            before = gets(scrape(port))
            assert before <= 3  # what the kernel's own 128 KiB readahead asks for
        with open(m.path / "m" / "model.safetensors", "rb") as f:
            f.read(10)
            wait_for(lambda: scrape(port).get("chunkfs_prefetch_blocks_total", 0) >= MODEL_BLOCKS - 1)
        # the kernel sends the release after close() returns: wait until the daemon has counted it
        wait_for(lambda: scrape(port).get("chunkfs_prefetch_wasted_blocks_total", 0) > 0)
        metrics = scrape(port)
        assert gets(metrics) - before == MODEL_BLOCKS  # each block once: prefetch and reader shared
        # the reader took the first two blocks (the kernel's 128 KiB readahead), then closed
        # the file: the rest was fetched for nothing
        prefetched, wasted = metrics["chunkfs_prefetch_blocks_total"], metrics["chunkfs_prefetch_wasted_blocks_total"]
        assert 0 <= prefetched - wasted <= 2 and wasted >= MODEL_BLOCKS - 3
        assert metrics["chunkfs_cache_blocks"] >= MODEL_BLOCKS


def test_sequential_reads_grow_a_readahead_window(model_volume: VolumeFixture, port: int) -> None:
    src = model_volume.src  # type: ignore[attr-defined]
    with mounted(model_volume, "--metrics", f"127.0.0.1:{port}", "--prefetch", "none",
                 "--kernel-readahead", "0") as m:
        with open(m.path / "m" / "model.safetensors", "rb", buffering=0) as f:
            data = b"".join(iter(lambda: f.read(16 << 10), b""))
        assert data == (src / "model.safetensors").read_bytes()
        metrics = scrape(port)
        assert metrics["chunkfs_readahead_blocks_total"] >= MODEL_BLOCKS // 2
        assert gets(metrics) == MODEL_BLOCKS


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, filled up: every cache write fails with ENOSPC."""
    with tmpfs(tmp_path / "full", "1m") as disk:
        for sub in ("cache/blocks", "cache/tmp"):
            (disk / sub).mkdir(parents=True)
        fill_up(disk / "filler")
        yield disk / "cache"


def test_reads_succeed_when_the_cache_disk_is_full(model_volume: VolumeFixture, full_disk: Path, port: int) -> None:
    src = model_volume.src  # type: ignore[attr-defined]
    with mounted(model_volume, "--metrics", f"127.0.0.1:{port}", "--free-space-ratio", "0",
                 cache=full_disk) as m:
        for name in ("model.safetensors", "notes.txt"):
            assert sha(m.path / "m" / name) == sha(src / name)
        metrics = scrape(port)
        assert metrics["chunkfs_cache_write_errors_total"] > 0
        assert metrics["chunkfs_cache_blocks"] == 0


def test_metrics_and_stats_command(model_volume: VolumeFixture, port: int) -> None:
    size = (model_volume.src / "notes.txt").stat().st_size  # type: ignore[attr-defined]
    with mounted(model_volume, "--metrics", f"127.0.0.1:{port}") as m:
        (m.path / "m" / "notes.txt").read_bytes()
        metrics = scrape(port)
        assert metrics["chunkfs_fuse_read_bytes_total"] == size
        assert metrics["chunkfs_fuse_ops_total{op=read}"] >= 1
        assert metrics["chunkfs_fuse_ops_total{op=open}"] >= 1
        assert metrics["chunkfs_object_request_seconds_count{op=get}"] == TEXT_BLOCKS + 1  # + the marker
        assert metrics["chunkfs_object_request_bytes_total{op=get}"] >= size
        assert metrics["chunkfs_cache_miss_bytes_total"] + metrics["chunkfs_cache_hit_bytes_total"] == size
        stats_file = m.path / ".chunkfs-stats"
        assert b"chunkfs_fuse_read_bytes_total" in stats_file.read_bytes()
        assert ".chunkfs-stats" not in os.listdir(m.path)
        result = chunkfs("stats", str(m.path), "--interval", "0.2", "--count", "2")
        lines = result.stdout.strip().splitlines()
        assert "read MiB/s" in lines[0] and "hit %" in lines[0] and len(lines) == 3
    result = chunkfs("stats", str(m.path), check=False)
    assert result.returncode != 0 and "is not mounted" in result.stderr and "Traceback" not in result.stderr


def test_kernel_readahead_is_raised_for_the_mount(model_volume: VolumeFixture) -> None:
    if os.geteuid() != 0:
        pytest.skip("setting read_ahead_kb needs root")
    # the daemon sets it just after the mount starts answering, so give it a moment
    for extra, kib in (((), 16 << 10), (("--kernel-readahead", "4M"), 4 << 10)):
        with mounted(model_volume, *extra) as m:
            bdi = Path(bdi_path(str(m.path)))
            wait_for(lambda bdi=bdi, kib=kib: bdi.read_text().strip() == str(kib), timeout=10)

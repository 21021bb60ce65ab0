"""Warmup: planning (units), the cache's node-wide download lock (unit), then the CLI against
a real S3 server (rclone) and real mounts: warm then read with the store gone, --check and
--evict, kill -9 and resume, one GET per block with a mount reading at the same time, and
warmup through a running mount."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from chunkfs.blocks import DEFAULT_HASH, block_id
from chunkfs.cache.block_cache import BlockCache
from chunkfs.cache.disk import CacheDir
from chunkfs.cli.stats import parse_metrics
from chunkfs.errors import ChunkfsError
from chunkfs.meta import open_meta
from chunkfs.meta.aio import AsyncMeta
from chunkfs.warmup.plan import Planner, normalize_volume_path
from tests.conftest import BLOCK, VolumeFixture, assert_cache_sound, block_files, chunkfs, mounted, unique_bucket
from tests.faultproxy import FaultProxy
from tests.test_cli import assert_one_line_error


def make_model(root: Path, seed: int = 7) -> Path:
    """A small model: two shards, a shard duplicated under another name, a config, an HF-style link."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "model-00001.safetensors").write_bytes(rng.randbytes(9 * BLOCK + 100))
    (root / "model-00002.safetensors").write_bytes(rng.randbytes(7 * BLOCK))
    (root / "copy.safetensors").write_bytes((root / "model-00002.safetensors").read_bytes())
    (root / "config.json").write_text('{"layers": 2}\n')
    (root / "snapshots").mkdir()
    (root / "snapshots" / "model.safetensors").symlink_to("../model-00001.safetensors")
    return root


def unique_blocks(root: Path) -> dict[bytes, int]:
    blocks: dict[bytes, int] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for off in range(0, len(data), BLOCK):
                chunk = data[off:off + BLOCK]
                blocks[block_id(chunk, DEFAULT_HASH)] = len(chunk)  # the volumes' hash
    return blocks


def assert_same_tree(src: Path, mnt: Path) -> None:
    for path in src.rglob("*"):
        if path.is_file():
            assert (mnt / path.relative_to(src)).read_bytes() == path.read_bytes(), path


# -- units -------------------------------------------------------------------------------------
def test_volume_paths_are_normalised_and_cannot_climb() -> None:
    assert normalize_volume_path("llama/../mistral/") == "/mistral"
    assert normalize_volume_path("/") == "/"
    with pytest.raises(ChunkfsError, match="climbs above"):
        normalize_volume_path("/../etc")


def test_plan_walks_directories_follows_links_and_names_missing_paths(volume: VolumeFixture, tmp_path: Path) -> None:
    src = make_model(tmp_path / "m")
    chunkfs("import", volume.meta_url, str(src), "/m")
    meta = open_meta(volume.meta_url)

    async def plan(*paths: str):  # type: ignore[no-untyped-def]
        return await Planner(AsyncMeta(meta, immutable=True), BLOCK).plan(list(paths))

    try:
        whole = trio.run(plan, "/m")
        assert sorted(f.path for f in whole.paths[0].files) == [
            "/m/config.json", "/m/copy.safetensors", "/m/model-00001.safetensors", "/m/model-00002.safetensors"]
        assert whole.unique_blocks() == unique_blocks(src)
        linked = trio.run(plan, "/m/snapshots")  # the link's target, counted once
        assert [f.path for f in linked.paths[0].files] == ["/m/model-00001.safetensors"]
        via_link = trio.run(plan, "/m/snapshots/model.safetensors")
        assert via_link.paths[0].size == 9 * BLOCK + 100
        both = trio.run(plan, "/m", "/m/snapshots")
        assert len(both.files()) == 4
        with pytest.raises(ChunkfsError, match="/m/nope: no such file"):
            trio.run(plan, "/m/nope")
        with pytest.raises(ChunkfsError, match="not a directory"):
            trio.run(plan, "/m/config.json/x")
    finally:
        meta.close()


def test_download_locks_keep_the_gil() -> None:
    """The lock calls never give the GIL up (``ctypes.PyDLL``): taking it back behind a
    queue of busy threads is what made lock takers wait tens of milliseconds each."""
    import ctypes

    from chunkfs.cache import disk

    assert disk._GIL_FCNTL is not None
    assert disk._GIL_FCNTL._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]


@pytest.mark.parametrize("gil_fcntl", [True, False], ids=["gil-held", "fcntl-module"])
def test_download_lock_is_exclusive_and_cleaned_up(tmp_path: Path, gil_fcntl: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from chunkfs.cache import disk

    if not gil_fcntl:  # the fallback where libc cannot be loaded through ctypes
        monkeypatch.setattr(disk, "_GIL_FCNTL", None)
    cache_dir = CacheDir(tmp_path / "c")
    bid = block_id(b"x")
    held = cache_dir.try_lock(bid)
    assert held is not None
    assert cache_dir.try_lock(bid) is None  # a second taker in this process is refused...
    other = CacheDir(tmp_path / "c")
    assert other.try_lock(bid) is None  # ...through another CacheDir too (OFD locks)
    assert other.try_lock(block_id(b"z")) is not None  # other blocks are free
    cache_dir.unlock(held)
    again = other.try_lock(bid)
    assert again is not None and cache_dir.try_lock(bid) is None
    other.close()  # closing drops its locks
    again = cache_dir.try_lock(bid)
    assert again is not None
    assert [p.name for p in (tmp_path / "c" / "locks").iterdir()] == ["downloads"]  # no file per block
    # a holder that died (here: a child process killed while holding it) leaves nothing held
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys,time; from chunkfs.cache.disk import CacheDir; from chunkfs.blocks import block_id;"
        f"d=CacheDir({str(tmp_path / 'c')!r}); assert d.try_lock(block_id(b'y')) is not None;"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert cache_dir.try_lock(block_id(b"y")) is None
    finally:
        child.kill()
        child.wait()
    mine = cache_dir.try_lock(block_id(b"y"))
    assert mine is not None
    cache_dir.unlock(mine)
    # per-block lock files of older versions are removed on open unless someone holds them
    (tmp_path / "c" / "locks" / bid.hex()).write_bytes(b"")
    CacheDir(tmp_path / "c")
    assert [p.name for p in (tmp_path / "c" / "locks").iterdir()] == ["downloads"]
    cache_dir.unlock(again)


def test_shortfalls_name_the_cache_size_and_the_disk(tmp_path: Path) -> None:
    blocks = {block_id(bytes([i])): 1 << 20 for i in range(8)}
    cache = BlockCache([tmp_path / "c"], capacity=4 << 20, free_ratio=0.0)
    found = cache.shortfalls(blocks)
    assert [s.where for s in found] == ["cache size"]
    assert "needs 8.0 MiB but the cache size is 4.0 MiB" in str(found[0])
    big = BlockCache([tmp_path / "c"], capacity=1 << 50, free_ratio=0.0)
    huge = {block_id(b"huge"): 1 << 49}
    assert [s.where for s in big.shortfalls(huge)] == [str(tmp_path / "c")]
    assert big.shortfalls(blocks) == []


# -- CLI against a real S3 server ----------------------------------------------------------------
@pytest.fixture
def s3_model(s3_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A volume on S3 reached through a counting proxy, holding make_model() at /m."""
    with FaultProxy(s3_server.endpoint) as proxy:
        db = tmp_path / "meta" / "v.db"
        vol = VolumeFixture(f"sqlite://{db}", tmp_path / "blocks", db, tmp_path)
        chunkfs("format", vol.meta_url, "--storage", f"s3://{unique_bucket()}/m?endpoint={proxy.endpoint}",
                "--block-size", str(BLOCK))
        src = make_model(tmp_path / "src")
        chunkfs("import", vol.meta_url, str(src), "/m")
        proxy.config.block_gets = 0
        yield vol, src, proxy


def warmup(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return chunkfs("warmup", *args, check=check, timeout=timeout)


@pytest.mark.mount
def test_warm_then_read_everything_with_the_store_stopped(tmp_path: Path) -> None:
    from tests.servers import apply_env, rclone_s3, s3_env

    apply_env(s3_env())
    cache = tmp_path / "cache"
    src = make_model(tmp_path / "src")
    db = tmp_path / "meta" / "v.db"
    vol = VolumeFixture(f"sqlite://{db}", tmp_path / "blocks", db, tmp_path)
    with rclone_s3(tmp_path / "s3") as server:
        chunkfs("format", vol.meta_url, "--storage", f"s3://{unique_bucket()}/m?endpoint={server.endpoint}",
                "--block-size", str(BLOCK))
        chunkfs("import", vol.meta_url, str(src), "/m")
        before = json.loads(warmup(vol.meta_url, "/m", "--cache-dir", str(cache), "--check", "--json",
                                   check=False).stdout)
        assert before["paths"][0]["cached_bytes"] == 0
        result = warmup(vol.meta_url, "/m", "--cache-dir", str(cache), "--json")
        report = json.loads(result.stdout)
        expected = unique_blocks(src)
        assert report["complete"] and report["blocks"] == len(expected)
        assert report["bytes_fetched"] == report["bytes_total"] == sum(expected.values())
        assert report["files_done"] == report["files"] == 4
    # the store is gone: the mount starts anyway and serves every byte from the warmed cache
    after = json.loads(warmup(vol.meta_url, "/m", "--cache-dir", str(cache), "--check", "--json").stdout)
    assert after["paths"][0]["percent"] == 100.0
    with mounted(vol, "--io-retries", "1", "--io-timeout", "2", cache=cache) as mnt:
        assert_same_tree(src, mnt.path / "m")
        stats = parse_metrics((mnt.path / ".chunkfs-stats").read_text())
    # the warmup's seals let the mount use its entries without hashing them again
    assert stats["chunkfs_cache_entry_checks_total{how=seal}"] == len(expected)
    assert stats.get("chunkfs_cache_entry_checks_total{how=hash}", 0) == 0
    assert_cache_sound(cache)


def test_check_and_evict(s3_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol, src, proxy = s3_model
    cache = str(tmp_path / "cache")
    partial = warmup(vol.meta_url, "/m", "--cache-dir", cache, "--check", check=False)
    assert partial.returncode == 1 and "not fully cached: /m (0.0%)" in partial.stderr
    warmup(vol.meta_url, "/m/model-00002.safetensors", "--cache-dir", cache, "-q")
    report = json.loads(warmup(vol.meta_url, "/m", "/m/copy.safetensors", "--cache-dir", cache, "--check", "--json",
                               check=False).stdout)
    by_path = {row["path"]: row for row in report["paths"]}
    assert by_path["/m/copy.safetensors"]["percent"] == 100.0  # the same blocks, deduplicated
    assert 0 < by_path["/m"]["percent"] < 100
    again = json.loads(warmup(vol.meta_url, "/m", "--cache-dir", cache, "--json").stdout)
    assert again["bytes_cached_before"] == 7 * BLOCK and again["bytes_fetched"] == again["bytes_total"] - 7 * BLOCK
    assert proxy.config.block_gets == len(unique_blocks(src))  # nothing fetched twice
    warmup(vol.meta_url, "/m", "--cache-dir", cache, "--check")
    evicted = warmup(vol.meta_url, "/m/snapshots", "--cache-dir", cache, "--evict")
    assert "evicted 10 blocks" in evicted.stdout
    report = json.loads(warmup(vol.meta_url, "/m/model-00001.safetensors", "/m/model-00002.safetensors",
                               "--cache-dir", cache, "--check", "--json", check=False).stdout)
    assert [row["percent"] for row in report["paths"]] == [0.0, 100.0]
    warmup(vol.meta_url, "/m", "--cache-dir", cache, "--evict")
    report = json.loads(warmup(vol.meta_url, "/m", "--cache-dir", cache, "--check", "--json", check=False).stdout)
    assert report["paths"][0]["percent"] == 0.0
    assert block_files(Path(cache)) == []


def test_kill_9_leaves_no_partial_block_and_a_rerun_resumes(s3_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol, src, proxy = s3_model
    cache = tmp_path / "cache"
    proxy.config.rate, proxy.config.kinds, proxy.config.delay = 1.0, ("delay",), 0.15
    proc = subprocess.Popen([sys.executable, "-m", "chunkfs", "warmup", vol.meta_url, "/m", "--cache-dir", str(cache),
                             "--threads", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(block_files(cache)) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    planted = len(block_files(cache))
    assert 4 <= planted < len(unique_blocks(src))
    assert_cache_sound(cache)
    proxy.config.rate = 0.0
    report = json.loads(warmup(vol.meta_url, "/m", "--cache-dir", str(cache), "--json").stdout)
    assert report["complete"] and report["bytes_cached_before"] >= planted * BLOCK - BLOCK
    assert_cache_sound(cache)
    assert len(block_files(cache)) == len(unique_blocks(src))
    assert list((cache / "tmp").iterdir()) == []
    assert [p.name for p in (cache / "locks").iterdir()] == ["downloads-blake3"]  # the volume's namespace


@pytest.mark.parametrize("images", [(), ("--file-images", "*.safetensors")], ids=["entries", "file-images"])
def test_sigterm_stops_cleanly(s3_model, tmp_path: Path, images: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    vol, _src, proxy = s3_model
    cache = tmp_path / "cache"
    proxy.config.rate, proxy.config.kinds, proxy.config.delay = 1.0, ("delay",), 0.15
    proc = subprocess.Popen([sys.executable, "-m", "chunkfs", "warmup", vol.meta_url, "/m", "--cache-dir", str(cache),
                             "--threads", "2", *images], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not block_files(cache) and time.monotonic() < deadline:  # the first entry, or image, is in
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "chunkfs: warmup stopped by SIGTERM; run it again to resume"
    assert_cache_sound(cache)
    assert list((cache / "tmp").iterdir()) == []
    assert [p.name for p in (cache / "locks").iterdir()] == ["downloads-blake3"]  # the volume's namespace


@pytest.mark.mount
def test_warmup_and_a_mount_reading_download_each_block_once(s3_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol, src, proxy = s3_model
    cache = tmp_path / "cache"
    proxy.config.rate, proxy.config.kinds, proxy.config.delay = 1.0, ("delay",), 0.05
    with mounted(vol, "--prefetch", "none", cache=cache) as mnt:
        proc = subprocess.Popen([sys.executable, "-m", "chunkfs", "warmup", vol.meta_url, "/m", "--cache-dir",
                                 str(cache), "--threads", "4", "--json"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        readers = [threading.Thread(target=assert_same_tree, args=(src, mnt.path / "m")) for _ in range(2)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out)["complete"]
    assert proxy.config.block_gets == len(unique_blocks(src))
    assert_cache_sound(cache)


@pytest.mark.mount
def test_warmup_through_a_running_mount(s3_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol, src, proxy = s3_model
    with mounted(vol, "--prefetch", "none") as mnt:
        target = mnt.path / "m"
        before = warmup(str(target), "--check", check=False)
        assert before.returncode == 1 and "/m (0.0%)" in before.stderr
        report = json.loads(warmup(str(target), "--json").stdout)
        assert report["complete"] and report["bytes_fetched"] == report["bytes_total"]
        assert proxy.config.block_gets == len(unique_blocks(src))
        warmup(str(target / "snapshots" / "model.safetensors"), "--check")
        assert_same_tree(src, target)
        assert proxy.config.block_gets == len(unique_blocks(src))  # every read came from the warmed cache
        assert "evicted 10 blocks" in warmup(str(target / "model-00001.safetensors"), "--evict").stdout
        partial = json.loads(warmup(str(target), "--check", "--json", check=False).stdout)
        assert partial["paths"][0]["cached_bytes"] == partial["paths"][0]["bytes"] - (9 * BLOCK + 100)
        refused = warmup(str(target), "--cache-dir", str(tmp_path / "x"), check=False)
        assert refused.returncode == 2 and "a mount warms its own cache" in refused.stderr


def test_bad_warmup_input_gets_one_line(s3_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol, _src, proxy = s3_model
    cache = str(tmp_path / "cache")
    cases = [
        ((vol.meta_url, "/nope", "--cache-dir", cache), 1, "/nope: no such file or directory in the volume"),
        ((vol.meta_url, "/m", "--cache-dir", cache, "--cache-size", "64K"), 1,
         "the cache cannot hold /m (1.0 MiB): needs 1.0 MiB but the cache size is 64.0 KiB (use --force"),
        ((vol.meta_url, "/../m", "--cache-dir", cache), 1, "climbs above the volume root"),
        ((vol.meta_url, "--cache-dir", cache), 2, "name at least one path inside the volume"),
        ((str(tmp_path),), 1, "is not inside a chunkfs mount"),
        ((str(tmp_path / "missing"),), 1, "no such file or directory"),
        ((vol.meta_url, "/m", "--check", "--evict"), 2, "--check and --evict do not go together"),
        ((vol.meta_url, "/m", "--list-file", str(tmp_path / "nolist")), 1, "cannot read list file"),
        ((f"sqlite://{tmp_path}/none.db", "/m", "--cache-dir", cache), 1, "no chunkfs volume"),
    ]
    for args, code, message in cases:
        result = warmup(*args, check=False)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert proxy.config.block_gets == 0  # refused before fetching anything
    forced = warmup(vol.meta_url, "/m", "--cache-dir", cache, "--cache-size", "256K", "--force", "--json", check=False)
    assert forced.returncode == 1 and "warmup incomplete" in forced.stderr
    assert not json.loads(forced.stdout)["complete"]
    assert sum(p.stat().st_size for p in block_files(Path(cache))) <= 256 << 10
    listed = tmp_path / "list.txt"
    listed.write_text("# models\n/m/config.json\n\n/m/model-00002.safetensors\n")
    report = json.loads(warmup(vol.meta_url, "--list-file", str(listed), "--cache-dir", cache, "--json").stdout)
    assert report["paths"] == ["/m/config.json", "/m/model-00002.safetensors"] and report["complete"]


def test_wait_tries_failed_blocks_again_until_all_are_cached(s3_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--wait: an init container's gate. While the store fails every GET the warmup keeps
    trying (saying so); once it answers again, it completes and exits 0."""
    vol, src, proxy = s3_model
    proxy.config.rate, proxy.config.kinds = 1.0, ("slowdown",)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "chunkfs", "warmup", vol.meta_url, "/m", "--cache-dir", str(cache),
                             "--io-retries", "1", "--wait", "--json", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = [proc.stderr.readline() for _ in range(1)]
        while "blocks failed; trying again in 1 s" not in seen[-1]:
            assert seen[-1] and len(seen) < 500, seen  # it says so before the first retry
            seen.append(proc.stderr.readline())
        proxy.config.rate = 0.0
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["complete"] and report["blocks"] == len(unique_blocks(src))


@pytest.mark.mount
def test_timeout_bounds_a_warmup_with_or_without_a_mount(s3_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol, _src, proxy = s3_model
    proxy.config.rate, proxy.config.kinds, proxy.config.delay = 1.0, ("delay",), 3.0
    cache = tmp_path / "cache"
    start = time.monotonic()
    # one thread: a block takes 3 s, so at 1 s the first is in flight and the rest untouched
    result = warmup(vol.meta_url, "/m", "--cache-dir", str(cache), "--timeout", "1s", "--threads", "1", check=False)
    assert result.returncode == 1 and time.monotonic() - start < 15
    assert_one_line_error(result, "warmup timed out after 1 s (--timeout): ", "is cached; run it again to resume")
    assert "100%" not in result.stderr
    with mounted(vol, cache=tmp_path / "mount-cache") as mnt:
        result = warmup(str(mnt.path / "m"), "--timeout", "1", "--threads", "1", check=False)
        assert result.returncode == 1
        assert_one_line_error(result, "warmup timed out after 1 s (--timeout)")
    for args in (["--check", "--timeout", "1"], ["--timeout", "0"]):
        result = warmup(vol.meta_url, "/m", "--cache-dir", str(cache), *args, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr

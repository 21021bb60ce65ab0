"""FUSE passthrough on the native transport (``--fuse-transport native``), through real mounts.

The first open of a model file waits while its file image is filled in the node cache, and
is passed through, as is every later open of it, by this daemon or a restarted one: the
kernel reads the image and no read reaches the daemon (its ``chunkfs_fuse_read_bytes_total``
does not move). The model files beside it are filled behind it. A damaged image is never
used, a file that is not a model file gets none, and a file whose image cannot be made is
served by the daemon.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    BLOCK,
    VolumeFixture,
    assert_cache_sound,
    block_files,
    chunkfs,
    mounted,
    proxied_s3_volume,
    wait_for,
)

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(os.geteuid() != 0, reason="the native transport mounts with mount(2): root only")]
NATIVE = ("--fuse-transport", "native")
SIZE = 5 * BLOCK + 1234  # several blocks and a short last one
BLOCKS = 6


@pytest.fixture
def model(volume: VolumeFixture, tmp_path: Path) -> dict[str, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    files = {"model.safetensors": os.urandom(SIZE), "notes.txt": os.urandom(3 * BLOCK)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    chunkfs("import", volume.meta_url, str(src), "/m")
    return files


def metric(mnt: Path, name: str) -> float:
    text = (mnt / ".chunkfs-stats").read_text()
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def read_bytes(mnt: Path) -> float:
    return metric(mnt, "chunkfs_fuse_read_bytes_total")


def images_in(cache: Path, size: int) -> list[Path]:
    return [p for p in cache.rglob("*")
            if p.is_file() and p.stat().st_size == size and "tmp" not in p.relative_to(cache).parts]


FILLED = 'chunkfs_file_images_total{outcome="filled"}'
BUILT = 'chunkfs_file_images_total{outcome="built"}'


def test_a_cold_model_file_is_filled_then_passed_through(volume: VolumeFixture, model: dict[str, bytes]) -> None:
    cache = volume.tmp / "cache"
    data = model["model.safetensors"]
    with mounted(volume, *NATIVE, cache=cache) as m:
        path = m.path / "m/model.safetensors"
        with open(path, "rb") as f:  # the open returns once the image is whole
            assert metric(m.path, FILLED) == 1
            assert f.read() == data
        assert path.read_bytes() == data
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:] == data
            assert mm[3 * BLOCK + 7: 4 * BLOCK] == data[3 * BLOCK + 7: 4 * BLOCK]
        assert read_bytes(m.path) == 0  # the kernel read the image: no read reached the daemon
        assert metric(m.path, "chunkfs_passthrough_opens_total") == 3
        assert metric(m.path, FILLED) == 1
        assert metric(m.path, "chunkfs_origin_blocks_total") == BLOCKS  # each block fetched once
        # the image is a cache entry, counted in the cache's bytes; the blocks downloaded
        # into it have no entries of their own
        assert metric(m.path, "chunkfs_cache_blocks") == 1
        assert metric(m.path, "chunkfs_cache_bytes") == SIZE
    assert len(images_in(cache, SIZE)) == 1
    # a warmup counts the model file as cached: its image holds it
    check = json.loads(chunkfs("warmup", volume.meta_url, "/m/model.safetensors", "--cache-dir", str(cache),
                               "--check", "--json").stdout)
    assert check["paths"][0]["percent"] == 100.0
    report = json.loads(chunkfs("warmup", volume.meta_url, "/m/model.safetensors", "--cache-dir", str(cache),
                                "--json").stdout)
    assert report["complete"] and report["bytes_fetched"] == 0
    assert report["bytes_cached_before"] == report["bytes_total"]

    with mounted(volume, *NATIVE, cache=cache, name="again") as m:  # a restarted daemon: its seal admits it
        assert (m.path / "m/model.safetensors").read_bytes() == data
        assert read_bytes(m.path) == 0
        assert metric(m.path, "chunkfs_passthrough_opens_total") == 1


def test_a_damaged_image_is_not_used(volume: VolumeFixture, model: dict[str, bytes]) -> None:
    cache = volume.tmp / "cache"
    data = model["model.safetensors"]
    with mounted(volume, *NATIVE, cache=cache) as m:
        assert (m.path / "m/model.safetensors").read_bytes() == data
    (image,) = images_in(cache, SIZE)
    with open(image, "r+b") as f:  # one flipped byte, written as any tool would: the seal no longer holds
        f.seek(BLOCK)
        byte = f.read(1)
        f.seek(BLOCK)
        f.write(bytes([byte[0] ^ 0xFF]))
    with mounted(volume, *NATIVE, cache=cache, name="again") as m:
        # not admitted: filled again from the store (the image was its blocks' only copy), verified
        assert (m.path / "m/model.safetensors").read_bytes() == data
        assert metric(m.path, FILLED) == 1
        assert metric(m.path, "chunkfs_origin_blocks_total") == BLOCKS
    (image,) = images_in(cache, SIZE)
    assert image.read_bytes() == data


def test_the_model_files_beside_the_one_opened_are_filled_behind_it(volume: VolumeFixture,
                                                                     tmp_path: Path) -> None:
    src = tmp_path / "shards"
    src.mkdir()
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    shards = {name: os.urandom(2 * BLOCK + i) for i, name in enumerate(names)}
    shards["weights.bin"] = os.urandom(BLOCK + 5)  # a model file of another kind: not queued
    for name, data in shards.items():
        (src / name).write_bytes(data)
    chunkfs("import", volume.meta_url, str(src), "/s")
    with mounted(volume, *NATIVE) as m:
        # a loader that starts at the second shard: the others follow, the first one last
        assert (m.path / "s" / names[1]).read_bytes() == shards[names[1]]
        wait_for(lambda: metric(m.path, FILLED) == 4)
        for name in names:
            assert (m.path / "s" / name).read_bytes() == shards[name]
        assert read_bytes(m.path) == 0
        assert metric(m.path, FILLED) == 4  # each shard filled once
        assert metric(m.path, "chunkfs_passthrough_opens_total") == 5
        assert images_in(volume.tmp / "cache", BLOCK + 5) == []


def test_a_file_whose_image_has_no_room_is_served_by_the_daemon(volume: VolumeFixture,
                                                                 model: dict[str, bytes]) -> None:
    with mounted(volume, *NATIVE, "--cache-size", str(SIZE // 2)) as m:
        assert (m.path / "m/model.safetensors").read_bytes() == model["model.safetensors"]
        assert metric(m.path, 'chunkfs_file_images_total{outcome="failed"}') >= 1
        assert metric(m.path, "chunkfs_passthrough_opens_total") == 0
        assert read_bytes(m.path) >= SIZE


def test_only_model_files_get_images(volume: VolumeFixture, model: dict[str, bytes]) -> None:
    with mounted(volume, *NATIVE) as m:
        assert (m.path / "m/notes.txt").read_bytes() == model["notes.txt"]
        assert (m.path / "m/model.safetensors").read_bytes() == model["model.safetensors"]
        assert (m.path / "m/notes.txt").read_bytes() == model["notes.txt"]
        assert metric(m.path, "chunkfs_passthrough_opens_total") == 1
        assert read_bytes(m.path) == 3 * BLOCK  # notes.txt (once: then from the page cache)
    assert images_in(volume.tmp / "cache", 3 * BLOCK) == []
    assert len(images_in(volume.tmp / "cache", SIZE)) == 1


def test_the_default_is_native_and_libfuse_never_passes_through(volume: VolumeFixture,
                                                                model: dict[str, bytes]) -> None:
    cache = volume.tmp / "cache"
    with mounted(volume, cache=cache) as m:  # read-only, as root: --fuse-transport auto is native
        assert (m.path / "m/model.safetensors").read_bytes() == model["model.safetensors"]
        assert metric(m.path, "chunkfs_passthrough_opens_total") == 1
    with mounted(volume, "--fuse-transport", "libfuse", cache=cache, name="libfuse") as m:
        assert (m.path / "m/model.safetensors").read_bytes() == model["model.safetensors"]
        assert read_bytes(m.path) >= SIZE  # served by the daemon...
        assert metric(m.path, "chunkfs_origin_blocks_total") == 0  # ...from the image: its blocks' only copy
        assert metric(m.path, "chunkfs_passthrough_opens_total") == 0


def test_a_new_version_sharing_blocks_takes_them_from_the_old_ones_image(volume: VolumeFixture,
                                                                          model: dict[str, bytes],
                                                                          tmp_path: Path) -> None:
    """Blocks held only by an image (no entries of their own) still count as on the node: a
    file made partly of them (a fine-tuned version, another pinned version) copies them."""
    old = model["model.safetensors"]
    new = old[: 3 * BLOCK] + os.urandom(2 * BLOCK)  # three blocks in common, two new
    src = tmp_path / "v2"
    src.mkdir()
    (src / "model.safetensors").write_bytes(new)
    chunkfs("import", volume.meta_url, str(src), "/v2")
    with mounted(volume, *NATIVE) as m:
        assert (m.path / "m/model.safetensors").read_bytes() == old
        assert metric(m.path, "chunkfs_origin_blocks_total") == BLOCKS
        assert (m.path / "v2/model.safetensors").read_bytes() == new
        assert metric(m.path, FILLED) == 2
        assert metric(m.path, "chunkfs_origin_blocks_total") == BLOCKS + 2  # only the new blocks
        assert read_bytes(m.path) == 0


def test_warmup_evict_drops_the_image_too(volume: VolumeFixture, model: dict[str, bytes]) -> None:
    cache = volume.tmp / "cache"
    with mounted(volume, *NATIVE, cache=cache) as m:
        assert (m.path / "m/model.safetensors").read_bytes() == model["model.safetensors"]
    assert len(images_in(cache, SIZE)) == 1
    chunkfs("warmup", volume.meta_url, "/m", "--cache-dir", str(cache), "--evict")
    assert images_in(cache, SIZE) == []


def test_a_warmup_through_the_mount_makes_the_first_load_pass_through(volume: VolumeFixture,
                                                                      model: dict[str, bytes]) -> None:
    with mounted(volume, *NATIVE) as m:
        report = json.loads(chunkfs("warmup", str(m.path / "m"), "--json").stdout)
        assert report["complete"] and report["bytes_fetched"] == report["bytes_total"]
        assert metric(m.path, FILLED) == 1  # the daemon filled the model file's image, as an open does
        assert metric(m.path, "chunkfs_origin_blocks_total") == BLOCKS + 3  # each block once: notes.txt has 3
        assert (m.path / "m/model.safetensors").read_bytes() == model["model.safetensors"]
        assert metric(m.path, FILLED) == 1 and metric(m.path, BUILT) == 0
        assert metric(m.path, "chunkfs_passthrough_opens_total") == 1
        assert read_bytes(m.path) == 0  # the first load never reached the daemon
        assert (m.path / "m/notes.txt").read_bytes() == model["notes.txt"]  # not a model file: served
        assert metric(m.path, "chunkfs_origin_blocks_total") == BLOCKS + 3


def test_a_warmup_with_file_images_leaves_models_ready_to_pass_through(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``chunkfs warmup --file-images`` without a mount: model files become images, the rest
    block entries; a warmup stopped mid-fill leaves nothing partial, and the next one
    completes it; then a native mount passes the first open through and a libfuse mount
    reads the images, neither fetching anything."""
    src = tmp_path / "src"
    src.mkdir()
    files = {"a.safetensors": os.urandom(5 * BLOCK + 7), "b.safetensors": os.urandom(4 * BLOCK),
             "config.json": b'{"layers": 2}\n'}
    for name, data in files.items():
        (src / name).write_bytes(data)
    cache = tmp_path / "cache"
    with proxied_s3_volume(s3_server, tmp_path, BLOCK) as (vol, proxy):
        chunkfs("import", vol.meta_url, str(src), "/m")
        proxy.config.block_gets = 0
        args = ["warmup", vol.meta_url, "/m", "--cache-dir", str(cache), "--file-images", "*.safetensors"]
        proxy.config.kinds, proxy.config.delay, proxy.config.rate = ("delay",), 0.2, 1.0
        proc = subprocess.Popen([sys.executable, "-m", "chunkfs", *args, "--threads", "2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: proxy.config.block_gets >= 3)  # an image is being filled
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143, err
        assert list((cache / "tmp").iterdir()) == []  # no partial image
        assert_cache_sound(cache)
        proxy.config.rate = 0.0
        report = json.loads(chunkfs(*args, "--json").stdout)
        assert report["complete"] and report["files_done"] == 3
        sizes = sorted(p.stat().st_size for p in block_files(cache))
        assert sizes == sorted(len(data) for data in files.values())  # two images and one block entry
        assert assert_cache_sound(cache) == 3
        check = json.loads(chunkfs("warmup", vol.meta_url, "/m", "--cache-dir", str(cache), "--check",
                                   "--json").stdout)
        assert check["paths"][0]["percent"] == 100.0
        fetched = proxy.config.block_gets
        with mounted(vol, *NATIVE, cache=cache) as m:
            for name, data in files.items():
                assert (m.path / "m" / name).read_bytes() == data
            assert metric(m.path, "chunkfs_passthrough_opens_total") == 2
            assert metric(m.path, FILLED) == 0 and metric(m.path, BUILT) == 0
            assert read_bytes(m.path) == len(files["config.json"])
        with mounted(vol, "--fuse-transport", "libfuse", cache=cache, name="libfuse") as m:
            for name, data in files.items():
                assert (m.path / "m" / name).read_bytes() == data
        assert proxy.config.block_gets == fetched  # every byte came from the node cache


def test_an_open_waiting_for_its_image_can_be_interrupted(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C on a process whose open waits for a fill ends it at once (EINTR, then the
    signal); the fill goes on, and the next open is passed through."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(6 * BLOCK)
    (src / "slow.safetensors").write_bytes(data)
    with proxied_s3_volume(s3_server, tmp_path, BLOCK) as (vol, proxy):
        chunkfs("import", vol.meta_url, str(src), "/m")
        proxy.config.kinds, proxy.config.delay, proxy.config.rate = ("delay",), 1.0, 1.0  # 1 s per block
        with mounted(vol, *NATIVE, "--max-downloads", "1") as m:  # one at a time: the fill takes about 6 s
            path = m.path / "m/slow.safetensors"
            opener = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read(1)", str(path)],
                                      stderr=subprocess.DEVNULL)
            wait_for(lambda: proxy.config.block_gets >= 1)  # the open is waiting for the fill
            started = time.monotonic()
            opener.send_signal(signal.SIGINT)
            assert opener.wait(timeout=30) != 0  # KeyboardInterrupt
            assert time.monotonic() - started < 2.5, "the open was not interrupted: it waited for the fill"
            assert metric(m.path, FILLED) == 0
            wait_for(lambda: metric(m.path, FILLED) == 1, timeout=60)
            assert path.read_bytes() == data
            assert metric(m.path, "chunkfs_passthrough_opens_total") == 1
            assert proxy.config.block_gets == 6  # the interrupted open's fill was not started again


def test_an_open_during_a_warmup_through_the_mount_waits_for_the_warmups_fill(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One registry of fills: the open joins the image the warmup is filling (one fill, each
    block fetched once), and is passed through once it is whole."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(6 * BLOCK + 5)
    (src / "w.safetensors").write_bytes(data)
    with proxied_s3_volume(s3_server, tmp_path, BLOCK) as (vol, proxy):
        chunkfs("import", vol.meta_url, str(src), "/m")
        proxy.config.block_gets = 0
        proxy.config.kinds, proxy.config.delay, proxy.config.rate = ("delay",), 0.3, 1.0
        with mounted(vol, *NATIVE, "--max-downloads", "2") as m:
            warmup = subprocess.Popen([sys.executable, "-m", "chunkfs", "warmup", str(m.path / "m"), "--json"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for(lambda: proxy.config.block_gets >= 1)  # the warmup's fill is under way
            assert (m.path / "m/w.safetensors").read_bytes() == data
            out, err = warmup.communicate(timeout=60)
            assert warmup.returncode == 0, err
            assert json.loads(out)["complete"]
            assert metric(m.path, FILLED) == 1
            assert metric(m.path, "chunkfs_passthrough_opens_total") == 1
            assert read_bytes(m.path) == 0
        assert proxy.config.block_gets == 7  # each block once


def test_a_shards_fill_does_not_share_the_store_with_its_siblings(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The files queued behind an opened shard are filled once the shard's own fill (the one
    its loader waits for) is over: no sibling GET is sent while one of the shard's is."""
    from chunkfs.blocks import DEFAULT_HASH, block_id, object_key

    src = tmp_path / "src"
    src.mkdir()
    shards = {f"model-0000{i}-of-00002.safetensors": os.urandom(3 * BLOCK) for i in (1, 2)}
    for name, data in shards.items():
        (src / name).write_bytes(data)
    first = next(iter(shards))
    first_keys = {object_key(block_id(shards[first][i:i + BLOCK], DEFAULT_HASH)) for i in range(0, 3 * BLOCK, BLOCK)}
    with proxied_s3_volume(s3_server, tmp_path, BLOCK) as (vol, proxy):
        chunkfs("import", vol.meta_url, str(src), "/m")
        # two downloads at a time, 0.5 s each: the first shard's third block goes alone, while
        # a slot is free for a sibling
        proxy.config.kinds, proxy.config.delay, proxy.config.rate = ("delay",), 0.5, 1.0
        with mounted(vol, *NATIVE, "--max-downloads", "2") as m:
            assert (m.path / "m" / first).read_bytes() == shards[first]
            wait_for(lambda: metric(m.path, FILLED) == 2, timeout=60)
            spans = list(proxy.config.get_spans)
    mine = [(start, end) for path, start, end in spans if any(path.endswith(k) for k in first_keys)]
    others = [start for path, start, _ in spans if not any(path.endswith(k) for k in first_keys)]
    assert len(mine) == 3 and len(others) == 3
    assert min(others) >= max(end for _, end in mine) - 0.05, "a sibling was fetched beside the shard"

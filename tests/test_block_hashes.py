"""Block hash algorithms: BLAKE3 (new volumes) and SHA-256 (older volumes, or chosen), their
ids never confused: units of the codec, then a SHA-256 volume and a BLAKE3 volume holding
the same model, warmed into one node cache and read through real mounts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import blake3
import pytest

from chunkfs.blocks import DEFAULT_HASH, HASHES, BlockCodec, BlockCorrupt, block_id
from chunkfs.cache.block_cache import BlockCache
from tests.conftest import BLOCK, VolumeFixture, assert_cache_sound, block_files, chunkfs, format_volume, mounted
from tests.test_warmup import assert_same_tree, make_model


def test_each_volume_verifies_with_its_own_algorithm() -> None:
    data = b"weights" * 1000
    assert block_id(data, "sha256") == hashlib.sha256(data).digest()
    assert block_id(data, "blake3") == blake3.blake3(data).digest()
    assert DEFAULT_HASH == "blake3" and set(HASHES) == {"blake3", "sha256"}
    for algorithm in HASHES:
        for compression in ("none", "lz4"):
            codec = BlockCodec(compression, algorithm)
            bid = codec.block_id(data)
            assert codec.decode(bid, codec.encode(data), len(data)) == data
            other = BlockCodec(compression, next(a for a in HASHES if a != algorithm))
            with pytest.raises(BlockCorrupt):  # the same bytes under the other algorithm's id
                other.decode(bid, other.encode(data), len(data))
    with pytest.raises(ValueError, match="unknown block hash"):
        BlockCodec("none", "md5")


def test_the_node_cache_keeps_each_algorithm_apart(tmp_path: Path) -> None:
    data = b"x" * 5000
    caches = {a: BlockCache([tmp_path], capacity=1 << 30, free_ratio=0, hash=a) for a in HASHES}
    for algorithm, cache in caches.items():
        cache.put(block_id(data, algorithm), data)
    assert sorted(p.parent.parent.name for p in block_files(tmp_path)) == ["blocks", "blocks-blake3"]
    sha = block_id(data, "sha256")
    assert caches["sha256"].contains(sha) and not caches["blake3"].contains(sha)
    assert assert_cache_sound(tmp_path) == 2


def _volume(tmp_path: Path, name: str, *extra: str) -> VolumeFixture:
    (tmp_path / name).mkdir()
    return format_volume(tmp_path / name, *extra)


@pytest.mark.mount
def test_a_sha256_and_a_blake3_volume_share_a_node_cache(tmp_path: Path) -> None:
    src = make_model(tmp_path / "model")
    sha = _volume(tmp_path, "sha", "--hash", "sha256")
    b3 = _volume(tmp_path, "b3")  # the default
    cache = tmp_path / "node-cache"
    for vol, algorithm in ((sha, "sha256"), (b3, "blake3")):
        assert json.loads(chunkfs("status", vol.meta_url, "--json").stdout)["format"]["hash"] == algorithm
        chunkfs("import", vol.meta_url, str(src), "/m")
        chunkfs("warmup", vol.meta_url, "/m", "--cache-dir", str(cache))
        assert json.loads(chunkfs("fsck", vol.meta_url, "--check-content", "--json").stdout)["clean"]
    entries = block_files(cache)
    namespaces = {p.parent.parent.name for p in entries}
    assert namespaces == {"blocks", "blocks-blake3"}
    assert assert_cache_sound(cache) == len(entries)
    for vol in (sha, b3):
        with mounted(vol, cache=cache, name="mnt") as m:
            assert_same_tree(src, m.path / "m")
    # both read from the cache: nothing new fetched, the only new entries are the model files'
    # images (the native transport's passthrough)
    added = [p for p in block_files(cache) if p not in set(entries)]
    model_sizes = {p.stat().st_size for p in src.rglob("*.safetensors")}
    assert added and all(p.stat().st_size in model_sizes for p in added)
    assert assert_cache_sound(cache) == len(entries) + len(added)
    # the same bytes have different ids: the stores hold different keys
    assert {p.name for p in block_files(sha.storage)}.isdisjoint({p.name for p in block_files(b3.storage)})


def test_the_hash_of_a_volume_with_files_cannot_change(tmp_path: Path) -> None:
    vol = format_volume(tmp_path)
    (tmp_path / "f").write_bytes(b"a" * BLOCK)
    chunkfs("import", vol.meta_url, str(tmp_path / "f"), "/f")
    out = chunkfs("format", vol.meta_url, "--force", "--hash", "sha256", check=False)
    assert out.returncode != 0 and "cannot change" in out.stderr and out.stderr.count("\n") == 1
    bad = chunkfs("format", f"sqlite://{tmp_path / 'x.db'}", "--storage", str(tmp_path / "x"), "--hash", "md5",
                  check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr

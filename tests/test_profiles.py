"""Access profiles: the format and recorder (pure), the engines' storage (every engine), and
real mounts against an S3 server behind a proxy that logs the order of block GETs: a mount
records a non-sequential loader's order, and the next mount's prefetch and a warmup fetch
in that order (and without the profile they do not)."""

from __future__ import annotations

import errno
import io
import json
import os
import random
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkfs.errors import FsError
from chunkfs.meta import ROOT_INODE, MetaStore, open_meta
from chunkfs.meta.base import MAX_PROFILE_BYTES
from chunkfs.meta.dump import dump, load
from chunkfs.profile import AccessProfile, ProfileDamaged, ProfileRecorder
from tests.conftest import VolumeFixture, chunkfs, mounted, proxied_s3_volume, wait_for
from tests.faultproxy import FaultProxy
from tests.test_cli import assert_one_line_error

BLOCK = 64 << 10
FILE_BLOCKS = 24

DAEMON_SERVED = ("--fuse-transport", "libfuse")


# -- the format and the recorder -------------------------------------------------------------

def test_a_recorder_keeps_first_reads_as_runs() -> None:
    r = ProfileRecorder()
    for name, index in [("a", 0), ("a", 1), ("a", 2), ("b", 7), ("a", 1), ("b", 8), ("a", 3), ("c", 0)]:
        r.note(name, index)
    profile = r.finished()
    assert profile.runs == [(0, 0, 3), (1, 7, 2), (0, 3, 1), (2, 0, 1)] and profile.names == ["a", "b", "c"]
    assert list(profile.entries()) == [("a", 0), ("a", 1), ("a", 2), ("b", 7), ("b", 8), ("a", 3), ("c", 0)]
    again = AccessProfile.from_bytes(profile.to_bytes())
    assert again == profile and profile.blocks == 7
    capped = ProfileRecorder(limit=2)
    assert [capped.note("x", i) for i in range(4)] == [True, True, False, False]


@pytest.mark.parametrize("data", [b"", b"junk", b"x\x9c\x03\x00", AccessProfile(["a"], [(1, 0, 1)]).to_bytes(),
                                  AccessProfile(["a"], [(0, -1, 1)]).to_bytes(),
                                  AccessProfile(["a"], [(0, 0, 10**12)]).to_bytes(),  # would spin a prefetch
                                  zlib.compress(b'{"v":1,"names":["a"],"runs":[0,0,1e400]}')])
def test_a_damaged_profile_is_refused(data: bytes) -> None:
    with pytest.raises(ProfileDamaged):
        AccessProfile.from_bytes(data)


def test_a_tensor_parallel_profile_of_a_large_model_is_a_few_kb() -> None:
    """4 readers each mapping a quarter of every tensor's rows, 140 GB at 8 MiB blocks."""
    r = ProfileRecorder()
    rng = random.Random(1)
    for shard in range(30):
        blocks = 560
        for start in range(0, blocks, 8):
            for rank in range(4):
                r.note(f"model-{shard:05d}-of-00030.safetensors", min(blocks - 1, start + rank * 2 + rng.randrange(2)))
    data = r.finished().to_bytes()
    assert len(data) < 64 << 10, len(data)


# -- the engines -----------------------------------------------------------------------------

def test_engines_store_profiles_per_directory(meta: MetaStore, tmp_path: Path) -> None:
    d = meta.mkdir(ROOT_INODE, b"m", 0o755, 0, 0, 0)
    f = meta.publish_file(d.ino, b"f", mode=0o644, uid=0, gid=0, mtime_ns=0, size=0, blocks=[])
    assert meta.get_profile(d.ino) is None
    assert meta.set_profile(d.ino, b"first", replace=False)
    assert not meta.set_profile(d.ino, b"second", replace=False) and meta.get_profile(d.ino) == b"first"
    assert meta.set_profile(d.ino, b"third") and meta.get_profile(d.ino) == b"third"
    for call, code in [(lambda: meta.set_profile(f.ino, b"x"), errno.ENOTDIR),
                       (lambda: meta.set_profile(d.ino, bytes(MAX_PROFILE_BYTES + 1)), errno.E2BIG),
                       (lambda: meta.set_profile(999, b"x"), errno.ENOENT)]:
        with pytest.raises(FsError) as info:
            call()
        assert info.value.errno == code
    snap = meta.snapshot(d.ino, ROOT_INODE, b"m@1", source="/m", created_ns=1)
    assert meta.get_profile(snap.ino) == b"third"  # a snapshot keeps its model's profile
    assert meta.set_profile(snap.ino, b"of the snapshot")  # a hint: allowed on a snapshot
    out = io.StringIO()
    dump(meta, out)
    assert meta.set_profile(d.ino, None) and meta.get_profile(d.ino) is None
    meta.unlink(d.ino, b"f")
    meta.rmdir(ROOT_INODE, b"m")
    meta.delete_snapshot(snap.ino)
    assert meta.get_profile(snap.ino) is None  # goes with its directory
    loaded = open_meta(f"sqlite://{tmp_path / 'loaded.db'}", create=True)
    try:
        load(loaded, io.StringIO(out.getvalue()))
        assert loaded.get_profile(loaded.lookup(ROOT_INODE, b"m").ino) == b"third"
        assert loaded.get_profile(loaded.lookup(ROOT_INODE, b"m@1").ino) == b"of the snapshot"
    finally:
        loaded.close()


# -- real mounts, with the order of GETs seen at the store ----------------------------------

LOADER = r"""
import os, sys
block, order = int(sys.argv[1]), sys.argv[2:]
fds = {}
for item in order:
    name, index = item.rsplit(":", 1)
    if name not in fds:
        fds[name] = os.open(os.path.join(os.environ.get("MODEL") or os.environ["CHUNKFS_MODEL_PATH"], name), 0)
        os.posix_fadvise(fds[name], 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead: one read, one block
    assert len(os.pread(fds[name], block, int(index) * block)) > 0
"""


def loader_order() -> list[tuple[str, int]]:
    """A tensor-parallel-like order: both shards interleaved, each from its end backwards."""
    return [(name, index) for index in reversed(range(FILE_BLOCKS)) for name in ("b.safetensors", "a.safetensors")]


@pytest.fixture
def s3_volume(s3_server, tmp_path: Path) -> Iterator[tuple[VolumeFixture, FaultProxy]]:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    for name in ("a.safetensors", "b.safetensors"):
        (src / name).write_bytes(rng.randbytes(FILE_BLOCKS * BLOCK))
    (src / "config.json").write_text("{}\n")
    with proxied_s3_volume(s3_server, tmp_path, BLOCK) as (vol, proxy):
        chunkfs("import", vol.meta_url, str(src), "/m")
        yield vol, proxy


def block_names(vol: VolumeFixture) -> dict[str, tuple[str, int]]:
    """Block id (hex) -> (file, index) of the model's files."""
    meta = open_meta(vol.meta_url)
    try:
        m = meta.lookup(ROOT_INODE, b"m").ino
        out = {}
        for name in ("a.safetensors", "b.safetensors"):
            for index, bid in meta.read_blocks(meta.lookup(m, name.encode()).ino).stored():
                out[bid.hex()] = (name, index)
        return out
    finally:
        meta.close()


def gets_in_order(proxy: FaultProxy, names: dict[str, tuple[str, int]], since: int) -> list[tuple[str, int]]:
    """The model's blocks in the order their first GET reached the store since GET ``since``."""
    ids = [key.rsplit("/", 1)[-1] for key in proxy.config.get_order[since:]]
    return [names[i] for i in dict.fromkeys(ids) if i in names]


def displacement(got: list[tuple[str, int]], wanted: list[tuple[str, int]]) -> int:
    """How far, at most, an item of ``got`` is from its place in ``wanted``."""
    place = {item: i for i, item in enumerate(wanted)}
    return max(abs(i - place[item]) for i, item in enumerate(got))


def run_loader(mnt: Path, order: list[tuple[str, int]]) -> None:
    subprocess.run([sys.executable, "-c", LOADER, str(BLOCK), *(f"{n}:{i}" for n, i in order)],
                   env={**os.environ, "MODEL": str(mnt / "m")}, check=True, timeout=120)


def open_one_file_and_wait(mnt: Path, proxy: FaultProxy, since: int, count: int) -> None:
    """Open one shard without reading it; wait until ``count`` block GETs reached the store."""
    fd = os.open(mnt / "m" / "a.safetensors", os.O_RDONLY)
    try:
        wait_for(lambda: len(proxy.config.get_order) - since >= count, timeout=60)
    finally:
        os.close(fd)


@pytest.mark.mount
def test_a_recorded_profile_orders_the_next_mounts_prefetch_and_warmup(s3_volume, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol, proxy = s3_volume
    names = block_names(vol)
    order = loader_order()
    # the daemon-served path, where profiles apply (the native transport passes the loads of
    # model files through to file images, filled whole in name order, and records nothing)
    # the probe reads too little to stand for a load
    with mounted(vol, *DAEMON_SERVED, cache=tmp_path / "c0", name="probe") as probe:
        run_loader(tmp_path / "probe", order[:6])
    assert "not storing the access profile of m yet: its readers read 6 of the 48 blocks" in probe.log_text()
    assert_one_line_error(chunkfs("profile", "show", vol.meta_url, "/m", check=False))
    with mounted(vol, *DAEMON_SERVED, "--max-downloads", "2", cache=tmp_path / "c1", name="first"):
        run_loader(tmp_path / "first", order)
    shown = json.loads(chunkfs("profile", "show", vol.meta_url, "/m", "--json").stdout)
    recorded = [(run["file"], run["first_block"] + k) for run in shown["order"] for k in range(run["blocks"])]
    assert recorded == order, recorded[:10]  # the loader's first reads, in its order

    since = len(proxy.config.get_order)
    with mounted(vol, *DAEMON_SERVED, "--max-downloads", "2", cache=tmp_path / "c2", name="second") as mnt:
        open_one_file_and_wait(mnt.path, proxy, since, len(order))
        wait_for(lambda: "prefetching m (access profile)" in mnt.log_text())
    got = gets_in_order(proxy, names, since)
    assert sorted(got) == sorted(order) and displacement(got, order) <= 4, got[:10]
    assert "prefetching m (access profile): 48 blocks in the recorded order" in mnt.log_text()
    assert len(got) == len(order)

    since = len(proxy.config.get_order)  # the same without the profile: file order, far from it
    with mounted(vol, *DAEMON_SERVED, "--max-downloads", "2", "--access-profile", "off", cache=tmp_path / "c3",
                 name="third") as mnt:
        open_one_file_and_wait(mnt.path, proxy, since, FILE_BLOCKS)
    got = gets_in_order(proxy, names, since)
    assert got[:FILE_BLOCKS] != order[:FILE_BLOCKS] and displacement(got, order) > FILE_BLOCKS // 2

    since = len(proxy.config.get_order)
    report = json.loads(chunkfs("warmup", vol.meta_url, "/m", "--cache-dir", str(tmp_path / "c4"),
                                "--threads", "1", "--json", "-q").stdout)
    assert report["complete"]
    assert gets_in_order(proxy, names, since) == order  # a warmup follows the profile too


@pytest.mark.mount
def test_profile_command_records_shows_and_deletes(s3_volume, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol, _proxy = s3_volume
    order = loader_order()[:10]
    loader = [sys.executable, "-c", LOADER, str(BLOCK), *(f"{n}:{i}" for n, i in order)]
    result = chunkfs("profile", "record", "--cache-dir", str(tmp_path / "c"), vol.meta_url, "/m", "--", *loader)
    assert "recorded the access profile of /m: 10 blocks of 2 files" in result.stdout
    shown = chunkfs("profile", "show", vol.meta_url, "/m").stdout
    assert "10 blocks of 2 files in 10 runs" in shown and "b.safetensors: blocks 23..23" in shown
    before = chunkfs("profile", "show", vol.meta_url, "/m", "--json").stdout
    reads_then_fails = ("import os, sys; fd = os.open(sys.argv[1] + '/a.safetensors', os.O_RDONLY); "
                        "os.pread(fd, 100, 0); sys.exit(3)")
    failing = chunkfs("profile", "record", "--cache-dir", str(tmp_path / "c"), vol.meta_url, "/m", "--",
                      sys.executable, "-c", reads_then_fails, "{}", check=False)
    assert_one_line_error(failing)
    assert "exited with status 3" in failing.stderr
    assert chunkfs("profile", "show", vol.meta_url, "/m", "--json").stdout == before  # left as it was
    assert "deleted" in chunkfs("profile", "delete", vol.meta_url, "/m").stdout
    for args in [("show", vol.meta_url, "/m"), ("delete", vol.meta_url, "/m"), ("show", vol.meta_url, "/nope"),
                 ("show", vol.meta_url, "/m/config.json"), ("record", vol.meta_url, "/m"),
                 ("show", vol.meta_url, "/m", "--", "ls"), ("record", vol.meta_url, "/m", "--", "/no/such/program"),
                 ("record", vol.meta_url, "/m", "--json", "--", "true"), ("list", vol.meta_url, "/m")]:
        assert_one_line_error(chunkfs("profile", *args, check=False))
    assert_one_line_error(chunkfs("profile", "record", vol.meta_url, "/m", "--", "true", check=False))

"""Redis metadata end to end: standalone, TLS + ACL and cluster behind real mounts; a restart
while a model is read; connection and auth failures; secrets masked; dump and load."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from chunkfs.fuse.mountinfo import find_mount
from chunkfs.meta import open_meta
from chunkfs.meta.base import ROOT_INODE
from tests.conftest import (
    BLOCK,
    VolumeFixture,
    background_mount,
    chunkfs,
    force_unmount,
    meta_url,
    mounted,
    tree_listing,
    volume_on,
)
from tests.test_cli import assert_one_line_error
from tests.test_mount_read import FILES

pytestmark = pytest.mark.mount


@pytest.mark.parametrize("kind", ["redis", "redis-tls", "redis-cluster"])
def test_format_import_mount_every_byte(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                                        source: Path) -> None:
    vol = volume_on(request, tmp_path, kind)
    chunkfs("import", vol.meta_url, str(source), "/model")
    status = chunkfs("status", vol.meta_url).stdout
    assert "10 files" in status
    assert "s3cret" not in status
    with mounted(vol) as m:
        assert tree_listing(m.path / "model") == tree_listing(source)
        for rel in FILES:
            assert (m.path / "model" / rel).read_bytes() == (source / rel).read_bytes(), rel
    assert "s3cret" not in m.log_text()


def test_redis_restart_while_reading(redis_server, request: pytest.FixtureRequest, tmp_path: Path,  # type: ignore[no-untyped-def]
                                     source: Path) -> None:
    big = source / "big.bin"
    big.write_bytes(os.urandom(48 * BLOCK + 3))
    vol = volume_on(request, tmp_path, "redis")
    chunkfs("import", vol.meta_url, str(source), "/model")
    data = big.read_bytes()
    with mounted(vol) as m, open(m.path / "model/big.bin", "rb", buffering=0) as f:
        first = f.read(len(data) // 2)
        redis_server.restart(0, down_seconds=1.0)
        rest = f.read()
        assert first + rest == data
        # a lookup the mount has not cached yet goes to the restarted server (retried)
        assert (m.path / "model/nested/deeper/text.txt").read_text() == "hello chunkfs\n"


def test_metadata_outage_gives_eio_not_a_hang_and_the_daemon_survives(
        redis_server, request: pytest.FixtureRequest, tmp_path: Path, source: Path) -> None:  # type: ignore[no-untyped-def]
    vol = volume_on(request, tmp_path, "redis")
    chunkfs("import", vol.meta_url, str(source), "/model")
    with mounted(vol, allow_errors=True) as m:
        (m.path / "model/one").read_bytes()
        from chunkfs.procs import stop_process as stop

        stop(redis_server.procs[0])
        try:
            start = time.monotonic()
            with pytest.raises(OSError):
                (m.path / "model/zeros").read_bytes()  # not looked up yet: needs the engine
            assert time.monotonic() - start < 60
            assert (m.path / "model/one").read_bytes() == (source / "one").read_bytes()  # cached: still served
        finally:
            redis_server.restart(0)
        assert (m.path / "model/zeros").read_bytes() == (source / "zeros").read_bytes()
    assert "unavailable" in m.log_text()


def test_connection_and_auth_failures_are_one_line(redis_server, redis_tls_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tls = urlsplit(redis_tls_server.url)
    plain = urlsplit(redis_server.url)
    cases = [
        (redis_tls_server.url.replace("s3cret-pass", "wrong-pass"), "authentication"),
        (redis_tls_server.url.replace("chunkfs:s3cret-pass", "nobody:s3cret-pass"), "authentication"),
        (f"redis://chunkfs:s3cret-pass@127.0.0.1:{tls.port}/2", "cannot connect"),  # plain client, TLS port
        (f"rediss://127.0.0.1:{plain.port}/1?ca={tls.query.split('=')[1]}", "cannot connect"),  # TLS client, plain
        ("redis://:pw-xyz@127.0.0.1:1/0", "cannot connect"),
        (f"redis://127.0.0.1:{plain.port}/1?bogus=1", "unknown Redis URL option"),
    ]
    for url, fragment in cases:
        start = time.monotonic()
        result = chunkfs("status", url, check=False, timeout=90)
        assert_one_line_error(result, fragment)
        assert time.monotonic() - start < 60
        for secret in ("s3cret-pass", "wrong-pass", "pw-xyz"):
            assert secret not in result.stderr


def test_password_from_environment(redis_tls_server, tmp_path: Path, source: Path) -> None:  # type: ignore[no-untyped-def]
    url = redis_tls_server.url.replace(":s3cret-pass@", "@") + "&prefix=envpw"
    env = dict(os.environ, CHUNKFS_META_PASSWORD="s3cret-pass")
    chunkfs("format", url, "--storage", str(tmp_path / "blocks"), env=env)
    chunkfs("import", url, str(source), "/m", env=env)
    assert "10 files" in chunkfs("status", url, env=env).stdout
    assert_one_line_error(chunkfs("status", url, check=False), "authentication")


def test_background_mount_hides_the_password(redis_tls_server, request: pytest.FixtureRequest,  # type: ignore[no-untyped-def]
                                             tmp_path: Path, source: Path) -> None:
    vol = volume_on(request, tmp_path, "redis-tls")
    chunkfs("import", vol.meta_url, str(source), "/model")
    mnt, log, pid, result = background_mount(vol.meta_url, tmp_path)
    try:
        assert (mnt / "model/several").read_bytes() == (source / "several").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"s3cret-pass" not in cmdline and b"****" in cmdline
        assert b"s3cret-pass" not in Path(f"/proc/{pid}/environ").read_bytes()
        assert "s3cret-pass" not in result.stderr
    finally:
        chunkfs("umount", str(mnt), check=False)
        force_unmount(mnt)
    assert "s3cret-pass" not in log.read_text()


def test_dump_load_between_sqlite_and_redis(request: pytest.FixtureRequest, tmp_path: Path, source: Path) -> None:
    vol = volume_on(request, tmp_path, "sqlite")
    chunkfs("import", vol.meta_url, str(source), "/model")
    meta = open_meta(vol.meta_url)
    try:  # a hard link and extended attributes, which a dump must carry too
        model = meta.lookup(ROOT_INODE, b"model")
        several = meta.lookup(model.ino, b"several")
        meta.link(several.ino, ROOT_INODE, b"several-link")
        meta.set_xattr(several.ino, b"user.origin", b"hf:\x00\xff")
        meta.set_xattr(model.ino, b"user.revision", b"main")
    finally:
        meta.close()
    dumped = chunkfs("dump", vol.meta_url).stdout
    assert dumped.splitlines()[0].startswith('{"chunkfs_dump": 3')
    assert '"type": "hardlink"' in dumped
    redis_url = meta_url("redis", request, tmp_path)
    chunkfs("load", redis_url, input=dumped)
    assert chunkfs("dump", redis_url).stdout == dumped
    loaded = open_meta(redis_url)
    try:
        link = loaded.lookup(ROOT_INODE, b"several-link")
        model = loaded.lookup(ROOT_INODE, b"model")
        assert link.nlink == 2 and loaded.lookup(model.ino, b"several").ino == link.ino
        assert loaded.get_xattr(link.ino, b"user.origin") == b"hf:\x00\xff"
        assert loaded.list_xattrs(model.ino) == [b"user.revision"]
    finally:
        loaded.close()
    back = f"sqlite://{tmp_path}/back.db"
    subprocess.run([sys.executable, "-m", "chunkfs", "dump", redis_url, "-o", str(tmp_path / "meta.json")],
                   check=True)
    chunkfs("load", back, "-i", str(tmp_path / "meta.json"))
    assert chunkfs("dump", back).stdout == dumped
    before = chunkfs("status", vol.meta_url, "--json").stdout
    redis_vol = VolumeFixture(redis_url, vol.storage, vol.db, tmp_path)
    with mounted(redis_vol) as m:
        assert tree_listing(m.path / "model") == tree_listing(source)
        for rel in FILES:
            assert (m.path / "model" / rel).read_bytes() == (source / rel).read_bytes(), rel
    # refusals change nothing
    assert_one_line_error(chunkfs("load", redis_url, input=dumped, check=False), "already holds a volume")
    assert_one_line_error(chunkfs("load", f"sqlite://{tmp_path}/x.db", input="garbage\n", check=False),
                          "not a chunkfs dump")
    assert chunkfs("dump", redis_url).stdout == dumped
    assert chunkfs("status", vol.meta_url, "--json").stdout == before


def test_two_importers_into_one_directory_lose_nothing(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    vol = volume_on(request, tmp_path, "redis-cluster")
    sources = []
    for name in ("a", "b"):
        src = tmp_path / f"src-{name}"
        for i in range(30):
            (src / f"{name}-{i}").parent.mkdir(parents=True, exist_ok=True)
            (src / f"{name}-{i}").write_bytes(os.urandom(100 + i))
        sources.append(src)
    procs = [subprocess.Popen([sys.executable, "-m", "chunkfs", "import", vol.meta_url, str(s), "/shared",
                               "--threads", "4"], stderr=subprocess.PIPE) for s in sources]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    with mounted(vol) as m:
        names = sorted(os.listdir(m.path / "shared"))
        assert names == sorted([f"a-{i}" for i in range(30)] + [f"b-{i}" for i in range(30)])
        for src in sources:
            for f in src.iterdir():
                assert (m.path / "shared" / f.name).read_bytes() == f.read_bytes()
    assert find_mount(str(m.path)) is None

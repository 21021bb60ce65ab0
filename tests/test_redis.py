"""Redis metadata end to end: standalone, TLS + ACL and cluster behind real mounts; a restart
while a model is read; connection and auth failures; secrets masked; dump and load."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from chunkfs.errors import FsError
from chunkfs.fuse.mountinfo import find_mount
from chunkfs.meta import open_meta
from chunkfs.meta.base import ROOT_INODE
from chunkfs.meta.dump import DUMP_VERSION
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
    assert dumped.splitlines()[0].startswith(f'{{"chunkfs_dump": {DUMP_VERSION}')
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


def _strip_links(meta, dirs: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Make the volume look as chunkfs before directory links left it."""
    for ino in dirs:
        meta.client.hdel(meta._ikey(ino), "parent", "pname")
    meta.client.delete(meta.prefix + "parents")


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_the_subtree_check_walks_up_and_old_volumes_stay_right(kind: str, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    """A rename's "not below itself" check walks up from the destination: it reads no
    directory listing, however large the moved tree (counted at the server). A volume made
    before directory links (and a link made stale by such a chunkfs moving a directory) is
    still checked right, by the subtree search, and its first writable session links it."""
    from chunkfs.meta.base import VolumeFormat

    meta = open_meta(meta_url(kind, request, tmp_path), create=True)
    meta.save_format(VolumeFormat(name="t", uuid="u", storage="file:///x", block_size=4, compression="none",
                                  created="2026-01-01T00:00:00+00:00"))
    big = meta.mkdir(ROOT_INODE, b"big", 0o755, 0, 0, 0)
    subdirs = [meta.mkdir(big.ino, f"d{i}".encode(), 0o755, 0, 0, 0).ino for i in range(200)]
    deep = meta.mkdir(subdirs[-1], b"deep", 0o755, 0, 0, 0)
    other = meta.mkdir(ROOT_INODE, b"other", 0o755, 0, 0, 0)
    # the server holding the volume (one slot: one node of a cluster)
    server = (meta.client.get_node_from_key(meta._format_key).redis_connection  # type: ignore[union-attr]
              if kind == "redis-cluster" else meta.client)

    def hgetalls() -> int:
        return int(server.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))

    def refused() -> bool:
        try:
            meta.rename(ROOT_INODE, b"big", deep.ino, b"x")
        except FsError as exc:
            return exc.errno == errno.EINVAL
        return False

    server.config_resetstat()
    assert refused() and hgetalls() == 0  # walked up: deep, d199, big
    meta.rename(ROOT_INODE, b"other", deep.ino, b"other")  # allowed, and no listing read either
    assert hgetalls() == 0

    _strip_links(meta, [big.ino, *subdirs, deep.ino, other.ino])
    assert refused() and hgetalls() >= 200  # no links: the subtree search, still right
    meta.open_session("s-1", 0)  # links every directory
    assert meta.client.get(meta.prefix + "parents") == b"1"
    server.config_resetstat()
    assert refused() and hgetalls() == 0

    # a chunkfs without links moves d199 (with deep) to the root: its link is stale
    meta.client.hdel(meta._dkey(big.ino), "d199")
    meta.client.hset(meta._dkey(ROOT_INODE), "d199", subdirs[-1])
    meta.rename(ROOT_INODE, b"d199", ROOT_INODE, b"moved")  # (the link now names the root)
    meta.client.hset(meta._ikey(subdirs[-1]), mapping={"parent": big.ino, "pname": "d199"})  # stale again
    assert not refused()  # big may now go below deep: deep is no longer inside big
    assert meta.lookup(deep.ino, b"x").ino == big.ino
    with pytest.raises(FsError) as err:
        meta.rename(deep.ino, b"x", subdirs[0], b"y")  # big into its own child: refused despite the stale link
    assert err.value.errno == errno.EINVAL
    meta.close()

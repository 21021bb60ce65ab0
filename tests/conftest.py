"""Shared fixtures: a volume on the embedded default, a source tree, real FUSE mounts.

Mounts run ``python -m chunkfs mount`` in a subprocess (as users do); tests are plain
syscalls on the mountpoint. Every mount is torn down with ``fusermount3 -u -z`` even when a
test fails, and its log is checked for tracebacks (a daemon must never crash).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chunkfs.blocks import block_id
from chunkfs.cache.images import image_id
from chunkfs.fuse.mountinfo import find_mount
from chunkfs.meta import MetaStore, VolumeFormat, open_meta
from tests import mount_guard
from tests.faultproxy import FaultProxy
from tests.mount_guard import require_mount_marker

BLOCK = 64 << 10  # small blocks make multi-block edge cases cheap


@pytest.fixture(autouse=True)
def _mount_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Note whether the test may mount: ``-m "not mount"`` must run no FUSE mount at all."""
    mount_guard.marked_mount = request.node.get_closest_marker("mount") is not None
    yield
    mount_guard.marked_mount = False


def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it holds (an exception counts as not yet), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def chunkfs(*args: str, check: bool = True, env: dict | None = None, timeout: float = 120,
            **kwargs) -> subprocess.CompletedProcess:
    """Run the chunkfs CLI the way a user does."""
    if args and args[0] in ("mount", "csi"):
        require_mount_marker()
    result = subprocess.run([sys.executable, "-m", "chunkfs", *args], capture_output=True, text=True,
                            env=env, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"chunkfs {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def make_source_tree(root: Path, block: int = BLOCK) -> Path:
    """Files at every block-boundary edge, zeros, a duplicate, symlinks, nested dirs, modes."""
    rng = __import__("random").Random(1234)
    root.mkdir(parents=True, exist_ok=True)
    sizes = {"empty": 0, "one": 1, "block-minus-1": block - 1, "block": block, "block-plus-1": block + 1,
             "several": 5 * block + 123}
    for name, size in sizes.items():
        (root / name).write_bytes(rng.randbytes(size))
    (root / "zeros").write_bytes(bytes(3 * block + 7))
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "nested" / "copy-of-several").write_bytes((root / "several").read_bytes())
    (root / "nested" / "deeper" / "text.txt").write_text("hello chunkfs\n")
    (root / "nested" / "link-to-several").symlink_to("../several")
    (root / "dangling").symlink_to("does-not-exist")
    (root / "private").write_bytes(b"secret-ish")
    os.chmod(root / "private", 0o600)
    os.chmod(root / "nested" / "deeper" / "text.txt", 0o755)
    os.utime(root / "one", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


@dataclass
class VolumeFixture:
    meta_url: str
    storage: Path
    db: Path
    tmp: Path


def format_volume(tmp: Path, *extra: str, block: int = BLOCK) -> VolumeFixture:
    db = tmp / "meta" / "v.db"
    storage = tmp / "blocks"
    vol = VolumeFixture(f"sqlite://{db}", storage, db, tmp)
    chunkfs("format", vol.meta_url, "--storage", f"file://{storage}", "--block-size", str(block), *extra)
    return vol


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_source_tree(tmp_path / "src")


@pytest.fixture
def volume(tmp_path: Path) -> VolumeFixture:
    return format_volume(tmp_path)


@pytest.fixture
def imported(volume: VolumeFixture, source: Path) -> VolumeFixture:
    chunkfs("import", volume.meta_url, str(source), "/model")
    return volume


class Mount:
    def __init__(self, proc: subprocess.Popen, mountpoint: Path, log: Path) -> None:
        self.proc = proc
        self.path = mountpoint
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_mounted(mountpoint: Path, proc: subprocess.Popen | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if find_mount(str(mountpoint)) is not None:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"mount daemon exited with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"{mountpoint} not mounted after {timeout}s")


def force_unmount(mountpoint: Path) -> None:
    if find_mount(str(mountpoint)) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(vol: VolumeFixture, *extra: str, cache: Path | None = None, allow_errors: bool = False,
            name: str = "mnt", read_only: bool = True) -> Iterator[Mount]:
    """A mount of ``vol`` (read-only unless told) served by a child process; always unmounted afterwards."""
    require_mount_marker()
    mountpoint = vol.tmp / name
    mountpoint.mkdir(exist_ok=True)
    cache = cache or vol.tmp / "cache"
    log = vol.tmp / f"{name}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chunkfs", "mount", vol.meta_url, str(mountpoint), *mount_guard.mount_args,
             *(["--read-only"] if read_only else []), "--cache-dir", str(cache), *extra],
            stdout=logf, stderr=subprocess.STDOUT,
        )
    mount = Mount(proc, mountpoint, log)
    try:
        wait_mounted(mountpoint, proc)
        yield mount
    finally:
        force_unmount(mountpoint)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = mount.log_text()
    assert "Traceback" not in text or allow_errors, f"daemon log has a traceback:\n{text}"
    assert proc.returncode == 0, f"mount daemon exited {proc.returncode}:\n{text}"


def background_mount(meta_url: str, tmp: Path) -> tuple[Path, Path, int, subprocess.CompletedProcess]:
    """``chunkfs mount --background`` at tmp/bg, as a user runs it: (mountpoint, log, daemon pid, result)."""
    mnt = tmp / "bg"
    mnt.mkdir()
    log = tmp / "bg.log"
    result = chunkfs("mount", meta_url, str(mnt), "--read-only", "--background", "--cache-dir",
                     str(tmp / "cache"), "--log-file", str(log))
    pid = int(result.stderr.split("(pid ")[1].split(",")[0])
    return mnt, log, pid, result


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small filesystem at ``path`` (tmpfs), so free space is under the test's control."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(path: Path) -> None:
    """Write a file at ``path`` until its filesystem has no space left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def block_files(root: Path) -> list[Path]:
    """The files under ``root/blocks*``: a cache directory's entries (each hash algorithm's
    namespace) or a file store's objects."""
    return [p for d in root.glob("blocks*") for p in d.rglob("*") if p.is_file()]


def assert_cache_sound(cache: Path, block_size: int = BLOCK) -> int:
    """Every entry of a cache directory holds exactly the block its name is the hash of (with
    the algorithm of its namespace), or is a file image whose id its bytes give (the image id
    of its ``block_size`` pieces' hashes: ``cache/images.py``). Returns the number of entries."""
    files = block_files(cache)
    for path in files:
        algorithm = "sha256" if path.parent.parent.name == "blocks" else path.parent.parent.name.split("-", 1)[1]
        data = path.read_bytes()
        if block_id(data, algorithm).hex() == path.name:
            continue
        pieces = [block_id(data[i: i + block_size], algorithm) for i in range(0, len(data), block_size)]
        key = image_id(len(data), pieces)
        assert key is not None and key.hex() == path.name, f"{path} is neither the block nor the image it names"
    return len(files)


def listed_inodes(directory: Path) -> list[tuple[str, int]]:
    """(name, inode number) of each entry as ``readdir`` returns them, ``.`` and ``..``
    included, in the order the filesystem gives (``ls -f``: unsorted)."""
    out = subprocess.run(["ls", "-1fi", str(directory)], capture_output=True, text=True, check=True).stdout
    pairs = [line.split(maxsplit=1) for line in out.splitlines()]
    return [(name, int(ino)) for ino, name in pairs]


def expect_errno(code: int, fn, *args) -> None:  # type: ignore[no-untyped-def]
    """``fn(*args)`` fails with OSError ``code``."""
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, f"{fn.__name__}{args}: {info.value}"


def tree_listing(root: Path) -> list[tuple[str, str, int, int]]:
    """(relative path, kind, size-or-target-len, permission bits) for every entry under root."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            kind = "link" if path.is_symlink() else ("dir" if path.is_dir() else "file")
            size = st.st_size if kind == "file" else 0
            out.append((str(path.relative_to(root)), kind, size, st.st_mode & 0o7777))
    return sorted(out)


# -- real object-store servers (session-wide; each test uses its own bucket) -----------------
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.servers import apply_env, rclone_s3, s3_env

    apply_env(s3_env())  # mount subprocesses inherit the credentials, as on a real node
    with rclone_s3(tmp_path_factory.mktemp("s3") / "data") as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.servers import apply_env, fake_gcs, gcs_env

    with fake_gcs(tmp_path_factory.mktemp("gcs") / "data") as server:
        apply_env(gcs_env(server))
        yield server


def unique_bucket() -> str:
    import uuid

    return f"chunkfs-{uuid.uuid4().hex[:12]}"


def storage_url(kind: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    """A fresh, empty store location of the given kind."""
    if kind == "file":
        return f"file://{tmp / 'blocks'}"
    if kind == "s3":
        server = request.getfixturevalue("s3_server")
        return f"s3://{unique_bucket()}/models?endpoint={server.endpoint}"
    if kind == "gcs":
        request.getfixturevalue("gcs_server")
        return f"gs://{unique_bucket()}/models"
    raise ValueError(kind)


# -- Redis servers (session-wide; each test uses its own key prefix) ---------------------------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.servers import redis_standalone

    with redis_standalone(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_tls_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.servers import redis_tls_acl

    with redis_tls_acl(tmp_path_factory.mktemp("redis-tls")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.servers import redis_cluster

    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as server:
        yield server


META_KINDS = ["sqlite", "redis", "redis-tls", "redis-cluster"]
_REDIS_FIXTURES = {"redis": "redis_server", "redis-tls": "redis_tls_server", "redis-cluster": "redis_cluster_server"}


def meta_url(kind: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    """A fresh, empty metadata location of the given kind."""
    if kind == "sqlite":
        return f"sqlite://{tmp / 'meta' / 'v.db'}"
    import uuid

    server = request.getfixturevalue(_REDIS_FIXTURES[kind])
    sep = "&" if "?" in server.url else "?"
    return f"{server.url}{sep}prefix=t{uuid.uuid4().hex[:10]}"


def volume_on(request: pytest.FixtureRequest, tmp: Path, meta_kind: str = "sqlite", store_kind: str = "file",
              *extra: str) -> VolumeFixture:
    db = tmp / "meta" / "v.db"
    vol = VolumeFixture(meta_url(meta_kind, request, tmp), tmp / "blocks", db, tmp)
    chunkfs("format", vol.meta_url, "--storage", storage_url(store_kind, request, tmp), "--block-size", str(BLOCK),
            *extra)
    return vol


#: the volume settings of the engine contract tests (4-byte blocks)
FMT = VolumeFormat(name="t", uuid="u-1", storage="file:///x", block_size=4, compression="none",
                   created="2026-01-01T00:00:00+00:00")


@pytest.fixture(params=META_KINDS)
def meta(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetaStore]:
    """A formatted volume on each metadata engine: SQLite, redis-server standalone, TLS and cluster."""
    m = open_meta(meta_url(request.param, request, tmp_path), create=True)
    m.save_format(FMT)
    yield m
    m.close()


@contextlib.contextmanager
def proxied_s3_volume(s3_server, tmp: Path, block: int) -> Iterator[tuple[VolumeFixture, FaultProxy]]:  # type: ignore[no-untyped-def]
    """A fresh volume on the S3 server reached through a ``FaultProxy`` (no faults until a
    test sets a rate; the proxy counts and orders the block GETs)."""
    with FaultProxy(s3_server.endpoint) as proxy:
        db = tmp / "meta" / "v.db"
        vol = VolumeFixture(f"sqlite://{db}", tmp / "blocks", db, tmp)
        chunkfs("format", vol.meta_url, "--storage", f"s3://{unique_bucket()}/m?endpoint={proxy.endpoint}",
                "--block-size", str(block))
        yield vol, proxy

"""The CLI as users drive it: bad inputs give one line and a non-zero exit and change
nothing stored; mount lifecycle (background, SIGTERM, umount, dead mounts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from chunkfs.fuse.mountinfo import find_mount
from tests.conftest import (
    VolumeFixture,
    background_mount,
    chunkfs,
    force_unmount,
    mounted,
    require_mount_marker,
    wait_mounted,
)

REPO = Path(__file__).resolve().parents[1]


def snapshot(vol: VolumeFixture) -> tuple[str, list[tuple[str, int]]]:
    """Everything stored: the metadata rows and the object files."""
    conn = sqlite3.connect(vol.db)
    dump = "\n".join(conn.iterdump())
    conn.close()
    objects = sorted((str(p.relative_to(vol.storage)), p.stat().st_size)
                     for p in vol.storage.rglob("*") if p.is_file())
    return dump, objects


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int | None = None) -> None:
    assert result.returncode != 0, result
    if code is not None:
        assert result.returncode == code, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    # ours: "chunkfs: <message>"; argparse's usage errors: "chunkfs <command>: error: <message>"
    errors = [ln for ln in lines if re.match(r"chunkfs( [a-z]+: error)?: ", ln)]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# -- format -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "fragments"), [
    (["mysql://h/db", "--storage", "/tmp/x"], ["unsupported metadata URL"]),
    (["sqlite://", "--storage", "/tmp/x"], ["needs a database path"]),
    (["notaurl", "--storage", "/tmp/x"], ["not a URL"]),
    (["sqlite:///{tmp}/v.db", "--storage", "ftp://h/x"], ["unsupported storage URL"]),
    (["sqlite:///{tmp}/v.db", "--storage", "/tmp/x", "--block-size", "3M"], ["power of two"]),
    (["sqlite:///{tmp}/v.db", "--storage", "/tmp/x", "--block-size", "huge"], ["invalid size"]),
    (["sqlite:///{tmp}/v.db", "--storage", "/tmp/x", "--compress", "zstd"], ["invalid choice"]),
    (["sqlite:///{tmp}/v.db"], ["needs --storage"]),
    (["sqlite:///{tmp}/v.db", "--storage", "s3://bucket/p?secret_key=abc"], ["credentials"]),
    (["sqlite:///{tmp}/v.db", "--storage", "/dev/null/blocks"], ["cannot create storage directory"]),
    (["sqlite:///dev/null/x.db", "--storage", "/tmp/x"], ["cannot create"]),
    (["redis://:secret@[::1/0", "--storage", "/tmp/x"], ["not a valid URL", "Invalid IPv6"]),
    (["redis://host:notaport/0", "--storage", "/tmp/x"], ["not a valid URL", "Port"]),
    (["redis://host:99999/0", "--storage", "/tmp/x"], ["not a valid URL", "out of range"]),
    (["sqlite:///{tmp}/v.db", "--storage", "s3://bucket:99999/x"], ["not a valid URL", "out of range"]),
    (["sqlite:///{tmp}/v.db", "--storage", "s3://bucket:9000/x"], ["bucket name holds only"]),
    (["sqlite:///{tmp}/v.db", "--storage", "gs://bu ck/x"], ["bucket name holds only"]),
])
def test_format_bad_inputs(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    args = [a.replace("/{tmp}", str(tmp_path)) for a in args]
    result = chunkfs("format", *args, check=False)
    assert_one_line_error(result, *fragments)
    assert "secret" not in result.stderr and "abc" not in result.stderr


def test_format_refusals_change_nothing(imported: VolumeFixture, tmp_path: Path) -> None:
    before = snapshot(imported)
    assert_one_line_error(chunkfs("format", imported.meta_url, "--storage", str(imported.storage), check=False),
                          "already holds volume", "--force")
    assert_one_line_error(chunkfs("format", f"sqlite://{tmp_path}/other.db", "--storage",
                                  str(imported.storage), check=False), "already holds another volume")
    assert_one_line_error(chunkfs("format", imported.meta_url, "--storage", str(imported.storage), "--force",
                                  "--block-size", "128K", check=False), "cannot change")
    assert snapshot(imported) == before
    assert not (tmp_path / "other.db").exists()


# -- import, status on bad volumes ------------------------------------------------------------
@pytest.mark.mount
def test_unformatted_and_unreachable_volumes(tmp_path: Path, source: Path) -> None:
    missing = f"sqlite://{tmp_path}/missing.db"
    (tmp_path / "mnt").mkdir()
    for cmd in (["import", missing, str(source), "/m"], ["status", missing],
                ["mount", missing, str(tmp_path / "mnt"), "--read-only", "--cache-dir", str(tmp_path / "c")]):
        assert_one_line_error(chunkfs(*cmd, check=False), "no chunkfs volume", "chunkfs format")
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "garbage.db").write_bytes(b"this is not sqlite" * 100)
    assert_one_line_error(chunkfs("status", f"sqlite://{tmp_path}/garbage.db", check=False), "not a database")
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert_one_line_error(chunkfs("status", f"sqlite://{empty}", check=False), "no chunkfs volume")
    assert_one_line_error(chunkfs("status", f"sqlite://{tmp_path}", check=False), "is a directory")
    assert_one_line_error(chunkfs("status", "redis://:hunter2@127.0.0.1:1/0", check=False))


def test_import_bad_inputs_change_nothing(imported: VolumeFixture, tmp_path: Path, source: Path) -> None:
    before = snapshot(imported)
    assert_one_line_error(chunkfs("import", imported.meta_url, str(tmp_path / "nope"), "/x", check=False),
                          "does not exist")
    assert_one_line_error(chunkfs("import", imported.meta_url, str(source), "relative", check=False), "absolute")
    assert_one_line_error(chunkfs("import", imported.meta_url, str(source), "/model/several/x", check=False),
                          "not a directory")
    assert_one_line_error(chunkfs("import", imported.meta_url, str(source), "/m", "--threads", "0", check=False))
    assert snapshot(imported) == before


def test_store_gone_is_reported(imported: VolumeFixture) -> None:
    shutil.rmtree(imported.storage)
    assert_one_line_error(chunkfs("status", imported.meta_url, check=False), "storage directory", "does not exist")


def test_status_reports_dedup(imported: VolumeFixture) -> None:
    out = chunkfs("status", imported.meta_url).stdout
    assert "10 files" in out and "dedup:" in out and "hash:         blake3" in out  # new volumes hash with BLAKE3

    data = json.loads(chunkfs("status", imported.meta_url, "--json").stdout)
    assert data["stats"]["unique_bytes"] < data["stats"]["logical_bytes"]
    assert data["dedup_ratio"] > 1


def test_import_progress_is_quiet_in_scripts(volume: VolumeFixture, source: Path) -> None:
    result = chunkfs("import", volume.meta_url, str(source), "/m")
    assert result.stdout == "" and result.stderr == ""


# -- mount errors -----------------------------------------------------------------------------
@pytest.mark.mount
def test_mountpoint_errors(imported: VolumeFixture, tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "afile").write_text("x")
    for mountpoint, fragment in [(tmp_path / "nope", "does not exist"), (tmp_path / "full", "not empty"),
                                 (tmp_path / "afile", "not a directory")]:
        for bg in ([], ["--background", "--log-file", str(tmp_path / "bg.log")]):
            result = chunkfs("mount", imported.meta_url, str(mountpoint), "--read-only", *cache, *bg, check=False)
            assert_one_line_error(result, fragment)
    assert_one_line_error(chunkfs("mount", imported.meta_url, str(tmp_path / "full"), *cache, check=False),
                          "not empty")  # a read-write mount checks the same
    with mounted(imported) as m:
        result = chunkfs("mount", imported.meta_url, str(m.path), "--read-only", *cache, check=False)
        assert_one_line_error(result, "already mounted")


def test_no_permission_on_dev_fuse(imported: VolumeFixture, tmp_path: Path) -> None:
    """As an unprivileged user (nobody) with Debian's own python3.11 and our site-packages."""
    system_python = Path("/usr/bin/python3.11")
    site = Path(sys.prefix) / "lib" / "python3.11" / "site-packages"
    if not system_python.exists() or shutil.which("setpriv") is None:
        pytest.fail("needs /usr/bin/python3.11 and setpriv (scripts/test.sh installs python3.11 and util-linux)",
                    pytrace=False)
    home = Path(tempfile.mkdtemp(prefix="chunkfs-nobody-"))  # outside root's 0700 pytest dir
    try:
        (home / "mnt").mkdir()
        for p in (home, home / "mnt"):
            os.chmod(p, 0o777)
        env = {"PYTHONPATH": f"{REPO}:{site}", "PATH": os.environ["PATH"], "HOME": str(home)}
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(system_python), "-m", "chunkfs",
             "mount", imported.meta_url, str(home / "mnt"), "--read-only", "--cache-dir", str(home / "c")],
            capture_output=True, text=True, env=env, timeout=60, check=False)
        assert_one_line_error(result, "no permission to open /dev/fuse")
    finally:
        shutil.rmtree(home)


# -- lifecycle --------------------------------------------------------------------------------
def _pid_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_daemon_that_never_reported_ready_is_killed(tmp_path: Path) -> None:
    """``mount --background`` gives up on a daemon after READY_TIMEOUT: it must not mount
    later, unseen (the CSI plugin would find its staging path taken)."""
    from chunkfs.cli.mount import _abandon

    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    _abandon(proc, str(tmp_path), None)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.mount
def test_background_mount_and_umount(imported: VolumeFixture, tmp_path: Path, source: Path) -> None:
    mnt, log, pid, _result = background_mount(imported.meta_url, tmp_path)
    try:
        assert find_mount(str(mnt)) is not None  # ready when the command returns
        assert (mnt / "model/several").read_bytes() == (source / "several").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--read-only" in cmdline
        assert os.getsid(pid) == pid  # its own session: outlives the shell that started it
        with open(mnt / "model/several", "rb"):
            busy = chunkfs("umount", str(mnt), check=False)
            assert_one_line_error(busy, "cannot unmount")
        chunkfs("umount", str(mnt))
        assert find_mount(str(mnt)) is None
        assert _pid_gone(pid)
    finally:
        force_unmount(mnt)
    assert "Traceback" not in log.read_text()
    assert_one_line_error(chunkfs("umount", str(mnt), check=False), "not mounted")
    assert_one_line_error(chunkfs("umount", "/", check=False), "not a chunkfs mount")


def _unusual_value(option):  # type: ignore[no-untyped-def]
    """A command-line value for ``option`` that differs from its default."""
    from chunkfs.cli import options as o

    if option.flag_only:
        return []
    if option.repeated:
        return ["/c1:/c2", "/c3"]
    if option.choices:
        return [next(c for c in option.choices if c != option.default)]
    value = {o.size: "3M", o.positive_int: "7", o.ratio: "0.25", float: "2.5",
             o.address: "10.0.0.1:9570"}.get(option.type, "x,y")
    if option.flag == "--metrics":
        value = "127.0.0.1:9567"
    return [value]


def test_every_mount_option_reaches_a_background_daemon_and_the_csi_mounts() -> None:
    """Each option of the mount command, set to something other than its default, parses back
    from the background daemon's command line to the same value; so does each option the CSI
    plugin hands to its mounts, from the mount command it runs. The mount command has no
    option outside ``MOUNT_OPTIONS`` but its local ones, so a new one cannot be forgotten."""
    from chunkfs.cli.csi_node import mount_args
    from chunkfs.cli.main import build_parser
    from chunkfs.cli.mount import _daemon_argv
    from chunkfs.cli.options import CSI_MOUNT_OPTIONS, MOUNT_OPTIONS, cache_dirs

    parser = build_parser()
    mount_parser = next(a for a in parser._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
                        if a.prog.endswith(" mount"))
    local = {"help", "meta", "mountpoint", "background", "log_file", "pid_file", "ready_fd", "meta_fd"}
    assert {a.dest for a in mount_parser._actions} - local == {o.dest for o in MOUNT_OPTIONS}

    user = ["mount", "redis://:hunter2@10.0.0.7:6379/1", "/mnt/m"]
    for option in MOUNT_OPTIONS:
        user += [option.flag, *_unusual_value(option)] if not option.repeated else [
            part for value in _unusual_value(option) for part in (option.flag, value)]
    args = parser.parse_args(user)
    args.cache_dir = cache_dirs(args.cache_dir)
    defaults = parser.parse_args(["mount", "m", "/mnt/m"])
    for option in MOUNT_OPTIONS:
        assert getattr(args, option.dest) != getattr(defaults, option.dest), option.flag  # really set
    argv = _daemon_argv(args, 9, 10)
    assert "hunter2" not in " ".join(argv) and "redis://:****@10.0.0.7:6379/1" in argv
    daemon = parser.parse_args(argv[3:])
    daemon.cache_dir = cache_dirs(daemon.cache_dir)
    assert daemon.cache_dir == ["/c1", "/c2", "/c3"]
    for option in MOUNT_OPTIONS:
        assert getattr(daemon, option.dest) == getattr(args, option.dest), option.flag

    csi = ["csi", "--node-id", "n1"]
    for option in CSI_MOUNT_OPTIONS:
        csi += [part for value in _unusual_value(option) for part in (option.flag, value)] if option.repeated \
            else [option.flag, *_unusual_value(option)]
    csi_args = parser.parse_args(csi)
    staged = parser.parse_args(["mount", "CHUNKFS_META_URL", "/staging", "--read-only", *mount_args(csi_args)])
    staged.cache_dir = cache_dirs(staged.cache_dir)
    for option in CSI_MOUNT_OPTIONS:
        assert getattr(staged, option.dest) == getattr(csi_args, option.dest), option.flag


@pytest.mark.mount
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(imported: VolumeFixture, tmp_path: Path, sig: signal.Signals) -> None:
    mnt = tmp_path / "sig"
    mnt.mkdir()
    require_mount_marker()
    proc = subprocess.Popen([sys.executable, "-m", "chunkfs", "mount", imported.meta_url, str(mnt), "--read-only",
                             "--cache-dir", str(tmp_path / "cache")], stderr=subprocess.PIPE, text=True)
    try:
        wait_mounted(mnt, proc)
        assert (mnt / "model/one").stat().st_size == 1
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert find_mount(str(mnt)) is None
        assert "Traceback" not in proc.stderr.read()
    finally:
        force_unmount(mnt)
        if proc.poll() is None:
            proc.kill()


@pytest.mark.mount
def test_dead_mount_is_reported_and_lazy_umount_clears_it(imported: VolumeFixture, tmp_path: Path) -> None:
    mnt = tmp_path / "dead"
    mnt.mkdir()
    require_mount_marker()
    proc = subprocess.Popen([sys.executable, "-m", "chunkfs", "mount", imported.meta_url, str(mnt), "--read-only",
                             "--cache-dir", str(tmp_path / "cache")], stderr=subprocess.DEVNULL)
    try:
        wait_mounted(mnt, proc)
        proc.kill()
        proc.wait()
        result = chunkfs("mount", imported.meta_url, str(mnt), "--read-only", "--cache-dir",
                         str(tmp_path / "cache"), check=False)
        assert_one_line_error(result, "dead FUSE mount", "umount --lazy")
        chunkfs("umount", "--lazy", str(mnt))
        assert find_mount(str(mnt)) is None
    finally:
        force_unmount(mnt)


@pytest.mark.parametrize("option,fragment", [
    (["--cache-size", "abc"], "--cache-size"),
    (["--free-space-ratio", "1.5"], "--free-space-ratio"),
    (["--max-readahead", "1Q"], "--max-readahead"),
    (["--metrics", "nonsense"], "expected HOST:PORT"),
    (["--cache-dir", "/proc/chunkfs-nope"], "cannot create cache directory"),
])
@pytest.mark.mount
def test_bad_read_path_options_are_one_line_errors(imported: VolumeFixture, tmp_path: Path, option: list[str],
                                                   fragment: str) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    result = chunkfs("mount", imported.meta_url, str(mnt), "--read-only", *option, check=False)
    assert_one_line_error(result, fragment)


@pytest.mark.mount
def test_metrics_port_in_use_is_a_one_line_error(imported: VolumeFixture, tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = chunkfs("mount", imported.meta_url, str(mnt), "--read-only", "--cache-dir", str(tmp_path / "c"),
                         "--metrics", f"127.0.0.1:{port}", check=False)
    assert_one_line_error(result, "cannot serve metrics", "Address already in use")
    assert find_mount(str(mnt)) is None


@pytest.mark.mount
def test_the_native_fuse_transport_serves_read_only_mounts_only(imported: VolumeFixture, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = chunkfs("mount", imported.meta_url, str(mnt), "--fuse-transport", "native", check=False)
    assert result.returncode == 2
    assert_one_line_error(result, "--fuse-transport native serves read-only mounts only")
    assert find_mount(str(mnt)) is None


def test_stats_of_a_plain_directory_is_a_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(chunkfs("stats", str(tmp_path), check=False), "is not mounted")


def test_meta_url_from_an_environment_variable(imported: VolumeFixture) -> None:
    env = {**os.environ, "CHUNKFS_META_URL": imported.meta_url}
    status = chunkfs("status", "CHUNKFS_META_URL", "--json", env=env)
    assert json.loads(status.stdout)["metadata"] == imported.meta_url
    unset = chunkfs("status", "CHUNKFS_META_URL", check=False)
    assert unset.returncode == 2
    assert unset.stderr.strip() == ("chunkfs: environment variable CHUNKFS_META_URL (named as the metadata URL) "
                                    "is not set")
    bad = chunkfs("status", "CHUNKFS_META_URL", check=False, env={**os.environ, "CHUNKFS_META_URL": "nope"})
    assert bad.returncode == 2 and "does not hold a metadata URL" in bad.stderr

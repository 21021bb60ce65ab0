"""The system side of the plugin: chunkfs mount daemons, bind mounts, mount health.

Everything here is a blocking call on the node (subprocesses, mount(8), statvfs) and raises
``MountError`` with a one-line reason the plugin returns to kubelet.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from chunkfs.fuse.mountinfo import MountEntry, find_mount
from chunkfs.procs import pid_alive
from chunkfs.urls import is_env_name

log = logging.getLogger(__name__)

META_ENV = "CHUNKFS_META_URL"  # the daemon reads its metadata URL from here, never argv


class MountError(Exception):
    """A mount operation failed; the message is safe to return to kubelet."""


@dataclass(frozen=True)
class DaemonSettings:
    mount_args: tuple[str, ...] = ()  # ``chunkfs mount`` options of every volume (cli.csi_node.mount_args)


def secrets_to_env(secrets: dict[str, str]) -> dict[str, str]:
    """The mount daemon's environment from a CSI secret: ``metaurl``, ``access-key`` and
    ``secret-key`` by name, and every UPPER_CASE key as is (AWS_SESSION_TOKEN, AWS_REGION,
    CHUNKFS_META_PASSWORD, ...)."""
    env = {key: value for key, value in secrets.items() if is_env_name(key)}
    aliases = {"metaurl": META_ENV, "access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"}
    for key, name in aliases.items():
        if secrets.get(key):
            env[name] = secrets[key]
    return env


def start_daemon(staging: str, env: dict[str, str], settings: DaemonSettings, log_file: str) -> int:
    """Mount the whole volume read-only at ``staging`` with a background chunkfs daemon in
    its own session; returns its pid once the mount answers."""
    os.makedirs(staging, exist_ok=True)
    pid_file = f"{log_file}.pid"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pid_file)
    cmd = [sys.executable, "-m", "chunkfs", "mount", META_ENV, staging, "--read-only", "--background",
           "--log-file", log_file, "--pid-file", pid_file, *settings.mount_args]
    result = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=180,
                            check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise MountError(lines[-1].removeprefix("chunkfs: "))
    try:
        with open(pid_file) as f:
            return int(f.read())
    except (OSError, ValueError) as exc:
        raise MountError(f"mounted, but the daemon's pid file {pid_file} cannot be read: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)


def chunkfs_mount_at(path: str) -> MountEntry | None:
    entry = find_mount(path)
    return entry if entry is not None and entry.fstype == "fuse.chunkfs" else None


def statvfs_within(path: str, timeout: float = 10.0) -> os.statvfs_result | None:
    """statvfs that gives up (None) on a mount whose daemon is dead or hangs."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(os.statvfs, path).result(timeout=timeout)
    except (OSError, FutureTimeout):
        return None
    finally:
        pool.shutdown(wait=False)  # a hung statvfs keeps its thread; the caller goes on


def healthy(path: str) -> bool:
    """A chunkfs mount is at ``path`` and its daemon answers."""
    return chunkfs_mount_at(path) is not None and statvfs_within(path) is not None


def unmount(path: str, *, fuse: bool) -> None:
    """Unmount ``path`` if something is mounted there; lazily if it is busy or dead."""
    if find_mount(path) is None:
        return
    cmd = ["fusermount3", "-u"] if fuse else ["umount"]
    result = subprocess.run([*cmd, path], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lazy = ["fusermount3", "-u", "-z"] if fuse else ["umount", "-l"]
        result = subprocess.run([*lazy, path], capture_output=True, text=True, check=False)
        if result.returncode != 0 and find_mount(path) is not None:
            raise MountError(f"cannot unmount {path}: {result.stderr.strip() or 'failed'}")
    deadline = time.monotonic() + 10
    while find_mount(path) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_exit(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


def bind_read_only(source: str, target: str) -> None:
    """Bind-mount ``source`` at ``target`` read-only (creating ``target`` like ``source``)."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    for cmd in (["mount", "--bind", source, target], ["mount", "-o", "remount,bind,ro", target]):
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            with contextlib.suppress(MountError):
                unmount(target, fuse=False)
            raise MountError(f"{' '.join(cmd[:-2])} failed: {result.stderr.strip() or 'no output'}")


def remove_target(path: str) -> None:
    """Remove the target path the plugin created (a directory or a file), if it is there."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY):
            raise MountError(f"cannot remove {path}: {exc.strerror}") from None
        raise MountError(f"cannot remove {path}: {exc.strerror} (still mounted or not empty)") from None

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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from chunkfs.errors import ChunkfsError, UsageError
from chunkfs.fuse.mountinfo import MountEntry, find_mount
from chunkfs.peer.auth import MIN_SECRET_BYTES
from chunkfs.peer.membership import check_spec
from chunkfs.urls import is_env_name
from chunkfs.warmup.control import WarmupTimedOut, cached_so_far, run, socket_path

log = logging.getLogger(__name__)

META_ENV = "CHUNKFS_META_URL"  # the daemon reads its metadata URL from here, never argv
PEER_SECRET_ENV = "CHUNKFS_PEER_SECRET"
#: volume attributes of the fleet cache: serve the node cache to peers on this port of the
#: plugin pod's address, and the members to ask (``meta``, ``dns:NAME:PORT`` or ``H:P,...``)
PEER_PORT_KEY, PEERS_KEY = "peerPort", "peers"
#: volume attributes: warm the volume's path into the node cache before a publish returns
#: ("100%" or "true"), bounded by ``warmTimeout`` seconds per publish call
WARM_KEY, WARM_TIMEOUT_KEY = "warm", "warmTimeout"
#: below the kubelet's own bound on a NodePublishVolume call (2 minutes)
DEFAULT_WARM_TIMEOUT = 100.0
PROGRESS_LOG_S = 10.0
SILENT_DAEMON_S = 30.0


class MountError(Exception):
    """A mount operation failed; the message is safe to return to kubelet."""


@dataclass(frozen=True)
class DaemonSettings:
    mount_args: tuple[str, ...] = ()  # ``chunkfs mount`` options of every volume (cli.csi_node.mount_args)


def secrets_to_env(secrets: dict[str, str]) -> dict[str, str]:
    """The mount daemon's environment from a CSI secret: ``metaurl``, ``access-key``,
    ``secret-key`` and ``peer-secret`` by name, and every UPPER_CASE key as is
    (AWS_SESSION_TOKEN, AWS_REGION, CHUNKFS_META_PASSWORD, ...)."""
    env = {key: value for key, value in secrets.items() if is_env_name(key)}
    aliases = {"metaurl": META_ENV, "access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY",
               "peer-secret": PEER_SECRET_ENV}
    for key, name in aliases.items():
        if secrets.get(key):
            env[name] = secrets[key]
    return env


def peer_args(attributes: Mapping[str, str], env: Mapping[str, str]) -> tuple[str, ...]:
    """The ``chunkfs mount`` options of a volume's fleet cache, from its attributes
    (``peerPort``: serve peers on that port of the pod's address, ``POD_IP``; ``peers``: the
    members, default ``meta`` when serving). ``ValueError`` with a one-line reason for a bad
    attribute or a missing shared secret (``peer-secret`` in the volume's Secret)."""
    port, members = attributes.get(PEER_PORT_KEY, "").strip(), attributes.get(PEERS_KEY, "").strip()
    if not port and not members:
        return ()
    args: list[str] = []
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"volume attribute {PEER_PORT_KEY} {port!r} is not a port number")
        args += ["--peer-listen", f"0.0.0.0:{int(port)}"]
    if members:
        try:
            args += ["--peers", check_spec(members)]
        except UsageError as exc:
            raise ValueError(f"volume attribute {PEERS_KEY}: {exc}") from None
    if len(env.get(PEER_SECRET_ENV, "").encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"volume attributes {PEER_PORT_KEY}/{PEERS_KEY} need the volume's secret to hold "
                         f"'peer-secret' (at least {MIN_SECRET_BYTES} bytes, the same on every node)")
    return tuple(args)


#: seconds a ``chunkfs mount --background`` may take: beyond its own 120 s wait for the daemon,
#: after which it kills a daemon that never reported ready (so none mounts later, unseen)
MOUNT_TIMEOUT_S = 150.0


class _TimedOut(MountError):
    """A command did not finish in time (``_run``)."""


def _run(cmd: list[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None,
         what: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; a missing binary or a timeout is a ``MountError``
    naming it (``what``, else the command)."""
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise _TimedOut(f"{what or ' '.join(cmd)} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise MountError(f"cannot run {cmd[0]}: {exc.strerror}") from None


def start_daemon(staging: str, env: dict[str, str], settings: DaemonSettings, log_file: str,
                 extra_args: tuple[str, ...] | list[str] = ()) -> int:
    """Mount the whole volume read-only at ``staging`` with a background chunkfs daemon in
    its own session (the plugin's mount options, then the volume's ``extra_args``); returns
    its pid once the mount answers."""
    try:
        os.makedirs(staging, exist_ok=True)
    except OSError as exc:
        raise MountError(f"cannot create {staging}: {exc.strerror}") from None
    pid_file = f"{log_file}.pid"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pid_file)
    cmd = [sys.executable, "-m", "chunkfs", "mount", META_ENV, staging, "--read-only", "--background",
           "--log-file", log_file, "--pid-file", pid_file, *settings.mount_args, *extra_args]
    try:
        result = _run(cmd, env={**os.environ, **env}, timeout=MOUNT_TIMEOUT_S, what="chunkfs mount")
    except MountError:
        with contextlib.suppress(MountError):  # it may have mounted after all: leave nothing behind
            unmount(staging, fuse=True)
        raise
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
    try:
        failed = _run([*cmd, path], timeout=60).returncode != 0
    except _TimedOut:  # a hung daemon: detach lazily
        failed = True
    if failed:
        lazy = ["fusermount3", "-u", "-z"] if fuse else ["umount", "-l"]
        result = _run([*lazy, path], timeout=60)
        if result.returncode != 0 and find_mount(path) is not None:
            raise MountError(f"cannot unmount {path}: {result.stderr.strip() or 'failed'}")
    deadline = time.monotonic() + 10
    while find_mount(path) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def bind_read_only(source: str, target: str) -> None:
    """Bind-mount ``source`` at ``target`` read-only (creating ``target`` like ``source``)."""
    try:
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        elif not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "a"):
                pass
    except OSError as exc:
        raise MountError(f"cannot create {target}: {exc.strerror}") from None
    for cmd in (["mount", "--bind", source, target], ["mount", "-o", "remount,bind,ro", target]):
        result = _run(cmd, timeout=60)
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


class WarmingIncomplete(MountError):
    """The volume's path is not whole in the node cache yet (time ran out, or blocks failed);
    a later publish resumes where this one stopped."""


def warm_settings(attributes: Mapping[str, str]) -> float | None:
    """Seconds a publish may spend warming the volume's path (``warm``, ``warmTimeout``
    attributes), or None when it is not to warm; ``ValueError`` for a bad attribute."""
    warm = attributes.get(WARM_KEY, "").strip().lower()
    if warm in ("", "false", "0%", "no"):
        return None
    if warm not in ("true", "100%", "yes"):
        raise ValueError(f"volume attribute {WARM_KEY} {attributes[WARM_KEY]!r}: expected \"100%\" (or \"true\")")
    text = attributes.get(WARM_TIMEOUT_KEY, "").strip()
    try:
        timeout = float(text) if text else DEFAULT_WARM_TIMEOUT
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= 86400:
        raise ValueError(f"volume attribute {WARM_TIMEOUT_KEY} {text!r}: expected seconds, e.g. \"100\"")
    return timeout


def warm(staging: str, volume_path: str, timeout: float, progress: Callable[[str], None]) -> dict[str, Any]:
    """Warm ``volume_path`` into the node cache through the daemon of the mount at
    ``staging`` (``chunkfs warmup`` over its control socket), for at most ``timeout``
    seconds. Returns the warmup's report once every block is cached; ``WarmingIncomplete``
    (with how far it got) when time runs out or blocks fail. ``progress`` gets a line every
    ``PROGRESS_LOG_S``."""
    entry = chunkfs_mount_at(staging)
    if entry is None:
        raise MountError(f"no chunkfs mount at {staging} to warm")
    next_log = [0.0]

    def log_progress(snapshot: dict[str, Any]) -> None:
        if time.monotonic() >= next_log[0]:
            progress(f"warming {volume_path}: {cached_so_far(snapshot)} in the node cache")
            next_log[0] = time.monotonic() + PROGRESS_LOG_S

    # the deadline is checked at each progress answer (several a second once planned); the
    # silence bound only catches a daemon gone quiet (a plan of a huge tree included)
    try:
        result = run(socket_path(entry.device), {"op": "warmup", "paths": [volume_path], "threads": 32}, staging,
                     deadline=time.monotonic() + timeout, silence=timeout + SILENT_DAEMON_S,
                     on_progress=log_progress)
    except WarmupTimedOut as exc:
        raise WarmingIncomplete(f"warming {volume_path}: {cached_so_far(exc.snapshot)} in the node cache after "
                                f"{timeout:.0f} s (warmTimeout); the next publish resumes it") from None
    except (ChunkfsError, OSError, ValueError) as exc:  # OSError, ValueError: the daemon died mid-answer
        raise MountError(f"warming {volume_path}: {exc}") from None
    if not result["complete"]:
        raise WarmingIncomplete(f"warming {volume_path}: {result['failed_blocks']} blocks failed, "
                                f"{cached_so_far(result)} in the node cache; the next publish tries again")
    return result

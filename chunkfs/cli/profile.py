"""``chunkfs profile``: show, delete or record a model directory's access profile.

``record`` mounts the volume read-only at a temporary mountpoint with ``--access-profile
record``, runs the given command (an argument ``{}`` becomes the directory's path in that
mount; ``CHUNKFS_MODEL_PATH`` holds it too), unmounts, and reports what was stored.
If the command fails, the profile stored before (or none) is put back.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chunkfs.errors import ChunkfsError, UsageError
from chunkfs.fuse.mountinfo import find_mount
from chunkfs.meta import open_meta
from chunkfs.meta.base import MetaStore
from chunkfs.procs import stop_pid, wait_exit
from chunkfs.profile import AccessProfile, ProfileDamaged
from chunkfs.snapshots import lookup_path
from chunkfs.warmup.plan import normalize_volume_path

META_ENV = "CHUNKFS_PROFILE_META_URL"
#: how long the recording daemon may take to store its profile and exit after the unmount
DAEMON_EXIT_S = 30.0
SHOWN_RUNS = 20


def _directory(meta: MetaStore, path: str) -> int:
    attr = lookup_path(meta, path)
    if not attr.is_dir:
        raise UsageError(f"{path}: not a directory (profiles are kept per model directory)")
    return attr.ino


def _load(meta: MetaStore, ino: int, path: str) -> AccessProfile | None:
    data = meta.get_profile(ino)
    if data is None:
        return None
    try:
        return AccessProfile.from_bytes(data)
    except ProfileDamaged as exc:
        raise ChunkfsError(f"{path}: the stored access profile is damaged ({exc}); "
                           f"'chunkfs profile delete' removes it") from None


def cmd_profile(args: argparse.Namespace) -> int:
    path = normalize_volume_path(args.path)
    command = list(args.program or [])
    if command and args.action != "record":
        raise UsageError(f"profile {args.action} takes no command")
    meta = open_meta(args.meta)
    try:
        ino = _directory(meta, path)
        if args.action == "show":
            return _show(meta, ino, path, args.json)
        if args.action == "delete":
            if not meta.set_profile(ino, None):
                raise ChunkfsError(f"{path} has no access profile")
            print(f"deleted the access profile of {path}")
            return 0
        before = meta.get_profile(ino)
    finally:
        meta.close()
    return _record(args, command, path, before)


def _show(meta: MetaStore, ino: int, path: str, as_json: bool) -> int:
    profile = _load(meta, ino, path)
    if profile is None:
        raise ChunkfsError(f"{path} has no access profile (a mount records one on the first load, "
                           f"or 'chunkfs profile record')")
    if as_json:
        runs = [{"file": profile.names[n], "first_block": first, "blocks": count} for n, first, count in profile.runs]
        print(json.dumps({"path": path, **profile.summary(), "order": runs}, indent=2))
        return 0
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(profile.recorded_ns / 1e9))
    print(f"{path}: {profile.blocks} blocks of {len(profile.names)} files in {len(profile.runs)} runs, "
          f"recorded {when}")
    for n, first, count in profile.runs[:SHOWN_RUNS]:
        print(f"  {profile.names[n]}: blocks {first}..{first + count - 1}")
    if len(profile.runs) > SHOWN_RUNS:
        print(f"  ... {len(profile.runs) - SHOWN_RUNS} more runs (--json shows all)")
    return 0


def _record(args: argparse.Namespace, command: list[str], path: str, before: bytes | None) -> int:
    if not command:
        raise UsageError("profile record needs a command to run, e.g. "
                         "chunkfs profile record META /llama -- python load.py {}")
    started_ns = time.time_ns()
    run: subprocess.CompletedProcess[bytes] | None = None
    failure = ""
    previous = {sig: signal.signal(sig, _interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with tempfile.TemporaryDirectory(prefix="chunkfs-profile-") as tmp:
            mountpoint, pid_file, log_file = Path(tmp, "mnt"), Path(tmp, "pid"), Path(tmp, "mount.log")
            mountpoint.mkdir()
            env = {**os.environ, META_ENV: args.meta}
            mount = [sys.executable, "-m", "chunkfs", "mount", META_ENV, str(mountpoint), "--read-only",
                     "--access-profile", "record", "--background", "--pid-file", str(pid_file),
                     "--log-file", str(log_file), *[a for d in args.cache_dir or [] for a in ("--cache-dir", d)]]
            started = subprocess.run(mount, env=env, capture_output=True, text=True, check=False)
            if started.returncode != 0:
                reason = (started.stderr.strip().splitlines() or ["mount failed"])[-1].removeprefix("chunkfs: ")
                raise ChunkfsError(f"cannot mount the volume to record: {reason}")
            model = str(mountpoint) + path.rstrip("/")
            try:
                run = subprocess.run([model if part == "{}" else part for part in command],
                                     env={**os.environ, "CHUNKFS_MODEL_PATH": model}, check=False)
            except OSError as exc:
                failure = f"cannot run {command[0]}: {exc.strerror}"
            finally:
                _unmount(mountpoint, pid_file)
    except BaseException:  # interrupted: the recording of a load cut short is not kept
        _restore(args.meta, path, before)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if run is None or run.returncode != 0:
        _restore(args.meta, path, before)
        failure = failure or f"{command[0]} exited with status {run.returncode if run else '?'}"
        raise ChunkfsError(f"{failure}; the access profile of {path} is left as it was")
    meta = open_meta(args.meta)
    try:
        profile = _load(meta, _directory(meta, path), path)
    finally:
        meta.close()
    if profile is None or profile.recorded_ns < started_ns:
        raise ChunkfsError(f"the command read no block of a model file directly in {path}: nothing recorded")
    print(f"recorded the access profile of {path}: {profile.blocks} blocks of {len(profile.names)} files "
          f"in {len(profile.runs)} runs")
    return 0


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _unmount(mountpoint: Path, pid_file: Path) -> None:
    """Unmount and wait for the daemon to exit (it stores its recording on the way out);
    a daemon still there after ``DAEMON_EXIT_S`` is stopped."""
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        try:
            subprocess.run(cmd, capture_output=True, check=False)
        except FileNotFoundError:
            continue
        if find_mount(str(mountpoint)) is None:
            break
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    if not wait_exit(pid, DAEMON_EXIT_S):
        stop_pid(pid)


def _restore(meta_url: str, path: str, before: bytes | None) -> None:
    meta = open_meta(meta_url)
    try:
        meta.set_profile(_directory(meta, path), before)
    finally:
        meta.close()

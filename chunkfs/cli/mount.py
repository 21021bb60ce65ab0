"""mount and umount.

``mount --background`` re-runs this command as a daemon in its own session and waits on a
pipe until the daemon reports ``ok`` (mounted and answering) or ``error: <reason>``. The
daemon's command line carries the metadata URL with its password masked; the real URL
travels through an inherited pipe (``--meta-fd``), so neither ``ps``,
``/proc/<pid>/cmdline`` nor ``/proc/<pid>/environ`` ever show a secret.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from chunkfs.cli.options import MOUNT_OPTIONS, cache_dirs, store_options, to_argv
from chunkfs.errors import ChunkfsError, UsageError
from chunkfs.fuse.mountinfo import (
    MountEntry,
    check_fuse_device,
    check_mountpoint,
    find_mount,
    require_chunkfs_mount,
)
from chunkfs.urls import mask_url

READY_TIMEOUT = 120.0


def default_log_file() -> str:
    if os.geteuid() == 0:
        return "/var/log/chunkfs.log"
    return os.path.expanduser("~/.chunkfs/chunkfs.log")


def cmd_mount(args: argparse.Namespace) -> int:
    if args.meta_fd is not None:
        with os.fdopen(args.meta_fd, "rb") as pipe:
            args.meta = pipe.read().decode()
        if not args.meta:
            raise ChunkfsError("metadata URL expected on --meta-fd")
    args.cache_dir = cache_dirs(args.cache_dir)
    if args.background:
        return _spawn_daemon(args)
    try:
        _serve_foreground(args)
    except ChunkfsError as exc:
        _report_ready(args.ready_fd, f"error: {exc}")
        raise
    except BaseException as exc:
        _report_ready(args.ready_fd, f"error: {type(exc).__name__}: {exc}")
        raise
    return 0


def _report_ready(fd: int | None, message: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, message.encode() + b"\n")
        os.close(fd)


def prefetch_patterns(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none", "off"):
        return ()
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _serve_foreground(args: argparse.Namespace) -> None:
    from chunkfs.fuse.mount import ServeConfig, serve
    from chunkfs.metrics import Metrics, parse_address
    from chunkfs.peer.setup import PeerSettings
    from chunkfs.vfs.vfs import MountOptions
    from chunkfs.volume import open_volume

    if args.fuse_transport == "native" and not args.read_only:
        raise UsageError("--fuse-transport native serves read-only mounts only: add --read-only")
    transport = args.fuse_transport
    if transport == "auto":
        transport = "native" if args.read_only and os.geteuid() == 0 else "libfuse"
    check_fuse_device()
    mountpoint = check_mountpoint(args.mountpoint)
    for path in args.cache_dir:
        try:
            Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ChunkfsError(f"cannot create cache directory {path}: {exc.strerror}") from None
    try:
        metrics_address = parse_address(args.metrics) if args.metrics else None
    except ValueError as exc:
        raise UsageError(f"--metrics: {exc}") from None
    # a read-only volume is treated as frozen while mounted; a writable one may change under
    # another mount's feet, so the kernel asks again after a second (close-to-open)
    default_timeout = 300.0 if args.read_only else 1.0
    options = MountOptions(read_only=args.read_only,
                           attr_timeout=default_timeout if args.attr_timeout is None else args.attr_timeout,
                           entry_timeout=default_timeout if args.entry_timeout is None else args.entry_timeout)
    metrics = Metrics()
    config = ServeConfig(
        mountpoint=mountpoint, cache_dirs=[Path(d) for d in args.cache_dir], cache_size=args.cache_size,
        free_space_ratio=args.free_space_ratio, verify_cache=args.verify_cache, options=options,
        max_downloads=args.max_downloads,
        buffer_size=args.buffer_size, readahead_max=args.max_readahead,
        prefetch_patterns=prefetch_patterns(args.prefetch), kernel_readahead=args.kernel_readahead,
        metrics_address=metrics_address, metrics=metrics, cache_writes=args.cache_writes,
        peers=PeerSettings.from_args(args), access_profile=args.access_profile,
        fuse_transport=transport,
    )
    with open_volume(args.meta, replace(store_options(args, args.max_downloads), observer=metrics),
                     store_may_be_down=args.read_only) as volume:
        ready_fd = args.ready_fd
        serve(volume, config, on_ready=lambda: _report_ready(ready_fd, "ok"))


def _daemon_argv(args: argparse.Namespace, ready_fd: int, meta_fd: int) -> list[str]:
    argv = [sys.executable, "-m", "chunkfs"]
    if args.debug:
        argv.append("--debug")
    # The URL travels through --meta-fd; this argument only labels the process. When the user
    # named an environment variable (a URL from a Kubernetes Secret), only that name is shown.
    label = getattr(args, "meta_arg", None) or mask_url(args.meta)
    argv += ["mount", label, os.path.abspath(args.mountpoint), "--meta-fd", str(meta_fd),
             "--ready-fd", str(ready_fd)]
    return argv + to_argv(args, MOUNT_OPTIONS)  # every mount option, so the daemon serves as asked


def _spawn_daemon(args: argparse.Namespace) -> int:
    log_file = os.path.abspath(args.log_file or default_log_file())
    try:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        log = open(log_file, "ab")  # noqa: SIM115 - handed to the child
    except OSError as exc:
        raise ChunkfsError(f"cannot open log file {log_file}: {exc.strerror}") from None
    read_end, write_end = os.pipe()
    meta_read, meta_write = os.pipe()
    os.write(meta_write, args.meta.encode())  # far below the pipe buffer: never blocks
    os.close(meta_write)
    before = find_mount(args.mountpoint)
    with log:
        proc = subprocess.Popen(
            _daemon_argv(args, write_end, meta_read), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            pass_fds=(write_end, meta_read), start_new_session=True,
        )
    os.close(write_end)
    os.close(meta_read)
    message = _wait_ready(read_end, proc)
    if message == "ok":
        if args.pid_file:
            _write_pid_file(args.pid_file, proc.pid)
        print(f"chunkfs: mounted {os.path.abspath(args.mountpoint)} (pid {proc.pid}, log {log_file})",
              file=sys.stderr)
        return 0
    _abandon(proc, args.mountpoint, before)
    if message.startswith("error: "):
        raise ChunkfsError(message[len("error: "):])
    raise ChunkfsError(f"mount daemon {message}; see {log_file}")


def _abandon(proc: subprocess.Popen, mountpoint: str, before: MountEntry | None) -> None:
    """A daemon that did not report ready is not left to mount later, unseen: its session is
    killed, and a mount it made meanwhile (not ``before``, what was mounted there already)
    is detached."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session)
        proc.wait()
    entry = find_mount(mountpoint)
    if entry is not None and entry.fstype == "fuse.chunkfs" and (before is None or entry.device != before.device):
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, check=False)


def _write_pid_file(path: str, pid: int) -> None:
    """The daemon's pid, written whole (tmp + rename) so a reader never sees half of it."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{pid}\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise ChunkfsError(f"mounted (daemon pid {pid}) but cannot write --pid-file {path}: {exc.strerror}") from None


def _wait_ready(fd: int, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"\n"):
                    return data.decode(errors="replace").strip()
        if not data:
            code = proc.poll()
            if code is None:
                return f"did not report ready within {READY_TIMEOUT:.0f}s (pid {proc.pid})"
            return f"exited with status {code} before mounting"
        return data.decode(errors="replace").strip()
    finally:
        os.close(fd)


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = require_chunkfs_mount(args.mountpoint)
    cmd = ["fusermount3", "-u", *(["-z"] if args.lazy else []), mountpoint]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ChunkfsError("fusermount3 not found: install the fuse3 package") from None
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        hint = " (files are open: close them or use --lazy)" if "busy" in reason else ""
        raise ChunkfsError(f"cannot unmount {mountpoint}: {reason}{hint}")
    deadline = time.monotonic() + 10
    while find_mount(mountpoint) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return 0

"""The mount daemon's control socket: warmup, check and evict through a running mount.

``chunkfs warmup /mnt/models/x`` finds the chunkfs mount holding the path and talks to its
daemon over a unix socket named after the mount's device number (the same number in every
bind mount of it), so the work runs with the daemon's volume, credentials, cache and
download single-flight. The socket is in a root-only directory (``/run/chunkfs`` for root)
and is itself mode 0600: nothing secret crosses it, but it can make the daemon download.

Protocol: one JSON line from the client ``{"op": "warmup"|"check"|"evict", "paths": [...],
"threads": N, "force": bool}``; the daemon answers with ``{"progress": {...}}`` lines while
a warmup runs, then one ``{"result": {...}}`` or ``{"error": "..."}`` line, and closes.
Closing the connection early (Ctrl-C) cancels the warmup.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import time
from collections.abc import Callable, Generator
from typing import Any

import trio

from chunkfs.errors import ChunkfsError, first_error
from chunkfs.meta.aio import AsyncMeta
from chunkfs.read.fetcher import BlockFetcher
from chunkfs.units import format_size
from chunkfs.warmup.engine import Filler, Warmup, inspect
from chunkfs.warmup.plan import Planner

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
PROGRESS_INTERVAL = 0.5
OPS = ("warmup", "check", "evict")


def runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/chunkfs"
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "chunkfs") if base else f"/tmp/chunkfs-{os.getuid()}"


def socket_path(device: str) -> str:
    """The control socket of the mount whose device is ``major:minor``."""
    return os.path.join(runtime_dir(), f"mount-{device.replace(':', '-')}.sock")


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


class ControlServer:
    def __init__(self, fetcher: BlockFetcher, meta: AsyncMeta, block_size: int,
                 on_warmed: Callable[[list[tuple[int, str]]], None] | None = None,
                 fill: Filler | None = None, wants_image: Callable[[str], bool] | None = None) -> None:
        """``on_warmed``: told (inode, name) of every file of a warmup that completed (the
        native transport then builds the file images a warmup left in block entries).
        ``fill``/``wants_image``: how a warmup fills the files it names as file images (the
        native transport's model files, through its registry of fills)."""
        self.fetcher = fetcher
        self.meta = meta
        self.block_size = block_size
        self.on_warmed = on_warmed
        self.fill = fill
        self.wants_image = wants_image

    async def serve(self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a daemon that died with this device number
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        try:
            task_status.started()
            await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                try:
                    request = await self._read_request(stream)
                    try:
                        result = await self._run(request, stream)
                    except BaseExceptionGroup as group:
                        raise first_error(group) from None
                    await stream.send_all(_line({"result": result}))
                except ChunkfsError as exc:
                    await stream.send_all(_line({"error": str(exc)}))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("control request failed")

    async def _read_request(self, stream: trio.SocketStream) -> dict[str, Any]:
        data = b""
        with trio.move_on_after(10):
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                data += chunk
        try:
            request = json.loads(data.split(b"\n", 1)[0])
        except ValueError:
            raise ChunkfsError("malformed control request") from None
        if not isinstance(request, dict) or request.get("op") not in OPS or not isinstance(request.get("paths"), list):
            raise ChunkfsError(f"control request needs op (one of {', '.join(OPS)}) and paths")
        return request

    async def _run(self, request: dict[str, Any], stream: trio.SocketStream) -> Any:
        plan = await Planner(self.meta, self.block_size).plan([str(p) for p in request["paths"]])
        cache = self.fetcher.cache
        if request["op"] in ("check", "evict"):
            return await trio.to_thread.run_sync(inspect, request["op"], cache, plan)
        job = Warmup(self.fetcher, plan, threads=max(1, int(request.get("threads") or 32)),
                     force=bool(request.get("force")), fill=self.fill, wants_image=self.wants_image)
        report = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_hangup, stream, nursery.cancel_scope)
            nursery.start_soon(_send_progress, stream, job)
            try:
                report = await job.run()
            finally:
                nursery.cancel_scope.cancel()
        if report is None:
            log.info("warmup of %s stopped: the client went away", ", ".join(job.report.paths))
            raise trio.ClosedResourceError
        log.info("warmup of %s: %d of %d bytes fetched, %s", ", ".join(report.paths), report.bytes_fetched,
                 report.bytes_total, "complete" if report.complete else f"{report.failed_blocks} blocks failed")
        if report.complete and self.on_warmed is not None:
            self.on_warmed([(f.ino, posixpath.basename(f.path)) for f in plan.files()])
        return report.as_dict()


async def _cancel_on_hangup(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some():
            pass
    scope.cancel()


async def _send_progress(stream: trio.SocketStream, job: Warmup) -> None:
    while True:
        await trio.sleep(PROGRESS_INTERVAL)
        await stream.send_all(_line({"progress": job.snapshot()}))


def request(path: str, message: dict[str, Any], mountpoint: str,
            timeout: float | None = None) -> Generator[dict[str, Any], None, None]:
    """Send one request to the daemon at ``path``; yield the JSON lines it answers.
    ``timeout``: seconds the daemon may stay silent (``TimeoutError``). Closing the
    generator closes the connection, which cancels a warmup (its cached blocks stay)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ChunkfsError(
                f"the chunkfs daemon of {mountpoint} does not answer on {path} ({exc.strerror}); it may run in "
                "another container, or be older than this command: give the metadata URL and --cache-dir instead"
            ) from None
        sock.sendall(_line(message))
        with sock.makefile("rb") as answers:
            for raw in answers:
                yield json.loads(raw)
    finally:
        sock.close()


class WarmupTimedOut(ChunkfsError):
    """A request's deadline passed, or the daemon stayed silent; ``snapshot``: its latest
    progress (``bytes_done``, ``bytes_total``; empty if none came)."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        super().__init__(f"timed out with {cached_so_far(snapshot)} cached")
        self.snapshot = snapshot


def run(path: str, message: dict[str, Any], mountpoint: str, *, deadline: float | None = None,
        silence: float | None = None, on_progress: Callable[[dict[str, Any]], None] | None = None,
        ) -> dict[str, Any]:
    """One request to the daemon at ``path``, to its result: each progress snapshot goes to
    ``on_progress``; an error answer raises ``ChunkfsError``; ``WarmupTimedOut`` once
    ``deadline`` (``time.monotonic()``) has passed at a progress answer, or when the daemon
    says nothing for ``silence`` seconds. Leaving early closes the connection, which cancels
    the daemon's warmup (what it cached stays)."""
    last: dict[str, Any] = {}
    answers = request(path, message, mountpoint, timeout=silence)
    try:
        for answer in answers:
            if "progress" in answer:
                last = answer["progress"]
                if on_progress is not None:
                    on_progress(last)
                if deadline is not None and time.monotonic() > deadline:
                    raise WarmupTimedOut(last)
            elif "error" in answer:
                raise ChunkfsError(answer["error"])
            elif "result" in answer:
                result: dict[str, Any] = answer["result"]
                return result
    except TimeoutError:
        raise WarmupTimedOut(last) from None
    finally:
        answers.close()
    raise ChunkfsError(f"the chunkfs daemon of {mountpoint} stopped answering; see its log")


def cached_so_far(snapshot: dict[str, Any]) -> str:
    """``45% (3.6 GiB of 8.0 GiB)`` of a warmup snapshot or report."""
    done, total = snapshot.get("bytes_done", 0), snapshot.get("bytes_total", 0)
    pct = 100.0 * done / total if total else 0.0
    return f"{pct:.0f}% ({format_size(done)} of {format_size(total)})"

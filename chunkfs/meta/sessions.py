"""Sessions of writable mounts, and the orphans they leave when they die.

Layer: ``meta/`` (only the ``MetaStore`` interface). A writable mount registers a session and
refreshes its heartbeat every ``HEARTBEAT_S``. A file unlinked while open in that mount stays
in the metadata as an orphan of the session (nlink 0, blocks referenced) until its last close.

Invariant: an orphan is released exactly when its session can no longer close it: at its
last close, at the session's clean end (``close_session``), or, after a crash, when a later
writable mount or ``gc`` finds the session dead:

- on the same host: its process is gone (the pid is not running, or runs a later process);
- elsewhere: no heartbeat for ``STALE_AFTER_S``.

Then its orphans' blocks become garbage ``gc`` collects.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from chunkfs.meta.base import MetaStore

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # ten missed heartbeats


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19].decode() if len(fields) > 19 else None


def new_session_id() -> str:
    """``host/pid/start-time/random``: enough to tell, on the same host, whether it still runs."""
    pid = os.getpid()
    return f"{socket.gethostname()}/{pid}/{_start_time(pid) or 0}/{uuid.uuid4().hex[:8]}"


def is_dead(session: str, heartbeat_ns: int | None, now_ns: int) -> bool:
    host, _, rest = session.partition("/")
    pid_text, _, rest = rest.partition("/")
    started = rest.partition("/")[0]
    if host == socket.gethostname() and pid_text.isdigit():
        return _start_time(int(pid_text)) != started
    return heartbeat_ns is None or now_ns - heartbeat_ns > STALE_AFTER_S * 1e9


def release_dead_sessions(meta: MetaStore, now_ns: int | None = None) -> int:
    """Close every dead session (releasing its orphans), and release orphans whose session
    is not registered at all; returns how many orphans were released."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    sessions = meta.sessions()
    orphans = meta.orphans()
    released = 0
    for session, heartbeat in sessions.items():
        if is_dead(session, heartbeat, now_ns):
            count = sum(1 for owner in orphans.values() if owner == session)
            log.info("session %s is gone: releasing its %d file(s) unlinked while open", session, count)
            meta.close_session(session)
            released += count
    for ino, owner in orphans.items():
        if owner not in sessions and is_dead(owner, None, now_ns):
            meta.release_orphan(ino)
            released += 1
    return released

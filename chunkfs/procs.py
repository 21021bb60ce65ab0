"""Process helpers shared by the cache (stale temporary files) and the CSI plugin (daemons)."""

from __future__ import annotations

import os
import subprocess


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (a dead child not yet reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc to ask: kill(0) said it exists


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a child we started and reap it; kill it if it outlives ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

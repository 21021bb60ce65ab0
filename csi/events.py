"""Kubernetes Events on the pod a publish is for: a warming volume's progress, visible in
``kubectl describe pod`` while the pod waits for its model.

Only when the plugin can reach the API: in a cluster (``KUBERNETES_SERVICE_HOST`` and
``KUBERNETES_SERVICE_PORT``, the service account's token and CA under
``/var/run/secrets/kubernetes.io/serviceaccount``, or ``CHUNKFS_KUBE_SA_DIR``), and for a
publish that names its pod (the CSIDriver's ``podInfoOnMount: true`` puts
``csi.storage.k8s.io/pod.name``, ``pod.namespace`` and ``pod.uid`` in the volume context).
The ClusterRole in ``deploy/rbac.yaml`` grants ``events: create``.

Best effort: events are posted from one background daemon thread, each request bounded by
``TIMEOUT_S``, at most ``QUEUE_MAX`` waiting (more are dropped while the API is slow); a
failure is logged (the first at warning level, later ones at debug) and never delays or
fails a publish or the plugin's exit. The token is read again for every event (projected
service account tokens rotate); an unreadable CA means no events, not a plugin that fails.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SA_DIR_ENV = "CHUNKFS_KUBE_SA_DIR"
COMPONENT = "csi.chunkfs.io"
TIMEOUT_S = 2.0
QUEUE_MAX = 100
POD_KEYS = ("csi.storage.k8s.io/pod.name", "csi.storage.k8s.io/pod.namespace", "csi.storage.k8s.io/pod.uid")


@dataclass(frozen=True)
class PodRef:
    name: str
    namespace: str
    uid: str

    @classmethod
    def from_volume_context(cls, context: Mapping[str, str]) -> PodRef | None:
        name, namespace, uid = (context.get(key, "") for key in POD_KEYS)
        return cls(name, namespace, uid) if name and namespace else None


class PodEvents:
    """Posts core/v1 Events about pods to the API server (see the module docstring)."""

    def __init__(self, api: str, sa_dir: Path, node_id: str) -> None:
        self.api = api.rstrip("/")
        self.sa_dir = sa_dir
        self.node_id = node_id
        ca = sa_dir / "ca.crt"
        self._tls = ssl.create_default_context(cafile=str(ca)) if ca.exists() else ssl.create_default_context()
        self._queue: queue.Queue[tuple[PodRef, str, str, bool]] = queue.Queue(QUEUE_MAX)
        self._failed = False
        threading.Thread(target=self._drain, name="pod-events", daemon=True).start()

    @classmethod
    def from_environment(cls, node_id: str) -> PodEvents | None:
        """The in-cluster API, or None outside a cluster (no events, as before)."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        sa_dir = Path(os.environ.get(SA_DIR_ENV) or SA_DIR)
        if not host or not port or not (sa_dir / "token").exists():
            return None
        host = f"[{host}]" if ":" in host else host
        try:
            return cls(f"https://{host}:{port}", sa_dir, node_id)
        except (OSError, ssl.SSLError) as exc:
            log.warning("no events on pods: cannot use the service account's CA: %s", exc)
            return None

    def post(self, pod: PodRef | None, reason: str, message: str, *, warning: bool = False) -> None:
        """Queue an event on ``pod`` (nothing when the publish named no pod)."""
        if pod is not None:
            try:
                self._queue.put_nowait((pod, reason, message, warning))
            except queue.Full:
                log.debug("event on pod %s/%s dropped: the API is not keeping up", pod.namespace, pod.name)

    def _drain(self) -> None:
        while True:
            self._send(*self._queue.get())

    def _send(self, pod: PodRef, reason: str, message: str, warning: bool) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{pod.name}.chunkfs-", "namespace": pod.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "namespace": pod.namespace,
                               **({"uid": pod.uid} if pod.uid else {})},
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT, "host": self.node_id},
            "reportingComponent": COMPONENT, "reportingInstance": self.node_id,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            token = (self.sa_dir / "token").read_text().strip()
            request = urllib.request.Request(
                f"{self.api}/api/v1/namespaces/{pod.namespace}/events", data=json.dumps(event).encode(),
                method="POST", headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=self._tls) as response:
                response.read()
        except (OSError, urllib.error.URLError, ValueError) as exc:
            level = logging.DEBUG if self._failed else logging.WARNING
            self._failed = True
            log.log(level, "cannot post an event on pod %s/%s: %s", pod.namespace, pod.name, exc)

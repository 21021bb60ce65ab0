"""The CSI Identity and Node services of csi.chunkfs.io.

Volumes: one chunkfs mount per volume id per node, read-only, at kubelet's staging path (or,
for an inline ephemeral volume, at a directory of the plugin's own), shared node cache. Each
target path is a read-only bind mount of the volume's ``path`` directory (volume context).

Rules every call follows (CSI spec v1):

- Required fields are checked first, before any state is read: a missing volume id, path or
  capability is INVALID_ARGUMENT.
- Every call is idempotent: staging or publishing what is already there, or unstaging or
  unpublishing what is gone, answers OK.
- Any access mode is accepted; the volume is always mounted read-only (kubelet sends a
  writer mode for inline volumes).
- Secrets (``metaurl``, store keys, the peer secret) go to the mount daemon's environment and
  a root-only state file; never to a command line, a log line or the volume context.
- A publish of a volume with ``warm: "100%"`` returns only once the volume's path is whole in
  the node cache (warmed through its daemon, outside the lock), or fails UNAVAILABLE after
  ``warmTimeout`` seconds saying how far it got; the kubelet's retry resumes it. Its progress
  also goes to events on the pod when the API is reachable (``csi/events.py``).
- A volume with ``peerPort`` serves its node cache to the other nodes on that port (one port
  per volume on a node: each volume's daemon listens on its own), and asks the members that
  ``peers`` names (default ``meta``: the nodes serving this volume, from its metadata).
- A ``path`` with ``..``, or one whose symlinks lead outside the volume, is refused.
- One lock serialises the calls that change mounts, and the supervisor's repairs.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import wrappers_pb2

from chunkfs.fuse.mountinfo import find_mount
from chunkfs.procs import wait_exit
from csi import csi_pb2, csi_pb2_grpc
from csi.events import PodEvents, PodRef
from csi.mounter import (
    META_ENV,
    DaemonSettings,
    MountError,
    WarmingIncomplete,
    bind_read_only,
    chunkfs_mount_at,
    healthy,
    peer_args,
    remove_target,
    secrets_to_env,
    start_daemon,
    statvfs_within,
    unmount,
    warm,
    warm_settings,
)
from csi.state import StateStore, Target, VolumeRecord

log = logging.getLogger(__name__)

DRIVER_NAME = "csi.chunkfs.io"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
Code = grpc.StatusCode


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    log.info("-> %s: %s", code.name, message)
    context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


def _require(context: grpc.ServicerContext, value: str, name: str) -> None:
    if not value:
        _abort(context, Code.INVALID_ARGUMENT, f"{name} is required")


def _require_capability(context: grpc.ServicerContext, request: Any, field: str) -> None:
    """A capability names its access type (``mount``; ``block`` is refused) and a known
    access mode: the spec makes both required."""
    if not request.HasField(field):
        _abort(context, Code.INVALID_ARGUMENT, f"{field} is required")
    capability = getattr(request, field)
    if capability.WhichOneof("access_type") is None:
        _abort(context, Code.INVALID_ARGUMENT, f"{field} needs an access type (mount)")
    if not capability.HasField("access_mode") or \
            capability.access_mode.mode == csi_pb2.VolumeCapability.AccessMode.UNKNOWN:
        _abort(context, Code.INVALID_ARGUMENT, f"{field} needs an access mode")
    if capability.HasField("block"):
        _abort(context, Code.FAILED_PRECONDITION, "chunkfs volumes are filesystems; block access is not supported")


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """An RPC handler that answers INTERNAL, with the reason, for an error it did not expect
    (grpc would answer UNKNOWN, "Exception calling application", which a CO cannot act on);
    what the handler aborted with on purpose goes through unchanged."""

    @functools.wraps(method)
    def handle(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            if context.code() is not None:  # an _abort: its code and message are set
                raise
            log.exception("%s failed", method.__name__)
            _abort(context, Code.INTERNAL, f"{method.__name__}: {type(exc).__name__}: {exc}")

    return handle


T = TypeVar("T")


def rpc_handlers(cls: type[T]) -> type[T]:
    """Every RPC a servicer class defines (its CamelCase methods) goes through ``_rpc``."""
    for name, value in list(vars(cls).items()):
        if name[:1].isupper() and callable(value):
            setattr(cls, name, _rpc(value))
    return cls


def volume_path(context: grpc.ServicerContext, volume_context: Any) -> str:
    """The ``path`` attribute as ``/a/b``; refuses ``..`` (INVALID_ARGUMENT)."""
    raw = volume_context.get("path", "/") or "/"
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts or "\0" in raw:
        _abort(context, Code.INVALID_ARGUMENT, f"volume attribute path {raw!r} may not contain '..'")
    return "/" + "/".join(parts)


def volume_peer_args(context: grpc.ServicerContext, volume_context: Any, secrets: dict[str, str]) -> list[str]:
    """The volume's fleet-cache mount options (``peerPort``, ``peers``); INVALID_ARGUMENT if
    they are malformed or the secret has no ``peer-secret``."""
    try:
        return list(peer_args(volume_context, secrets_to_env(secrets)))
    except ValueError as exc:
        _abort(context, Code.INVALID_ARGUMENT, str(exc))


@rpc_handlers
class ChunkfsIdentity(csi_pb2_grpc.IdentityServicer):
    def __init__(self, version: str, ready: Callable[[], str | None]) -> None:
        self.version = version
        self.ready = ready  # None when healthy, else the reason

    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=self.version)

    def GetPluginCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[])  # a node plugin only: no controller

    def Probe(self, request: Any, context: grpc.ServicerContext) -> Any:
        problem = self.ready()
        if problem is not None:
            _abort(context, Code.FAILED_PRECONDITION, problem)
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))


@rpc_handlers
class ChunkfsController(csi_pb2_grpc.ControllerServicer):
    """The least of a Controller service, for clients that ask every plugin for controller
    capabilities (csi-sanity before v5.6 does so before each Node test, and fails the test if
    the call fails or the list is empty). Never advertised to a CO: GetPluginCapabilities
    names no CONTROLLER_SERVICE, and every other Controller RPC answers UNIMPLEMENTED.

    Its one capability is GET_CAPACITY, and the capacity is 0: models are put into a chunkfs
    volume by import or a writable mount, and no volume can be provisioned through CSI."""

    def ControllerGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        kind = csi_pb2.ControllerServiceCapability.RPC(type=csi_pb2.ControllerServiceCapability.RPC.GET_CAPACITY)
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[csi_pb2.ControllerServiceCapability(rpc=kind)])

    def GetCapacity(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.GetCapacityResponse(available_capacity=0)


class SourceRefused(Exception):
    """The volume's ``path`` cannot be bound: it is missing or leads outside the volume."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def source_path(record: VolumeRecord) -> str:
    """The real path of the volume's ``path`` inside its staging mount; ``SourceRefused`` if it
    leads outside the mount (a symlink or ``..``) or does not exist."""
    staging = os.path.realpath(record.staging_path)
    source = os.path.realpath(staging + record.volume_path)
    if source != staging and not source.startswith(staging + "/"):
        raise SourceRefused(Code.INVALID_ARGUMENT, f"path {record.volume_path} leads outside the volume")
    if not os.path.exists(source):
        raise SourceRefused(Code.NOT_FOUND, f"path {record.volume_path} does not exist")
    return source


@rpc_handlers
class ChunkfsNode(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, state: StateStore, settings: DaemonSettings) -> None:
        self.node_id = node_id
        self.state = state
        self.settings = settings
        self.lock = threading.RLock()
        self.records: dict[str, VolumeRecord] = {r.volume_id: r for r in state.load_all()}
        self._warming: dict[str, int] = {}  # target -> publishes of it warming now (under the lock)
        self.events = PodEvents.from_environment(node_id)  # None outside a cluster

    # -- stage ---------------------------------------------------------------------------------
    def NodeStageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        _require(context, request.volume_id, "volume_id")
        _require(context, request.staging_target_path, "staging_target_path")
        _require_capability(context, request, "volume_capability")
        path = volume_path(context, request.volume_context)
        peers = volume_peer_args(context, request.volume_context, dict(request.secrets))
        log.info("NodeStageVolume %s at %s (path %s)", request.volume_id, request.staging_target_path, path)
        with self.lock:
            record = self.records.get(request.volume_id)
            if record is not None:
                if (record.staging_path, record.volume_path, record.ephemeral, record.peer_args) != \
                        (request.staging_target_path, path, False, peers):
                    _abort(context, Code.ALREADY_EXISTS,
                           f"volume {request.volume_id} is staged at {record.staging_path} with path "
                           f"{record.volume_path}" + (" and other peer settings" if record.peer_args != peers else ""))
                self._ensure_running(context, record)
                return csi_pb2.NodeStageVolumeResponse()
            record = VolumeRecord(request.volume_id, request.staging_target_path, path, peer_args=peers)
            self._stage(context, record, dict(request.secrets))
        return csi_pb2.NodeStageVolumeResponse()

    def _stage(self, context: grpc.ServicerContext, record: VolumeRecord, secrets: dict[str, str]) -> str:
        """Start the volume's mount daemon; the source path targets bind (a bad path is refused
        and the mount stopped)."""
        env = secrets_to_env(secrets)
        if META_ENV not in env:
            _abort(context, Code.INVALID_ARGUMENT, "the volume's secret has no 'metaurl' key")
        self.state.save_env(record.volume_id, env)
        try:
            record.pid = start_daemon(record.staging_path, env, self.settings, self.state.log_path(record.volume_id),
                                      record.peer_args)
        except MountError as exc:
            self.state.delete(record)
            _abort(context, Code.INTERNAL, f"cannot mount volume {record.volume_id}: {exc}")
        self.records[record.volume_id] = record
        self.state.save(record)
        return self._source(context, record, teardown=True)

    def _source(self, context: grpc.ServicerContext, record: VolumeRecord, *, teardown: bool) -> str:
        """The directory (or file) targets bind: the volume's path inside the staging mount.
        A path that is missing or escapes aborts the call; with ``teardown`` (the volume was
        staged by this very call) its mount is stopped first, if nothing is published."""
        try:
            return source_path(record)
        except SourceRefused as exc:
            if teardown:
                self._teardown_if_unused(record)
            _abort(context, exc.code, f"volume {record.volume_id}: {exc}")

    def _teardown_if_unused(self, record: VolumeRecord) -> None:
        if not record.targets:
            self._teardown(record)

    def _teardown(self, record: VolumeRecord) -> None:
        unmount(record.staging_path, fuse=True)
        wait_exit(record.pid)
        self.state.delete(record)
        self.records.pop(record.volume_id, None)
        if record.ephemeral:
            remove_target(record.staging_path)

    def _ensure_running(self, context: grpc.ServicerContext, record: VolumeRecord) -> None:
        if not healthy(record.staging_path):
            try:
                self.revive(record)
            except (MountError, OSError, ValueError) as exc:  # OSError, ValueError: its saved state
                _abort(context, Code.UNAVAILABLE, f"volume {record.volume_id}: mount daemon cannot restart: {exc}")

    def NodeUnstageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        _require(context, request.volume_id, "volume_id")
        _require(context, request.staging_target_path, "staging_target_path")
        log.info("NodeUnstageVolume %s at %s", request.volume_id, request.staging_target_path)
        with self.lock:
            record = self.records.get(request.volume_id)
            if record is None or record.staging_path != request.staging_target_path:
                unmount_leftover(request.staging_target_path)
                return csi_pb2.NodeUnstageVolumeResponse()
            busy = [t for t in record.targets if _mounted(t)]
            if busy:
                _abort(context, Code.FAILED_PRECONDITION,
                       f"volume {request.volume_id} is still published at {', '.join(sorted(busy))}")
            try:
                self._teardown(record)
            except MountError as exc:
                _abort(context, Code.INTERNAL, str(exc))
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish -------------------------------------------------------------------------------
    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        _require(context, request.volume_id, "volume_id")
        _require(context, request.target_path, "target_path")
        _require_capability(context, request, "volume_capability")
        ephemeral = request.volume_context.get(EPHEMERAL_KEY) == "true"
        if not ephemeral and not request.staging_target_path:
            _abort(context, Code.FAILED_PRECONDITION, "staging_target_path is required (the driver stages volumes)")
        path = volume_path(context, request.volume_context)
        try:
            warm_for = warm_settings(request.volume_context)
        except ValueError as exc:
            _abort(context, Code.INVALID_ARGUMENT, str(exc))
        target = request.target_path
        log.info("NodePublishVolume %s at %s (path %s%s)", request.volume_id, target, path,
                 ", inline" if ephemeral else "")
        record, bound = self._publish(context, request, ephemeral, path)
        if warm_for is not None:  # outside the lock: other volumes' calls go on meanwhile
            with self.lock:
                self._warming[target] = self._warming.get(target, 0) + 1
            try:
                self._warm(context, record, target, bound, warm_for, PodRef.from_volume_context(request.volume_context))
            finally:
                with self.lock:
                    self._warming[target] -= 1
                    if not self._warming[target]:
                        del self._warming[target]
        return csi_pb2.NodePublishVolumeResponse()

    def _warm(self, context: grpc.ServicerContext, record: VolumeRecord, target: str, bound: bool,
              timeout: float, pod: PodRef | None) -> None:
        """Warm the volume's path into the node cache before the publish answers (attribute
        ``warm``). The target stays bound when time runs out (UNAVAILABLE: kubelet holds the
        volume as maybe-mounted and retries the publish, the same arguments, idempotent), and
        each retry resumes the warmup, its error message (a pod event) saying how far it got.
        A warmup that fails outright undoes the publish first (INTERNAL: kubelet holds the
        volume as not mounted and will not unpublish it), if this call made the bind and no
        other publish of the target is warming; else the bind stays, for the call or pod that
        holds it (UNAVAILABLE). Progress goes to the log and, when
        the plugin can reach the API, to events on the pod (``csi/events.py``)."""
        volume_id = record.volume_id

        def event(reason: str, message: str, warning: bool = False) -> None:
            if self.events is not None:
                self.events.post(pod, reason, f"volume {volume_id}: {message}", warning=warning)

        def progress(line: str) -> None:
            log.info("volume %s: %s", volume_id, line)
            event("ChunkfsWarming", line)

        event("ChunkfsWarming", f"warming {record.volume_path} into the node cache before the pod starts "
                                f"(warmTimeout {timeout:.0f} s)")
        try:
            report = warm(record.staging_path, record.volume_path, timeout, progress)
        except WarmingIncomplete as exc:
            log.warning("volume %s: %s", volume_id, exc)
            event("ChunkfsWarmingIncomplete", str(exc), warning=True)
            _abort(context, Code.UNAVAILABLE, f"volume {volume_id}: {exc}")
        except MountError as exc:
            log.warning("volume %s: %s", volume_id, exc)
            event("ChunkfsWarmingFailed", str(exc), warning=True)
            with self.lock:
                if not bound or self._warming.get(target) != 1 or target not in record.targets:
                    _abort(context, Code.UNAVAILABLE, f"volume {volume_id}: {exc}")
                try:
                    self._unpublish(target)
                except MountError as undo:
                    _abort(context, Code.UNAVAILABLE, f"volume {volume_id}: {exc}; and {undo}")
            _abort(context, Code.INTERNAL, f"volume {volume_id}: {exc}")
        done = (f"{record.volume_path} is in the node cache ({report['bytes_fetched']} bytes fetched, "
                f"{report['bytes_cached_before']} already there)")
        log.info("volume %s: %s", volume_id, done)
        event("ChunkfsWarmed", done)

    def _publish(self, context: grpc.ServicerContext, request: Any, ephemeral: bool,
                 path: str) -> tuple[VolumeRecord, bool]:
        """Stage (inline volumes) and bind the target; the volume's record, and whether this
        call made the bind (False: it was there already)."""
        target = request.target_path
        with self.lock:
            owner = self._owner_of(target)
            if owner is not None and owner.volume_id != request.volume_id:
                _abort(context, Code.ALREADY_EXISTS, f"{target} already holds volume {owner.volume_id}")
            record = self.records.get(request.volume_id)
            source = None
            if ephemeral and record is None:
                record = VolumeRecord(request.volume_id, self.state.ephemeral_staging(request.volume_id), path,
                                      ephemeral=True, peer_args=volume_peer_args(context, request.volume_context,
                                                                                 dict(request.secrets)))
                source = self._stage(context, record, dict(request.secrets))
            elif record is None or (not ephemeral and record.staging_path != request.staging_target_path):
                _abort(context, Code.FAILED_PRECONDITION,
                       f"volume {request.volume_id} is not staged at {request.staging_target_path}")
            if record.volume_path != path:
                _abort(context, Code.ALREADY_EXISTS,
                       f"volume {request.volume_id} is staged with path {record.volume_path}, not {path}")
            self._ensure_running(context, record)
            mounted = _mounted(target)
            asked = Target(target, readonly=request.readonly,
                           capability=request.volume_capability.SerializeToString(deterministic=True).hex())
            if target in record.targets and mounted:
                held = record.targets[target]
                if held.readonly != asked.readonly or held.capability not in ("", asked.capability):
                    _abort(context, Code.ALREADY_EXISTS,
                           f"{target} already publishes volume {request.volume_id} with another readonly flag "
                           "or volume capability")
                return record, False
            if mounted:
                _abort(context, Code.ALREADY_EXISTS, f"something else is mounted at {target}")
            try:
                if source is None:
                    # a staged volume whose path went away refuses this publish but stays
                    # staged: the CO still holds it staged and will unstage it itself
                    source = self._source(context, record, teardown=record.ephemeral)
                bind_read_only(source, target)
            except MountError as exc:
                self._teardown_ephemeral_if_unused(record)
                _abort(context, Code.INTERNAL, str(exc))
            record.targets[target] = asked
            self.state.save(record)
        return record, True

    def _owner_of(self, target: str) -> VolumeRecord | None:
        return next((r for r in self.records.values() if target in r.targets), None)

    def _teardown_ephemeral_if_unused(self, record: VolumeRecord) -> None:
        if record.ephemeral and not record.targets:
            self._teardown(record)

    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        _require(context, request.volume_id, "volume_id")
        _require(context, request.target_path, "target_path")
        target = request.target_path
        log.info("NodeUnpublishVolume %s at %s", request.volume_id, target)
        with self.lock:
            try:
                self._unpublish(target)
            except MountError as exc:
                _abort(context, Code.INTERNAL, str(exc))
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _unpublish(self, target: str) -> None:
        """Unbind and remove ``target`` and forget it in whichever record holds it (an
        inline volume left with no target is torn down). Under the lock."""
        unmount(target, fuse=False)
        remove_target(target)
        record = self._owner_of(target)
        if record is not None:
            del record.targets[target]
            self.state.save(record)
            self._teardown_ephemeral_if_unused(record)

    # -- information ---------------------------------------------------------------------------
    def NodeGetVolumeStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        _require(context, request.volume_id, "volume_id")
        _require(context, request.volume_path, "volume_path")
        record = self.records.get(request.volume_id)
        path = request.volume_path
        if record is None or (path not in record.targets and path != record.staging_path) or not _mounted(path):
            _abort(context, Code.NOT_FOUND, f"volume {request.volume_id} is not mounted at {path}")
        st = statvfs_within(path)
        if st is None:
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=csi_pb2.VolumeCondition(
                abnormal=True, message="the chunkfs mount does not answer; the plugin is restarting its daemon"))
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        usage = [csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=total, available=free, used=total - free),
                 csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.INODES, total=st.f_files, available=st.f_favail,
                                     used=st.f_files - st.f_ffree)]
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage, volume_condition=csi_pb2.VolumeCondition(abnormal=False, message="ok"))

    def NodeGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        rpc = csi_pb2.NodeServiceCapability.RPC
        kinds = [rpc.STAGE_UNSTAGE_VOLUME, rpc.GET_VOLUME_STATS, rpc.VOLUME_CONDITION]
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=rpc(type=kind)) for kind in kinds])

    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id)

    # -- supervision ---------------------------------------------------------------------------
    def revive(self, record: VolumeRecord) -> None:
        """Bring back a dead mount daemon and re-bind every target onto the new mount."""
        log.warning("volume %s: the chunkfs mount at %s is gone; restarting its daemon", record.volume_id,
                    record.staging_path)
        unmount(record.staging_path, fuse=True)
        record.pid = start_daemon(record.staging_path, self.state.load_env(record.volume_id), self.settings,
                                  self.state.log_path(record.volume_id), record.peer_args)
        self.state.save(record)
        try:
            source = source_path(record)
        except SourceRefused as exc:
            log.error("volume %s: not re-binding %d targets: %s", record.volume_id, len(record.targets), exc)
            return
        for target in list(record.targets):
            unmount(target, fuse=False)
            bind_read_only(source, target)
        log.warning("volume %s: mount restored (daemon pid %d, %d targets re-bound)", record.volume_id,
                    record.pid, len(record.targets))

    def check_all(self) -> None:
        """One supervisor pass: revive every staged volume whose mount is gone or dead."""
        for record in list(self.records.values()):
            with self.lock:
                if record.volume_id not in self.records or healthy(record.staging_path):
                    continue
                try:
                    self.revive(record)
                except (MountError, OSError) as exc:
                    log.error("volume %s: cannot restore the mount yet: %s", record.volume_id, exc)


def _mounted(path: str) -> bool:
    return find_mount(path) is not None


def unmount_leftover(staging: str) -> None:
    """Unstage of a volume the plugin does not know: remove a chunkfs mount left there, if any."""
    if chunkfs_mount_at(staging) is not None:
        unmount(staging, fuse=True)

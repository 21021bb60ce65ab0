#!/usr/bin/env python3
"""Read benchmark: load a safetensors model from S3 through chunkfs, JuiceFS, boto3 and a local disk.

    scripts/bench [--size 2G] [--shards 4] [--runs 3] [--work /tmp/chunkfs-bench-read] [--json PATH]
                  [--only NAME[,NAME...]] [--skip-juicefs] [--chunkfs-args "--max-downloads 32"] [--verify]
                  [--rclone-md5-etag]

(scripts/bench sets up the virtualenv and runs this file with .venv/bin/python.) One run builds a
synthetic model with scripts/make_model.py (kept between invocations while size and shards are
unchanged), starts ``rclone serve s3`` on a free loopback port over WORK/s3 (ETags off, see
start_rclone), formats and fills a JuiceFS and a chunkfs volume in it, and then, --runs
times, measures in this order:

  raw_get              all shards fetched with 16 parallel 8 MiB ranged GETs (boto3), data discarded
  raw_get_sha256       the same, each 8 MiB range also hashed with SHA-256 as it arrives: the least a
                       client that verifies what it downloads (chunkfs checks every block's hash) pays
  raw_get_blake3       the same with BLAKE3 (the hash of new chunkfs volumes)
  raw_get_blake3_write the same, each range also written at its place in a copy of its shard in WORK
                       (pwrite, through the page cache): the least a warmup does, without its start
  (the raw rows' CPU-s/GiB is this process's own: the client's, not the store's)
  local_disk           the model loaded from the local disk
  disk_write           the model's size written to new files in WORK by 8 threads with O_DIRECT, 1 MiB
                       at a time (as a warmup writes its cache): the node disk's floor for ck_warmup
  boto3_download_load  boto3 download_file of each shard into an empty directory, then loaded (wall)
  jfs_cold_default     JuiceFS mount with an empty cache, default flags
  jfs_cold_tuned       JuiceFS mount with an empty cache, --max-readahead 1024 --buffer-size 2048
                       --max-downloads 64
  jfs_warm             JuiceFS mount (tuned flags) over the cache the cold run left
  ck_cold              chunkfs mount with an empty cache
  ck_warm_same         the ck_cold mount, loaded again after dropping the page cache (a node's
                       long-lived daemon: blocks in its cache and already verified by it)
  ck_warm              a fresh chunkfs mount over the cache the cold run left (a restarted daemon:
                       each block is read back and verified once)
  ck_hot               the same mount as ck_warm, loaded again without dropping the page cache
  ck_cold_mmap1        one process mmap-reading every row of every tensor of every shard (safe_open +
                       get_slice, the loader of ck_cold_mmap4 with a world of one), empty cache
  ck_cold_mmap4        4 processes at once, each mmap-reading its quarter of the rows of every tensor of
                       every shard (as tensor-parallel loaders do), empty cache; the time is from the
                       first rank's start to the last rank's end. The issue's "same throughput as one
                       reader" target compares it with ck_cold_mmap1, the same loader in one process
  ck_cold_mmap4_recording  the same, the mount recording the model directory's access profile
                       (--access-profile record: it replaces the stored one at unmount)
  ck_cold_mmap4_profiled   the same over a mount that prefetches in that recorded order
                       (--access-profile use); its "first tensor" is the time from the first rank's
                       start to the first slice any rank got (printed for every mmap row)
  Every other chunkfs mount runs with --access-profile off, so no row's recording steers another.
  jfs_write            `cp -r MODEL MNT/model` into a fresh JuiceFS volume (default mount flags); cp's wall time
                       (each close waits for the file's upload)
  ck_write             the same into a fresh chunkfs volume through a read-write mount (each close publishes)
  jfs_warmup           `juicefs warmup MNT/model` through a fresh JuiceFS mount (default flags, empty cache)
  ck_warmup            `chunkfs warmup META /model --cache-dir EMPTY` (no mount); then the same on the
                       complete cache, whose CPU (start, metadata, plan) the "beyond" figure leaves out
  ck_download_loop     chunkfs's block download layer alone (scripts/download_loop.py): every block of
                       the model fetched, verified and written into an empty cache as a warmup's block
                       entries are, by 32 plain threads: no trio, no warmup engine, no process start
                       (its seconds and CPU are the loop's). ck_warmup's floor in chunkfs's own code
  ck_after_warmup      a fresh mount on ck_warmup's cache, loading the model after dropping the page
                       cache: the first load a pod sees on a node an operator warmed
  pt_warm              design probe (scripts/probe_passthrough.py, not chunkfs): the local copy of the
                       model served by a pure-Python FUSE server that hands every open to the kernel
                       by FUSE passthrough, so no read reaches the server: what a warm load through a
                       passthrough read path would cost
  pt_cold              the same probe fetching each file whole (16 parallel 8 MiB ranged GETs of the
                       raw copy, each hashed with BLAKE3) into a node-local image before answering its
                       open, then the model's other files in name order: a cold load that passes the
                       download through instead of serving reads

--store-conn-rate SIZE caps each connection's object GETs (nginx limit_rate: S3 serves one
connection at about 100 MB/s) and --store-rate SIZE the store's whole egress (tc htb on loopback,
in a network namespace of the bench's own, after the set-up): a store across a network.

Page caches are dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every measurement except
ck_hot, including raw_get. The store's objects stay in memory (--store-disk memory, the
default, a helper maps them so that drop_caches leaves them resident), as a real store's disks are
not the node's; with --store-disk node every cold case reads them from the disk the caches write
to. A
"load" is load_model() of scripts/load_model.py in a fresh Python (its own timing, which covers only
the load); each load checks the tensor count and the bytes of tensor data against the source model,
and --verify runs scripts/load_model.py --compare MODEL instead (bit-for-bit). Mount daemons' peak
RSS is VmHWM from /proc just before unmounting (for JuiceFS the largest process of the mount's tree:
a foreground `juicefs mount` serves from a child). Prints a Markdown table and the targets, and
writes every timing to --json (default WORK/bench.json). Needs root (drop_caches, FUSE).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import mmap
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
from botocore.config import Config

from chunkfs.blocks import DEFAULT_HASH, HASHES, new_hasher
from chunkfs.procs import process_tree, stop_process
from chunkfs.units import parse_size

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
S3_KEY, S3_SECRET = "chunkfs-test-key", "chunkfs-test-secret"  # as tests/servers.py; rclone refuses short keys
REGION = "us-east-1"
RAW_BUCKET, JFS_BUCKET, CK_BUCKET = "rawbucket", "jfsbucket", "ckbucket"
RANGE = 8 << 20
NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120;
    client_max_body_size 0;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    default_type application/octet-stream;
    upstream rclone {{ server 127.0.0.1:{rclone}; keepalive 64; }}
    # a query string means an S3 API call for rclone (LIST, multipart...), except a presigned
    # object GET's signature (X-Amz-*): such a GET is answered from the file like a plain one
    map $args $s3_api_call {{ default 1; "" 0; "~^X-Amz-[^&]*(&X-Amz-[^&]*)*$" 0; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            error_page 418 = @rclone;
            if ($request_method != GET) {{ return 418; }}
            if ($s3_api_call) {{ return 418; }}
            if ($http_if_match != "") {{ return 418; }}  # boto3 download_file: rclone's ETags, not nginx's
            root {root};
            try_files $uri @rclone;
        }}
        location @rclone {{
            proxy_pass http://rclone;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"""
#: maps every file under argv[1], populated, then waits for stdin to close (the kernel never drops
#: mapped page-cache pages on drop_caches)
HOLD_IN_MEMORY = """
import mmap, os, sys
held, maps = 0, []
for top, _, names in os.walk(sys.argv[1]):
    for name in names:
        with open(os.path.join(top, name), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size:
                maps.append(mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                      prot=mmap.PROT_READ))
                held += size
print(f"held {held >> 20} MiB", flush=True)
sys.stdin.read()
"""
JFS_TUNED = ["--max-readahead", "1024", "--buffer-size", "2048", "--max-downloads", "64"]
NAMES = ["raw_get", "raw_get_sha256", "raw_get_blake3", "raw_get_blake3_write", "local_disk", "disk_write",
         "boto3_download_load",
         "jfs_cold_default", "jfs_cold_tuned", "jfs_warm", "ck_cold", "ck_warm_same", "ck_warm", "ck_hot",
         "ck_cold_mmap1", "ck_cold_mmap4", "ck_cold_mmap4_recording", "ck_cold_mmap4_profiled", "jfs_write",
         "ck_write", "jfs_warmup", "ck_warmup", "ck_download_loop", "ck_after_warmup", "pt_warm", "pt_cold"]
MMAP4_PROFILE_ROWS = {"ck_cold_mmap4": "off", "ck_cold_mmap4_recording": "record", "ck_cold_mmap4_profiled": "use"}
COLD = {"jfs_cold_default", "jfs_cold_tuned", "ck_cold", "ck_cold_mmap1", *MMAP4_PROFILE_ROWS, "pt_cold"}
RANKS = 4
WARM = {"jfs_warm", "ck_warm_same", "ck_warm", "ck_hot", "pt_warm", "ck_after_warmup"}
MOUNT_TIMEOUT, UNMOUNT_TIMEOUT, LOAD_TIMEOUT = 60.0, 60.0, 3600.0

# Runs in a fresh interpreter: load_model() from scripts/load_model.py (it times only the load), plus
# the bytes of tensor data actually decoded, which the bench checks against the source model.
LOADER = """
import importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("load_model", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
tensors, nbytes, seconds = mod.load_model(Path(sys.argv[2]))
print(json.dumps({"tensors": len(tensors), "bytes": nbytes, "seconds": seconds,
                  "tensor_bytes": sum(t.nbytes for t in tensors.values())}))
"""


# One tensor-parallel rank: mmap every shard and read rows [rank/world, (rank+1)/world) of each tensor.
RANK_LOADER = """
import json, sys, time
from pathlib import Path
from safetensors import safe_open
model, rank, world = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
start, nbytes, first = time.time(), 0, None
for shard in sorted(model.glob("*.safetensors")):
    with safe_open(str(shard), framework="np") as f:
        for key in f.keys():
            part = f.get_slice(key)
            rows = part.get_shape()[0]
            nbytes += part[rows * rank // world: rows * (rank + 1) // world].nbytes
            first = first or time.time()
print(json.dumps({"start": start, "end": time.time(), "first": first, "tensor_bytes": nbytes}))
"""


class BenchError(Exception):
    """A step failed; main() prints the message on one line and exits 1."""


class IncompleteWarmup(Exception):
    """A peer's warmup left part of the model out of its cache (``sample``: its timing)."""

    def __init__(self, message: str, sample: Sample) -> None:
        super().__init__(message)
        self.sample = sample


@dataclass
class Sample:
    seconds: float
    rss_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Runs cmd, returns its stdout; raises BenchError with the last line of its output on failure."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"{what} failed: {e}") from e
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise BenchError(f"{what} failed (exit {proc.returncode}): {lines[-1][:300]}")
    return proc.stdout


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise BenchError(f"cannot drop the page cache ({e}); the benchmark needs root") from e


PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
#: above the largest free block the kernel keeps (order 10): no free memory is reported
NO_REPORTING_ORDER = 11


class PageReporting:
    """This VM's free page reporting (virtio-balloon): the kernel hands memory that has been
    free a moment back to the host, and the next touch of it costs a host fault per page. Here
    that is about 2 s per GiB touched (8 GiB of freed memory touched again 15 s later: 0.5
    GB/s; with reporting off: 8.3 GB/s). Every ``drop_caches`` before a row frees GiBs that the
    row's page cache, buffers and copies then touch again, so each filesystem's daemon is
    charged for host faults a real node (bare metal, or a VM without reporting) never takes.
    ``pause`` turns reporting off for the run; ``restore`` puts the old order back."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # "pause" or "keep"
        self.saved: str | None = None

    def pause(self) -> str:
        """Turn reporting off if asked and possible, then have the host back the VM's free
        memory again (memory reported before the pause would still cost the first row that
        touches it a host fault per page); what the run measures under, for the report."""
        if self.mode == "keep":
            return "free page reporting left as it is"
        try:
            self.saved = PAGE_REPORTING_ORDER.read_text().strip()
            PAGE_REPORTING_ORDER.write_text(f"{NO_REPORTING_ORDER}\n")
        except OSError:
            self.saved = None
            return "no free page reporting to pause"
        drop_caches()
        touched = touch_free_memory()
        return f"free page reporting paused for the run ({touched / 2**30:.0f} GiB of free memory touched first)"

    def restore(self) -> None:
        if self.saved is not None:
            with contextlib.suppress(OSError):
                PAGE_REPORTING_ORDER.write_text(f"{self.saved}\n")
            self.saved = None


_ZEROS = bytes(2 << 20)


def touch_free_memory(spare: int = 2 << 30, chunk: int = 1 << 30) -> int:
    """Write once to all but ``spare`` bytes of the memory the kernel has available (in
    ``chunk``-sized huge-page mappings, all held, then all released); returns how much. With
    reporting paused, that memory then stays backed by the host."""
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    held: list[mmap.mmap] = []
    total = 0
    try:
        while total + chunk <= available - spare:
            m = mmap.mmap(-1, chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            with contextlib.suppress(AttributeError, OSError):
                m.madvise(mmap.MADV_HUGEPAGE)
            for offset in range(0, chunk, len(_ZEROS)):
                m[offset : offset + len(_ZEROS)] = _ZEROS  # every page, huge or not
            held.append(m)
            total += chunk
    finally:
        for m in held:
            m.close()
    return total


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot (all cores; /proc/stat).
    The difference over a measurement, divided by its seconds, is how many cores it kept
    busy: near the core count, it was CPU-bound."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and the processes below it (``juicefs
    mount`` serves from a child process), from /proc/<pid>/stat."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children that have exited and been waited
    for (``getrusage(RUSAGE_CHILDREN)``): the difference over a ``run`` is that command's own."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Timed:
    """Wall seconds, machine-wide busy CPU seconds and the CPU seconds of the commands run
    (and waited for) in a ``with`` block."""

    def __enter__(self) -> Timed:
        self.cpu, self.start = busy_cpu_seconds(), time.perf_counter()
        self.children = children_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu = busy_cpu_seconds() - self.cpu
        self.children = children_cpu_seconds() - self.children

    def cpu_extra(self) -> dict[str, float]:
        return {"cpu_s": round(self.cpu, 2), "cores_busy": round(self.cpu / self.seconds, 2)}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def reset_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def safetensors_payload(path: Path) -> tuple[int, int]:
    """(tensor count, bytes of tensor data) from a safetensors header."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    entries = [v for k, v in header.items() if k != "__metadata__"]
    return len(entries), sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries)


def mount_points() -> list[Path]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        points.append(Path(raw.encode().decode("unicode_escape")))  # octal escapes like \040
    return points


def vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss(pid: int) -> tuple[float, dict[int, float]]:
    """The largest VmHWM (MiB) in pid's process tree, and every process's."""
    per_pid = {p: round(vm_hwm_mib(p), 1) for p in process_tree(pid)}
    return max(per_pid.values(), default=0.0), per_pid


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return (out.stdout.strip() or out.stderr.strip()).splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def import_load_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("load_model", ROOT / "scripts" / "load_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.memory_note = "free page reporting left as it is"
        self.work: Path = args.work.resolve()
        self.selected = set(args.only) if args.only else set(NAMES)
        if args.skip_juicefs:
            self.selected -= {n for n in NAMES if n.startswith("jfs_")}
        self.juicefs, self.chunkfs, self.rclone = str(BIN / "juicefs"), str(BIN / "chunkfs"), str(BIN / "rclone")
        self.model = self.work / "model"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []
        self.samples: dict[str, list[Sample]] = {n: [] for n in NAMES if n in self.selected}
        self.commands: dict[str, list[str]] = {}
        self.endpoint = ""
        self.shards: list[Path] = []
        self.model_bytes = self.tensor_count = self.tensor_bytes = 0
        self.jfs_meta = f"sqlite3://{self.work / 'jfs.db'}"
        self.ck_meta = f"sqlite://{self.work / 'ck.db'}"
        self.nginx_access_log: Path | None = None  # set before start_rclone to log nginx's requests

    # -- set-up --------------------------------------------------------------------------------
    def wants(self, *names: str) -> bool:
        return any(n in self.selected for n in names)

    def prepare(self) -> None:
        for point in mount_points():
            if point.is_relative_to(self.work):
                say(f"clearing a stale mount {point}")
                subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False)
        self.work.mkdir(parents=True, exist_ok=True)
        stamp, wanted = self.work / "model.stamp", f"{self.args.size} {self.args.shards}\n"
        keep = {self.model, stamp} if stamp.exists() and stamp.read_text() == wanted else set()
        for child in self.work.iterdir():
            if child not in keep:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        if not self.model.exists():
            say(f"building a {self.args.size} model in {self.args.shards} shards ({self.model})")
            run([sys.executable, str(ROOT / "scripts" / "make_model.py"), str(self.model), "--size", self.args.size,
                 "--shards", str(self.args.shards)], "scripts/make_model.py", timeout=3600)
            stamp.write_text(wanted)
        self.shards = sorted(self.model.glob("*.safetensors"))
        self.model_bytes = sum(p.stat().st_size for p in self.shards)
        self.check_free_space()
        for shard in self.shards:
            count, nbytes = safetensors_payload(shard)
            self.tensor_count += count
            self.tensor_bytes += nbytes
        for binary in ([self.chunkfs, self.rclone] + ([self.juicefs] if self.wants(*self.jfs_names()) else [])):
            if not Path(binary).exists():
                hint = " (or pass --skip-juicefs)" if binary == self.juicefs else ""
                raise BenchError(f"{binary} is missing; run scripts/bench, which installs it{hint}")

    def check_free_space(self) -> None:
        """Refuse to run where the caches would meet their free-space floor: chunkfs and
        JuiceFS both stop caching blocks once their disk has less than 10% free (their
        --free-space-ratio default), which would time a different code path (JuiceFS's
        warmup then leaves its cache incomplete; chunkfs serves from memory)."""
        st = os.statvfs(self.work)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        needed = 8 * self.model_bytes  # the store's three copies, two caches, a write volume, headroom
        if free - needed < 0.15 * total:
            raise BenchError(f"{self.work} has {free / 2**30:.0f} GiB free of {total / 2**30:.0f} GiB; the run needs "
                             f"about {needed / 2**30:.0f} GiB and the caches stop at 10% free: free up space first")

    @staticmethod
    def jfs_names() -> list[str]:
        return [n for n in NAMES if n.startswith("jfs_")]

    def hold_store_in_memory(self) -> None:
        """Keep the store's objects resident in the page cache through every drop_caches (a
        helper process maps each of them, populated: the kernel drops no mapped page). A real
        store reads its objects on its own machines: its GETs must not share the node's disk
        with the cache the node is writing (a warmup writes as much as it reads). GETs are then
        still served by sendfile from the page cache, as they are from the disk (a tmpfs would
        make the store copy every byte on our 2 CPUs)."""
        proc = subprocess.Popen([sys.executable, "-c", HOLD_IN_MEMORY, str(self.work / "s3")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("held "):
            raise BenchError(f"could not hold the store's objects in memory: {line or 'the helper exited'}")
        say(f"store objects {line} in memory")

    def start_rclone(self) -> None:
        root = self.work / "s3"
        for bucket in (RAW_BUCKET, JFS_BUCKET, CK_BUCKET):
            (root / bucket).mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        # As tests/servers.py, plus --etag-hash "" by default: with rclone's default MD5 ETags, the first GET of
        # each object after a (re)start or an upload hashes the whole object (16 ranged GETs of a 512 MiB shard
        # hash it 16 times), which would time rclone rather than the client; --rclone-md5-etag keeps them.
        # --no-checksum: rclone's VFS MD5-checks every file it reads whole from the start, which costs it
        # about 70 ms of CPU per 16 MiB object: whole-object GETs (chunkfs, JuiceFS, boto3 download_file) paid it,
        # ranged GETs from the middle of a file (raw_get) did not. Without it, no client pays it.
        etag = ([] if self.args.rclone_md5_etag else ["--etag-hash", ""]) + ["--no-checksum"]
        cmd = [self.rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{S3_KEY},{S3_SECRET}",
               "--config", "/dev/null", *etag, str(root)]
        self.commands["rclone"] = cmd
        with (self.work / "rclone.log").open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        self.wait_answering(proc, "rclone serve s3", self.work / "rclone.log")
        say(f"rclone serve s3 on {self.endpoint} (pid {proc.pid})")
        if self.args.store == "nginx":
            self.start_nginx(root, port)

    def wait_answering(self, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
        """Wait (30 s at most) until the server at ``self.endpoint`` answers HTTP at all."""
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}; see {log}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{name} did not answer on {self.endpoint} within 30 s") from None
                time.sleep(0.1)

    def start_nginx(self, root: Path, rclone_port: int) -> None:
        """nginx in front of rclone: plain object GETs (no query string but a presigned URL's
        signature, no If-Match) are answered by nginx
        from rclone's directory with sendfile, costing the machine almost no CPU, as a real
        object store costs the node none; every other request (PUT, HEAD, LIST, DELETE,
        multipart) goes to rclone. The Host header is passed on, so signatures still verify."""
        port = free_port()
        conf = self.work / "nginx.conf"
        text = NGINX_CONF.format(work=self.work, root=root, port=port, rclone=rclone_port)
        if getattr(self.args, "store_conn_rate", 0):  # object GETs only (rclone's answers are not file answers)
            text = text.replace(f"            root {root};",
                                f"            limit_rate {self.args.store_conn_rate};\n            root {root};")
        if self.nginx_access_log is not None:  # one line per request: status and body bytes sent
            text = text.replace("access_log off;", "log_format bytes '$status $body_bytes_sent $request_method';\n"
                                f"    access_log {self.nginx_access_log} bytes;")
        conf.write_text(text)
        cmd = ["nginx", "-c", str(conf), "-p", str(self.work)]
        self.commands["nginx"] = cmd
        with (self.work / "nginx.log").open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.wait_answering(proc, "nginx", self.work / "nginx.log")
        say(f"nginx on {self.endpoint} (pid {proc.pid}) answers object GETs from {root}, the rest goes to rclone")

    def client(self, pool: int | None = None) -> Any:
        config = Config(s3={"addressing_style": "path"}, **({"max_pool_connections": pool} if pool else {}))
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name=REGION, config=config)

    def upload_raw(self) -> None:
        say(f"uploading {len(self.shards)} shards to s3://{RAW_BUCKET}")
        client = self.client()
        for shard in self.shards:
            client.upload_file(str(shard), RAW_BUCKET, shard.name)

    def jfs_format_cmd(self, meta: str, name: str) -> list[str]:
        return [self.juicefs, "format", "--no-update", meta, name, "--storage", "s3", "--bucket",
                f"{self.endpoint}/{JFS_BUCKET}", "--access-key", S3_KEY, "--secret-key", S3_SECRET]

    def ck_format_cmd(self, meta: str, prefix: str) -> list[str]:
        storage = f"s3://{CK_BUCKET}/{prefix}?endpoint={self.endpoint}&path_style=true"
        return [self.chunkfs, "format", meta, "--storage", storage, "--hash", self.args.hash]

    def setup_juicefs(self) -> None:
        cmd = self.jfs_format_cmd(self.jfs_meta, "bench")
        self.commands["juicefs_format"] = cmd
        say("juicefs format, and cp of the model through a JuiceFS mount")
        run(cmd, "juicefs format", timeout=120)
        mnt = self.work / "mnt"
        proc = self.mount(self.jfs_mount_cmd(self.work / "jfs-cache-write", mnt, tuned=False), mnt, "juicefs-write")
        run(["cp", "-r", str(self.model), str(mnt / "model")], "cp into the JuiceFS mount", timeout=3600)
        self.unmount(proc, mnt, [self.juicefs, "umount"])
        shutil.rmtree(self.work / "jfs-cache-write", ignore_errors=True)

    def setup_chunkfs(self) -> None:
        cmd = self.ck_format_cmd(self.ck_meta, "bench")
        self.commands["chunkfs_format"] = cmd
        say("chunkfs format and import")
        run(cmd, "chunkfs format", timeout=120)
        run([self.chunkfs, "import", self.ck_meta, str(self.model), "/model", "-q"], "chunkfs import", timeout=3600)

    # -- mounts --------------------------------------------------------------------------------
    def jfs_mount_cmd(self, cache: Path, mnt: Path, tuned: bool, meta: str | None = None) -> list[str]:
        return [self.juicefs, "mount", "--no-usage-report", "--cache-dir", str(cache),
                *(JFS_TUNED if tuned else []), meta or self.jfs_meta, str(mnt)]

    def ck_mount_cmd(self, cache: Path, mnt: Path, meta: str | None = None, read_only: bool = True,
                     profile: str = "off") -> list[str]:
        return [self.chunkfs, "mount", meta or self.ck_meta, str(mnt), *(["--read-only"] if read_only else []),
                "--cache-dir", str(cache), "--access-profile", profile, *shlex.split(self.args.chunkfs_args)]

    def profiled(self, cmd: list[str], name: str) -> list[str]:
        """``cmd`` under ``py-spy record`` with --profile (collapsed on-CPU stacks, one file per
        run in the profile directory; py-spy's own sampling costs CPU, so such runs are for
        finding where the time goes, not for the table)."""
        if self.args.profile is None:
            return cmd
        self.args.profile.mkdir(parents=True, exist_ok=True)
        runs = len(list(self.args.profile.glob(f"{name}-*")))
        if self.args.profiler == "perf":  # user and kernel time, native frames (perf report -i FILE)
            out = self.args.profile / f"{name}-{runs + 1}.data"
            return ["perf", "record", "-q", "-F", "499", "-g", "-o", str(out), "--", *cmd]
        out = self.args.profile / f"{name}-{runs + 1}.txt"
        return [str(BIN / "py-spy"), "record", "--format", "raw", "--rate", "250", "--threads", "--nonblocking",
                "-o", str(out), "--", *cmd]

    def mount(self, cmd: list[str], mnt: Path, log_name: str) -> subprocess.Popen[bytes]:
        """Starts a foreground mount daemon and waits until mnt is a mount point."""
        mnt.mkdir(parents=True, exist_ok=True)
        if os.path.ismount(mnt):
            raise BenchError(f"{mnt} is already a mount point")
        log_path = self.work / f"{log_name}.log"
        with log_path.open("ab") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        self.mounts.append(mnt)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                raise BenchError(f"{Path(cmd[0]).name} mount exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise BenchError(f"{mnt} was not mounted within {MOUNT_TIMEOUT:.0f} s; see {log_path}")
            time.sleep(0.05)
        return proc

    def unmount(self, proc: subprocess.Popen[bytes], mnt: Path, umount: list[str]) -> None:
        result = subprocess.run([*umount, str(mnt)], capture_output=True, text=True, timeout=UNMOUNT_TIMEOUT,
                                check=False)
        if result.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            proc.wait(timeout=UNMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            say(f"warning: {Path(umount[0]).name} mount daemon (pid {proc.pid}) did not exit after unmount")
        self.mounts.remove(mnt)
        self.procs.remove(proc)
        if result.returncode != 0:
            lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
            raise BenchError(f"{shlex.join(umount)} {mnt} failed (exit {result.returncode}): {lines[-1]}")
        if proc.returncode not in (0, None):
            say(f"warning: {Path(umount[0]).name} mount daemon exited with {proc.returncode}")

    # -- loads ---------------------------------------------------------------------------------
    def load(self, model: Path, what: str, daemon: int | None = None) -> Sample:
        """Loads model in a fresh Python and checks what it read; the seconds are the load's own.
        With ``daemon`` (the pid of the mount daemon serving it), the CPU seconds that daemon
        spent meanwhile are recorded too, per GiB of the model."""
        before = process_cpu_seconds(daemon) if daemon else 0.0
        if self.args.verify:
            cmd = [sys.executable, str(ROOT / "scripts" / "load_model.py"), str(model), "--json", "--compare",
                   str(self.model)]
        else:
            cmd = [sys.executable, "-c", LOADER, str(ROOT / "scripts" / "load_model.py"), str(model)]
        out = run(cmd, f"loading the model ({what})", timeout=LOAD_TIMEOUT)
        result = json.loads(out.strip().splitlines()[-1])
        if result["tensors"] != self.tensor_count or result["bytes"] != self.model_bytes:
            raise BenchError(f"{what}: loaded {result['tensors']} tensors / {result['bytes']} bytes, expected "
                             f"{self.tensor_count} / {self.model_bytes}")
        if "tensor_bytes" in result and result["tensor_bytes"] != self.tensor_bytes:
            raise BenchError(f"{what}: read {result['tensor_bytes']} bytes of tensor data, "
                             f"expected {self.tensor_bytes}")
        if result.get("differing"):
            raise BenchError(f"{what}: {len(result['differing'])} tensors differ from the source")
        sample = Sample(float(result["seconds"]))
        if daemon:
            sample.extra["daemon_cpu_s_per_gib"] = self.per_gib(process_cpu_seconds(daemon) - before)
        return sample

    def raw_get(self, verify: str | None = None, write: bool = False) -> Sample:
        """16 threads of ranged GETs over the raw copy of the model; with ``verify`` (an
        algorithm), each range is hashed with it; with ``write``, also written at its place
        in a copy of its shard in WORK, through the page cache (the copies are removed after)."""
        name = f"raw_get_{verify}" if verify else "raw_get"
        name += "_write" if write else ""
        client = self.client(pool=32)
        parts = [(shard.name, start, min(start + RANGE, size) - 1)
                 for shard in self.shards for size in [shard.stat().st_size] for start in range(0, size, RANGE)]
        target = reset_dir(self.work / "raw-write") if write else None
        files = {shard.name: os.open(target / shard.name, os.O_WRONLY | os.O_CREAT, 0o600)
                 for shard in self.shards} if target else {}

        def fetch(part: tuple[str, int, int]) -> int:
            key, first, last = part
            body = client.get_object(Bucket=RAW_BUCKET, Key=key, Range=f"bytes={first}-{last}")["Body"]
            digest = new_hasher(verify) if verify else None
            got = 0
            while chunk := body.read(1 << 20):
                if digest is not None:
                    digest.update(chunk)
                if files:
                    os.pwrite(files[key], chunk, first + got)
                got += len(chunk)
            return got

        drop_caches()
        own = resource.getrusage(resource.RUSAGE_SELF)
        try:
            with Timed() as timed, ThreadPoolExecutor(16) as pool:
                total = sum(pool.map(fetch, parts))
        finally:
            for fd in files.values():
                os.close(fd)
            if target:
                shutil.rmtree(target)
        used = resource.getrusage(resource.RUSAGE_SELF)
        if total != self.model_bytes:
            raise BenchError(f"{name}: fetched {total} bytes, expected {self.model_bytes}")
        cpu = used.ru_utime - own.ru_utime + used.ru_stime - own.ru_stime
        return Sample(timed.seconds, extra={"requests": len(parts), "process_cpu_s_per_gib": self.per_gib(cpu),
                                            **timed.cpu_extra()})

    def disk_write(self) -> Sample:
        """The model's size written with O_DIRECT by 8 threads into WORK (the cache's disk)."""
        target = reset_dir(self.work / "disk-write")
        piece, files = 1 << 20, 8
        share = -(-self.model_bytes // files // piece) * piece
        buffer = mmap.mmap(-1, piece)  # page-aligned, as O_DIRECT wants
        buffer.write(os.urandom(piece))

        def write(index: int) -> int:
            fd = os.open(target / f"part{index}", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
            try:
                return sum(os.write(fd, buffer) for _ in range(share // piece))
            finally:
                os.close(fd)

        drop_caches()
        with Timed() as timed, ThreadPoolExecutor(files) as pool:
            total = sum(pool.map(write, range(files)))
        shutil.rmtree(target)
        return Sample(timed.seconds * self.model_bytes / total, extra=timed.cpu_extra())

    def local_disk(self) -> Sample:
        drop_caches()
        return self.load(self.model, "local_disk")

    def boto3_download_load(self, loader: ModuleType) -> Sample:
        # Timed in this process: download_file (default TransferConfig) of every shard, then load_model() of
        # scripts/load_model.py imported with importlib, so the seconds are the wall time of both together.
        client = self.client()
        target = reset_dir(self.work / "download")
        drop_caches()
        start = time.perf_counter()
        for shard in self.shards:
            client.download_file(RAW_BUCKET, shard.name, str(target / shard.name))
        downloaded = time.perf_counter()
        tensors, nbytes, _ = loader.load_model(target)
        seconds = time.perf_counter() - start
        count, payload = len(tensors), sum(t.nbytes for t in tensors.values())
        del tensors
        shutil.rmtree(target)
        if (count, payload, nbytes) != (self.tensor_count, self.tensor_bytes, self.model_bytes):
            raise BenchError(f"boto3_download_load: got {count} tensors / {payload} bytes, expected "
                             f"{self.tensor_count} / {self.tensor_bytes}")
        return Sample(seconds, extra={"download_s": round(downloaded - start, 3),
                                      "load_s": round(seconds - (downloaded - start), 3)})

    def jfs_load(self, cache: Path, tuned: bool, cold: bool, name: str) -> Sample:
        if cold:
            reset_dir(cache)
        mnt = self.work / "mnt"
        cmd = self.jfs_mount_cmd(cache, mnt, tuned)
        self.commands[f"{name}_mount"] = cmd
        proc = self.mount(cmd, mnt, "juicefs")
        drop_caches()
        sample = self.load(mnt / "model", name, daemon=proc.pid)
        sample.rss_mib, per_pid = peak_rss(proc.pid)
        self.unmount(proc, mnt, [self.juicefs, "umount"])
        sample.extra.update(rss_by_pid=per_pid, cache_bytes=dir_bytes(cache))
        return sample

    def ck_cold(self, cache: Path) -> tuple[Sample, Sample | None]:
        """ck_cold, then (if wanted) ck_warm_same on the same daemon after dropping the page cache."""
        reset_dir(cache)
        mnt = self.work / "mnt"
        cmd = self.ck_mount_cmd(cache, mnt)
        self.commands["ck_mount"] = cmd
        proc = self.mount(self.profiled(cmd, "ck_cold"), mnt, "chunkfs")
        drop_caches()
        sample = self.load(mnt / "model", "ck_cold", daemon=proc.pid)
        sample.rss_mib, per_pid = peak_rss(proc.pid)
        if "libfuse" not in shlex.split(self.args.chunkfs_args):  # the native transport (the default here)
            sample.extra["image_build_s"] = self.wait_for_images(mnt)
        same = None
        if self.wants("ck_warm_same"):
            drop_caches()
            same = self.load(mnt / "model", "ck_warm_same", daemon=proc.pid)
            same.rss_mib, _ = peak_rss(proc.pid)
        self.unmount(proc, mnt, [self.chunkfs, "umount"])
        sample.extra.update(rss_by_pid=per_pid, cache_bytes=dir_bytes(cache))
        return sample, same

    def ck_warm_hot(self, cache: Path) -> tuple[Sample, Sample]:
        mnt = self.work / "mnt"
        proc = self.mount(self.profiled(self.ck_mount_cmd(cache, mnt), "ck_warm"), mnt, "chunkfs")
        drop_caches()
        warm = self.load(mnt / "model", "ck_warm", daemon=proc.pid)
        warm.rss_mib, _ = peak_rss(proc.pid)
        hot = self.load(mnt / "model", "ck_hot", daemon=proc.pid)
        hot.rss_mib, _ = peak_rss(proc.pid)
        self.unmount(proc, mnt, [self.chunkfs, "umount"])
        return warm, hot

    def wait_for_images(self, mnt: Path, timeout: float = 300.0) -> float:
        """With the native transport: seconds until the mount has a file image of every
        shard (filled as the cold load opened them, or built after it), so the warm rows
        that follow are passed through."""
        start = time.monotonic()
        pattern = re.compile(r'^chunkfs_file_images_total\{outcome="(?:built|filled)"\} (\S+)$', re.M)
        while time.monotonic() - start < timeout:
            made = sum(float(n) for n in pattern.findall((mnt / ".chunkfs-stats").read_text()))
            if made >= len(self.shards):
                seconds = time.monotonic() - start
                say(f"file images of {len(self.shards)} shards made {seconds:.1f} s after the cold load")
                return seconds
            time.sleep(0.5)
        raise BenchError(f"the mount built no file image of every shard within {timeout:.0f} s")

    def pt_load(self, name: str) -> Sample:
        """pt_warm or pt_cold: the model loaded through scripts/probe_passthrough.py."""
        mnt = self.work / "mnt"
        cmd = [sys.executable, str(ROOT / "scripts" / "probe_passthrough.py"), str(self.model), str(mnt)]
        if name == "pt_cold":
            cmd += ["--fetch", f"{self.endpoint}/{RAW_BUCKET}", "--images", str(reset_dir(self.work / "pt-images"))]
        self.commands[name] = cmd
        proc = self.mount(cmd, mnt, "probe")
        drop_caches()
        sample = self.load(mnt, name, daemon=proc.pid)
        sample.rss_mib, _ = peak_rss(proc.pid)
        self.unmount(proc, mnt, ["fusermount3", "-u"])
        shutil.rmtree(self.work / "pt-images", ignore_errors=True)
        return sample

    def ck_cold_mmap(self, cache: Path, ranks_wanted: int, name: str, profile: str = "off") -> Sample:
        """RANK_LOADER in ``ranks_wanted`` processes started together over one fresh mount and
        empty cache, with ``--access-profile profile``."""
        reset_dir(cache)
        mnt = self.work / "mnt"
        proc = self.mount(self.ck_mount_cmd(cache, mnt, profile=profile), mnt, "chunkfs")
        drop_caches()
        ranks = [subprocess.Popen([sys.executable, "-c", RANK_LOADER, str(mnt / "model"), str(rank),
                                   str(ranks_wanted)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in range(ranks_wanted)]
        results = []
        for rank in ranks:
            out, err = rank.communicate(timeout=LOAD_TIMEOUT)
            if rank.returncode != 0:
                raise BenchError(f"{name}: a rank exited {rank.returncode}: {err.strip().splitlines()[-1:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        rss, _ = peak_rss(proc.pid)
        self.unmount(proc, mnt, [self.chunkfs, "umount"])
        payload = sum(r["tensor_bytes"] for r in results)
        if payload != self.tensor_bytes:
            raise BenchError(f"{name}: the ranks read {payload} bytes of tensors, expected {self.tensor_bytes}")
        started = min(r["start"] for r in results)
        seconds = max(r["end"] for r in results) - started
        first = min(r["first"] for r in results) - started
        return Sample(seconds, rss_mib=rss, extra={"ranks": ranks_wanted, "first_tensor_s": first})

    def jfs_write(self, run_index: int) -> Sample:
        meta = f"sqlite3://{self.work / f'jfs-write-{run_index}.db'}"
        run(self.jfs_format_cmd(meta, f"benchw{run_index}"), "juicefs format (write)", timeout=120)
        cmd = self.jfs_mount_cmd(reset_dir(self.work / "jfs-wcache"), self.work / "mnt", tuned=False, meta=meta)
        return self.write_through(cmd, "jfs_write", [self.juicefs, "umount"])

    def ck_write(self, run_index: int) -> Sample:
        meta = f"sqlite://{self.work / f'ck-write-{run_index}.db'}"
        run(self.ck_format_cmd(meta, f"write{run_index}"), "chunkfs format (write)", timeout=120)
        cmd = self.ck_mount_cmd(reset_dir(self.work / "ck-wcache"), self.work / "mnt", meta=meta, read_only=False)
        return self.write_through(cmd, "ck_write", [self.chunkfs, "umount"])

    def write_through(self, cmd: list[str], name: str, umount: list[str]) -> Sample:
        """Mount with cmd (on WORK/mnt), time copy_in, unmount; with the daemon's peak RSS."""
        mnt = self.work / "mnt"
        self.commands[f"{name}_mount"] = cmd
        proc = self.mount(cmd, mnt, name.split("_")[0])
        seconds = self.copy_in(mnt, name)
        rss, _ = peak_rss(proc.pid)
        self.unmount(proc, mnt, umount)
        return Sample(seconds, rss_mib=rss)

    def copy_in(self, mnt: Path, what: str) -> float:
        """cp -r of the model into mnt; the seconds of the copy, then a check of every size."""
        drop_caches()
        start = time.perf_counter()
        run(["cp", "-r", str(self.model), str(mnt / "model")], f"cp into the mount ({what})", timeout=LOAD_TIMEOUT)
        seconds = time.perf_counter() - start
        for shard in self.shards:
            copied, expected = (mnt / "model" / shard.name).stat().st_size, shard.stat().st_size
            if copied != expected:
                raise BenchError(f"{what}: {shard.name} has {copied} bytes in the mount, expected {expected}")
        return seconds

    def ck_warmup(self) -> Sample:
        cache = reset_dir(self.work / "ck-warmup-cache")
        cmd = [self.chunkfs, "warmup", self.ck_meta, "/model", "--cache-dir", str(cache), "--json", "-q",
               *shlex.split(self.args.warmup_args)]
        self.commands["ck_warmup"] = cmd
        drop_caches()
        with Timed() as timed:
            out = run(self.profiled(cmd, "ck_warmup"), "chunkfs warmup", timeout=LOAD_TIMEOUT)
        report = json.loads(out[out.index("{") : out.rindex("}") + 1])  # py-spy (--profile) talks too
        if not report["complete"] or report["bytes_fetched"] < self.model_bytes:
            raise BenchError(f"chunkfs warmup fetched {report['bytes_fetched']} bytes, expected {self.model_bytes}")
        # The same command on the now complete cache fetches nothing: its CPU is what every
        # warmup pays whatever the model's size (interpreter, imports, store client, metadata,
        # plan, a stat per block). The rest is the cost per byte a larger model scales with.
        with Timed() as idle:
            run(cmd, "chunkfs warmup (cache complete)", timeout=LOAD_TIMEOUT)
        return Sample(timed.seconds, extra={"engine_s": report["seconds"], "cache_bytes": dir_bytes(cache),
                                            "process_cpu_s_per_gib": self.per_gib(timed.children),
                                            "startup_cpu_s": round(idle.children, 3),
                                            "process_cpu_s_per_gib_after_start":
                                                self.per_gib(max(0.0, timed.children - idle.children)),
                                            **timed.cpu_extra()})

    def ck_download_loop(self) -> Sample:
        """scripts/download_loop.py into an empty cache: the loop's seconds and its CPU-s/GiB."""
        cache = reset_dir(self.work / "ck-loop-cache")
        cmd = [sys.executable, str(ROOT / "scripts" / "download_loop.py"), self.ck_meta, str(cache)]
        self.commands["ck_download_loop"] = cmd
        drop_caches()
        out = run(cmd, "download loop", timeout=LOAD_TIMEOUT)
        result = json.loads(out.strip().splitlines()[-1])
        shutil.rmtree(cache)
        if result["failures"] or result["bytes"] < self.model_bytes:
            raise BenchError(f"download loop: {result['bytes']} bytes, failures {result['failures']}")
        return Sample(result["seconds"], extra={"process_cpu_s_per_gib": self.per_gib(result["cpu_s"]),
                                                "setup_cpu_s": round(result["setup_cpu_s"], 3)})

    def ck_after_warmup(self) -> Sample:
        """A fresh mount on the cache ``ck_warmup`` just filled: the first load after a warmup."""
        mnt = self.work / "mnt"
        proc = self.mount(self.profiled(self.ck_mount_cmd(self.work / "ck-warmup-cache", mnt), "ck_after_warmup"),
                          mnt, "chunkfs")
        drop_caches()
        sample = self.load(mnt / "model", "ck_after_warmup", daemon=proc.pid)
        sample.rss_mib, _ = peak_rss(proc.pid)
        self.unmount(proc, mnt, [self.chunkfs, "umount"])
        return sample

    def jfs_warmup(self) -> Sample:
        """``juicefs warmup``; tried up to three times, because JuiceFS now and then leaves a
        few blocks out of its cache (its cache writes are asynchronous and may be skipped),
        and a timing of an incomplete warmup would flatter it."""
        last: IncompleteWarmup | None = None
        for attempt in range(1, 4):
            try:
                return self._jfs_warmup_once()
            except IncompleteWarmup as exc:
                say(f"warning: {exc} (attempt {attempt} of 3)")
                last = exc
        assert last is not None
        say("warning: juicefs warmup left its cache incomplete three times in a row; its row is marked incomplete")
        last.sample.extra["incomplete"] = True
        return last.sample

    def _jfs_warmup_once(self) -> Sample:
        cache = reset_dir(self.work / "jfs-warmup-cache")
        mnt = self.work / "mnt"
        proc = self.mount(self.jfs_mount_cmd(cache, mnt, tuned=False), mnt, "juicefs")
        cmd = [self.juicefs, "warmup", str(mnt / "model")]
        self.commands["jfs_warmup"] = cmd
        drop_caches()
        daemon_before = process_cpu_seconds(proc.pid)
        with Timed() as timed:
            run(cmd, "juicefs warmup", timeout=LOAD_TIMEOUT)
        # `juicefs warmup` asks the mount to do the work: its CPU is the command's plus the daemon's
        process_cpu = timed.children + process_cpu_seconds(proc.pid) - daemon_before
        rss, _ = peak_rss(proc.pid)
        # JuiceFS writes its cache in the background: give it a moment (not timed) before unmounting
        deadline = time.monotonic() + 15
        while dir_bytes(cache) < self.model_bytes and time.monotonic() < deadline:
            time.sleep(0.5)
        self.unmount(proc, mnt, [self.juicefs, "umount"])
        cached = dir_bytes(cache)
        sample = Sample(timed.seconds, rss_mib=rss, extra={"cache_bytes": cached,
                                                           "process_cpu_s_per_gib": self.per_gib(process_cpu),
                                                           **timed.cpu_extra()})
        if cached < self.model_bytes:
            raise IncompleteWarmup(f"juicefs warmup left {cached} bytes in its cache, expected {self.model_bytes}",
                                   sample)
        return sample

    def per_gib(self, cpu_seconds: float) -> float:
        return round(cpu_seconds / (self.model_bytes / 2**30), 3)

    # -- the run -------------------------------------------------------------------------------
    def record(self, name: str, sample: Sample, run_index: int) -> None:
        if name not in self.samples:
            return
        self.samples[name].append(sample)
        rss = f", daemon peak RSS {sample.rss_mib:.0f} MiB" if sample.rss_mib is not None else ""
        busy = f", {sample.extra['cores_busy']} cores busy" if "cores_busy" in sample.extra else ""
        say(f"run {run_index + 1}/{self.args.runs}: {name} {sample.seconds:.2f} s "
            f"({self.model_bytes / sample.seconds / 2**20:.0f} MiB/s){rss}{busy}")

    def one_run(self, i: int, loader: ModuleType) -> None:
        steps: list[tuple[str, Callable[[], Sample]]] = [
            ("raw_get", self.raw_get), ("raw_get_sha256", lambda: self.raw_get(verify="sha256")),
            ("raw_get_blake3", lambda: self.raw_get(verify="blake3")),
            ("raw_get_blake3_write", lambda: self.raw_get(verify="blake3", write=True)),
            ("local_disk", self.local_disk), ("disk_write", self.disk_write),
            ("boto3_download_load", lambda: self.boto3_download_load(loader))]
        for name, step in steps:
            if self.wants(name):
                self.record(name, step(), i)
        jfs_cache, ck_cache = self.work / "jfs-cache", self.work / "ck-cache"
        if self.wants("jfs_cold_default"):
            self.record("jfs_cold_default", self.jfs_load(jfs_cache, False, True, "jfs_cold_default"), i)
        if self.wants("jfs_cold_tuned") or (self.wants("jfs_warm") and not self.wants("jfs_cold_default")):
            self.record("jfs_cold_tuned", self.jfs_load(jfs_cache, True, True, "jfs_cold_tuned"), i)
        if self.wants("jfs_warm"):
            self.record("jfs_warm", self.jfs_load(jfs_cache, True, False, "jfs_warm"), i)
        if self.wants("ck_cold", "ck_warm_same", "ck_warm", "ck_hot"):
            cold, same = self.ck_cold(ck_cache)  # also fills the cache for warm/hot
            self.record("ck_cold", cold, i)
            if same is not None:
                self.record("ck_warm_same", same, i)
        if self.wants("ck_warm", "ck_hot"):
            warm, hot = self.ck_warm_hot(ck_cache)
            self.record("ck_warm", warm, i)
            self.record("ck_hot", hot, i)
        if self.wants("ck_cold_mmap1"):
            self.record("ck_cold_mmap1", self.ck_cold_mmap(ck_cache, 1, "ck_cold_mmap1"), i)
        for name, profile in MMAP4_PROFILE_ROWS.items():  # interleaved: without, recording, with
            if self.wants(name) or (name == "ck_cold_mmap4_recording" and self.wants("ck_cold_mmap4_profiled")):
                self.record(name, self.ck_cold_mmap(ck_cache, RANKS, name, profile), i)
        if self.wants("jfs_write"):
            self.record("jfs_write", self.jfs_write(i), i)
        if self.wants("ck_write"):
            self.record("ck_write", self.ck_write(i), i)
        if self.wants("jfs_warmup"):
            self.record("jfs_warmup", self.jfs_warmup(), i)
        if self.wants("ck_warmup", "ck_after_warmup"):
            warmup = self.ck_warmup()
            if self.wants("ck_warmup"):
                self.record("ck_warmup", warmup, i)
            if self.wants("ck_after_warmup"):
                self.record("ck_after_warmup", self.ck_after_warmup(), i)
        if self.wants("ck_download_loop"):
            self.record("ck_download_loop", self.ck_download_loop(), i)
        for name in ("pt_warm", "pt_cold"):
            if self.wants(name):
                self.record(name, self.pt_load(name), i)

    def execute(self) -> dict[str, Any]:
        self.prepare()
        self.start_rclone()
        if self.wants("raw_get", "raw_get_sha256", "raw_get_blake3", "raw_get_blake3_write", "boto3_download_load",
                      "pt_cold"):
            self.upload_raw()
        if self.wants(*[n for n in self.jfs_names() if n != "jfs_write"]):  # jfs_write formats its own
            self.setup_juicefs()
        if self.wants("ck_cold", "ck_warm_same", "ck_warm", "ck_hot", "ck_warmup", "ck_after_warmup",
                      "ck_download_loop", "ck_cold_mmap1", *MMAP4_PROFILE_ROWS):
            self.setup_chunkfs()
        if self.args.store_disk == "memory":
            self.hold_store_in_memory()
        if self.args.store_rate:  # after the set-up: only the measurements pay it
            cap_store_egress(int(self.endpoint.rsplit(":", 1)[1]), self.args.store_rate)
        loader = import_load_model()
        for i in range(self.args.runs):
            self.one_run(i, loader)
        return self.report()

    def cleanup(self) -> None:
        for mnt in reversed(self.mounts):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, stderr=subprocess.DEVNULL)
        for proc in reversed(self.procs):  # mount daemons first, rclone (started first) last
            stop_process(proc, timeout=15)
        self.mounts.clear()
        self.procs.clear()

    # -- report --------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        summary: dict[str, dict[str, Any]] = {}
        for name, samples in self.samples.items():
            if not samples:
                continue
            secs = [s.seconds for s in samples]
            rss = [s.rss_mib for s in samples if s.rss_mib is not None]
            cpu_each = [s.extra.get("daemon_cpu_s_per_gib", s.extra.get("process_cpu_s_per_gib")) for s in samples]
            cpu_s: list[float] = [c for c in cpu_each if c is not None]
            median = statistics.median(secs)
            summary[name] = {"median_s": median, "min_s": min(secs), "max_s": max(secs),
                             "mib_per_s": self.model_bytes / median / 2**20,
                             "rss_mib_median": statistics.median(rss) if rss else None,
                             "rss_mib_max": max(rss) if rss else None,
                             "daemon_cpu_s_per_gib": statistics.median(cpu_s) if cpu_s else None,
                             "incomplete_runs": sum(bool(s.extra.get("incomplete")) for s in samples)}

        def ratio(name: str, base: str | None) -> float | None:
            if base is not None and name in summary and base in summary:
                return summary[name]["median_s"] / summary[base]["median_s"]
            return None

        for name, row in summary.items():
            row["vs_raw_get"] = ratio(name, "raw_get")
            row["vs_jfs_cold_tuned"] = ratio(name, "jfs_cold_tuned") if name in COLD else None
            row["vs_local_disk"] = ratio(name, "local_disk") if name in WARM else None

        ck_names = ("ck_cold", "ck_warm_same", "ck_warm", "ck_hot", "ck_cold_mmap1", *MMAP4_PROFILE_ROWS, "ck_write")
        ck_rss = [s.rss_mib for n in ck_names for s in self.samples.get(n, [])
                  if s.rss_mib is not None]
        def cpu(name: str | None) -> float | None:
            return summary[name]["daemon_cpu_s_per_gib"] if name is not None and name in summary else None

        def cpu_ratio(name: str, base: str | None) -> float | None:
            mine, theirs = cpu(name), cpu(base) if base else None
            return mine / theirs if mine is not None and theirs else None

        jfs_cold = [n for n in ("jfs_cold_default", "jfs_cold_tuned") if n in summary]
        best_jfs_cold: str | None = min(jfs_cold, key=lambda n: summary[n]["median_s"]) if jfs_cold else None
        targets: list[dict[str, Any]] = [
            {"target": f"ck_cold <= 0.65 x JuiceFS's best cold ({best_jfs_cold})",
             "value": ratio("ck_cold", best_jfs_cold) if best_jfs_cold else None, "limit": 0.65, "unit": "x"},
            {"target": "ck_cold <= 1.6 x raw_get", "value": ratio("ck_cold", "raw_get"), "limit": 1.6, "unit": "x"},
            {"target": "ck_cold daemon CPU <= 1.0 s/GiB", "value": cpu("ck_cold"), "limit": 1.0, "unit": " s/GiB"},
            {"target": f"ck_cold daemon CPU <= 0.5 x JuiceFS's ({best_jfs_cold})",
             "value": cpu_ratio("ck_cold", best_jfs_cold), "limit": 0.5, "unit": "x"},
            {"target": "ck_warm_same daemon CPU <= 0.3 s/GiB", "value": cpu("ck_warm_same"), "limit": 0.3,
             "unit": " s/GiB"},
            {"target": "ck_warm (restarted daemon) daemon CPU <= 0.3 s/GiB", "value": cpu("ck_warm"), "limit": 0.3,
             "unit": " s/GiB"},
            {"target": "ck_warm_same daemon CPU <= 0.5 x jfs_warm's", "value": cpu_ratio("ck_warm_same", "jfs_warm"),
             "limit": 0.5, "unit": "x"},
            {"target": "ck_warm (restarted daemon) <= 1.1 x ck_warm_same", "value": ratio("ck_warm", "ck_warm_same"),
             "limit": 1.1, "unit": "x"},
            {"target": "ck_warmup throughput >= 1.5 x jfs_warmup (time <= 0.67 x)",
             "value": ratio("ck_warmup", "jfs_warmup"), "limit": 1 / 1.5, "unit": "x"},
            {"target": "ck_warmup throughput >= 0.8 x raw_get (time <= 1.25 x)",
             "value": ratio("ck_warmup", "raw_get"), "limit": 1 / 0.8, "unit": "x"},
            {"target": "ck_warmup process CPU <= 0.6 s/GiB", "value": cpu("ck_warmup"), "limit": 0.6,
             "unit": " s/GiB"},
            {"target": "ck peak RSS <= 400 MiB (max over all chunkfs mounts)", "value": max(ck_rss, default=None),
             "limit": 400, "unit": " MiB"},
            {"target": "ck_warm_same <= 1.15 x local_disk", "value": ratio("ck_warm_same", "local_disk"),
             "limit": 1.15, "unit": "x"},
            {"target": "ck_warm <= 1.15 x local_disk", "value": ratio("ck_warm", "local_disk"), "limit": 1.15,
             "unit": "x"},
            {"target": "ck_cold_mmap4 (4 mmap readers) as fast as ck_cold_mmap1 (one mmap reader): time <= 1.1 x",
             "value": ratio("ck_cold_mmap4", "ck_cold_mmap1"), "limit": 1.1, "unit": "x"},
            {"target": "ck_write throughput >= 0.8 x jfs_write (time <= 1.25 x)",
             "value": ratio("ck_write", "jfs_write"), "limit": 1.25, "unit": "x"},
        ]
        for t in targets:
            t["pass"] = None if t["value"] is None else t["value"] <= t["limit"]
        # Not targets: how far each verifying path is from the least a verifying client pays.
        context = [{"what": f"{name} / {raw}", "value": ratio(name, raw)}
                   for raw in ("raw_get_sha256", "raw_get_blake3", "raw_get_blake3_write")
                   for name in ("ck_cold", "ck_warmup")
                   if ratio(name, raw) is not None]
        for name in ("ck_cold_mmap1", *MMAP4_PROFILE_ROWS):
            firsts = [s.extra["first_tensor_s"] for s in self.samples.get(name, []) if "first_tensor_s" in s.extra]
            if firsts:
                context.append({"what": f"{name}: time to first tensor (median)", "value": statistics.median(firsts),
                                "unit": " s"})
        if ratio("ck_cold_mmap4_profiled", "ck_cold_mmap4") is not None:
            context.append({"what": "ck_cold_mmap4_profiled / ck_cold_mmap4 (the same load with and without a profile)",
                            "value": ratio("ck_cold_mmap4_profiled", "ck_cold_mmap4")})
        if ratio("ck_warmup", "disk_write") is not None:
            context.append({"what": "ck_warmup / disk_write (writing the cache is the floor of a warmup)",
                            "value": ratio("ck_warmup", "disk_write")})
        after_start = [s.extra["process_cpu_s_per_gib_after_start"] for s in self.samples.get("ck_warmup", [])
                       if "process_cpu_s_per_gib_after_start" in s.extra]
        if after_start:
            startup = statistics.median(s.extra["startup_cpu_s"] for s in self.samples["ck_warmup"])
            context.append({"what": f"ck_warmup process CPU per GiB beyond what a warmup of a complete cache "
                                    f"costs ({startup:.2f} CPU-s: start, metadata, plan)",
                            "value": statistics.median(after_start), "unit": " s/GiB"})
        if ratio("ck_warmup", "ck_download_loop") is not None:
            context.append({"what": "ck_warmup / ck_download_loop (the whole command against its download layer "
                                    "alone in plain threads)", "value": ratio("ck_warmup", "ck_download_loop")})
            context.append({"what": "ck_download_loop CPU per GiB (fetch, verify, write: the floor of ck_warmup's "
                                    "CPU in chunkfs's own code)", "value": cpu("ck_download_loop"), "unit": " s/GiB"})
        return {"summary": summary, "targets": targets, "context": context}

    def markdown(self, result: dict[str, Any]) -> str:
        def num(value: float | None, fmt: str, suffix: str = "") -> str:
            return "" if value is None else f"{value:{fmt}}{suffix}"

        mib = self.model_bytes / 2**20
        lines = [f"Model: {mib:.0f} MiB in {len(self.shards)} shards ({self.tensor_count} tensors); "
                 f"{self.args.runs} run(s); {os.cpu_count()} CPUs, Linux {platform.release()}; "
                 f"object store: {'nginx (GETs) + ' if self.args.store == 'nginx' else ''}rclone serve s3 on loopback, "
                 f"objects {'in memory' if self.args.store_disk == 'memory' else 'on the node disk'}; "
                 f"{self.memory_note}",
                 "",
                 "| measurement | median s | min s | max s | MiB/s | vs raw_get | vs jfs_cold_tuned | vs local_disk "
                 "| daemon peak RSS MiB | CPU-s/GiB (daemon; warmup: the process) |",
                 "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for name, row in result["summary"].items():
            label = f"{name} ({row['incomplete_runs']} incomplete)" if row.get("incomplete_runs") else name
            lines.append(f"| {label} | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['max_s']:.2f} "
                         f"| {row['mib_per_s']:.0f} | {num(row['vs_raw_get'], '.2f', 'x')} "
                         f"| {num(row['vs_jfs_cold_tuned'], '.2f', 'x')} | {num(row['vs_local_disk'], '.2f', 'x')} "
                         f"| {num(row['rss_mib_median'], '.0f')} | {num(row['daemon_cpu_s_per_gib'], '.2f')} |")
        lines.append("")
        for t in result["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
            value = "not measured" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
            lines.append(f"{verdict}  {t['target']}: {value}")
        for c in result.get("context", []):
            lines.append(f"info  {c['what']}: {c['value']:.2f}{c.get('unit', 'x')}")
        return "\n".join(lines)

    def machine(self) -> dict[str, Any]:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "unknown")
        mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal")), "0")
        import numpy
        import safetensors
        return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu, "memory": self.memory_note,
                "mem_total_mib": int(mem) // 1024, "python": platform.python_version(),
                "versions": {"juicefs": version([self.juicefs, "version"]) if self.wants(*self.jfs_names()) else None,
                             "rclone": version([self.rclone, "version"]),
                             "chunkfs": version([self.chunkfs, "--version"]), "boto3": boto3.__version__,
                             "safetensors": safetensors.__version__, "numpy": numpy.__version__}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="measurements: " + ", ".join(NAMES))
    parser.add_argument("--size", default="2G", help="model size for scripts/make_model.py (default 2G)")
    parser.add_argument("--shards", type=int, default=4, help="model shards (default 4)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs; the table shows medians (default 3)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/chunkfs-bench-read"),
                        help="work directory, wiped except for the model (default /tmp/chunkfs-bench-read)")
    parser.add_argument("--json", type=Path, help="where to write all results (default WORK/bench.json)")
    parser.add_argument("--only", type=lambda s: [n.strip() for n in s.split(",") if n.strip()],
                        help="comma-separated measurements to run (default all)")
    parser.add_argument("--skip-juicefs", action="store_true", help="leave out the JuiceFS measurements")
    parser.add_argument("--store", choices=("nginx", "rclone"), default="nginx",
                        help="nginx answers object GETs from rclone's directory (no CPU, as a real store) and passes "
                             "the rest to rclone (default); rclone: rclone serve s3 answers everything")
    parser.add_argument("--store-disk", choices=("memory", "node"), default="memory",
                        help="where the store's GETs read objects from: memory (held in the page cache, default: a "
                             "real store's disks are not the node's) or node (the disk the caches write to)")
    parser.add_argument("--hash", choices=HASHES, default=DEFAULT_HASH,
                        help=f"block hash of the chunkfs volume (default {DEFAULT_HASH}; sha256 for an A/B)")
    parser.add_argument("--chunkfs-args", default="", help='extra `chunkfs mount` arguments, e.g. "--max-downloads 32"')
    parser.add_argument("--warmup-args", default="", help='extra `chunkfs warmup` arguments, e.g. "--threads 16"')
    parser.add_argument("--rclone-md5-etag", action="store_true",
                        help="keep rclone's MD5 ETags (hashes each object on its first GET; off by default)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run chunkfs mounts and warmups under py-spy, writing collapsed on-CPU stacks to DIR "
                             "(costs CPU: for finding where it goes, not for the table)")
    parser.add_argument("--profiler", choices=("py-spy", "perf"), default="py-spy",
                        help="with --profile: py-spy (Python stacks, collapsed) or perf (user and kernel, perf.data)")
    parser.add_argument("--store-conn-rate", type=parse_size, default=0, metavar="SIZE",
                        help="cap each connection's object GETs at SIZE bytes/s, e.g. 90M (nginx limit_rate), as S3 "
                             "serves one connection at about 100 MB/s")
    parser.add_argument("--store-rate", type=parse_size, default=0, metavar="SIZE",
                        help="cap the store's egress at SIZE bytes/s, e.g. 500M (tc htb on loopback; the bench then "
                             "runs in a network namespace of its own, unshare --net)")
    parser.add_argument("--page-reporting", choices=("pause", "keep"), default="pause",
                        help="pause (default): turn this VM's free page reporting off for the run and restore it "
                             "after, so no row pays host faults for memory the previous row's drop_caches freed; "
                             "keep: measure with it as it is")
    parser.add_argument("--verify", action="store_true",
                        help="load with scripts/load_model.py --compare MODEL (bit-for-bit check, slower)")
    args = parser.parse_args()
    unknown = set(args.only or []) - set(NAMES)
    if unknown:
        parser.error(f"unknown measurement(s) {', '.join(sorted(unknown))}; known: {', '.join(NAMES)}")
    if args.runs < 1 or args.shards < 1:
        parser.error("--runs and --shards must be at least 1")
    return args


NETNS_ENV = "CHUNKFS_BENCH_NETNS"


def cap_store_egress(port: int, rate: int) -> None:
    """Every packet from the store's port through an HTB class of ``rate`` bytes/s; all other
    loopback traffic through an unlimited one. (This kernel has no netem to add latency.)"""
    for cmd in (
        "qdisc add dev lo root handle 1: htb default 20",
        f"class add dev lo parent 1: classid 1:10 htb rate {rate * 8}bit ceil {rate * 8}bit burst 4mb cburst 4mb "
        "quantum 65536",
        "class add dev lo parent 1: classid 1:20 htb rate 100gbit quantum 200000",
        f"filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport {port} 0xffff flowid 1:10",
    ):
        run(["tc", *cmd.split()], f"tc {cmd}")
    say(f"store egress capped at {rate / 2**20:.0f} MiB/s")


def main() -> None:
    args = parse_args()
    if args.store_rate and os.environ.get(NETNS_ENV) != "1":
        # shaping is a tc qdisc on loopback: in a namespace of our own it touches nothing else
        os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, *sys.argv], {**os.environ, NETNS_ENV: "1"})
    if os.environ.get(NETNS_ENV) == "1":
        run(["ip", "link", "set", "lo", "up"], "ip link set lo up")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below unmounts and stops servers
    os.environ.update({"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": REGION,
                       "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"})
    bench = Bench(args)
    reporting = PageReporting(args.page_reporting)
    try:
        bench.memory_note = reporting.pause()
        say(bench.memory_note)
        result = bench.execute()
        print(bench.markdown(result))
        out = args.json or bench.work / "bench.json"
        data = {"machine": bench.machine(),
                "model": {"size": args.size, "shards": args.shards, "bytes": bench.model_bytes,
                          "tensors": bench.tensor_count, "tensor_bytes": bench.tensor_bytes},
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "commands": bench.commands, "runs": {n: [asdict(s) for s in v] for n, v in bench.samples.items()},
                **result}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
        say(f"wrote {out}")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        bench.cleanup()
        reporting.restore()


if __name__ == "__main__":
    main()

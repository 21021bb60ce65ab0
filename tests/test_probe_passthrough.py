"""The FUSE passthrough design probe (``scripts/probe_passthrough.py``) on this kernel.

Not chunkfs itself: these tests keep the probe behind ``scripts/bench``'s pt_* rows honest
(the bytes read through it are the source's, and no read reaches the server, so the kernel
really passed the opens through) and tell on CI whether the machine's kernel can do what a
passthrough read path would need.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import force_unmount, wait_mounted
from tests.mount_guard import require_mount_marker

PROBE = Path(__file__).resolve().parent.parent / "scripts" / "probe_passthrough.py"
pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(os.geteuid() != 0, reason="the probe mounts with mount(2): root only")]


def make_files(root: Path) -> dict[str, bytes]:
    root.mkdir()
    files = {"a.safetensors": os.urandom((20 << 20) + 12345), "b.safetensors": os.urandom(3 << 20),
             "config.json": b'{"x": 1}', "empty.safetensors": b""}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@contextlib.contextmanager
def probe(source: Path, mnt: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    require_mount_marker()
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, str(PROBE), str(source), str(mnt), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            wait_mounted(mnt, proc)
        except AssertionError:
            output = proc.communicate(timeout=10)[0]
            if "offers no FUSE passthrough" in output:
                pytest.skip("this kernel offers no FUSE passthrough")
            raise AssertionError(output) from None
        yield proc
    finally:
        force_unmount(mnt)
        proc.wait(timeout=30)


def reads_that_reached(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    output = proc.stdout.read()
    found = re.search(r"(\d+) read request\(s\) reached the probe", output)
    assert found, output
    return int(found.group(1))


def test_opens_are_passed_through_to_the_local_files(tmp_path: Path) -> None:
    files = make_files(tmp_path / "src")
    mnt = tmp_path / "mnt"
    with probe(tmp_path / "src", mnt) as proc:
        assert sorted(os.listdir(mnt)) == sorted(files)
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data
        with open(mnt / "a.safetensors", "rb") as f:  # a read far into the file, as mmap loaders do
            f.seek(17 << 20)
            assert f.read(4096) == files["a.safetensors"][17 << 20:(17 << 20) + 4096]
    assert reads_that_reached(proc) == 0


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """GET with one ``Range: bytes=a-b`` over a directory (the store of the fetch mode)."""

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if not path.is_file() or match is None:
            self.send_error(404 if not path.is_file() else 416)
            return
        first, last = int(match.group(1)), int(match.group(2))
        with path.open("rb") as f:
            f.seek(first)
            body = f.read(last - first + 1)
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_fetch_mode_answers_an_open_once_the_whole_file_is_on_the_node(tmp_path: Path) -> None:
    files = make_files(tmp_path / "src")
    store = tmp_path / "store"
    store.mkdir()
    for name in ("a.safetensors", "b.safetensors", "empty.safetensors"):
        (store / name).write_bytes(files[name])

    def handler(*args: object) -> RangeHandler:
        return RangeHandler(*args, directory=str(store))  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # type: ignore[arg-type]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    images, mnt = tmp_path / "images", tmp_path / "mnt"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with probe(tmp_path / "src", mnt, "--fetch", url, "--images", str(images), "--threads", "4") as proc:
            assert (mnt / "b.safetensors").read_bytes() == files["b.safetensors"]
            assert (images / "a.safetensors").exists()  # queued behind b without being opened
            assert (mnt / "a.safetensors").read_bytes() == files["a.safetensors"]
            assert (mnt / "empty.safetensors").read_bytes() == b""
            assert not (images / "config.json").exists()  # not a model file: never fetched
    finally:
        server.shutdown()
        server.server_close()
    assert reads_that_reached(proc) == 0

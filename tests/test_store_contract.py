"""The ObjectStore contract, written once and run against every backend: the local
directory, S3 on a real ``rclone serve s3`` and GCS on a real ``fake-gcs-server``."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkfs.errors import UsageError
from chunkfs.store import ObjectNotFound, ObjectStore, StoreError, open_store
from tests.conftest import storage_url


@pytest.fixture(params=["file", "s3", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    s = open_store(storage_url(request.param, request, tmp_path), create=True)
    yield s
    s.close()


def test_put_get_whole_and_ranges(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40
    store.put("blocks/ab/obj", data)
    assert store.get("blocks/ab/obj") == data
    assert store.get("blocks/ab/obj", 10, 20) == data[10:20]
    assert store.get("blocks/ab/obj", 1000) == data[1000:]
    assert store.get("blocks/ab/obj", 0, 0) == b""


def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.get("blocks/00/missing")
    assert store.head("blocks/00/missing") is None
    assert not store.exists("blocks/00/missing")
    store.delete("blocks/00/missing")  # idempotent


def test_head_delete_overwrite(store: ObjectStore) -> None:
    store.put("k", b"one")
    info = store.head("k")
    assert info is not None and info.size == 3
    store.put("k", b"three")
    assert store.get("k") == b"three"
    store.delete("k")
    assert store.head("k") is None


def test_empty_object(store: ObjectStore) -> None:
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.head("empty").size == 0


def test_list_by_prefix_in_key_order(store: ObjectStore) -> None:
    for key in ["blocks/bb/2", "blocks/aa/1", "other/x", "blocks/aa/0"]:
        store.put(key, key.encode())
    assert [o.key for o in store.list("blocks/")] == ["blocks/aa/0", "blocks/aa/1", "blocks/bb/2"]
    assert {o.key: o.size for o in store.list()} == {
        "blocks/aa/0": 11, "blocks/aa/1": 11, "blocks/bb/2": 11, "other/x": 7}


def test_concurrent_puts_are_atomic(store: ObjectStore) -> None:
    """Readers racing writers of the same key see one whole version, never a mix, and no
    thread fails. (The one exception: ``rclone serve s3``, our S3 test server, answers 404
    to a GET that races an overwrite of its key; real S3 overwrites atomically. chunkfs
    never overwrites a block with other bytes: keys are content hashes.)"""
    versions = [bytes([i]) * 200_000 for i in range(4)]
    seen: list[bytes] = []
    errors: list[BaseException] = []
    store.put("race", versions[0])
    rclone_gap = ObjectNotFound if store.url.startswith("s3://") else ()

    def writer(v: bytes) -> None:
        try:
            for _ in range(5):
                store.put("race", v)
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        for _ in range(20):
            try:
                seen.append(store.get("race"))
            except rclone_gap:
                continue
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer, args=(v,)) for v in versions] + [
        threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert seen and all(s in versions for s in seen)


def test_invalid_keys_refused(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    for key in ["", "../escape", "a//b", "a/./b"]:
        with pytest.raises(StoreError):
            store.put(key, b"x")


def test_large_object_and_many_concurrent_gets(store: ObjectStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = bytes(range(256)) * (4 << 12)  # 4 MiB
    store.put("big", data)
    with ThreadPoolExecutor(32) as pool:
        parts = list(pool.map(lambda i: store.get("big", i << 17, (i + 1) << 17), range(32)))
    assert b"".join(parts) == data


def test_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unsupported storage URL"):
        open_store("ftp://host/x")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"file://{tmp_path / 'nope'}")
    assert open_store(str(tmp_path)).url == f"file://{tmp_path}"  # a bare path is file://


class Collected:
    """A ``Sink`` that keeps what it is given, and whether each piece was a view of ``buffer``."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer
        self.pieces: list[bytes] = []
        self.in_buffer: list[bool] = []
        self.restarts = 0

    def restart(self) -> None:
        self.restarts += 1
        self.pieces.clear()

    def lend(self, size: int) -> memoryview | None:
        return None

    def write(self, piece: memoryview) -> None:
        self.pieces.append(bytes(piece))
        self.in_buffer.append(piece.obj is self.buffer.obj)

    def finish(self) -> None:
        self.finishes = getattr(self, "finishes", 0) + 1


class Lending(Collected):
    """A ``Sink`` that lends its own memory for every piece, front to back (as ``BlockSink``
    lends its block buffer), and notes whether each piece arrived in it."""

    def __init__(self, buffer: memoryview, size: int) -> None:
        super().__init__(buffer)
        self.memory = memoryview(bytearray(size))
        self.filled = 0
        self.in_place: list[bool] = []

    def restart(self) -> None:
        super().restart()
        self.filled = 0

    def lend(self, size: int) -> memoryview | None:
        room = min(size, len(self.memory) - self.filled)
        return self.memory[self.filled : self.filled + room] if room > 0 else None

    def write(self, piece: memoryview) -> None:
        super().write(piece)
        self.in_place.append(piece.obj is self.memory.obj)
        self.filled += len(piece)


def test_get_into_receives_into_the_memory_the_sink_lends(store: ObjectStore) -> None:
    data = os.urandom(300_000)
    store.put("blocks/ab/lent", data)
    buffer = memoryview(bytearray(64 << 10))
    sink = Lending(buffer, len(data))
    assert store.get_into("blocks/ab/lent", sink, buffer) == len(data)
    assert b"".join(sink.pieces) == data and bytes(sink.memory) == data
    assert sink.in_place and all(sink.in_place)  # no piece went through the store's own buffer
    assert max(map(len, sink.pieces)) <= len(buffer)


def test_get_into_streams_the_whole_object_in_buffer_sized_pieces(store: ObjectStore) -> None:
    data = os.urandom(300_000)
    store.put("blocks/ab/big", data)
    buffer = memoryview(bytearray(64 << 10))
    sink = Collected(buffer)
    assert store.get_into("blocks/ab/big", sink, buffer) == len(data)
    assert b"".join(sink.pieces) == data and sink.restarts == 1
    assert len(sink.pieces) >= 5 and max(map(len, sink.pieces)) <= len(buffer)
    assert all(sink.in_buffer)  # streamed through the buffer: no object-sized allocation
    store.put("empty", b"")
    empty = Collected(buffer)
    assert store.get_into("empty", empty, buffer) == 0 and empty.pieces == [] and empty.restarts == 1
    with pytest.raises(ObjectNotFound):
        store.get_into("blocks/00/missing", Collected(buffer), buffer)

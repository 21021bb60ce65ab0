"""The fleet cache: nodes fetch blocks from the peer that owns them before the object store.

Layers: pure units (signatures, owners, member lists); a real PeerServer over a real node
cache, asked by a real PeerClient over loopback HTTP, and hostile peers (corrupt, slow, gone)
as small real HTTP servers; then real mounts in separate processes, warming one model at once
with GETs counted at the store (an S3 server behind a counting proxy).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from chunkfs.blocklist import BlockList
from chunkfs.blocks import BlockCodec, block_id
from chunkfs.cache.block_cache import BlockCache
from chunkfs.cache.disk import aligned_buffer
from chunkfs.cache.images import FileImages, image_id
from chunkfs.meta.sqlite import SqliteMeta
from chunkfs.metrics import Metrics
from chunkfs.peer import auth
from chunkfs.peer.client import BAD_PEER_S, PeerClient, block_path
from chunkfs.peer.membership import Membership, membership
from chunkfs.peer.ring import owners
from chunkfs.peer.server import BUSY_WAIT_S, PeerServer
from chunkfs.read.download import BlockSink
from tests.conftest import (
    BLOCK,
    VolumeFixture,
    chunkfs,
    force_unmount,
    mounted,
    unique_bucket,
    wait_for,
    wait_mounted,
)
from tests.faultproxy import FaultProxy
from tests.servers import free_port

SECRET = b"a-fleet-secret-of-32-characters!"
UUID = "0b6c1c1e-0000-4000-8000-000000000001"


# -- units -----------------------------------------------------------------------------------
def test_signature_is_checked_and_the_secret_never_travels() -> None:
    header = auth.sign(SECRET, "GET", "/v1/x?length=1", now=1000)
    assert SECRET.decode() not in header
    assert auth.check(SECRET, header, "GET", "/v1/x?length=1", now=1000)
    assert auth.check(SECRET, header, "GET", "/v1/x?length=1", now=1000 + auth.MAX_SKEW)
    assert not auth.check(SECRET, header, "GET", "/v1/x?length=1", now=1001 + auth.MAX_SKEW)  # too old
    assert not auth.check(b"another-secret-of-32-characters!", header, "GET", "/v1/x?length=1", now=1000)
    assert not auth.check(SECRET, header, "GET", "/v1/y?length=1", now=1000)  # another request
    assert not auth.check(SECRET, header, "PUT", "/v1/x?length=1", now=1000)
    for bad in (None, "", "Bearer x", "chunkfs-hmac", "chunkfs-hmac x:y", "chunkfs-hmac 1000", "z" * 500):
        assert not auth.check(SECRET, bad, "GET", "/v1/x?length=1", now=1000)


def test_secret_comes_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    with pytest.raises(Exception, match="shared secret"):
        auth.load_secret(None)
    monkeypatch.setenv(auth.SECRET_ENV, "short")
    with pytest.raises(Exception, match="at least 16"):
        auth.load_secret(None)
    monkeypatch.setenv(auth.SECRET_ENV, SECRET.decode())
    assert auth.load_secret(None) == SECRET
    (tmp_path / "s").write_bytes(SECRET + b"\n")
    assert auth.load_secret(str(tmp_path / "s")) == SECRET


def test_owners_agree_and_move_little_when_a_node_joins() -> None:
    nodes = [f"10.0.0.{i}:9570" for i in range(8)]
    bids = [block_id(i.to_bytes(4, "big"), "blake3") for i in range(2000)]
    first = {bid: owners(bid, nodes)[0] for bid in bids}
    assert first == {bid: owners(bid, list(reversed(nodes)))[0] for bid in bids}  # order-free
    share = {n: sum(1 for o in first.values() if o == n) for n in nodes}
    assert min(share.values()) > 2000 / 8 * 0.7, share  # spread evenly
    grown = {bid: owners(bid, [*nodes, "10.0.0.99:9570"])[0] for bid in bids}
    moved = [bid for bid in bids if grown[bid] != first[bid]]
    assert all(grown[bid] == "10.0.0.99:9570" for bid in moved)  # only to the newcomer
    assert len(moved) < 2000 / 9 * 1.4


def test_members_from_metadata_expire(tmp_path: Path) -> None:
    meta = SqliteMeta(f"sqlite://{tmp_path / 'm.db'}", create=True)
    a = membership("meta", "10.0.0.1:9570", meta, ttl_s=0.5)
    b = membership("meta", "10.0.0.2:9570", meta, ttl_s=0.5)
    a.refresh()
    b.refresh()
    a.refresh()
    assert a.members() == ["10.0.0.1:9570", "10.0.0.2:9570"]
    time.sleep(0.6)  # b stops refreshing: it is dead
    a.refresh()
    assert a.members() == ["10.0.0.1:9570"]
    a.close()
    assert meta.live_peers(time.time_ns()) == []


def test_members_from_dns_and_a_static_list() -> None:
    dns = membership("dns:localhost:9570", None, None)
    dns.refresh()
    assert "127.0.0.1:9570" in dns.members()
    static = membership("10.0.0.1:1,10.0.0.2:2", "10.0.0.3:3", None)
    static.refresh()
    assert static.members() == ["10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3"]
    for bad in ("dns:nohost", "x", "10.0.0.1:0", "a/b:1"):
        with pytest.raises(Exception):  # noqa: B017 - a usage error, whichever
            membership(bad, None, None).refresh() if bad.startswith("dns") else membership(bad, None, None)


# -- a real server and client over loopback ----------------------------------------------------
def _block(seed: int, size: int = BLOCK) -> tuple[bytes, bytes]:
    data = (seed.to_bytes(4, "big") * (size // 4 + 1))[:size]
    return block_id(data, "blake3"), data


@contextlib.contextmanager
def serving(tmp: Path, blocks: dict[bytes, bytes], **kwargs) -> Iterator[PeerServer]:  # type: ignore[no-untyped-def]
    cache = BlockCache([tmp / "served-cache"], 1 << 30, 0.0, Metrics(), hash="blake3")
    for bid, data in blocks.items():
        assert cache.put(bid, data)
    server = PeerServer(("127.0.0.1", 0), UUID, SECRET, cache, Metrics(), **kwargs).start()
    try:
        yield server
    finally:
        server.close()


def _client(peers: list[str], **kwargs) -> PeerClient:  # type: ignore[no-untyped-def]
    members = Membership(lambda: peers, "test", None)
    members.refresh()
    return PeerClient(members, UUID, SECRET, Metrics(), **kwargs)


def _fetch(client: PeerClient, bid: bytes, length: int, tmp: Path) -> bytes | None:
    sink = BlockSink(BlockCodec(hash="blake3"), bid, length, None)
    ok = client.fetch(bid, length, sink, memoryview(aligned_buffer(1 << 20)))
    return bytes(sink.memory or b"") if ok else None


def _raw(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_peer_serves_verified_blocks_and_nothing_else(tmp_path: Path) -> None:
    bid, data = _block(1)
    with serving(tmp_path, {bid: data}) as server:
        client = _client([f"127.0.0.1:{server.port}"])
        assert _fetch(client, bid, len(data), tmp_path) == data
        wait_for(lambda: server.metrics.peer_served_blocks._value.get() == 1)  # counted once sent
        path = f"{block_path(UUID, bid)}?length={len(data)}"
        signed = {"Authorization": auth.sign(SECRET, "GET", path)}
        assert _raw(server.port, "GET", path, signed) == (200, data)
        # unauthenticated, or signed for something else: 401 and an empty body, whatever the path
        for headers in ({}, {"Authorization": auth.sign(b"x" * 32, "GET", path)},
                        {"Authorization": auth.sign(SECRET, "GET", path + "0")}):
            assert _raw(server.port, "GET", path, headers) == (401, b"")
        assert _raw(server.port, "GET", "/../../etc/passwd") == (401, b"")
        # malformed ids and lengths: 400; another volume or an unknown block: 404; other methods: 405
        for bad in (f"/v1/volumes/{UUID}/blocks/../../etc/passwd?length=1",
                    f"/v1/volumes/{UUID}/blocks/{bid.hex()[:-2]}?length=1",
                    f"/v1/volumes/{UUID}/blocks/{bid.hex().upper()}?length=1",
                    f"{block_path(UUID, bid)}?length=-1", f"{block_path(UUID, bid)}?length={1 << 40}",
                    f"{block_path(UUID, bid)}", "/"):
            assert _raw(server.port, "GET", bad, {"Authorization": auth.sign(SECRET, "GET", bad)})[0] == 400, bad
        other = f"{block_path('0b6c1c1e-0000-4000-8000-0000000000ff', bid)}?length={len(data)}"
        assert _raw(server.port, "GET", other, {"Authorization": auth.sign(SECRET, "GET", other)})[0] == 404
        unknown = f"{block_path(UUID, _block(2)[0])}?length={BLOCK}"
        assert _raw(server.port, "GET", unknown, {"Authorization": auth.sign(SECRET, "GET", unknown)})[0] == 404
        wrong_length = f"{block_path(UUID, bid)}?length={len(data) - 1}"
        assert _raw(server.port, "GET", wrong_length,
                    {"Authorization": auth.sign(SECRET, "GET", wrong_length)})[0] == 404
        assert _raw(server.port, "PUT", path, {"Authorization": auth.sign(SECRET, "PUT", path)})[0] == 405
        refused = {s.labels["reason"]: s.value for m in server.metrics.registry.collect()
                   if m.name == "chunkfs_peer_requests_refused" for s in m.samples if s.name.endswith("_total")}
        assert refused["unauthenticated"] == 4 and refused["malformed"] == 7, refused


def test_a_member_that_is_this_very_process_is_known_at_once(tmp_path: Path) -> None:
    """A member list naming this node under an address it does not know as its own (a CSI
    volume's ``peers: 127.0.0.1:PORT``): asked for a block it owns but does not hold, its own
    server would wait for its own download of that block. The server knows its process's
    token and answers 508 at once; the client then treats that member as itself."""
    bid, data = _block(5)
    loads: list[bytes] = []
    with serving(tmp_path, {}, node_token="this-process") as server:
        server.load = lambda want, length: loads.append(want) or False
        client = _client([f"127.0.0.1:{server.port}"], node_token="this-process")
        started = time.monotonic()
        assert _fetch(client, bid, len(data), tmp_path) is None  # use the store
        assert time.monotonic() - started < 5 and loads == []
        assert client.candidates(bid) == []  # never asked again
        other = _client([f"127.0.0.1:{server.port}"])  # another process: served as before
        assert _fetch(other, bid, len(data), tmp_path) is None and loads == [bid]
    with hostile("loop") as (port, _handler):  # a 508 that does not echo the asker's token
        client = _client([f"127.0.0.1:{port}"])
        assert _fetch(client, bid, len(data), tmp_path) is None
        assert client._selves == set()


def test_a_block_held_only_in_a_file_image_is_served_from_it(tmp_path: Path) -> None:
    blocks = [_block(10 + i) for i in range(3)]
    ids = [bid for bid, _ in blocks]
    size = 3 * BLOCK
    with serving(tmp_path, {}) as server:
        cache = server.node_cache
        images = FileImages(cache, BLOCK)
        key = image_id(size, ids)
        assert key is not None
        entry = images.open_fill(key, size)
        assert entry is not None
        for index, (_, data) in enumerate(blocks):
            entry.write_at(data, index * BLOCK)
        assert images.finish_fill(entry, size, BlockList.dense(ids))
        assert not cache.contains(ids[1]) and cache.in_image(ids[1])
        client = _client([f"127.0.0.1:{server.port}"])
        for bid, data in blocks:
            assert _fetch(client, bid, len(data), tmp_path) == data


def test_an_owner_loads_a_missing_block_once_for_every_asker(tmp_path: Path) -> None:
    bid, data = _block(3)
    loads: list[bytes] = []
    with serving(tmp_path, {}) as server:
        def load(want: bytes, length: int) -> bool:
            loads.append(want)
            time.sleep(0.2)
            return server.node_cache.put(want, data) if want == bid else False
        server.load = load
        client = _client([f"127.0.0.1:{server.port}"])
        assert _fetch(client, bid, len(data), tmp_path) == data
        assert _fetch(client, bid, len(data), tmp_path) == data
        assert loads == [bid]
        assert _fetch(client, _block(4)[0], BLOCK, tmp_path) is None  # the owner could not load it


def test_a_late_owner_takes_what_the_fleet_already_holds_before_the_store(tmp_path: Path) -> None:
    """Nodes that start seconds apart: askers turned to the next peer in a block's order while
    its owner was not up yet. The owner asks that peer, only for a block it holds (no load
    there), before going to the store itself."""
    with serving(tmp_path, {}) as server:
        other, own = f"127.0.0.1:{server.port}", "127.0.0.1:1"
        members = Membership(lambda: [own, other], "test", own)
        members.refresh()
        client = PeerClient(members, UUID, SECRET, Metrics())
        owned = [b for b in (_block(seed) for seed in range(100, 140)) if owners(b[0], [own, other])[0] == own]
        (held, held_data), (absent, _) = owned[0], owned[1]
        assert server.node_cache.put(held, held_data)
        loads: list[bytes] = []
        server.load = lambda bid, length: loads.append(bid) or False
        assert client.candidates(held) == [(other, True)]
        assert _fetch(client, held, len(held_data), tmp_path) == held_data  # not from the store
        assert _fetch(client, absent, BLOCK, tmp_path) is None  # the store, and nothing loaded there
        assert loads == []
        assert sum(s.value for m in client.metrics.registry.collect() if m.name == "chunkfs_peer_errors"
                   for s in m.samples if s.name.endswith("_total")) == 0  # a 404 there is no error
        not_owned = next(b for b, _ in (_block(seed) for seed in range(200, 240))
                         if owners(b, [own, other])[0] == other)
        assert client.candidates(not_owned) == [(other, False)]  # an asker asks the owner, which loads
        # a holder with every upload slot taken answers such an ask at once, without queueing
        while server.uploads.acquire(blocking=False):
            pass
        path = f"{block_path(UUID, held)}?length={len(held_data)}&held=1"
        start = time.monotonic()
        assert _raw(server.port, "GET", path, {"Authorization": auth.sign(SECRET, "GET", path)})[0] == 503
        assert time.monotonic() - start < BUSY_WAIT_S / 2


def test_an_owner_loading_slowly_keeps_its_askers_waiting_not_timing_out(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An owner whose load outlasts the asker's --peer-timeout sends interim answers, so the
    asker waits (a store queued behind a fleet is slow, not dead); a load outlasting the
    server's own bound is answered 404 and the asker uses the store."""
    from chunkfs.peer import server as server_module

    monkeypatch.setattr(server_module, "HEARTBEAT_S", 0.3)
    bid, data = _block(50)
    with serving(tmp_path, {}) as server:
        def load(want: bytes, length: int) -> bool:
            time.sleep(2.5)
            return server.node_cache.put(want, data)
        server.load = load
        client = _client([f"127.0.0.1:{server.port}"], base_timeout=1.0)
        assert _fetch(client, bid, len(data), tmp_path) == data
        assert client.metrics.peer_errors.labels("timeout")._value.get() == 0
        monkeypatch.setattr(server_module, "LOAD_WAIT_S", 0.5)
        other, _ = _block(51)
        assert _fetch(client, other, len(data), tmp_path) is None


def test_loading_for_askers_holds_no_upload_slot(tmp_path: Path) -> None:
    """Slow loads (the store is the fleet's bottleneck) queue beside each other, not for the one
    upload slot: four askers of four missing blocks all get theirs, none is sent to the store."""
    blocks = dict(_block(40 + i) for i in range(4))
    with serving(tmp_path, {}, max_uploads=1) as server:
        def load(want: bytes, length: int) -> bool:
            time.sleep(BUSY_WAIT_S + 0.5)  # longer than a request would queue for a slot
            return server.node_cache.put(want, blocks[want])
        server.load = load
        client = _client([f"127.0.0.1:{server.port}"])
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda bid: _fetch(client, bid, BLOCK, tmp_path), blocks))
        assert got == list(blocks.values())


def test_uploads_are_bounded_busy_peers_say_so(tmp_path: Path) -> None:
    bid, data = _block(5, 8 << 20)  # at 1 MiB/s it holds the one slot longer than a request queues
    with serving(tmp_path, {bid: data}, max_uploads=1, max_rate=1 << 20) as server:
        path = f"{block_path(UUID, bid)}?length={len(data)}"
        headers = {"Authorization": auth.sign(SECRET, "GET", path)}
        first = threading.Thread(target=_raw, args=(server.port, "GET", path, headers))
        first.start()
        wait_for(lambda: server.uploads._value == 0)  # type: ignore[attr-defined]  # the one slot is taken
        start = time.monotonic()
        assert _raw(server.port, "GET", path, headers)[0] == 503
        assert time.monotonic() - start >= BUSY_WAIT_S - 0.1  # it queued first
        first.join()


def test_a_busy_owner_is_asked_again_not_the_store(tmp_path: Path) -> None:
    """Two askers, one upload slot held longer than a request queues: the second is told 503,
    asks again and gets the block from the owner (origin bytes stay at once per block)."""
    blocks = dict(_block(seed, 8 << 20) for seed in (30, 31))
    with serving(tmp_path, blocks, max_uploads=1, max_rate=1 << 20) as server:  # about 7 s per block
        client = _client([f"127.0.0.1:{server.port}"], base_timeout=25.0)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda bid: _fetch(client, bid, len(blocks[bid]), tmp_path), blocks))
    assert got == list(blocks.values())  # both from the owner, none left to the store
    assert client.metrics.peer_errors.labels("busy")._value.get() >= 1
    assert client.metrics.peer_fetched_blocks._value.get() == 2


def test_a_busy_owner_is_given_up_at_the_blocks_deadline(tmp_path: Path) -> None:
    bid, data = _block(32, 8 << 20)
    with serving(tmp_path, {bid: data}, max_uploads=1, max_rate=1 << 20) as server:
        path = f"{block_path(UUID, bid)}?length={len(data)}"
        first = threading.Thread(target=_raw, args=(server.port, "GET", path,
                                                    {"Authorization": auth.sign(SECRET, "GET", path)}))
        first.start()  # holds the one slot for about 8 s
        wait_for(lambda: server.uploads._value == 0)  # type: ignore[attr-defined]
        # deadline 4 s (the queue sends nothing for 3 s: the read timeout must outlast it)
        client = _client([f"127.0.0.1:{server.port}"], base_timeout=4.0, min_rate=1 << 30)
        start = time.monotonic()
        assert _fetch(client, bid, len(data), tmp_path) is None  # the store, once the deadline passed
        assert time.monotonic() - start < 2 * BUSY_WAIT_S + 1.5  # 503 at 3 s, again at 6.5 s, no more
        assert client.metrics.peer_errors.labels("busy")._value.get() == 2
        first.join()


class _Hostile(BaseHTTPRequestHandler):
    """A peer answering with what ``mode`` says: corrupt bytes, a stall, or half a body; or
    ("stale") the right block, except that a keep-alive connection's second request is met
    by closing it unanswered (an idle connection the peer closed just as the client reused it)."""

    protocol_version = "HTTP/1.1"
    mode = "corrupt"
    requests = 0
    blocks: ClassVar[dict[str, bytes]] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests += 1
        if self.mode == "stale":
            served = getattr(self, "served", 0)
            self.served = served + 1
            if served:
                self.close_connection = True
                return
            body = self.blocks[self.path.split("/blocks/")[1].split("?")[0]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.mode == "loop":  # claims to be the asker, without its token
            self.send_response(508)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        length = int(self.path.rpartition("length=")[2])
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.mode == "corrupt":
            self.wfile.write(os.urandom(length))
        elif self.mode == "slow":
            self.wfile.write(b"\0" * 10)
            time.sleep(5)
        else:  # "cut": half the body, then the connection drops
            self.wfile.write(b"\0" * (length // 2))
            self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def hostile(mode: str, blocks: dict[str, bytes] | None = None) -> Iterator[int]:
    handler = type("Hostile", (_Hostile,), {"mode": mode, "requests": 0, "blocks": blocks or {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], handler  # type: ignore[misc]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", ["corrupt", "slow", "cut"])
def test_a_bad_peer_is_skipped_and_never_trusted(tmp_path: Path, mode: str) -> None:
    bid, data = _block(6)
    with hostile(mode) as (port, handler):
        client = _client([f"127.0.0.1:{port}"], base_timeout=0.5, min_rate=1 << 30)
        start = time.monotonic()
        assert _fetch(client, bid, len(data), tmp_path) is None  # the caller goes to the store
        assert time.monotonic() - start < 4
        assert handler.requests == 1
        assert _fetch(client, bid, len(data), tmp_path) is None
        assert handler.requests == 1  # held off: not asked again for a while
        reason = {"corrupt": "corrupt", "slow": "timeout", "cut": "unreachable"}[mode]
        assert client.metrics.peer_errors.labels(reason)._value.get() == 1
    if mode == "corrupt":
        assert client._skip_until[f"127.0.0.1:{port}"] > time.monotonic() + BAD_PEER_S - 10


def test_a_keep_alive_connection_the_peer_closed_is_replaced_not_held_against_it(tmp_path: Path) -> None:
    first, second = _block(40), _block(41)
    with hostile("stale", {bid.hex(): data for bid, data in (first, second)}) as (port, handler):
        client = _client([f"127.0.0.1:{port}"])
        assert _fetch(client, first[0], len(first[1]), tmp_path) == first[1]
        # the pooled connection is reused and closed unanswered: asked again on a new one
        assert _fetch(client, second[0], len(second[1]), tmp_path) == second[1]
        assert handler.requests == 3
        assert client.metrics.peer_errors.labels("unreachable")._value.get() == 0
        assert not client._skip_until


def test_no_peer_up_means_the_store(tmp_path: Path) -> None:
    bid, data = _block(7)
    client = _client([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
    start = time.monotonic()
    assert _fetch(client, bid, len(data), tmp_path) is None
    assert time.monotonic() - start < 3
    assert client.metrics.peer_errors.labels("unreachable")._value.get() == 2


# -- real mounts in separate processes ---------------------------------------------------------
MODEL_BLOCKS = 48


@pytest.fixture
def fleet_volume(s3_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    model = tmp_path / "src"
    model.mkdir()
    for i in range(3):
        (model / f"shard-{i}.bin").write_bytes(os.urandom(MODEL_BLOCKS // 3 * BLOCK - 11 * i))
    with FaultProxy(s3_server.endpoint) as proxy:
        db = tmp_path / "meta" / "v.db"
        vol = VolumeFixture(f"sqlite://{db}", tmp_path / "blocks", db, tmp_path)
        chunkfs("format", vol.meta_url, "--storage", f"s3://{unique_bucket()}/m?endpoint={proxy.endpoint}",
                "--block-size", str(BLOCK))
        chunkfs("import", vol.meta_url, str(model), "/model")
        proxy.config.gets_by_block.clear()
        yield vol, proxy, model


@pytest.fixture
def peer_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(auth.SECRET_ENV, SECRET.decode())  # the mounts and warmups started below inherit it


def _same_model(root: Path, model: Path) -> None:
    for f in sorted(model.iterdir()):
        assert (root / f.name).read_bytes() == f.read_bytes(), f.name


def _warm_all(mounts: list, timeout: float = 120) -> list[dict]:  # type: ignore[type-arg]
    procs = [subprocess.Popen([sys.executable, "-m", "chunkfs", "warmup", str(m.path / "model"), "--json", "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in mounts]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    return reports


@contextlib.contextmanager
def fleet(vol: VolumeFixture, count: int, *extra: str) -> Iterator[list]:  # type: ignore[type-arg]
    ports = [free_port() for _ in range(count)]
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
    with contextlib.ExitStack() as stack:
        mounts = [stack.enter_context(mounted(vol, "--peer-listen", f"127.0.0.1:{port}", "--peers", addresses,
                                              *extra, cache=vol.tmp / f"cache{i}", name=f"node{i}"))
                  for i, port in enumerate(ports)]
        yield mounts


@pytest.mark.mount
def test_a_fleet_warming_one_model_gets_each_block_from_the_store_once(fleet_volume, peer_secret) -> None:  # type: ignore[no-untyped-def]
    vol, proxy, model = fleet_volume
    with fleet(vol, 3) as mounts:
        reports = _warm_all(mounts)
        assert all(r["complete"] for r in reports)
        gets = proxy.config.gets_by_block
        assert len(gets) == MODEL_BLOCKS and set(gets.values()) == {1}, gets  # each block once, fleet-wide
        from_peers = sum(r["bytes_from_peers"] for r in reports)
        assert from_peers >= 0.5 * sum(r["bytes_total"] for r in reports), reports
        for m in mounts:
            _same_model(m.path / "model", model)


@pytest.mark.mount
def test_a_node_killed_mid_transfer_fails_no_read(fleet_volume, peer_secret) -> None:  # type: ignore[no-untyped-def]
    vol, _proxy, model = fleet_volume
    ports = [free_port() for _ in range(3)]
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
    victim_mnt = vol.tmp / "node2"
    victim_mnt.mkdir()
    victim = subprocess.Popen([sys.executable, "-m", "chunkfs", "mount", vol.meta_url, str(victim_mnt), "--read-only",
                               "--cache-dir", str(vol.tmp / "cache2"), "--peer-listen", f"127.0.0.1:{ports[2]}",
                               "--peers", addresses, "--peer-max-rate", "1M"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_mounted(victim_mnt, victim)
        with contextlib.ExitStack() as stack:
            mounts = [stack.enter_context(mounted(vol, "--peer-listen", f"127.0.0.1:{port}", "--peers", addresses,
                                                  cache=vol.tmp / f"cache{i}", name=f"node{i}"))
                      for i, port in enumerate(ports[:2])]
            files = [str(m.path / "model" / f.name) for m in mounts for f in model.iterdir()]
            reader = subprocess.Popen([sys.executable, "-c", "import sys\nfor p in sys.argv[1:]: open(p,'rb').read()",
                                       *files])
            # node 2 owns about a third of the blocks and sends them at 1 MiB/s: kill it mid-transfer
            wait_for(lambda: any(p.is_file() for p in (vol.tmp / "cache2").rglob("*")))
            victim.kill()
            assert reader.wait(timeout=120) == 0
            for m in mounts:
                _same_model(m.path / "model", model)
    finally:
        force_unmount(victim_mnt)
        victim.kill()
        victim.wait()


@pytest.mark.mount
def test_warmup_without_a_mount_fills_from_peers_or_the_store(fleet_volume, peer_secret, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol, proxy, _model = fleet_volume
    dead = f"127.0.0.1:{free_port()}"
    result = chunkfs("warmup", vol.meta_url, "/model", "--cache-dir", str(tmp_path / "c0"), "--peers", dead,
                     "--json", "-q")
    report = json.loads(result.stdout)
    assert report["complete"] and report["bytes_from_peers"] == 0  # all peers gone: the store, nothing fails
    port = free_port()
    with mounted(vol, "--peer-listen", f"127.0.0.1:{port}", "--peers", f"127.0.0.1:{port}", cache=tmp_path / "c1"):
        # the mount owns every block (it is the only member) and fetches each from the store once
        before = dict(proxy.config.gets_by_block)
        result = chunkfs("warmup", vol.meta_url, "/model", "--cache-dir", str(tmp_path / "c2"), "--peers",
                         f"127.0.0.1:{port}", "--json", "-q")
        report = json.loads(result.stdout)
        assert report["complete"] and report["bytes_from_peers"] == report["bytes_total"]
        assert sum(proxy.config.gets_by_block.values()) - sum(before.values()) == MODEL_BLOCKS
        printed = chunkfs("warmup", vol.meta_url, "/model", "--cache-dir", str(tmp_path / "c3"), "--peers",
                          f"127.0.0.1:{port}").stdout
        assert "from peers" in printed
        assert sum(proxy.config.gets_by_block.values()) - sum(before.values()) == MODEL_BLOCKS


@pytest.mark.mount
def test_mounts_find_each_other_in_the_metadata(fleet_volume, peer_secret) -> None:  # type: ignore[no-untyped-def]
    vol, _proxy, _model = fleet_volume
    meta = SqliteMeta(vol.meta_url)
    ports = [free_port() for _ in range(2)]
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports):
            stack.enter_context(mounted(vol, "--peer-listen", f"127.0.0.1:{port}", cache=vol.tmp / f"cache{i}",
                                        name=f"node{i}"))
        wait_for(lambda: meta.live_peers(time.time_ns()) == sorted(f"127.0.0.1:{p}" for p in ports))
    assert meta.live_peers(time.time_ns()) == []  # each unregistered when it stopped


def test_peer_flags_are_checked(tmp_path: Path) -> None:
    vol_db = tmp_path / "v.db"
    chunkfs("format", f"sqlite://{vol_db}", "--storage", f"file://{tmp_path / 'b'}")
    with_secret = {**os.environ, auth.SECRET_ENV: SECRET.decode()}
    without = {k: v for k, v in os.environ.items() if k != auth.SECRET_ENV}
    for args, env, message in ((["--peers", "nonsense"], with_secret, "HOST:PORT"),
                               (["--peers", "127.0.0.1:1"], without, "shared secret"),
                               (["--peers", "127.0.0.1:1"], {**without, auth.SECRET_ENV: "short"}, "at least 16"),
                               (["--peer-ca", "x"], with_secret, "needs --peers"),
                               (["--peer-timeout", "0", "--peers", "meta"], with_secret, "positive")):
        result = chunkfs("warmup", f"sqlite://{vol_db}", "/", "--cache-dir", str(tmp_path / "c"), *args,
                         check=False, env=env)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result


@pytest.mark.mount
def test_warmups_without_mounts_seed_a_node_pool_from_one_store_download(fleet_volume, peer_secret, tmp_path: Path,
                                                                          ) -> None:  # type: ignore[no-untyped-def]
    """A warmup DaemonSet's pods: each serves the cache it fills (--peer-listen), so the pool
    fetches each block from the store once, and keeps serving once complete (--keep-serving)
    until SIGTERM, which ends it with status 0 and its report."""
    vol, proxy, model = fleet_volume
    ports = [free_port() for _ in range(3)]
    members = ",".join(f"127.0.0.1:{p}" for p in ports)
    logs = [tmp_path / f"warmup{i}.err" for i in range(3)]
    procs = []
    try:
        for i, port in enumerate(ports):
            with logs[i].open("wb") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "chunkfs", "warmup", vol.meta_url, "/model", "--cache-dir",
                     str(tmp_path / f"pool{i}"), "--peer-listen", f"127.0.0.1:{port}", "--peers", members,
                     "--keep-serving", "--json", "-q"], stdout=subprocess.PIPE, stderr=err, text=True))
        wait_for(lambda: all("serving peers as" in log.read_text() for log in logs), timeout=120)
        gets = dict(proxy.config.gets_by_block)
        # fewer than the 3 per block of three lone warmups; not exactly one: the three processes
        # start up to a second or two apart on a loaded machine, a member not listening yet is
        # skipped for a second, and this whole warmup of 3 MiB takes well under a second, so
        # an asker may go to the store before the owner is up (a late owner then asks the
        # others for blocks they hold before the store: about 1.1x per block, against 1.3-1.9x
        # without that, on this machine under load; the mounts' test above, all listening
        # first, checks exactly one GET per block)
        assert len(gets) == MODEL_BLOCKS and sum(gets.values()) <= 2 * MODEL_BLOCKS, sum(gets.values())
        # complete nodes go on serving: a node joining later gets every byte from them
        late = json.loads(chunkfs("warmup", vol.meta_url, "/model", "--cache-dir", str(tmp_path / "late"), "--peers",
                                  members, "--json", "-q").stdout)
        assert late["complete"] and late["bytes_from_peers"] == late["bytes_total"]
        assert proxy.config.gets_by_block == gets
        reports = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0
            reports.append(json.loads(out))
        assert all(r["complete"] for r in reports)
        # peers fed them (2/3 of the bytes at best; less for the start-up skew above)
        assert sum(r["bytes_from_peers"] for r in reports) >= 0.25 * sum(r["bytes_total"] for r in reports), reports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    with mounted(vol, cache=tmp_path / "pool0"):
        _same_model(vol.tmp / "mnt" / "model", model)
    assert proxy.config.gets_by_block == gets  # read whole from the warmed cache


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.mark.mount
def test_peers_over_tls(fleet_volume, peer_secret, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A TLS peer serves clients that trust its certificate; a client speaking plain HTTP to
    it, or trusting another CA, gets nothing from it and completes from the store."""
    vol, _proxy, model = fleet_volume
    cert, key = _self_signed(tmp_path, "peer")
    other_ca, _ = _self_signed(tmp_path, "other")
    port = free_port()
    with mounted(vol, "--peer-listen", f"127.0.0.1:{port}", "--peers", f"127.0.0.1:{port}", "--peer-tls-cert",
                 str(cert), "--peer-tls-key", str(key), cache=tmp_path / "served"):
        def warm(name: str, *extra: str) -> dict:  # type: ignore[type-arg]
            return json.loads(chunkfs("warmup", vol.meta_url, "/model", "--cache-dir", str(tmp_path / name),
                                      "--peers", f"127.0.0.1:{port}", *extra, "--json", "-q").stdout)
        trusted = warm("trusted", "--peer-ca", str(cert))
        assert trusted["complete"] and trusted["bytes_from_peers"] == trusted["bytes_total"]
        for report in (warm("plain"), warm("wrong-ca", "--peer-ca", str(other_ca))):
            assert report["complete"] and report["bytes_from_peers"] == 0
    with mounted(vol, cache=tmp_path / "trusted"):
        _same_model(vol.tmp / "mnt" / "model", model)


@pytest.mark.mount
def test_a_slow_peer_costs_a_mount_one_timeout_not_a_failed_read(fleet_volume, peer_secret) -> None:  # type: ignore[no-untyped-def]
    """Through a real mount: the peer owning about half the blocks stalls every answer; reads
    stay byte-exact, the peer is asked, times out once per request then is skipped for a while
    (not asked for each block: its own, or the mount's, which the mount asks it for first only
    if it holds them)."""
    vol, proxy, model = fleet_volume
    port = free_port()
    with hostile("slow") as (slow_port, handler):
        members = f"127.0.0.1:{port},127.0.0.1:{slow_port}"
        with mounted(vol, "--peer-listen", f"127.0.0.1:{port}", "--peers", members, "--peer-timeout", "1"):
            start = time.monotonic()
            _same_model(vol.tmp / "mnt" / "model", model)
            elapsed = time.monotonic() - start
    slow = f"127.0.0.1:{slow_port}"
    owned_by_slow = sum(1 for key in proxy.config.gets_by_block
                        if owners(bytes.fromhex(key.rsplit("/", 1)[1]), members.split(","))[0] == slow)
    assert owned_by_slow >= 5  # rendezvous gave the slow peer a share
    assert 1 <= handler.requests < MODEL_BLOCKS, (handler.requests, owned_by_slow)  # (16 downloads at once)
    assert set(proxy.config.gets_by_block.values()) == {1} and len(proxy.config.gets_by_block) == MODEL_BLOCKS
    assert elapsed < 30


@pytest.mark.mount
def test_membership_changes_during_a_warmup(fleet_volume, peer_secret, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A warmup finding its peers in the metadata (--peers meta) while a second node joins
    and the first leaves: it completes byte-exact, every byte from a peer, each block fetched
    from the store once, and the joiner served it once it was listed."""
    vol, proxy, model = fleet_volume
    proxy.config.rate, proxy.config.kinds, proxy.config.delay = 1.0, ("delay",), 1.0  # a slow store
    meta = SqliteMeta(vol.meta_url)
    first, second = free_port(), free_port()
    with contextlib.ExitStack() as joiner, contextlib.ExitStack() as leaver:
        leaver.enter_context(mounted(vol, "--peer-listen", f"127.0.0.1:{first}", cache=tmp_path / "cache-a",
                                     name="a"))
        wait_for(lambda: meta.live_peers(time.time_ns()) == [f"127.0.0.1:{first}"])
        warm = subprocess.Popen([sys.executable, "-m", "chunkfs", "warmup", vol.meta_url, "/model", "--cache-dir",
                                 str(tmp_path / "w"), "--peers", "meta", "--threads", "2", "--json", "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            joiner.enter_context(mounted(vol, "--peer-listen", f"127.0.0.1:{second}", cache=tmp_path / "cache-b",
                                         name="b"))
            wait_for(lambda: len(meta.live_peers(time.time_ns())) == 2)
            time.sleep(6)  # one membership refresh of the warmup (every 5 s)
            assert warm.poll() is None, "the warmup ended before the membership changed"
            leaver.close()  # the first node leaves; the joiner stays
            out, err = warm.communicate(timeout=120)
        finally:
            warm.kill()
    assert warm.returncode == 0, err
    report = json.loads(out)
    assert report["complete"] and report["bytes_from_peers"] == report["bytes_total"], (report, err)
    gets = dict(proxy.config.gets_by_block)
    # once each, but for the blocks the leaving node was loading when it stopped (at most
    # the warmup's 2 requests in flight): the joiner fetches those again
    assert len(gets) == MODEL_BLOCKS and sum(gets.values()) <= MODEL_BLOCKS + 2, gets
    assert any(p.is_file() for p in (tmp_path / "cache-b").rglob("*")), "the joiner served nothing"
    proxy.config.rate = 0.0
    with mounted(vol, cache=tmp_path / "w", name="check"):  # the warmed cache, not a mountpoint
        _same_model(vol.tmp / "check" / "model", model)
    assert proxy.config.gets_by_block == gets  # read whole from the warmed cache

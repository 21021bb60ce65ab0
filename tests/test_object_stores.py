"""S3 and GCS end to end on real servers, the retry policy, and faults injected by a proxy
in front of the S3 server: every byte right at 10% faults, prompt EIO at 100%."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import botocore.credentials
import pytest

from chunkfs.errors import ChunkfsError
from chunkfs.store import StoreError, StoreOptions, open_store
from chunkfs.store.base import ObjectInfo, ObjectNotFound, ObjectStore
from chunkfs.store.retry import RetryingStore
from chunkfs.volume import MARKER_READS, open_volume, read_marker
from tests.conftest import (
    BLOCK,
    VolumeFixture,
    assert_cache_sound,
    block_files,
    chunkfs,
    mounted,
    proxied_s3_volume,
    storage_url,
    unique_bucket,
)
from tests.faultproxy import FaultConfig, FaultProxy
from tests.test_mount_read import FILES
from tests.test_store_contract import Collected


# -- the retry policy (a unit: a scripted inner store) ----------------------------------------
class Scripted(ObjectStore):
    url = "scripted://"

    def __init__(self, failures: list[StoreError]) -> None:
        self.failures = failures
        self.calls = 0

    def _next(self) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        self._next()
        return b"ok"

    def put(self, key: str, data: bytes) -> None:
        self._next()

    def head(self, key: str) -> ObjectInfo | None:
        self._next()
        return None

    def delete(self, key: str) -> None:
        self._next()

    def list(self, prefix: str = ""):  # type: ignore[no-untyped-def]
        self._next()
        yield ObjectInfo("a", 1)


def test_temporary_failures_are_retried_up_to_the_limit() -> None:
    sleeps: list[float] = []
    inner = Scripted([StoreError("503", temporary=True)] * 2)
    assert RetryingStore(inner, 3, sleep=sleeps.append).get("k") == b"ok"
    assert inner.calls == 3 and len(sleeps) == 2
    inner = Scripted([StoreError("503", temporary=True)] * 5)
    with pytest.raises(StoreError, match="gave up after 3 attempts"):
        RetryingStore(inner, 3, sleep=sleeps.append).put("k", b"")
    assert inner.calls == 3


def test_permanent_failures_fail_at_once() -> None:
    for exc in (StoreError("403 denied"), ObjectNotFound("404")):
        inner = Scripted([exc])
        with pytest.raises(type(exc)):
            RetryingStore(inner, 5, sleep=lambda _s: None).get("k")
        assert inner.calls == 1


def test_list_is_retried_before_the_first_item() -> None:
    inner = Scripted([StoreError("reset", temporary=True)])
    assert [o.key for o in RetryingStore(inner, 3, sleep=lambda _s: None).list()] == ["a"]


# -- end to end on real S3 and GCS servers -----------------------------------------------------
def _volume_on(kind: str, request: pytest.FixtureRequest, tmp: Path, *extra: str) -> VolumeFixture:
    db = tmp / "meta" / "v.db"
    vol = VolumeFixture(f"sqlite://{db}", tmp / "blocks", db, tmp)
    chunkfs("format", vol.meta_url, "--storage", storage_url(kind, request, tmp), "--block-size", str(BLOCK), *extra)
    return vol


@pytest.mark.mount
@pytest.mark.parametrize("kind", ["s3", "gcs"])
@pytest.mark.parametrize("compress", ["none", "lz4"])
def test_format_import_mount_every_byte(kind: str, compress: str, request: pytest.FixtureRequest, tmp_path: Path,
                                        source: Path) -> None:
    vol = _volume_on(kind, request, tmp_path, "--compress", compress)
    chunkfs("import", vol.meta_url, str(source), "/model")
    status = chunkfs("status", vol.meta_url).stdout
    assert ("s3://" if kind == "s3" else "gs://") in status
    with mounted(vol) as m:
        for rel in FILES:
            assert (m.path / "model" / rel).read_bytes() == (source / rel).read_bytes(), rel


def test_bad_credentials_fail_fast_naming_the_bucket(request: pytest.FixtureRequest, tmp_path: Path,
                                                     source: Path) -> None:
    vol = _volume_on("s3", request, tmp_path)
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="wrong")
    start = time.monotonic()
    result = chunkfs("import", vol.meta_url, str(source), "/m", env=env, check=False)
    assert result.returncode != 0 and time.monotonic() - start < 20
    assert "denied" in result.stderr and "chunkfs-" in result.stderr
    assert "Traceback" not in result.stderr and "wrong" not in result.stderr
    result = chunkfs("format", f"sqlite://{tmp_path}/other.db", "--storage",
                     f"s3://{unique_bucket()}/x?endpoint=http://127.0.0.1:1", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_objbench_reports_levels_and_cleans_up(s3_server) -> None:  # type: ignore[no-untyped-def]
    url = f"s3://{unique_bucket()}/bench?endpoint={s3_server.endpoint}"
    open_store(url, create=True).close()
    out = json.loads(chunkfs("objbench", url, "--block-size", "256K", "--objects", "8", "--concurrency", "1,4",
                             "--json").stdout)
    rows = {(r["op"], r["concurrency"]): r for r in out["results"]}
    assert set(rows) == {("put", 1), ("get", 1), ("put", 4), ("get", 4)}
    assert all(r["count"] == 8 and r["mib_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] for r in rows.values())
    assert list(open_store(url).list("objbench/")) == []


# -- faults through a proxy in front of the S3 server -----------------------------------------
@pytest.fixture
def proxied_volume(s3_server, tmp_path: Path, source: Path):  # type: ignore[no-untyped-def]
    big = source / "big.bin"
    big.write_bytes(os.urandom(64 * BLOCK + 17))
    with proxied_s3_volume(s3_server, tmp_path, BLOCK) as (vol, proxy):
        chunkfs("import", vol.meta_url, str(source), "/model")
        yield vol, proxy


@pytest.mark.mount
def test_ten_percent_faults_every_byte_right(proxied_volume, source: Path) -> None:  # type: ignore[no-untyped-def]
    vol, proxy = proxied_volume
    proxy.config.rate = 0.10
    proxy.config.delay = 0.05
    with mounted(vol, "--io-retries", "8") as m:
        for rel in [*FILES, "big.bin"]:
            assert (m.path / "model" / rel).read_bytes() == (source / rel).read_bytes(), rel
    counts = proxy.config.counts
    assert sum(counts.values()) >= 5 and len(counts) >= 3, counts  # the faults really happened
    # every entry is the block or the file image it names (big.bin, a model file, is filled
    # into an image on the native transport; its blocks as entries on libfuse)
    entries = block_files(vol.tmp / "cache")
    assert assert_cache_sound(vol.tmp / "cache") == len(entries)
    assert len(entries) > 64 or any(p.stat().st_size == 64 * BLOCK + 17 for p in entries)


@pytest.mark.mount
def test_total_failure_is_prompt_eio_and_recovers(proxied_volume, source: Path) -> None:  # type: ignore[no-untyped-def]
    vol, proxy = proxied_volume
    with mounted(vol, allow_errors=True) as m:
        (m.path / "model/one").read_bytes()  # mounted and answering
        proxy.config.kinds = ("slowdown", "reset", "truncate", "bitflip")
        proxy.config.rate = 1.0
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            (m.path / "model/big.bin").read_bytes()
        assert info.value.errno == errno.EIO
        assert time.monotonic() - start < 30
        proxy.config.rate = 0.0  # the store recovers: so do reads, nothing was poisoned
        assert (m.path / "model/big.bin").read_bytes() == (source / "big.bin").read_bytes()
    assert "big.bin" in m.log_text()
    assert_cache_sound(vol.tmp / "cache")


def test_connection_pool_is_sized_to_the_concurrency(s3_server) -> None:  # type: ignore[no-untyped-def]
    """32 concurrent GETs are 32 connections, reused by the next 32 (none opened and dropped)."""
    bucket = unique_bucket()
    with FaultProxy(s3_server.endpoint, FaultConfig(rate=1.0, kinds=("delay",), delay=0.3)) as proxy:
        store = open_store(f"s3://{bucket}/p?endpoint={proxy.endpoint}", create=True,
                           options=StoreOptions(concurrency=32))
        store.put("blocks/aa/obj", b"x" * 1000)
        proxy.config.connections.clear()
        barrier = threading.Barrier(32)

        def get(_i: int) -> bytes:
            barrier.wait()
            return store.get("blocks/aa/obj")

        with ThreadPoolExecutor(32) as pool:
            for _round in range(2):
                assert set(pool.map(get, range(32))) == {b"x" * 1000}
        store.close()
    assert proxy.config.max_in_flight == 32
    assert len(proxy.config.connections) <= 33  # 32 + the connection used by the PUT


def test_streamed_gets_reuse_connections_and_retry_short_bodies(s3_server) -> None:  # type: ignore[no-untyped-def]
    """``get_into`` hands each connection back once a body is read whole (a round of 16
    streamed GETs opens no new connection), and a truncated body is a temporary error that
    is retried from the start (the sink restarted) without poisoning the pool."""
    bucket = unique_bucket()
    data = os.urandom(3 << 20)
    with FaultProxy(s3_server.endpoint, FaultConfig(rate=1.0, kinds=("delay",), delay=0.2)) as proxy:
        store = open_store(f"s3://{bucket}/p?endpoint={proxy.endpoint}", create=True,
                           options=StoreOptions(concurrency=16, attempts=3))
        store.put("blocks/aa/obj", data)
        proxy.config.connections.clear()
        barrier = threading.Barrier(16)

        def get(_i: int) -> bytes:
            buffer = memoryview(bytearray(256 << 10))
            sink = Collected(buffer)
            barrier.wait()
            assert store.get_into("blocks/aa/obj", sink, buffer) == len(data)
            return b"".join(sink.pieces)

        with ThreadPoolExecutor(16) as pool:
            for _round in range(2):
                assert set(pool.map(get, range(16))) == {data}
        assert proxy.config.max_in_flight == 16 and len(proxy.config.connections) <= 17

        proxy.config.kinds = ("truncate",)
        buffer = memoryview(bytearray(256 << 10))
        sink = Collected(buffer)
        with pytest.raises(StoreError) as info:
            store.get_into("blocks/aa/obj", sink, buffer)
        assert info.value.temporary and "gave up after 3 attempts" in str(info.value)
        assert sink.restarts == 3 and proxy.config.counts.get("truncate") == 3
        proxy.config.rate = 0.0
        sink = Collected(buffer)
        assert store.get_into("blocks/aa/obj", sink, buffer) == len(data) and b"".join(sink.pieces) == data
        store.close()


@pytest.mark.parametrize("path", ["signed", "client_presigned", "get_object"])
def test_a_connection_failing_mid_body_is_a_temporary_error(s3_server, path: str) -> None:  # type: ignore[no-untyped-def]
    """Any socket error while a streamed body is read (not only resets and timeouts: also
    EHOSTUNREACH, EIO...) is temporary, as urllib3 would have reported it; on each block GET
    path: signed without a client (a store named by an endpoint), presigned by the client
    (AWS itself), and ``get_object`` (where botocore has no session)."""
    from chunkfs.store.s3 import S3Store

    class FailingRaw:
        def __init__(self) -> None:
            self.headers = {"Content-Length": "10"}

        def read(self, _n: int) -> bytes:
            raise OSError(errno.EHOSTUNREACH, "No route to host")

        def close(self) -> None:
            pass

    def failing(_request: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(status_code=200, raw=FailingRaw())

    store = S3Store(f"s3://{unique_bucket()}/p?endpoint={s3_server.endpoint}", StoreOptions(), create=True)
    buffer = memoryview(bytearray(1024))
    with pytest.raises(StoreError) as info:
        if path == "signed":
            assert store._gets is not None
            store._gets.http.send = failing  # type: ignore[method-assign]
            store.get_into("blocks/aa/obj", Collected(buffer), buffer)
        elif path == "client_presigned":
            store._gets = None  # as for a store without an endpoint
            store.client._endpoint.http_session.send = failing  # type: ignore[attr-defined]
            store.get_into("blocks/aa/obj", Collected(buffer), buffer)
        else:
            store.client.get_object = lambda **_kw: {"Body": FailingRaw(), "ContentLength": 10}  # type: ignore[method-assign]
            store._get_object_into("blocks/aa/obj", Collected(buffer), buffer)
    assert info.value.temporary and "No route to host" in str(info.value)
    store.close()


def test_block_gets_are_presigned_and_classified_like_get_object(s3_server) -> None:  # type: ignore[no-untyped-def]
    """``get_into`` never goes through ``get_object`` (botocore's per-call machinery), yet
    answers as it would: bytes, ObjectNotFound, a denied bucket named, and throttling as a
    temporary error with one request per attempt, counted at the server."""
    from chunkfs.store.s3 import S3Store

    bucket = unique_bucket()
    data = os.urandom(300_000)
    with FaultProxy(s3_server.endpoint, FaultConfig(rate=0.0, kinds=("slowdown",))) as proxy:
        store = open_store(f"s3://{bucket}/p?endpoint={proxy.endpoint}", create=True,
                           options=StoreOptions(attempts=2))
        inner = store
        while not isinstance(inner, S3Store):
            inner = inner.inner  # type: ignore[attr-defined]
        inner.client.get_object = None  # type: ignore[method-assign]
        store.put("blocks/aa/obj", data)
        buffer = memoryview(bytearray(64 << 10))
        sink = Collected(buffer)
        assert store.get_into("blocks/aa/obj", sink, buffer) == len(data) and b"".join(sink.pieces) == data
        with pytest.raises(ObjectNotFound):
            store.get_into("blocks/aa/missing", Collected(buffer), buffer)
        proxy.config.rate = 1.0
        before = proxy.config.block_gets
        with pytest.raises(StoreError) as info:
            store.get_into("blocks/aa/obj", Collected(buffer), buffer)
        assert info.value.temporary and "SlowDown" in str(info.value) and proxy.config.block_gets - before == 2
        store.close()
    for signer in ("signed", "client_presigned"):
        denied = S3Store(f"s3://{bucket}/p?endpoint={s3_server.endpoint}", StoreOptions())
        if signer == "signed":
            assert denied._gets is not None
            denied._gets._credentials = botocore.credentials.Credentials("wrong", "wrong")
        else:
            denied._gets = None
            denied.client._request_signer._credentials = botocore.credentials.Credentials(  # type: ignore[attr-defined]
                "wrong", "wrong")
        with pytest.raises(StoreError) as info:
            denied.get_into("blocks/aa/obj", Collected(buffer), buffer)
        assert not info.value.temporary and "denied" in str(info.value) and bucket in str(info.value)
        denied.close()


def test_one_request_per_attempt_counted_at_the_server(s3_server) -> None:  # type: ignore[no-untyped-def]
    """``--io-retries N`` means N requests on the wire for a GET the store keeps failing:
    botocore retries nothing itself (its max_attempts=1 still retried each 5xx once)."""
    bucket = unique_bucket()
    with FaultProxy(s3_server.endpoint, FaultConfig(rate=1.0, kinds=("slowdown",))) as proxy:
        store = open_store(f"s3://{bucket}/p?endpoint={proxy.endpoint}", create=True,
                           options=StoreOptions(attempts=3))
        store.put("blocks/aa/obj", b"x" * 100)
        before = proxy.config.block_gets
        with pytest.raises(StoreError) as info:
            store.get("blocks/aa/obj")
        assert info.value.temporary and proxy.config.block_gets - before == 3
        assert proxy.config.counts["slowdown"] == 3
        store.close()


def test_a_marker_damaged_in_transit_is_read_again(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A volume marker whose body arrives damaged is read again; only one damaged on every
    read is refused (with a one-line error). GETs counted at the server."""
    bucket = unique_bucket()
    with FaultProxy(s3_server.endpoint) as proxy:
        db = tmp_path / "v.db"
        chunkfs("format", f"sqlite://{db}", "--storage", f"s3://{bucket}/m?endpoint={proxy.endpoint}")
        store = open_store(f"s3://{bucket}/m?endpoint={proxy.endpoint}")
        good = read_marker(store)
        assert good is not None

        class Damaging:  # the real store, with the first ``bad`` marker bodies cut short in transit
            url = store.url

            def __init__(self, bad: int) -> None:
                self.bad = bad

            def get(self, key: str) -> bytes:
                body = store.get(key)
                self.bad -= 1
                return body[:-3] if self.bad >= 0 else body

        requests = proxy.config.requests
        assert read_marker(Damaging(2), good["uuid"]) == good  # type: ignore[arg-type]
        assert proxy.config.requests - requests == 3
        requests = proxy.config.requests
        with pytest.raises(ChunkfsError) as info:
            read_marker(Damaging(99), good["uuid"])  # type: ignore[arg-type]
        assert "damaged" in str(info.value) and "\n" not in str(info.value)
        assert proxy.config.requests - requests == MARKER_READS
        with open_volume(f"sqlite://{db}") as vol:
            assert vol.fmt.uuid == good["uuid"]
        store.close()


def test_a_store_named_by_an_endpoint_reads_without_botocores_client(s3_server) -> None:  # type: ignore[no-untyped-def]
    """Reads of a store named by an endpoint are signed without botocore's client, which is
    made only for the first other request (its service model costs each process start
    70-150 ms)."""
    from chunkfs.store.s3 import S3Store

    bucket = unique_bucket()
    assert_reads_need_no_client(
        lambda create: S3Store(f"s3://{bucket}/p?endpoint={s3_server.endpoint}", StoreOptions(), create=create))


@pytest.mark.parametrize("url", [
    "s3://b1/p?endpoint=http://127.0.0.1:9000",
    "s3://b1/p?endpoint=http://127.0.0.1:9000&path_style=true&region=eu-west-1",
    "s3://b1/p?endpoint=http://minio.example:9000&path_style=false",
    "s3://my.dotted.bucket/deep/prefix?endpoint=https://s3.example.com&path_style=false&region=ap-south-1",
    "s3://b1/models%20v1/x+y=z~?endpoint=https://s3.example.com",
    "s3://my-bucket/models",  # AWS itself: us-east-1, botocore's legacy global endpoint
    "s3://my-bucket/models?region=us-west-2",
    "s3://my-bucket/models?region=eu-central-1&path_style=true",
    "s3://my.dotted.bucket/models?region=eu-west-1",
    "s3://my-bucket/models?region=cn-north-1",
    "s3://my-bucket/models?region=us-gov-west-1",
    "s3://my-bucket/models?region=ap-southeast-5&path_style=false",
])
def test_signed_gets_go_where_the_client_would_send_them(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GET signed without the client goes to the URL the client's own ``get_object``
    would send it to, signed for the same scope, for endpoints, both addressing styles,
    regions of each partition and keys that need quoting (no server: the client's request
    is stopped just before it is sent)."""
    from urllib.parse import parse_qs, urlsplit

    from chunkfs.store.s3 import S3Store

    class Stop(Exception):
        pass

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    store = S3Store(url, StoreOptions())
    assert store._gets is not None
    key = store.prefix + "blocks/ab/abcdef0123"
    sent: list[Any] = []

    def capture(request: Any, **_kwargs: Any) -> None:
        sent.append(request)
        raise Stop

    store.client.meta.events.register("before-send.s3.GetObject", capture)
    with pytest.raises(Stop):
        store.client.get_object(Bucket=store.bucket, Key=key)
    theirs = urlsplit(sent[0].url)
    ours = urlsplit(store._gets.request(key).url)
    assert (ours.scheme, ours.netloc, ours.path) == (theirs.scheme, theirs.netloc, theirs.path)
    their_scope = sent[0].headers["Authorization"].decode().split("Credential=")[1].split(",")[0].split("/", 2)[2]
    assert parse_qs(ours.query)["X-Amz-Credential"][0].split("/", 2)[2] == their_scope
    store.close()


@pytest.mark.parametrize("setting", [("AWS_USE_FIPS_ENDPOINT", "true"), ("AWS_USE_DUALSTACK_ENDPOINT", "true"),
                                     ("AWS_ENDPOINT_URL_S3", "https://s3.example.com"),
                                     ("AWS_S3_US_EAST_1_REGIONAL_ENDPOINT", "regional")])
def test_configured_s3_endpoints_leave_signing_to_the_client(setting: tuple[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Where botocore's configuration says more about where S3 requests go than the storage
    URL does, the client signs block GETs (it alone resolves those settings)."""
    from chunkfs.store.s3 import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert S3Store("s3://my-bucket/models?region=us-east-1", StoreOptions())._gets is not None
    monkeypatch.setenv(*setting)
    store = S3Store("s3://my-bucket/models?region=us-east-1", StoreOptions())
    assert store._gets is None and store._client is not None
    store.close()


def test_gcs_reads_need_no_client_and_are_classified(gcs_server) -> None:  # type: ignore[no-untyped-def]
    """GCS reads (whole, ranged, streamed, missing, past the end) go through one media GET
    each without google-cloud-storage's client, which is made only for the first other
    request; error responses are classified as the library's exceptions were."""
    from chunkfs.store.gcs import GCSStore
    from chunkfs.store.gcs_reads import failure

    bucket = unique_bucket()
    assert_reads_need_no_client(lambda create: GCSStore(f"gs://{bucket}/p", StoreOptions(), create=create))
    missing = GCSStore(f"gs://{unique_bucket()}/p", StoreOptions())
    with pytest.raises(ObjectNotFound):  # fake-gcs-server answers a missing bucket "Not Found", as for an object
        missing.get("blocks/aa/obj")
    missing.close()
    # GCS itself names a missing bucket in its JSON error
    bucket_gone = b'{"error": {"code": 404, "message": "The specified bucket does not exist."}}'
    assert failure(404, bucket_gone) == ("no_bucket", False)
    assert failure(404, b'{"error": {"code": 404, "message": "No such object: b/o"}}') == ("not_found", False)
    assert failure(403, b"") == ("denied", False) and failure(401, b"") == ("denied", False)
    assert failure(416, b"") == ("range", False)
    assert [failure(status, b"")[1] for status in (408, 429, 500, 503, 400, 412)] == [True] * 4 + [False] * 2


def assert_reads_need_no_client(make: Callable[[bool], Any]) -> None:
    """``make(create)`` opens a store (S3Store or GCSStore) on a fresh bucket: every kind of
    read (whole, ranged, to the end, past the end, streamed, missing, from ``get`` and from
    ``get_into``) answers right without the SDK's client, made at the first list."""
    data = os.urandom(300_000)
    writer = make(True)
    writer.put("blocks/aa/obj", data)
    writer.close()
    store = make(False)
    buffer = memoryview(bytearray(64 << 10))
    sink = Collected(buffer)
    assert store.get("blocks/aa/obj") == data
    assert store.get("blocks/aa/obj", 1000, 5000) == data[1000:5000]
    assert store.get("blocks/aa/obj", 299_990) == data[299_990:]
    assert store.get("blocks/aa/obj", 400_000) == b""
    assert store.get_into("blocks/aa/obj", sink, buffer) == len(data) and b"".join(sink.pieces) == data
    with pytest.raises(ObjectNotFound):
        store.get("blocks/aa/missing")
    with pytest.raises(ObjectNotFound):
        store.get_into("blocks/aa/missing", Collected(buffer), buffer)
    assert store._client is None
    assert [o.key for o in store.list("blocks/")] == ["blocks/aa/obj"]
    assert store._client is not None
    store.close()


def test_gcs_reads_go_to_the_libraries_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads go where google-cloud-storage's would: the emulator, else API_ENDPOINT_OVERRIDE,
    else storage.googleapis.com; the object name quoted whole (no server: URLs only)."""
    from google.auth.credentials import AnonymousCredentials

    from chunkfs.store.gcs_reads import GCSReads

    def url(name: str) -> str:
        return GCSReads("my-bucket", AnonymousCredentials(), connections=1, connect_timeout=1,
                        read_timeout=1).url(name)

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("API_ENDPOINT_OVERRIDE", raising=False)
    assert url("p/blocks/ab/c d") == ("https://storage.googleapis.com/download/storage/v1/b/my-bucket/o/"
                                      "p%2Fblocks%2Fab%2Fc%20d?alt=media")
    monkeypatch.setenv("API_ENDPOINT_OVERRIDE", "https://storage.example.com/")
    assert url("o").startswith("https://storage.example.com/download/storage/v1/b/my-bucket/o/o?")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:4443")
    assert url("o").startswith("http://localhost:4443/download/")


def test_a_bad_s3_region_is_refused_at_open() -> None:
    """A region botocore's client would refuse is refused when the store is opened, in one
    line, although reads never make the client."""
    from chunkfs.store.s3 import S3Store

    for url in ("s3://b1/p?region=not a region", "s3://b1/p?region=x/y&endpoint=http://127.0.0.1:9"):
        with pytest.raises(StoreError, match=r"cannot set up S3 client.*doesn't match a supported format"):
            S3Store(url, StoreOptions())

"""``s3://bucket/prefix`` backend on botocore (AWS S3, MinIO, rclone, any S3-compatible store).

URL: ``s3://BUCKET[/PREFIX][?endpoint=http://host:9000][&region=R][&path_style=true]``.
Credentials come only from botocore's standard chain (environment, shared profiles, instance
or workload identity); a URL carrying keys is refused by ``format``. ``AWS_ENDPOINT_URL``
is honoured by botocore itself. The client is botocore's own: boto3 adds
nothing a block store uses, and importing it (with s3transfer) cost each process start about
0.1 s of CPU.

Invariants:

- botocore's own retries are off: ``RetryingStore`` is the one retry policy. This module
  only classifies failures: throttling (SlowDown, 503, 429), 5xx, timeouts, dropped
  connections and short bodies are temporary; 403/404, a missing bucket and credential
  problems are not, and their message names the bucket and the cause.
- The connection pool holds ``options.concurrency`` connections.
- A GET returns exactly the requested bytes or raises: a body shorter than its
  Content-Length is a temporary error, never a short result.
- Reads (``get``, ``get_into``) are signed without a client (``s3_gets.SignedGets``:
  botocore's endpoint rules and SigV4 signer, no service model), so a process that only
  reads (``mount``, ``warmup``) never builds botocore's client, which cost each start 70-150
  ms; it is made at the first other request. Where botocore's configuration says more about
  where S3 requests go (FIPS, dual-stack, endpoint URLs or S3 settings of its own), block
  GETs are presigned by the client instead and sent through the client's own HTTP session
  (its pool, proxies, CA bundle and timeouts). Either way: one request, as ``get_object``
  would send, without botocore's per-call machinery (event hooks, parameter validation,
  response parsing), which cost about 1.3-1.9 ms of CPU per GET here against 0.6, and an
  error response is classified exactly as a ``get_object`` error would be. Where the client
  has no session (another botocore), ``get_object`` is used.
- ``path_style=false`` is virtual-hosted addressing, also with an endpoint.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import botocore.exceptions as bexc
import botocore.session
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.utils import validate_region_name

from chunkfs.errors import UsageError
from chunkfs.store.base import ObjectInfo, ObjectNotFound, ObjectStore, Sink, StoreError, StoreOptions
from chunkfs.store.http_body import RangePastEnd, range_header, read_error_body, read_exactly, read_whole
from chunkfs.store.s3_gets import SIGNED_SECONDS, SignedGets, signed_gets
from chunkfs.urls import bucket_url

_TEMPORARY_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "OperationAborted"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                 "AllAccessDisabled", "AccountProblem", "403", "401"}
_XML_FIELD = re.compile(rb"<(Code|Message)>([^<]*)</")
_NETWORK_ERRORS = (bexc.EndpointConnectionError, bexc.ConnectionClosedError, bexc.ReadTimeoutError,
                   bexc.ConnectTimeoutError, bexc.IncompleteReadError, bexc.ResponseStreamingError,
                   bexc.HTTPClientError, ConnectionError, TimeoutError, http.client.IncompleteRead)


def parse_s3_url(url: str) -> tuple[str, str, dict[str, str]]:
    parts = bucket_url(url, "S3")
    bucket = parts.netloc
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(params) - {"endpoint", "region", "path_style"}
    if unknown:
        raise UsageError(f"unknown S3 URL option(s) {', '.join(sorted(unknown))} (known: endpoint, region, path_style)")
    return bucket, parts.path.strip("/"), params


class S3Store(ObjectStore):
    def __init__(self, url: str, options: StoreOptions, *, create: bool = False) -> None:
        self.url = url
        self.bucket, prefix, params = parse_s3_url(url)
        self.prefix = f"{prefix}/" if prefix else ""
        path_style = params.get("path_style", "true" if "endpoint" in params else "false").lower() == "true"
        config = Config(
            max_pool_connections=options.concurrency,
            connect_timeout=min(options.timeout, 10.0),
            read_timeout=options.timeout,
            # RetryingStore retries, not botocore: one request per attempt ("max_attempts": 1
            # would still let botocore retry each 5xx once)
            retries={"total_max_attempts": 1, "mode": "standard"},
            # Bodies are not hashed into the request signature (as AWS SDKs do over TLS): every
            # block is content-addressed and verified against its id when read, and hashing 4 MiB
            # per PUT on both ends was the largest CPU cost of writing over a plain-HTTP endpoint.
            # path_style=false asks for virtual-hosted addressing ("auto" would still be path-style
            # with an endpoint); without either, botocore picks
            s3={"addressing_style": "path" if path_style else "virtual" if "path_style" in params else "auto",
                "payload_signing_enabled": False},
            signature_version="s3v4",
            # S3-compatible stores (MinIO, rclone, Ceph) differ in flexible-checksum support, and a
            # ranged GET cannot be checked against a whole-object checksum; blocks carry their own hash.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._config = config
        self._endpoint = params.get("endpoint")
        self._client: Any = None
        self._http: Any = None  # the client's HTTP session, once the client is made
        self._client_lock = threading.Lock()
        self._gets: SignedGets | None = None
        try:
            self._session = botocore.session.get_session()
            self._region = params.get("region") or self._session.get_config_variable("region") or "us-east-1"
            validate_region_name(self._region)  # as the client would at its creation
            # reads need no client where their URL is known without it: the client is then
            # made at the first other request
            self._gets = signed_gets(self._session, self.bucket, self._region, self._endpoint, path_style,
                                     connections=options.concurrency, connect_timeout=config.connect_timeout,
                                     read_timeout=config.read_timeout)
            if self._gets is None:
                self._make_client()
        except (bexc.BotoCoreError, ValueError) as exc:
            raise StoreError(f"cannot set up S3 client for {url}: {exc}") from None
        if create:
            self._ensure_bucket()

    @property
    def client(self) -> Any:
        """botocore's S3 client, made at its first use (thread-safe)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    try:
                        self._make_client()
                    except (bexc.BotoCoreError, ValueError) as exc:
                        raise StoreError(f"cannot set up S3 client for {self.url}: {exc}") from None
        return self._client

    def _make_client(self) -> None:
        client = self._session.create_client("s3", endpoint_url=self._endpoint, region_name=self._region,
                                             config=self._config)
        # the client's own HTTP session for presigned block GETs (None: another botocore, use get_object)
        self._http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        self._client = client

    # -- failure classification -------------------------------------------------------------
    def _error(self, op: str, key: str, exc: Exception) -> StoreError:
        where = f"s3://{self.bucket}/{self.prefix}{key}"
        if isinstance(exc, bexc.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"{where} not found")
            if code == "NoSuchBucket":
                return StoreError(f"S3 bucket {self.bucket!r} does not exist")
            if code in _DENIED_CODES or status in (401, 403):
                return StoreError(f"access to S3 bucket {self.bucket!r} denied ({code or status}): check the "
                                  "credentials and the bucket policy")
            temporary = code in _TEMPORARY_CODES or status >= 500 or status == 429
            return StoreError(f"{op} {where}: {code or status} {err.get('Message', '')}".strip(),
                              temporary=temporary)
        if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            return StoreError(f"no AWS credentials for S3 bucket {self.bucket!r}: set AWS_ACCESS_KEY_ID/"
                              "AWS_SECRET_ACCESS_KEY, a profile, or an instance role")
        if isinstance(exc, _NETWORK_ERRORS):
            return StoreError(f"{op} {where}: {type(exc).__name__}: {exc}", temporary=True)
        return StoreError(f"{op} {where}: {type(exc).__name__}: {exc}")

    def _ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except bexc.ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status != 404:
                raise self._error("HEAD bucket", "", exc) from None
        except Exception as exc:
            raise self._error("HEAD bucket", "", exc) from None
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._error("CREATE bucket", "", exc) from None

    # -- operations --------------------------------------------------------------------------
    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        if end is not None and end <= start:
            return b""
        byte_range = range_header(start, end)
        if self._gets is not None:
            return read_whole(lambda sink, buffer: self._read_signed(key, sink, buffer, byte_range))
        kwargs = {"Bucket": self.bucket, "Key": self.prefix + key}
        if byte_range is not None:
            kwargs["Range"] = byte_range
        try:
            resp = self.client.get_object(**kwargs)
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        except bexc.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # a range starting at or past the end of the object
            raise self._error("GET", key, exc) from None
        except Exception as exc:
            raise self._error("GET", key, exc) from None
        expected = resp.get("ContentLength")
        if expected is not None and len(data) != expected:
            raise StoreError(f"GET s3://{self.bucket}/{self.prefix}{key}: body has {len(data)} of {expected} bytes",
                             temporary=True)
        return data

    def get_into(self, key: str, sink: Sink, buffer: memoryview) -> int:
        """Stream the object into ``buffer`` piece by piece, straight from the socket (no
        block-sized allocation, and each piece is still in the CPU cache when the sink hashes
        and writes it)."""
        if self._gets is not None:
            return self._read_signed(key, sink, buffer)
        client = self.client
        session = self._http
        if session is None:
            return self._get_object_into(key, sink, buffer)
        try:
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + key}, ExpiresIn=SIGNED_SECONDS)
            request = AWSRequest(method="GET", url=url).prepare()
            request.stream_output = True
            response = session.send(request)
        except Exception as exc:
            raise self._error("GET", key, exc) from None
        return self._read_response(key, response, sink, buffer)

    def _read_signed(self, key: str, sink: Sink, buffer: memoryview, byte_range: str | None = None) -> int:
        """A read through ``SignedGets`` (``RangePastEnd`` for a range past the end)."""
        assert self._gets is not None
        try:
            response = self._gets.send(self.prefix + key, {"Range": byte_range} if byte_range else None)
        except Exception as exc:
            raise self._error("GET", key, exc) from None
        return self._read_response(key, response, sink, buffer)

    def _read_response(self, key: str, response: Any, sink: Sink, buffer: memoryview) -> int:
        """Feed a GET's response (botocore's ``AWSResponse``, body not read) to ``sink``, or
        raise the error it carries, classified as ``get_object``'s would be."""
        raw = response.raw
        if response.status_code not in (200, 206):
            error = _client_error(response.status_code, read_error_body(raw))
            if error.response["Error"]["Code"] == "InvalidRange":
                raise RangePastEnd
            raise self._error("GET", key, error) from None
        length = raw.headers.get("Content-Length")
        return self._stream_into(key, raw, int(length) if length is not None else None, sink, buffer)

    def _get_object_into(self, key: str, sink: Sink, buffer: memoryview) -> int:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except Exception as exc:
            raise self._error("GET", key, exc) from None
        body = resp["Body"]
        return self._stream_into(key, getattr(body, "_raw_stream", body), resp.get("ContentLength"), sink, buffer)

    def _stream_into(self, key: str, raw: Any, expected: int | None, sink: Sink, buffer: memoryview) -> int:
        """Feed a GET response (a urllib3 response) to ``sink``: exactly ``expected`` bytes or
        a temporary ``StoreError``."""
        def failed(exc: Exception) -> StoreError:
            if isinstance(exc, OSError | http.client.HTTPException) and not isinstance(exc, StoreError):
                # what urllib3 would have wrapped as a protocol error: the connection failed mid-body
                return StoreError(f"GET s3://{self.bucket}/{self.prefix}{key}: {type(exc).__name__}: {exc}",
                                  temporary=True)
            return self._error("GET", key, exc)

        return read_exactly(raw, expected, sink, buffer, f"s3://{self.bucket}/{self.prefix}{key}", failed)

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except Exception as exc:
            raise self._error("PUT", key, exc) from None

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except Exception as exc:
            err = self._error("HEAD", key, exc)
            if isinstance(err, ObjectNotFound):
                return None
            raise err from None
        return ObjectInfo(key, int(resp["ContentLength"]))

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except Exception as exc:
            err = self._error("DELETE", key, exc)
            if not isinstance(err, ObjectNotFound):
                raise err from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        skip = len(self.prefix)
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    modified = obj.get("LastModified")
                    yield ObjectInfo(obj["Key"][skip:], int(obj["Size"]), modified.timestamp() if modified else None)
        except Exception as exc:
            raise self._error("LIST", prefix, exc) from None

    def close(self) -> None:
        if self._gets is not None:
            self._gets.close()
        if self._client is not None:
            self._client.close()


def _client_error(status: int, body: bytes) -> bexc.ClientError:
    """The ``ClientError`` botocore would have raised for this error response."""
    fields = {name.decode(): value.decode("utf-8", "replace") for name, value in _XML_FIELD.findall(body)}
    code = fields.get("Code") or str(status)
    return bexc.ClientError({"Error": {"Code": code, "Message": fields.get("Message", "")},
                             "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def open_url(url: str, create: bool, options: StoreOptions) -> S3Store:
    return S3Store(url, options, create=create)

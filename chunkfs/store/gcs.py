"""``gs://bucket/prefix`` backend on google-cloud-storage.

Credentials: Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
ADC file, workload identity). ``STORAGE_EMULATOR_HOST`` points the client at an emulator
(fake-gcs-server) with anonymous credentials, as the library does for its own tests.

Invariants (as for S3): the library's retries are off (``retry=None``) so that
``RetryingStore`` is the one policy; 429, 5xx, timeouts and dropped connections are
temporary, 401/403/404 and credential problems are not; the HTTP pool holds
``options.concurrency`` connections; a GET returns exactly the requested bytes or raises.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import google.api_core.exceptions as gexc
import google.auth.exceptions as aexc
import requests
import requests.adapters
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from chunkfs.errors import UsageError
from chunkfs.store.base import ObjectInfo, ObjectNotFound, ObjectStore, Sink, StoreError, StoreOptions
from chunkfs.urls import bucket_url, mask_url

_TEMPORARY = (gexc.TooManyRequests, gexc.ServerError, requests.exceptions.ConnectionError,
              requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError, aexc.TransportError,
              ConnectionError, TimeoutError)


class _Pieces:
    """A write-only file for ``download_to_file`` that passes what it is given on to a sink
    in pieces of up to ``buffer``'s size (the last one shorter), gathered in the memory the
    sink lends (``Sink.lend``) or else in ``buffer``."""

    def __init__(self, sink: Sink, buffer: memoryview) -> None:
        self.sink = sink
        self.buffer = buffer
        self.target: memoryview | None = None  # where the piece being gathered goes
        self.filled = 0
        self.total = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self.target is None:
                self.target = self.sink.lend(len(self.buffer)) or self.buffer
            take = min(len(view), len(self.target) - self.filled)
            self.target[self.filled : self.filled + take] = view[:take]
            self.filled += take
            view = view[take:]
            if self.filled == len(self.target):
                self.flush()
        self.total += len(data)
        return len(data)

    def flush(self) -> None:
        if self.target is not None and self.filled:
            self.sink.write(self.target[: self.filled])
        self.target, self.filled = None, 0


class GCSStore(ObjectStore):
    def __init__(self, url: str, options: StoreOptions, *, create: bool = False) -> None:
        parts = bucket_url(url, "GCS")
        if parts.query:
            raise UsageError(f"GCS URL {mask_url(url)!r} takes no options")
        self.url = url
        self.bucket_name = parts.netloc
        prefix = parts.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.timeout = options.timeout
        try:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                self.client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "chunkfs"),
                                             credentials=AnonymousCredentials())
            else:
                self.client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))
        except aexc.DefaultCredentialsError:
            raise StoreError(f"no Google credentials for GCS bucket {self.bucket_name!r}: set "
                             "GOOGLE_APPLICATION_CREDENTIALS or run 'gcloud auth application-default login'") from None
        except Exception as exc:
            raise StoreError(f"cannot set up GCS client for {url}: {exc}") from None
        adapter = requests.adapters.HTTPAdapter(pool_connections=options.concurrency,
                                                pool_maxsize=options.concurrency, max_retries=0)
        self.client._http.mount("https://", adapter)
        self.client._http.mount("http://", adapter)
        self.bucket = self.client.bucket(self.bucket_name)
        if create:
            self._ensure_bucket()

    def _error(self, op: str, key: str, exc: Exception) -> StoreError:
        where = f"gs://{self.bucket_name}/{self.prefix}{key}"
        if isinstance(exc, gexc.NotFound):
            if "bucket" in str(exc).lower() and "does not exist" in str(exc).lower():
                return StoreError(f"GCS bucket {self.bucket_name!r} does not exist")
            return ObjectNotFound(f"{where} not found")
        if isinstance(exc, gexc.Forbidden | gexc.Unauthorized | aexc.RefreshError):
            return StoreError(f"access to GCS bucket {self.bucket_name!r} denied ({type(exc).__name__}): check the "
                              "credentials and the bucket's IAM policy")
        if isinstance(exc, _TEMPORARY):
            return StoreError(f"{op} {where}: {type(exc).__name__}: {exc}", temporary=True)
        return StoreError(f"{op} {where}: {type(exc).__name__}: {exc}")

    def _ensure_bucket(self) -> None:
        try:
            if self.client.lookup_bucket(self.bucket_name, timeout=self.timeout, retry=None) is None:
                self.client.create_bucket(self.bucket_name, timeout=self.timeout, retry=None)
        except gexc.Conflict:
            return
        except Exception as exc:
            raise self._error("CREATE bucket", "", exc) from None

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        if end is not None and end <= start:
            return b""
        blob = self.bucket.blob(self.prefix + key)
        try:
            data = blob.download_as_bytes(start=start or None, end=None if end is None else end - 1,
                                          raw_download=True, checksum=None, timeout=self.timeout, retry=None)
        except gexc.RequestRangeNotSatisfiable:
            return b""
        except Exception as exc:
            raise self._error("GET", key, exc) from None
        if end is not None and blob.size is not None and len(data) != min(end, blob.size) - start:
            raise StoreError(f"GET gs://{self.bucket_name}/{self.prefix}{key}: short body ({len(data)} bytes)",
                             temporary=True)
        return data

    def get_into(self, key: str, sink: Sink, buffer: memoryview) -> int:
        """Stream the object through ``buffer``: the library hands the body over in small
        chunks, gathered here into buffer-sized pieces."""
        pieces = _Pieces(sink, buffer)
        sink.restart()
        try:
            self.bucket.blob(self.prefix + key).download_to_file(
                pieces, raw_download=True, checksum=None, timeout=self.timeout, retry=None)
        except Exception as exc:
            raise self._error("GET", key, exc) from None
        pieces.flush()
        return pieces.total

    def put(self, key: str, data: bytes) -> None:
        try:
            self.bucket.blob(self.prefix + key).upload_from_string(
                data, content_type="application/octet-stream", timeout=self.timeout, retry=None, checksum=None)
        except Exception as exc:
            raise self._error("PUT", key, exc) from None

    def head(self, key: str) -> ObjectInfo | None:
        try:
            blob = self.bucket.get_blob(self.prefix + key, timeout=self.timeout, retry=None)
        except Exception as exc:
            err = self._error("HEAD", key, exc)
            if isinstance(err, ObjectNotFound):
                return None
            raise err from None
        return None if blob is None else ObjectInfo(key, int(blob.size or 0))

    def delete(self, key: str) -> None:
        try:
            self.bucket.blob(self.prefix + key).delete(timeout=self.timeout, retry=None)
        except gexc.NotFound:
            return
        except Exception as exc:
            raise self._error("DELETE", key, exc) from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        skip = len(self.prefix)
        try:
            for blob in self.client.list_blobs(self.bucket_name, prefix=self.prefix + prefix, timeout=self.timeout,
                                               retry=None):
                updated = blob.updated
                yield ObjectInfo(blob.name[skip:], int(blob.size or 0), updated.timestamp() if updated else None)
        except Exception as exc:
            raise self._error("LIST", prefix, exc) from None

    def close(self) -> None:
        self.client.close()


def open_url(url: str, create: bool, options: StoreOptions) -> GCSStore:
    return GCSStore(url, options, create=create)

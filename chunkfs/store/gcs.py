"""``gs://bucket/prefix`` backend: reads through ``gcs_reads`` (one authorized media GET each),
everything else on google-cloud-storage.

Credentials: Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
ADC file, workload identity). ``STORAGE_EMULATOR_HOST`` points reads and the client at an
emulator (fake-gcs-server) with anonymous credentials, as the library does for its own tests.

Invariants (as for S3): the library's retries are off (``retry=None``) so that
``RetryingStore`` is the one policy; 429, 5xx, timeouts and dropped connections are
temporary, 401/403/404 and credential problems are not; the HTTP pools hold
``options.concurrency`` connections; a GET returns exactly the requested bytes or raises.
Reads (``get``, ``get_into``) never import or make the library's client (see
``gcs_reads``): it is made at the first other request.
"""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from typing import Any

import google.auth.exceptions as aexc
import urllib3.exceptions

from chunkfs.errors import UsageError
from chunkfs.store.base import ObjectInfo, ObjectNotFound, ObjectStore, Sink, StoreError, StoreOptions
from chunkfs.store.gcs_reads import GCSReads, default_credentials, failure
from chunkfs.store.http_body import RangePastEnd, range_header, read_error_body, read_exactly, read_whole
from chunkfs.urls import bucket_url, mask_url

#: failures of a read's request that are temporary (the connection, not the store, failed)
_READ_NETWORK = (urllib3.exceptions.HTTPError, aexc.TransportError, ConnectionError, TimeoutError, OSError,
                 http.client.HTTPException)


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
        self._options = options
        self._client: Any = None
        self._client_lock = threading.Lock()
        try:
            self._credentials = default_credentials()
        except aexc.DefaultCredentialsError:
            raise StoreError(f"no Google credentials for GCS bucket {self.bucket_name!r}: set "
                             "GOOGLE_APPLICATION_CREDENTIALS or run 'gcloud auth application-default login'") from None
        except Exception as exc:
            raise StoreError(f"cannot set up GCS client for {url}: {exc}") from None
        self._reads = GCSReads(self.bucket_name, self._credentials, connections=options.concurrency,
                               connect_timeout=min(options.timeout, 10.0), read_timeout=options.timeout)
        if create:
            self._ensure_bucket()

    @property
    def client(self) -> Any:
        """google-cloud-storage's client, made at its first use (thread-safe)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    @property
    def bucket(self) -> Any:
        return self.client.bucket(self.bucket_name)

    def _make_client(self) -> Any:
        import requests.adapters
        from google.cloud import storage

        try:
            project = os.environ.get("GOOGLE_CLOUD_PROJECT") or ("chunkfs" if os.environ.get("STORAGE_EMULATOR_HOST")
                                                                  else None)
            client = storage.Client(project=project, credentials=self._credentials)
        except Exception as exc:
            raise StoreError(f"cannot set up GCS client for {self.url}: {exc}") from None
        adapter = requests.adapters.HTTPAdapter(pool_connections=self._options.concurrency,
                                                pool_maxsize=self._options.concurrency, max_retries=0)
        client._http.mount("https://", adapter)
        client._http.mount("http://", adapter)
        return client

    def _error(self, op: str, key: str, exc: Exception) -> StoreError:
        """A library call's failure (``put``, ``head``, ``delete``, ``list``, buckets)."""
        import google.api_core.exceptions as gexc
        import requests

        temporary = (gexc.TooManyRequests, gexc.ServerError, requests.exceptions.ConnectionError,
                     requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError, aexc.TransportError,
                     ConnectionError, TimeoutError)
        where = f"gs://{self.bucket_name}/{self.prefix}{key}"
        if isinstance(exc, gexc.NotFound):
            if "bucket" in str(exc).lower() and "does not exist" in str(exc).lower():
                return StoreError(f"GCS bucket {self.bucket_name!r} does not exist")
            return ObjectNotFound(f"{where} not found")
        if isinstance(exc, gexc.Forbidden | gexc.Unauthorized | aexc.RefreshError):
            return StoreError(f"access to GCS bucket {self.bucket_name!r} denied ({type(exc).__name__}): check the "
                              "credentials and the bucket's IAM policy")
        if isinstance(exc, temporary):
            return StoreError(f"{op} {where}: {type(exc).__name__}: {exc}", temporary=True)
        return StoreError(f"{op} {where}: {type(exc).__name__}: {exc}")

    def _ensure_bucket(self) -> None:
        import google.api_core.exceptions as gexc

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
        return read_whole(lambda sink, buffer: self._read(key, sink, buffer, range_header(start, end)))

    def get_into(self, key: str, sink: Sink, buffer: memoryview) -> int:
        """Stream the object into ``buffer`` piece by piece, straight from the socket."""
        return self._read(key, sink, buffer)

    def _read(self, key: str, sink: Sink, buffer: memoryview, byte_range: str | None = None) -> int:
        where = f"gs://{self.bucket_name}/{self.prefix}{key}"
        try:
            response = self._reads.send(self.prefix + key, byte_range)
        except aexc.RefreshError as exc:
            raise StoreError(f"access to GCS bucket {self.bucket_name!r} denied (RefreshError: {exc}): check the "
                             "credentials and the bucket's IAM policy") from None
        except _READ_NETWORK as exc:
            raise StoreError(f"GET {where}: {type(exc).__name__}: {exc}", temporary=True) from None
        if response.status not in (200, 206):
            body = read_error_body(response)
            kind, temporary = failure(response.status, body)
            if kind == "range":
                raise RangePastEnd
            if kind == "not_found":
                raise ObjectNotFound(f"{where} not found")
            if kind == "no_bucket":
                raise StoreError(f"GCS bucket {self.bucket_name!r} does not exist")
            if kind == "denied":
                raise StoreError(f"access to GCS bucket {self.bucket_name!r} denied ({response.status}): check the "
                                 "credentials and the bucket's IAM policy")
            raise StoreError(f"GET {where}: HTTP {response.status} {body[:200].decode('utf-8', 'replace')}".strip(),
                             temporary=temporary)
        length = response.headers.get("Content-Length")
        return read_exactly(response, int(length) if length is not None else None, sink, buffer, where,
                            lambda exc: StoreError(f"GET {where}: {type(exc).__name__}: {exc}", temporary=True))

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
        import google.api_core.exceptions as gexc

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
        self._reads.close()
        if self._client is not None:
            self._client.close()


def open_url(url: str, create: bool, options: StoreOptions) -> GCSStore:
    return GCSStore(url, options, create=create)

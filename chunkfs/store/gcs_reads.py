"""GCS object reads without google-cloud-storage: one authorized JSON-API media GET each.

Layer: ``store/``, used by ``store/gcs.py`` only. Why it exists: the library's download
hands a body over in 8 KiB chunks through several Python layers; reading 8 MiB blocks
that way cost 3.7 CPU-seconds per GiB in the client here, against about 0.5 for the same
bytes read straight into a buffer (``http_body.stream_body``). Importing the library also
cost each process start 0.2-0.3 s before its first read.

Invariants:

- A read is ``GET {endpoint}/download/storage/v1/b/{bucket}/o/{object}?alt=media`` (the
  JSON API's media download, the request the library sends for ``raw_download``), the
  object name quoted whole, with a ``Range`` header for part of an object.
- The endpoint is the library's: ``STORAGE_EMULATOR_HOST``, else ``API_ENDPOINT_OVERRIDE``,
  else storage.googleapis.com (its mTLS twin with ``GOOGLE_API_USE_CLIENT_CERTIFICATE=true``
  and a client certificate google-auth finds).
- Credentials are google-auth's: Application Default Credentials with the library's
  scopes, refreshed by google-auth's ``AuthorizedHttp`` (which also retries once a request
  answered 401 after refreshing); with ``STORAGE_EMULATOR_HOST``, anonymous ones against
  that endpoint, as the library does.
- One urllib3 pool of ``connections`` connections, no urllib3 retries or redirects:
  ``RetryingStore`` is the one retry policy.
- ``failure`` classifies an error response as the library's exceptions were: 404 not
  found (or a missing bucket), 401/403 denied, 416 a range past the end, 408, 429 and 5xx
  temporary.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import google.auth
import urllib3
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.urllib3 import AuthorizedHttp

#: the scopes google-cloud-storage's client asks for
SCOPES = ("https://www.googleapis.com/auth/devstorage.full_control",
          "https://www.googleapis.com/auth/devstorage.read_only",
          "https://www.googleapis.com/auth/devstorage.read_write")
PUBLIC_ENDPOINT = "https://storage.googleapis.com"
MTLS_ENDPOINT = "https://storage.mtls.googleapis.com"


def emulator_endpoint() -> str | None:
    """``STORAGE_EMULATOR_HOST`` as a URL (a bare ``host:port`` is plain HTTP, as the library
    takes it), or None."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return None
    return (host if "://" in host else f"http://{host}").rstrip("/")


def default_credentials() -> Any:
    """The credentials reads and the library's client share: anonymous for an emulator,
    else ADC (raises google-auth's ``DefaultCredentialsError`` without any)."""
    if emulator_endpoint() is not None:
        return AnonymousCredentials()
    credentials, _project = google.auth.default(scopes=SCOPES)
    return credentials


class GCSReads:
    """Sends media GETs of objects in one bucket."""

    def __init__(self, bucket: str, credentials: Any, *, connections: int, connect_timeout: float,
                 read_timeout: float) -> None:
        pool = urllib3.PoolManager(num_pools=4, maxsize=connections, block=False, retries=False,
                                   timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout))
        self.http = AuthorizedHttp(credentials, http=pool)
        endpoint = emulator_endpoint() or os.environ.get("API_ENDPOINT_OVERRIDE")
        if not endpoint:  # mutual TLS only where asked for, as google-auth decides it
            mtls = os.environ.get("GOOGLE_API_USE_CLIENT_CERTIFICATE") == "true" and self.http.configure_mtls_channel()
            endpoint = MTLS_ENDPOINT if mtls else PUBLIC_ENDPOINT
        self.base = f"{endpoint.rstrip('/')}/download/storage/v1/b/{quote(bucket, safe='')}/o/"

    def url(self, name: str) -> str:
        return f"{self.base}{quote(name, safe='')}?alt=media"

    def send(self, name: str, byte_range: str | None = None) -> Any:
        """GET object ``name`` (``byte_range``: a Range header's value): the urllib3
        response, its body not read."""
        headers = {"Range": byte_range} if byte_range else {}
        return self.http.urlopen("GET", self.url(name), headers=headers, preload_content=False, redirect=False)

    def close(self) -> None:
        self.http.http.clear()


def failure(status: int, body: bytes) -> tuple[str, bool]:
    """(kind, temporary) of an error response: kind is ``not_found``, ``no_bucket``,
    ``denied``, ``range`` or ``other``."""
    if status == 404:
        message = _message(body).lower()
        return ("no_bucket" if "bucket" in message and "does not exist" in message else "not_found"), False
    if status in (401, 403):
        return "denied", False
    if status == 416:
        return "range", False
    return "other", status in (408, 429) or status >= 500


def _message(body: bytes) -> str:
    """The error message of a JSON API error body, else the body's text."""
    text = body.decode("utf-8", "replace")
    try:
        return str(json.loads(text).get("error", {}).get("message", text))
    except (ValueError, AttributeError):
        return text

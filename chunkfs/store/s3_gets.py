"""Signed S3 object GETs without a botocore client, for stores named by an explicit endpoint.

Layer: ``store/``, used by ``store/s3.py`` only. Why it exists: creating botocore's S3 client
loads and builds its service model (a 1.3 MB JSON description of every S3 operation, plus
the legacy endpoint table), about 70 ms of CPU with a warm page cache and 150 ms with a cold
one, and every process start (``mount``, ``warmup``, each CSI publish) paid it before its
first block GET. A block GET needs none of it: the URL, a SigV4 query signature and one
HTTP request.

Invariants:

- Only for an S3 URL with ``endpoint=`` (MinIO, Ceph, R2, rclone, any S3-compatible store).
  Without one (AWS itself), the request URL depends on region, partition, FIPS, dual-stack
  and us-east-1 settings that only the client resolves faithfully: ``S3Store`` then signs
  with its client as before.
- The URL comes from botocore's own S3 endpoint rules (``EndpointProvider`` over the
  bundled ``endpoint-rule-set-1`` and ``partitions`` data, the engine the client itself
  uses) with the inputs the client would give them for an explicit endpoint: region,
  endpoint, path style, no FIPS, dual-stack or acceleration (botocore refuses those with an
  endpoint). The signature is botocore's ``S3SigV4QueryAuth`` with the signing name and
  region the rules return, over the credentials of botocore's standard chain, refreshed by
  it. ``tests/test_object_stores.py`` checks the URL against the client's presigned one.
- The HTTP session is a ``URLLib3Session`` set up as the client's would be: the pool size
  and timeouts asked for, proxies from the environment, the CA bundle of the botocore
  configuration (or ``REQUESTS_CA_BUNDLE``), the configured client certificate.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import botocore.session
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.endpoint_provider import EndpointProvider
from botocore.exceptions import NoCredentialsError
from botocore.httpsession import URLLib3Session
from botocore.loaders import create_loader
from botocore.utils import get_environ_proxies

#: seconds a signed GET URL is valid (it is sent at once)
SIGNED_SECONDS = 300
#: the one version of the S3 API (botocore's data directory for it)
S3_API_VERSION = "2006-03-01"


class SignedGets:
    """Sends GETs of objects in one bucket of an S3-compatible store, each signed alone."""

    def __init__(self, session: botocore.session.Session, bucket: str, region: str, endpoint: str,
                 path_style: bool, *, connections: int, connect_timeout: float, read_timeout: float) -> None:
        loader = create_loader()
        # by its path: load_service_model("s3", ...) first lists every service botocore
        # knows (60 ms with a cold page cache); S3's API version is fixed for good
        rules = EndpointProvider(loader.load_data(f"s3/{S3_API_VERSION}/endpoint-rule-set-1"),
                                 loader.load_data("partitions"))
        resolved = rules.resolve_endpoint(Bucket=bucket, Region=region, Endpoint=endpoint, ForcePathStyle=path_style,
                                          UseFIPS=False, UseDualStack=False, Accelerate=False)
        scheme = next((s for s in resolved.properties.get("authSchemes", []) if s.get("name") == "sigv4"), None)
        if scheme is None:
            raise ValueError(f"S3 endpoint rules want {resolved.properties.get('authSchemes')} for {endpoint}, "
                             "not SigV4")
        self.base = resolved.url.rstrip("/")
        self.signing_name = scheme.get("signingName", "s3")
        self.signing_region = scheme.get("signingRegion", region)
        self._session = session
        self._credentials: Any = None
        verify = session.get_config_variable("ca_bundle")
        self.http = URLLib3Session(
            verify=verify if verify is not None else os.environ.get("REQUESTS_CA_BUNDLE", True),
            proxies=get_environ_proxies(self.base),
            timeout=(connect_timeout, read_timeout),
            max_pool_connections=connections,
            client_cert=session.get_config_variable("client_cert") if _knows(session, "client_cert") else None,
        )

    def url(self, key: str) -> str:
        """The object's URL, unsigned (``key`` quoted as botocore quotes it: ``/`` kept)."""
        return f"{self.base}/{quote(key, safe='/~')}"

    def request(self, key: str, headers: dict[str, str] | None = None) -> Any:
        """A prepared, signed GET of ``key``; raises ``NoCredentialsError`` without credentials."""
        if self._credentials is None:
            self._credentials = self._session.get_credentials()
            if self._credentials is None:
                raise NoCredentialsError()
        request = AWSRequest(method="GET", url=self.url(key), headers=headers or {})
        S3SigV4QueryAuth(self._credentials.get_frozen_credentials(), self.signing_name, self.signing_region,
                         expires=SIGNED_SECONDS).add_auth(request)
        prepared = request.prepare()
        prepared.stream_output = True
        return prepared

    def send(self, key: str, headers: dict[str, str] | None = None) -> Any:
        """Send a signed GET of ``key``: the response, its body not read (``raw``)."""
        return self.http.send(self.request(key, headers))

    def close(self) -> None:
        self.http.close()


def _knows(session: botocore.session.Session, name: str) -> bool:
    """Whether this botocore has configuration variable ``name``."""
    return name in session.session_var_map

"""Signed S3 object GETs without a botocore client.

Layer: ``store/``, used by ``store/s3.py`` only. Why it exists: creating botocore's S3 client
loads and builds its service model (a 1.3 MB JSON description of every S3 operation, plus
the legacy endpoint table), about 70 ms of CPU with a warm page cache and 150 ms with a cold
one, and every process start (``mount``, ``warmup``, each CSI publish) paid it before its
first block GET. A block GET needs none of it: the URL, a SigV4 query signature and one
HTTP request.

Invariants:

- The URL comes from botocore's own S3 endpoint rules (``EndpointProvider`` over the
  bundled ``endpoint-rule-set-1`` and ``partitions`` data, the engine the client itself
  uses) with the inputs the client would give them: the bucket, region and path style; the
  endpoint when the S3 URL names one; otherwise no FIPS, dual-stack or acceleration, and
  us-east-1 on its legacy global endpoint, botocore's defaults.
- Where botocore's configuration says anything more about where S3 requests go (an
  endpoint URL of its own, FIPS, dual-stack, an ``s3`` section or S3 environment settings),
  or the rules ask for another signer than SigV4 (S3 Express, multi-region access points),
  there is no ``SignedGets``: ``S3Store`` then signs with its client, as before.
- The signature is botocore's ``S3SigV4QueryAuth`` with the signing name and region the
  rules return, over the credentials of botocore's standard chain, refreshed by it.
  ``tests/test_object_stores.py`` checks URL and scope against the client's presigned GET
  for endpoints, addressing styles, regions of each partition and keys that need quoting.
- The HTTP session is a ``URLLib3Session`` set up as the client's would be: the pool size
  and timeouts asked for, proxies from the environment, the CA bundle of the botocore
  configuration (or ``REQUESTS_CA_BUNDLE``).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import botocore.session
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.endpoint_provider import EndpointProvider
from botocore.exceptions import EndpointProviderError, NoCredentialsError
from botocore.httpsession import URLLib3Session
from botocore.loaders import create_loader
from botocore.utils import get_environ_proxies

#: seconds a signed GET URL is valid (it is sent at once)
SIGNED_SECONDS = 300
#: the one version of the S3 API (botocore's data directory for it)
S3_API_VERSION = "2006-03-01"


def signed_gets(session: botocore.session.Session, bucket: str, region: str, endpoint: str | None,
                path_style: bool, *, connections: int, connect_timeout: float,
                read_timeout: float) -> SignedGets | None:
    """GETs of ``bucket`` signed without a client, or None where only the client knows
    where they go (see the module contract)."""
    if endpoint is None and _configured_beyond_defaults(session):
        return None
    loader = create_loader()
    # by its path: load_service_model("s3", ...) first lists every service botocore knows
    # (60 ms with a cold page cache); S3's API version is fixed for good
    rules = EndpointProvider(loader.load_data(f"s3/{S3_API_VERSION}/endpoint-rule-set-1"),
                             loader.load_data("partitions"))
    inputs: dict[str, Any] = {"Bucket": bucket, "Region": region, "ForcePathStyle": path_style, "UseFIPS": False,
                              "UseDualStack": False, "Accelerate": False}
    if endpoint is not None:
        inputs["Endpoint"] = endpoint
    else:  # botocore's default: us-east-1 on the legacy global endpoint
        inputs["UseGlobalEndpoint"] = region == "us-east-1"
    try:
        resolved = rules.resolve_endpoint(**inputs)
    except EndpointProviderError:
        return None  # inputs the rules refuse: the client reports them as it always did
    schemes = resolved.properties.get("authSchemes", [])
    if resolved.headers or [scheme.get("name") for scheme in schemes] != ["sigv4"]:
        return None  # S3 Express, multi-region access points...: the client's own signers
    scheme = schemes[0]
    return SignedGets(session, resolved.url.rstrip("/"), scheme.get("signingName", "s3"),
                      scheme.get("signingRegion", region), connections=connections,
                      connect_timeout=connect_timeout, read_timeout=read_timeout)


def _configured_beyond_defaults(session: botocore.session.Session) -> bool:
    """Whether botocore's configuration says anything about where S3 requests go (an
    endpoint of its own, FIPS, dual-stack, S3 settings): then only the client resolves them."""
    if any(os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")):
        return True
    scoped = session.get_scoped_config()
    if "endpoint_url" in scoped or "services" in scoped or "s3" in scoped:
        return True
    if session.get_component("config_store").get_config_variable("s3"):
        return True
    return any(_truthy(session.get_config_variable(name)) for name in ("use_fips_endpoint", "use_dualstack_endpoint"))


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


class SignedGets:
    """Sends GETs of objects in one bucket of an S3 store, each signed alone, to ``base``."""

    def __init__(self, session: botocore.session.Session, base: str, signing_name: str, signing_region: str, *,
                 connections: int, connect_timeout: float, read_timeout: float) -> None:
        self.base = base
        self.signing_name = signing_name
        self.signing_region = signing_region
        self._session = session
        self._credentials: Any = None
        verify = session.get_config_variable("ca_bundle")
        self.http = URLLib3Session(
            verify=verify if verify is not None else os.environ.get("REQUESTS_CA_BUNDLE", True),
            proxies=get_environ_proxies(self.base),
            timeout=(connect_timeout, read_timeout),
            max_pool_connections=connections,
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


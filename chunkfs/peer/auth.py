"""Peer authentication: every request carries an HMAC of itself under the fleet's shared secret.

Layer: a leaf of ``peer/``. The secret comes from a file (a mounted Kubernetes Secret) or the
environment, never from a command line or the metadata, so ``ps`` and ``chunkfs status``
never show it.

A request is ``Authorization: chunkfs-hmac <unix seconds>:<hex HMAC-SHA256>`` over
``METHOD\\nPATH\\nSECONDS``. The secret itself never crosses the wire, so plain HTTP leaks
only what it carries anyway (block bytes, which anyone holding their id can fetch from the
store); a captured header is good for ``MAX_SKEW`` seconds and only for the one block it names.

Invariants: ``check`` compares in constant time, accepts a timestamp within ``MAX_SKEW``
seconds of the server's clock, and never raises on malformed input (it answers False).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time

from chunkfs.errors import UsageError

SCHEME = "chunkfs-hmac"
SECRET_ENV = "CHUNKFS_PEER_SECRET"
#: seconds a signed request stays valid either side of the server's clock
MAX_SKEW = 300
#: a shorter secret is refused: it could be guessed offline from one captured request
MIN_SECRET_BYTES = 16


def load_secret(path: str | None) -> bytes:
    """The shared secret: the file at ``path`` (trailing newline dropped), else the
    ``CHUNKFS_PEER_SECRET`` environment variable. ``UsageError`` if neither has one of at
    least ``MIN_SECRET_BYTES`` bytes."""
    if path:
        try:
            with open(path, "rb") as f:
                secret = f.read(4096).rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read the peer secret file {path}: {exc.strerror}") from None
        where = path
    else:
        secret = os.environ.get(SECRET_ENV, "").encode()
        where = f"${SECRET_ENV}"
    if not secret:
        raise UsageError(f"peers need a shared secret: set {SECRET_ENV} or pass --peer-secret-file FILE "
                         "(the same on every node)")
    if len(secret) < MIN_SECRET_BYTES:
        raise UsageError(f"the peer secret in {where} is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
                         "(e.g. openssl rand -hex 32)")
    return secret


def _mac(secret: bytes, method: str, path: str, seconds: int) -> str:
    message = f"{method}\n{path}\n{seconds}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, path: str, now: float | None = None) -> str:
    """The ``Authorization`` header value for one request."""
    seconds = int(time.time() if now is None else now)
    return f"{SCHEME} {seconds}:{_mac(secret, method, path, seconds)}"


def check(secret: bytes, header: str | None, method: str, path: str, now: float | None = None) -> bool:
    """Whether ``header`` signs this request with ``secret``, recently enough."""
    if not header or len(header) > 200:
        return False
    scheme, _, value = header.partition(" ")
    seconds_text, _, mac = value.partition(":")
    if scheme != SCHEME or not seconds_text.isdigit() or len(seconds_text) > 12:
        return False
    seconds = int(seconds_text)
    current = time.time() if now is None else now
    if abs(current - seconds) > MAX_SKEW:
        return False
    return hmac.compare_digest(mac.encode(), _mac(secret, method, path, seconds).encode())

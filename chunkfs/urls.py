"""URL helpers shared by the metadata and storage registries. Pure functions.

Invariant: anything chunkfs prints or logs about a URL goes through ``mask_url``, so a
password embedded in a URL (``redis://:secret@host``) never reaches a terminal or a log.
"""

from __future__ import annotations

import os
import re
from urllib.parse import SplitResult, urlsplit

from chunkfs.errors import UsageError

_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]*")
_USERINFO_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<pw>[^@/]*)@")
_SECRET_QUERY_RE = re.compile(
    r"(?P<key>[?&](?:password|secret|secret_key|access_key_secret|token)=)[^&]*", re.IGNORECASE
)


def mask_url(url: str) -> str:
    """Replace the password in ``scheme://user:password@host`` and secret query values by ****."""
    masked = _USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:****@", url)
    return _SECRET_QUERY_RE.sub(lambda m: f"{m['key']}****", masked)


def split_url(url: str) -> SplitResult:
    """``urlsplit(url)`` whose host and port are known to parse: a malformed one (``[::1``
    unclosed, a port that is not a number or out of range) is a usage error naming the URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- parsed lazily: raises ValueError for a bad port
    except ValueError as exc:
        raise UsageError(f"{mask_url(url)!r} is not a valid URL: {exc}") from None
    return parts


#: bucket names the S3 and GCS clients accept (AWS and GCS are stricter; S3-compatible stores vary)
_BUCKET_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")


def bucket_url(url: str, kind: str) -> SplitResult:
    """``split_url`` of an object-store URL (``kind``: "S3" or "GCS") whose host part is a
    bucket name; a missing or malformed one is a usage error."""
    parts = split_url(url)
    scheme = parts.scheme.lower()
    if not parts.netloc:
        raise UsageError(f"{kind} URL {mask_url(url)!r} needs a bucket: {scheme}://bucket/prefix")
    if not _BUCKET_RE.fullmatch(parts.netloc):
        raise UsageError(f"{kind} URL {mask_url(url)!r}: a bucket name holds only letters, digits, '.', '-' and '_'")
    return parts


def url_scheme(url: str) -> str:
    """The lower-cased scheme of ``url``; a URL without ``scheme://`` is a usage error."""
    if "://" not in url:
        raise UsageError(f"{mask_url(url)!r} is not a URL (expected scheme://...)")
    scheme = url.partition("://")[0].lower()  # not urlsplit: a relative sqlite path may hold a ':'
    if not _SCHEME_RE.fullmatch(scheme):
        raise UsageError(f"{mask_url(url)!r} has no scheme")
    return scheme


def is_env_name(text: str) -> bool:
    """``text`` can name an environment variable holding a URL: an upper-case identifier
    (``CHUNKFS_META_URL``), never a URL itself."""
    return "://" not in text and text.isidentifier() and text.isupper()


def resolve_meta_arg(text: str) -> str:
    """A META_URL argument: a URL, or the name of an environment variable holding one
    (``CHUNKFS_META_URL``). Lets secrets stay out of command lines: Kubernetes passes the URL
    from a Secret as an environment variable and the command names the variable."""
    if not is_env_name(text):
        return text  # a URL, or something url_scheme() reports as not a URL
    value = os.environ.get(text)
    if value is None:
        raise UsageError(f"environment variable {text} (named as the metadata URL) is not set")
    if "://" not in value:
        raise UsageError(f"environment variable {text} does not hold a metadata URL (expected scheme://...)")
    return value

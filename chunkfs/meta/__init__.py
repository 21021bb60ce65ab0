"""Metadata engines, chosen by URL scheme through one registry.

``open_meta(url)`` is the only way the rest of chunkfs gets a ``MetaStore``.
``sqlite3://`` is accepted as an alias of ``sqlite://`` (JuiceFS users type it).
"""

from __future__ import annotations

from chunkfs.errors import UsageError
from chunkfs.meta.base import ROOT_INODE, Attr, MetaStore, VolumeFormat, VolumeStats
from chunkfs.registry import import_backend
from chunkfs.urls import mask_url, url_scheme

__all__ = ["ROOT_INODE", "Attr", "MetaStore", "VolumeFormat", "VolumeStats", "open_meta"]

#: scheme -> (module with ``open_url(url, create)``, pip extra providing its SDK)
_ENGINES: dict[str, tuple[str, str | None]] = {
    "sqlite": ("chunkfs.meta.sqlite", None),
    "sqlite3": ("chunkfs.meta.sqlite", None),
    "redis": ("chunkfs.meta.redis", "redis"),
    "rediss": ("chunkfs.meta.redis", "redis"),
}


def open_meta(url: str, *, create: bool = False) -> MetaStore:
    """Open the metadata engine at ``url``. ``create`` allows creating an empty database
    (``format`` only); every other command requires an existing volume."""
    scheme = url_scheme(url)
    if scheme not in _ENGINES:
        known = ", ".join(sorted({f"{s}://" for s in _ENGINES}))
        raise UsageError(f"unsupported metadata URL {mask_url(url)!r} (supported: {known})")
    module_name, extra = _ENGINES[scheme]
    return import_backend(module_name, scheme, "metadata", extra).open_url(url, create)

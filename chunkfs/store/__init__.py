"""Storage backends, chosen by URL scheme through one registry.

``open_store(url)`` is the only way the rest of chunkfs gets an ``ObjectStore``. A bare
local path is taken as ``file://``. A scheme whose optional SDK is not installed gives an
install hint, not a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from chunkfs.errors import UsageError
from chunkfs.registry import import_backend
from chunkfs.store.base import ObjectInfo, ObjectNotFound, ObjectStore, StoreError, StoreOptions
from chunkfs.store.retry import RetryingStore
from chunkfs.urls import mask_url, url_scheme

__all__ = ["ObjectInfo", "ObjectNotFound", "ObjectStore", "StoreError", "StoreOptions", "normalize_storage_url",
           "open_store"]


def _open_file(url: str, create: bool, options: StoreOptions) -> ObjectStore:
    from chunkfs.store.file import FileStore

    path = url[len("file://") :]
    if not path:
        raise UsageError("file:// storage URL needs a path, e.g. file:///var/lib/chunkfs/blocks")
    return FileStore(path, create=create)


#: scheme -> (module holding an ``open_url(url, create, options)`` function, pip extra to install)
_OPTIONAL: dict[str, tuple[str, str]] = {
    "s3": ("chunkfs.store.s3", "s3"),
    "gs": ("chunkfs.store.gcs", "gcs"),
}
_BUILTIN: dict[str, Callable[[str, bool, StoreOptions], ObjectStore]] = {"file": _open_file}


def normalize_storage_url(url: str) -> str:
    """A bare path becomes an absolute ``file://`` URL; other URLs are returned unchanged."""
    if "://" not in url:
        return f"file://{os.path.abspath(url)}"
    if url.startswith("file://") and not url.startswith("file:///"):
        return f"file://{os.path.abspath(url[len('file://'):])}"
    return url


def open_store(url: str, *, create: bool = False, options: StoreOptions | None = None) -> ObjectStore:
    """Open the object store at ``url``, wrapped in the retry policy of ``options``.
    ``create`` makes a missing local directory or bucket (``format`` only)."""
    options = options or StoreOptions()
    backend = _open_backend(url, create, options)
    if options.observer is not None:
        from chunkfs.store.observed import ObservedStore

        backend = ObservedStore(backend, options.observer)
    return RetryingStore(backend, options.attempts)


def _open_backend(url: str, create: bool, options: StoreOptions) -> ObjectStore:
    url = normalize_storage_url(url)
    scheme = url_scheme(url)
    if scheme in _BUILTIN:
        return _BUILTIN[scheme](url, create, options)
    if scheme in _OPTIONAL:
        module_name, extra = _OPTIONAL[scheme]
        return import_backend(module_name, scheme, "storage", extra).open_url(url, create, options)
    known = ", ".join(f"{s}://" for s in [*_BUILTIN, *_OPTIONAL])
    raise UsageError(f"unsupported storage URL {mask_url(url)!r} (supported: {known})")

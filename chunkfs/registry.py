"""Loading optional backend modules by URL scheme, for the metadata and storage registries.

A scheme whose module or SDK is missing gives a one-line install hint, never a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from chunkfs.errors import ChunkfsError


def import_backend(module_name: str, scheme: str, what: str, extra: str | None) -> ModuleType:
    """Import ``module_name``, which serves ``scheme://`` ``what`` (metadata, storage)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("chunkfs"):
            raise ChunkfsError(f"{scheme}:// {what} is not supported by this chunkfs build") from None
        hint = f": pip install 'chunkfs[{extra}]'" if extra else ""
        raise ChunkfsError(f"{scheme}:// {what} needs {exc.name}{hint}") from None

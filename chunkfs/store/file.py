"""``file://`` backend: objects are files under a local directory.

Keys map to relative paths (``blocks/ab/abcd...``). ``put`` writes a temporary file in the
target directory and renames it into place, so readers never see a partial object.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from chunkfs.store.base import ObjectInfo, ObjectNotFound, ObjectStore, Sink, StoreError

_TMP_SUFFIX = ".chunkfs-tmp"


class FileStore(ObjectStore):
    def __init__(self, root: str | Path, *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create storage directory {self.root}: {exc.strerror}") from exc
        if not self.root.is_dir():
            raise StoreError(f"storage directory {self.root} does not exist")

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if end is None:
                    f.seek(start)
                    return f.read()
                return os.pread(f.fileno(), max(0, end - start), start)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        except OSError as exc:
            raise StoreError(f"reading {key} from {self.url}: {exc.strerror}", temporary=True) from exc

    def get_into(self, key: str, sink: Sink, buffer: memoryview) -> int:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                sink.restart()
                total = 0
                while True:
                    target = sink.lend(len(buffer)) or buffer
                    got = f.readinto(target)
                    if not got:
                        return total
                    sink.write(target[:got])
                    total += got
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        except OSError as exc:
            raise StoreError(f"reading {key} from {self.url}: {exc.strerror}", temporary=True) from exc

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            temporary = exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM)
            raise StoreError(f"writing {key} to {self.url}: {exc.strerror}", temporary=temporary) from exc

    def head(self, key: str) -> ObjectInfo | None:
        try:
            return ObjectInfo(key, self._path(key).stat().st_size)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"stat {key} in {self.url}: {exc.strerror}", temporary=True) from exc

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"deleting {key} from {self.url}: {exc.strerror}") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found: list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.endswith(_TMP_SUFFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                        found.append(ObjectInfo(key, st.st_size, st.st_mtime))
                    except FileNotFoundError:
                        continue
        yield from sorted(found, key=lambda o: o.key)

"""Format and import against a real SQLite database and a real local store (no FUSE)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from chunkfs.blocks import block_length, object_key
from chunkfs.errors import ChunkfsError, UsageError
from chunkfs.meta import ROOT_INODE
from chunkfs.meta.base import WRITABLE_FORMAT_VERSION
from chunkfs.store.file import FileStore
from chunkfs.volume import MARKER_KEY, format_volume, open_volume
from chunkfs.write.importer import Importer
from tests.conftest import BLOCK


def _fmt(tmp: Path, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("block_size", BLOCK)
    return format_volume(f"sqlite://{tmp / 'v.db'}", f"file://{tmp / 'blocks'}", **kw)


def _resolve(meta, path: str):  # type: ignore[no-untyped-def]
    attr = meta.getattr(ROOT_INODE)
    for part in path.strip("/").split("/"):
        attr = meta.lookup(attr.ino, part.encode())
    return attr


def _read_volume_file(vol, path: str) -> bytes:  # type: ignore[no-untyped-def]
    attr = _resolve(vol.meta, path)
    out = b""
    for index, bid in enumerate(vol.meta.read_blocks(attr.ino)):
        out += vol.codec.decode(bid, vol.store.get(object_key(bid)), block_length(index, attr.size, BLOCK))
    return out


def test_format_stores_settings_and_marker(tmp_path: Path) -> None:
    fmt = _fmt(tmp_path, compression="lz4", name="models")
    with open_volume(f"sqlite://{tmp_path / 'v.db'}") as vol:
        assert vol.fmt == fmt
        assert (fmt.block_size, fmt.compression, fmt.name) == (BLOCK, "lz4", "models")
        assert fmt.format_version == WRITABLE_FORMAT_VERSION
    marker = json.loads((tmp_path / "blocks" / MARKER_KEY).read_text())
    assert marker["uuid"] == fmt.uuid


def test_reformat_needs_force_and_keeps_uuid_and_files(tmp_path: Path, source: Path) -> None:
    fmt = _fmt(tmp_path)
    with open_volume(f"sqlite://{tmp_path / 'v.db'}") as vol:
        Importer(vol).run(source, "/m")
    with pytest.raises(ChunkfsError, match="already holds volume"):
        _fmt(tmp_path)
    with pytest.raises(ChunkfsError, match="cannot change"):
        format_volume(f"sqlite://{tmp_path / 'v.db'}", f"file://{tmp_path / 'blocks'}", block_size=2 * BLOCK,
                      force=True)
    again = format_volume(f"sqlite://{tmp_path / 'v.db'}", f"file://{tmp_path / 'blocks'}", block_size=BLOCK,
                          name="renamed", force=True)
    assert again.uuid == fmt.uuid and again.name == "renamed"
    with open_volume(f"sqlite://{tmp_path / 'v.db'}") as vol:
        assert _read_volume_file(vol, "/m/several") == (source / "several").read_bytes()


def test_storage_of_another_volume_is_refused(tmp_path: Path) -> None:
    _fmt(tmp_path)
    with pytest.raises(ChunkfsError, match="already holds another volume"):
        format_volume(f"sqlite://{tmp_path / 'other.db'}", f"file://{tmp_path / 'blocks'}")
    with pytest.raises(ChunkfsError, match="already holds another volume"):
        format_volume(f"sqlite://{tmp_path / 'other.db'}", f"file://{tmp_path / 'blocks'}", force=True)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"block_size": 1000}, "power of two"),
    ({"block_size": 128 << 20}, "power of two"),
    ({"compression": "zstd"}, "compression"),
])
def test_bad_settings(tmp_path: Path, kw: dict, msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        _fmt(tmp_path, **kw)
    assert not (tmp_path / "v.db").exists()


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_import_round_trip_attrs_and_dedup(tmp_path: Path, source: Path, compression: str) -> None:
    _fmt(tmp_path, compression=compression)
    with open_volume(f"sqlite://{tmp_path / 'v.db'}") as vol:
        report = Importer(vol, threads=4).run(source, "/models/m")
        assert report.failed == [] and report.files == 10 and report.symlinks == 2
        for rel in ["empty", "one", "block-minus-1", "block", "block-plus-1", "several", "zeros",
                    "nested/copy-of-several", "nested/deeper/text.txt", "private"]:
            assert _read_volume_file(vol, f"/models/m/{rel}") == (source / rel).read_bytes(), rel
            attr = _resolve(vol.meta, f"/models/m/{rel}")
            st = (source / rel).stat()
            assert (attr.mode, attr.mtime_ns, attr.size) == (st.st_mode, st.st_mtime_ns, st.st_size)
        link = _resolve(vol.meta, "/models/m/nested/link-to-several")
        assert vol.meta.readlink(link.ino) == b"../several"
        d = _resolve(vol.meta, "/models/m/nested")
        assert d.mtime_ns == (source / "nested").stat().st_mtime_ns
        stats = vol.meta.stats()
        # the copy of "several" and the zero blocks are stored once
        assert stats.unique_bytes < stats.logical_bytes
        assert report.blocks_deduplicated >= 6 + 2
        blocks_on_disk = len(list(FileStore(tmp_path / "blocks").list("blocks/")))
        assert blocks_on_disk == stats.unique_blocks


def test_rerun_skips_unchanged_and_updates_changed(tmp_path: Path, source: Path) -> None:
    _fmt(tmp_path)
    with open_volume(f"sqlite://{tmp_path / 'v.db'}") as vol:
        Importer(vol).run(source, "/m")
        (source / "one").write_bytes(b"X" * (BLOCK + 5))
        report = Importer(vol).run(source, "/m")
        assert report.files == 1 and report.unchanged_files == 9
        assert _read_volume_file(vol, "/m/one") == b"X" * (BLOCK + 5)
        assert report.blocks_uploaded == 2


def test_interrupted_import_publishes_nothing_partial(tmp_path: Path, source: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """If uploads fail midway, files whose blocks are not all stored are not published;
    a second run completes the volume."""
    _fmt(tmp_path)
    calls = {"n": 0}
    real_put = FileStore.put

    def flaky_put(self, key, data):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if key.startswith("blocks/") and calls["n"] % 3 == 0:
            raise OSError(5, "injected failure")
        return real_put(self, key, data)

    monkeypatch.setattr(FileStore, "put", flaky_put)
    with open_volume(f"sqlite://{tmp_path / 'v.db'}") as vol:
        report = Importer(vol, threads=2).run(source, "/m")
        assert report.failed
        for name, attr in vol.meta.readdir(_resolve(vol.meta, "/m").ino):
            if attr.is_reg:  # anything published reads back intact
                assert _read_volume_file(vol, f"/m/{name.decode()}") == (source / name.decode()).read_bytes()
    monkeypatch.setattr(FileStore, "put", real_put)
    with open_volume(f"sqlite://{tmp_path / 'v.db'}") as vol:
        report = Importer(vol).run(source, "/m")
        assert report.failed == []
        for rel in ["several", "zeros", "nested/copy-of-several"]:
            assert _read_volume_file(vol, f"/m/{rel}") == (source / rel).read_bytes()


def test_import_single_file_into_existing_directory(tmp_path: Path, source: Path) -> None:
    _fmt(tmp_path)
    with open_volume(f"sqlite://{tmp_path / 'v.db'}") as vol:
        Importer(vol).run(source / "nested", "/dir")
        Importer(vol).run(source / "several", "/dir")
        Importer(vol).run(source / "one", "/dir/renamed.bin")
        assert hashlib.sha256(_read_volume_file(vol, "/dir/several")).digest() == \
            hashlib.sha256((source / "several").read_bytes()).digest()
        assert _read_volume_file(vol, "/dir/renamed.bin") == (source / "one").read_bytes()
        assert stat.S_ISDIR(_resolve(vol.meta, "/dir/deeper").mode)


def test_import_errors(tmp_path: Path, source: Path) -> None:
    _fmt(tmp_path)
    with open_volume(f"sqlite://{tmp_path / 'v.db'}") as vol:
        with pytest.raises(ChunkfsError, match="does not exist"):
            Importer(vol).run(tmp_path / "missing", "/x")
        with pytest.raises(UsageError, match="absolute"):
            Importer(vol).run(source, "relative")
        with pytest.raises(UsageError, match=r"\.\."):
            Importer(vol).run(source, "/a/../b")
        Importer(vol).run(source / "one", "/file")
        with pytest.raises(ChunkfsError, match="not a directory"):
            Importer(vol).run(source, "/file/sub")
        assert vol.meta.stats().files == 1
    os.chmod(tmp_path, 0o755)

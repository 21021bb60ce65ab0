"""Copy a volume's metadata between engines as a versioned JSON Lines stream.

Line 1 is a header ``{"chunkfs_dump": 2, "format": {...}}``; then one object per entry in
pre-order (a directory before its children): ``path`` (``/`` for the root), ``type``
(``dir``, ``file``, ``symlink``, ``fifo``, ``socket``, ``char``, ``block``), ``mode``
(permission bits), ``uid``, ``gid``, ``mtime_ns``, and ``size`` + ``blocks`` (hex ids, ``""``
for a hole) for files, or ``size`` + ``sparse_blocks`` (``[index, hex id]`` of the stored
blocks only) for a file with more holes than blocks, ``target`` for symlinks, ``rdev`` for
devices;
``xattrs`` (name -> base64 value) when the entry has extended attributes. A file reached
again under another name (a hard link) is a ``{"path", "type": "hardlink", "link_to"}``
record naming the path it was first dumped at, so ``load`` recreates one inode, not two.
Names that are not UTF-8 round-trip through ``os.fsdecode``/``os.fsencode``. After the tree,
one ``{"type": "snapshot", "path", "source", "created_ns"}`` record per snapshot; a
directory's access profile is its ``profile`` (base64); ``load``
freezes that directory's tree again once everything is loaded. Version 1 dumps (no xattrs,
hard links dumped as copies), version 2 dumps (no holes or special files) and version 3
dumps (no snapshots) load unchanged. Files unlinked while open are not dumped (they have no path).

Uses only the ``MetaStore`` interface, so it works between any two engines. ``load``
refuses a target that already holds a volume. Inode numbers are not preserved (nothing
refers to them outside the engine).
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict
from typing import IO

from chunkfs.blocklist import BlockList
from chunkfs.blocks import block_count
from chunkfs.errors import ChunkfsError
from chunkfs.meta.base import ROOT_INODE, SNAPSHOT_FORMAT_VERSION, Attr, FsError, MetaStore, VolumeFormat

DUMP_VERSION = 4
_SPECIAL_TYPES = {"fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK, "char": stat.S_IFCHR, "block": stat.S_IFBLK}


def _entry(path: str, attr: Attr, meta: MetaStore) -> dict:
    out = {"path": path, "mode": stat.S_IMODE(attr.mode), "uid": attr.uid, "gid": attr.gid,
           "mtime_ns": attr.mtime_ns}
    if attr.is_dir:
        out["type"] = "dir"
        profile = meta.get_profile(attr.ino)
        if profile is not None:
            out["profile"] = base64.b64encode(profile).decode()
    elif attr.is_link:
        out.update(type="symlink", target=os.fsdecode(meta.readlink(attr.ino)))
    elif attr.is_special:
        kind = next(name for name, ftype in _SPECIAL_TYPES.items() if stat.S_IFMT(attr.mode) == ftype)
        out.update(type=kind, rdev=attr.rdev)
    else:
        blocks = meta.read_blocks(attr.ino)
        if blocks.holes * 2 > len(blocks):
            out.update(type="file", size=attr.size, sparse_blocks=[[i, b.hex()] for i, b in blocks.stored()])
        else:
            out.update(type="file", size=attr.size, blocks=[b.hex() for b in blocks])
    names = meta.list_xattrs(attr.ino)
    if names:
        out["xattrs"] = {os.fsdecode(n): base64.b64encode(meta.get_xattr(attr.ino, n)).decode() for n in names}
    return out


def iter_dump(meta: MetaStore) -> Iterator[dict]:
    fmt = meta.load_format()
    if fmt is None:
        raise ChunkfsError(f"no chunkfs volume at {meta.url}")
    yield {"chunkfs_dump": DUMP_VERSION, "format": asdict(fmt)}
    stack = [("/", meta.getattr(ROOT_INODE))]
    first_path: dict[int, str] = {}  # inode -> where a file with several links was dumped
    snapshot_roots = {record.ino: record for record in meta.snapshots()}
    snapshots = []
    while stack:
        path, attr = stack.pop()
        if attr.ino in snapshot_roots:
            record = snapshot_roots[attr.ino]
            snapshots.append({"type": "snapshot", "path": path, "source": record.source,
                              "created_ns": record.created_ns})
        if not attr.is_dir and attr.nlink > 1:
            if attr.ino in first_path:
                yield {"path": path, "type": "hardlink", "link_to": first_path[attr.ino]}
                continue
            first_path[attr.ino] = path
        yield _entry(path, attr, meta)
        if attr.is_dir:
            children = meta.readdir(attr.ino)
            for name, child in reversed(children):
                stack.append((f"{path.rstrip('/')}/{os.fsdecode(name)}", child))
    yield from snapshots


def dump(meta: MetaStore, out: IO[str]) -> int:
    count = 0
    for record in iter_dump(meta):
        out.write(json.dumps(record, sort_keys=True) + "\n")
        count += 1
    return count - 1


def load(meta: MetaStore, lines: IO[str]) -> int:
    """Load a dump into an empty engine; returns the number of entries loaded."""
    if meta.load_format() is not None:
        raise ChunkfsError(f"{meta.url} already holds a volume; load needs an empty target")
    try:
        header = json.loads(lines.readline() or "null")
    except ValueError:
        header = None
    if not isinstance(header, dict) or "chunkfs_dump" not in header:
        raise ChunkfsError("input is not a chunkfs dump (missing header line)")
    if header["chunkfs_dump"] > DUMP_VERSION:
        raise ChunkfsError(f"dump version {header['chunkfs_dump']} is newer than this chunkfs reads ({DUMP_VERSION})")
    meta.save_format(VolumeFormat(**header["format"]))
    inodes: dict[str, int] = {"/": ROOT_INODE}  # every path loaded so far
    dirs: list[tuple[int, dict]] = []
    snapshots: list[tuple[int, dict]] = []
    count = 0
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            path = rec["path"]
            if rec.get("type") == "snapshot":
                snapshots.append((inodes[path], rec))
                continue
            if path == "/":
                dirs.append((ROOT_INODE, rec))
                _load_xattrs(meta, ROOT_INODE, rec)
                count += 1
                continue
            parent_path, _, name = path.rpartition("/")
            parent = inodes[parent_path or "/"]
            bname = os.fsencode(name)
            if rec["type"] == "hardlink":
                meta.link(inodes[rec["link_to"]], parent, bname)
                count += 1
                continue
            if rec["type"] == "dir":
                attr = meta.mkdir(parent, bname, rec["mode"], rec["uid"], rec["gid"], rec["mtime_ns"])
                dirs.append((attr.ino, rec))
            elif rec["type"] == "symlink":
                attr = meta.symlink(parent, bname, os.fsencode(rec["target"]), rec["uid"], rec["gid"],
                                    rec["mtime_ns"])
            elif rec["type"] in _SPECIAL_TYPES:
                attr = meta.mknod(parent, bname, _SPECIAL_TYPES[rec["type"]] | rec["mode"], rec.get("rdev", 0),
                                  rec["uid"], rec["gid"], rec["mtime_ns"])
            elif rec["type"] == "file":
                blocks = _blocks_of(rec, meta.block_size)
                attr = meta.publish_file(parent, bname, mode=rec["mode"], uid=rec["uid"], gid=rec["gid"],
                                         mtime_ns=rec["mtime_ns"], size=rec["size"], blocks=blocks)
            else:
                raise ValueError(f"unknown entry type {rec['type']!r}")
            inodes[path] = attr.ino  # directories, and any inode a later hard link names
            _load_xattrs(meta, attr.ino, rec)
        except (ValueError, KeyError, TypeError, FsError) as exc:
            raise ChunkfsError(f"dump line {number} is damaged ({type(exc).__name__}: {exc}); "
                               f"the target is partially loaded") from None
        count += 1
    for ino, rec in reversed(dirs):  # after the children, whose creation touched the mtimes
        meta.set_attrs(ino, mode=rec["mode"], uid=rec["uid"], gid=rec["gid"], mtime_ns=rec["mtime_ns"])
        if "profile" in rec:
            meta.set_profile(ino, base64.b64decode(rec["profile"], validate=True))
    if snapshots:
        meta.raise_format(SNAPSHOT_FORMAT_VERSION)
    for ino, rec in snapshots:  # last: a frozen directory takes no more changes
        meta.freeze_tree(ino, source=str(rec.get("source", "")), created_ns=int(rec.get("created_ns", 0)))
    return count


def _blocks_of(rec: dict, block_size: int) -> BlockList:
    if "sparse_blocks" not in rec:
        return BlockList.dense(bytes.fromhex(b) for b in rec["blocks"])
    blocks = BlockList()
    blocks.resize(block_count(rec["size"], block_size))
    for index, hexid in rec["sparse_blocks"]:
        blocks[index] = bytes.fromhex(hexid)
    return blocks


def _load_xattrs(meta: MetaStore, ino: int, rec: dict) -> None:
    for name, value in rec.get("xattrs", {}).items():
        meta.set_xattr(ino, os.fsencode(name), base64.b64decode(value, validate=True))

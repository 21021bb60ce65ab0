"""Which blocks a warmup, check or evict covers: volume paths resolved to files and blocks.

Layer: reads metadata through ``AsyncMeta`` only; knows nothing of caches or stores.

Rules:

- A path names a file or a directory (taken recursively) inside the volume; it is
  normalised (``a/../b`` -> ``/b``) and may not climb above the volume root.
- Symlinks with relative targets are followed inside the volume (Hugging Face cache
  snapshots link to ``../../blobs/...``); absolute targets point outside the volume and are
  skipped. A file reached twice (two paths, two links) is counted once.
- A path that does not exist is an error naming it, raised before anything is fetched.
- Order: blocks of a directory with an access profile (``chunkfs.profile``) come first, in
  the profile's order (the order its loader reads them); then every block in file order.
"""

from __future__ import annotations

import errno
import os
import posixpath
from dataclasses import dataclass, field

from chunkfs.blocklist import HOLE, BlockList
from chunkfs.blocks import block_length
from chunkfs.errors import ChunkfsError, FsError
from chunkfs.meta.aio import AsyncMeta
from chunkfs.meta.base import ROOT_INODE, Attr
from chunkfs.profile import AccessProfile, ProfileDamaged

MAX_LINK_HOPS = 40


@dataclass(frozen=True)
class WarmFile:
    path: str  # volume path the file was reached by
    ino: int
    size: int
    blocks: tuple[tuple[bytes, int], ...]  # (block id, plain length) of its stored blocks (no holes), in file order


@dataclass
class PathPlan:
    path: str  # as requested (normalised)
    files: list[WarmFile] = field(default_factory=list)
    inodes: set[int] = field(default_factory=set, repr=False)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class WarmPlan:
    paths: list[PathPlan]
    block_size: int  # the volume's
    skipped_links: list[str] = field(default_factory=list)
    #: (block id, length) of profiled directories, in their profiles' order: fetched first
    leading: list[tuple[bytes, int]] = field(default_factory=list)

    def files(self) -> list[WarmFile]:
        """Every file once, in the order the paths name them."""
        seen: set[int] = set()
        out = []
        for plan in self.paths:
            for f in plan.files:
                if f.ino not in seen:
                    seen.add(f.ino)
                    out.append(f)
        return out

    def unique_blocks(self) -> dict[bytes, int]:
        """Block id -> length for every block, each once: ``leading`` first, then file order."""
        blocks: dict[bytes, int] = {}
        for bid, length in self.leading:
            blocks.setdefault(bid, length)
        for f in self.files():
            for bid, length in f.blocks:
                blocks.setdefault(bid, length)
        return blocks


def normalize_volume_path(path: str) -> str:
    """``/a/b`` form of a path inside the volume; refuses one that climbs above the root."""
    if not path or "\0" in path:
        raise ChunkfsError(f"invalid volume path {path!r}")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ChunkfsError(f"volume path {path!r} climbs above the volume root")
            parts.pop()
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def block_layout(blocks: BlockList, size: int, block_size: int) -> tuple[tuple[bytes, int], ...]:
    """(id, plain length) for each stored block of a file of ``size`` bytes (holes have none)."""
    return tuple((bid, block_length(i, size, block_size)) for i, bid in blocks.stored())


class Planner:
    def __init__(self, meta: AsyncMeta, block_size: int) -> None:
        self.meta = meta
        self.block_size = block_size

    async def plan(self, paths: list[str]) -> WarmPlan:
        plan = WarmPlan([], self.block_size)
        for raw in paths:
            path = normalize_volume_path(raw)
            attr, real = await self._resolve(path, raw)
            entry = PathPlan(path)
            await self._collect(real, attr, entry, plan, set())
            plan.paths.append(entry)
        return plan

    async def _resolve(self, path: str, shown: str) -> tuple[Attr, str]:
        """The attributes and link-free path of ``path`` (links followed)."""
        hops = 0
        pending = [p for p in path.split("/") if p]
        done: list[str] = []
        attrs = [await self.meta.getattr(ROOT_INODE)]  # of "/" and of each name in done
        while pending:
            name = pending.pop(0)
            if name == "..":
                if done:
                    done.pop()
                    attrs.pop()
                continue
            if not attrs[-1].is_dir:
                raise ChunkfsError(f"{shown}: not a directory in the volume (at /{'/'.join(done)})")
            try:
                child = await self.meta.lookup(attrs[-1].ino, name.encode())
            except FsError as exc:
                if exc.errno == errno.ENOENT:
                    raise ChunkfsError(f"{shown}: no such file or directory in the volume") from None
                raise
            if child.is_link:
                hops += 1
                target = (await self.meta.readlink(child.ino)).decode(errors="surrogateescape")
                if hops > MAX_LINK_HOPS or target.startswith("/"):
                    raise ChunkfsError(f"{shown}: symlink /{'/'.join([*done, name])} leads outside the volume")
                pending = [p for p in target.split("/") if p and p != "."] + pending
                continue
            done.append(name)
            attrs.append(child)
        return attrs[-1], "/" + "/".join(done)

    async def _collect(self, path: str, attr: Attr, entry: PathPlan, plan: WarmPlan, seen_dirs: set[int]) -> None:
        if attr.is_reg:
            if attr.ino in entry.inodes:
                return
            entry.inodes.add(attr.ino)
            blocks = await self.meta.read_blocks(attr.ino)
            entry.files.append(WarmFile(path, attr.ino, attr.size, block_layout(blocks, attr.size, self.block_size)))
        elif attr.is_dir:
            if attr.ino in seen_dirs:
                return  # a link loop back into a directory already walked
            seen_dirs.add(attr.ino)
            children: dict[str, Attr] = {}
            for name, child in await self.meta.readdir(attr.ino):
                if child.is_reg:
                    children[os.fsdecode(name)] = child
                child_path = posixpath.join(path, name.decode(errors="surrogateescape"))
                if child.is_link:
                    try:
                        target, real = await self._resolve(child_path, child_path)
                    except ChunkfsError:
                        plan.skipped_links.append(child_path)
                        continue
                    await self._collect(real, target, entry, plan, seen_dirs)
                else:
                    await self._collect(child_path, child, entry, plan, seen_dirs)
            await self._lead_by_profile(attr.ino, children, plan)

    async def _lead_by_profile(self, directory: int, files: dict[str, Attr], plan: WarmPlan) -> None:
        """Put the directory's blocks in its access profile's order first (if it has one)."""
        try:
            data = await self.meta.call(self.meta.meta.get_profile, directory)
            profile = None if data is None else AccessProfile.from_bytes(data)
        except (ChunkfsError, ProfileDamaged):
            return  # a hint: without it, file order
        if profile is None:
            return
        blocks: dict[str, BlockList] = {}
        for name, index in profile.entries():
            attr = files.get(name)
            if attr is None:
                continue
            if name not in blocks:
                blocks[name] = await self.meta.read_blocks(attr.ino)
            if index < len(blocks[name]) and blocks[name][index] != HOLE:
                plan.leading.append((blocks[name][index], block_length(index, attr.size, self.block_size)))

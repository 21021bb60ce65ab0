"""Volume commands: format, import, status, snapshot, gc, fsck, dump, load."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from chunkfs import snapshots
from chunkfs.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_HASH
from chunkfs.cli.options import store_options
from chunkfs.errors import ChunkfsError, UsageError
from chunkfs.meta import open_meta
from chunkfs.meta.dump import dump, load
from chunkfs.objbench import run_objbench
from chunkfs.store import open_store
from chunkfs.units import format_size
from chunkfs.urls import mask_url
from chunkfs.volume import existing_format, format_volume, open_volume
from chunkfs.write.importer import Importer


def cmd_format(args: argparse.Namespace) -> int:
    existing = existing_format(args.meta) if args.force else None
    storage = args.storage or (existing.storage if existing else None)
    if not storage:
        raise UsageError("format needs --storage, e.g. --storage file:///var/lib/chunkfs/blocks")
    fmt = format_volume(
        args.meta,
        storage,
        name=args.name,
        block_size=args.block_size or (existing.block_size if existing else DEFAULT_BLOCK_SIZE),
        compression=args.compress or (existing.compression if existing else "none"),
        hash=args.hash or (existing.hash if existing else DEFAULT_HASH),
        force=args.force,
    )
    verb = "updated" if existing else "formatted"
    print(f"{verb} volume {fmt.name!r} ({fmt.uuid}): metadata {mask_url(args.meta)}, storage {fmt.storage}, "
          f"block size {format_size(fmt.block_size)}, compression {fmt.compression}, hash {fmt.hash}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with open_volume(args.meta, store_options(args, args.threads)) as volume:
        interactive = sys.stderr.isatty() and not args.quiet
        importer = Importer(volume, threads=args.threads, checksum=args.checksum, show_progress=interactive)
        report = importer.run(args.source, args.dest)
    if interactive:
        print(
            f"imported {report.files} files ({format_size(report.bytes_total)}), {report.directories} new "
            f"directories, {report.symlinks} symlinks; {report.unchanged_files} files unchanged; uploaded "
            f"{report.blocks_uploaded} blocks ({format_size(report.bytes_uploaded)}), "
            f"{report.blocks_deduplicated} already stored",
            file=sys.stderr,
        )
    for path in report.skipped:
        print(f"chunkfs: skipped {path}: not a regular file, directory or symlink", file=sys.stderr)
    for failure in report.failed:
        print(f"chunkfs: failed: {failure}", file=sys.stderr)
    if report.failed:
        raise ChunkfsError(f"import incomplete: {len(report.failed)} entries failed; run it again to finish")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    modes = sum((bool(args.paths), args.list, args.delete is not None))
    if modes != 1 or (args.paths and len(args.paths) != 2):
        raise UsageError("snapshot takes SRC DST, or --list, or --delete PATH "
                         "(e.g. chunkfs snapshot META /llama /llama@v1)")
    meta = open_meta(args.meta)
    try:
        if args.list:
            found = snapshots.list_all(meta)
            if args.json:
                print(json.dumps([s.as_dict() for s in found], indent=2))
            for snap in [] if args.json else found:
                print(f"{snap.path}\t{snap.as_dict()['created']}\tfrom {snap.source}")
            return 0
        if args.delete is not None:
            gone = snapshots.delete(meta, args.delete)
            verb = "deleted snapshot"
        else:
            gone = snapshots.create(meta, args.paths[0], args.paths[1])
            verb = "snapshot"
    finally:
        meta.close()
    if args.json:
        print(json.dumps(gone.as_dict(), indent=2))
    elif verb == "snapshot":
        print(f"snapshot {gone.path} of {gone.source} (read-only; no block copied)")
    else:
        print(f"deleted snapshot {gone.path}; 'chunkfs gc' collects the blocks nothing else uses")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with open_volume(args.meta) as volume:
        fmt = volume.fmt
        stats = volume.meta.stats()
        pinned = snapshots.list_all(volume.meta)
    if args.json:
        out = {"metadata": mask_url(args.meta), "format": asdict(fmt), "stats": asdict(stats),
               "dedup_ratio": round(stats.dedup_ratio, 4), "snapshots": [s.as_dict() for s in pinned]}
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    saved = max(0, stats.logical_bytes - stats.unique_bytes)
    rows = [
        ("volume", f"{fmt.name} ({fmt.uuid})"),
        ("metadata", mask_url(args.meta)),
        ("storage", fmt.storage),
        ("block size", format_size(fmt.block_size)),
        ("compression", fmt.compression),
        ("hash", fmt.hash),
        ("format", f"version {fmt.format_version}, created {fmt.created}"),
        ("files", f"{stats.files} files, {stats.directories} directories, {stats.symlinks} symlinks"
                  + (f", {stats.specials} special files" if stats.specials else "")),
        ("logical size", f"{format_size(stats.logical_bytes)} ({stats.logical_bytes} bytes)"),
        ("blocks", f"{stats.block_refs} referenced, {stats.unique_blocks} unique "
                   f"({format_size(stats.unique_bytes)})"),
        ("dedup", f"{stats.dedup_ratio:.2f}x (saves {format_size(saved)})"),
        ("snapshots", ", ".join(s.path for s in pinned) if pinned else "none"),
    ]
    for key, value in rows:
        print(f"{key + ':':14}{value}")
    return 0



def cmd_objbench(args: argparse.Namespace) -> int:
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--concurrency takes numbers like 1,8,32, not {args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise UsageError("--concurrency levels must be at least 1")
    store = open_store(args.storage, options=store_options(args, max(levels)))
    try:
        rows = run_objbench(store, size=args.block_size, objects=args.objects, levels=levels)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"storage": store.url, "object_size": args.block_size,
                          "results": [r.as_dict() for r in rows]}, indent=2))
        return 0
    print(f"{store.url}: {format_size(args.block_size)} objects")
    print(f"{'op':4} {'conc':>4} {'count':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'MiB/s':>9}")
    for r in rows:
        print(f"{r.op:4} {r.concurrency:4d} {r.count:6d} {r.p50_ms:8.1f} {r.p90_ms:8.1f} {r.p99_ms:8.1f} "
              f"{r.mib_per_s:9.1f}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from chunkfs.maintenance import collect_garbage
    from chunkfs.meta.base import CLAIM_RENEW_S, MIN_GC_GRACE_S

    if args.grace < MIN_GC_GRACE_S and not args.force:
        raise UsageError(f"--grace {args.grace:g}s is shorter than {MIN_GC_GRACE_S / 60:.0f}m: writable mounts "
                         f"renew the claims on blocks of files open for writing every {CLAIM_RENEW_S / 60:.0f}m, "
                         f"so gc could delete them; add --force if no mount is writing")

    with open_volume(args.meta, store_options(args, args.threads)) as volume:
        report = collect_garbage(volume, grace=args.grace, dry_run=args.dry_run, threads=args.threads)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{report.objects} block objects: {report.referenced} in use, {report.kept_recent} unused but within "
          f"the grace period, {verb} {report.deleted} ({format_size(report.deleted_bytes)})")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from chunkfs.maintenance import check_volume

    with open_volume(args.meta, store_options(args, args.threads)) as volume:
        report = check_volume(volume, check_content=args.check_content, threads=args.threads)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        checked = "sizes and hashes" if report.content_checked else "sizes"
        print(f"{report.files} files, {report.blocks} distinct blocks, {report.objects} objects in the store "
              f"({checked} checked)")
        if report.snapshots:
            print(f"{report.snapshots} snapshots")
        for title, entries in (("missing", report.missing), ("wrong size", report.wrong_size),
                               ("corrupt", report.corrupt), ("snapshot", report.snapshot_errors)):
            for entry in entries:
                print(f"{title}: {entry}")
        if report.refcount_errors:
            print(f"{report.refcount_errors} blocks whose reference record disagrees with the files")
        if report.orphans:
            print(f"{report.orphans} objects ({format_size(report.orphan_bytes)}) no file uses: 'chunkfs gc' "
                  "removes them")
    if not report.clean:
        raise ChunkfsError(f"{mask_url(args.meta)}: fsck found problems")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    meta = open_meta(args.meta)
    try:
        if args.output == "-":
            dump(meta, sys.stdout)
        else:
            try:
                with open(args.output, "w") as out:
                    dump(meta, out)
            except OSError as exc:
                raise ChunkfsError(f"cannot write {args.output}: {exc.strerror}") from None
    finally:
        meta.close()
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    meta = open_meta(args.meta, create=True)
    try:
        if args.input == "-":
            count = load(meta, sys.stdin)
        else:
            try:
                with open(args.input) as src:
                    count = load(meta, src)
            except OSError as exc:
                raise ChunkfsError(f"cannot read {args.input}: {exc.strerror}") from None
    finally:
        meta.close()
    print(f"loaded {count} entries into {mask_url(args.meta)}", file=sys.stderr)
    return 0

"""Verify (and optionally repair) HOME: shard files against their manifests, orphans, leftover temp files, the
catalog against the trusted shards, and the index against the catalog. Says what it found and what it fixed.

Repair never removes or rewrites what a live writer holds. Every judgement that could lead to a removal is made
again under the partition's lock, taken without waiting, against what is on disk *then* (the manifest re-read, the
row groups re-read): a held lock means a writer is at work (between its new .pt and its manifest, say), and the
partition is reported as `live` and left to it. Writers hold that lock for their whole write (`embed_partition`),
so a shard file without a manifest is an orphan only when nobody holds its partition's lock.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from embed_assets.core import catalog
from embed_assets.core.atomic import abandoned_temp_file, abandoned_work_dir
from embed_assets.core.index import IndexBuildError, load_index
from embed_assets.core.items import ItemsError, load_partitions
from embed_assets.core.layout import Layout
from embed_assets.core.shards import (
    ShardError,
    ShardManifest,
    cached_sha256,
    load_verified,
    partition_lock,
    read_manifest,
    remove_shard,
    shard_key_of,
    verify_files,
)


def _full_hash(path: Path) -> str:
    # verify hashes every file for real (bit rot keeps the stat), and leaves the result for the catalog sync
    return cached_sha256(path, refresh=True)


def _valid_partitions(layout: Layout) -> set[str] | None:
    try:
        return {rg["partition"] for rg in load_partitions(layout)}
    except ItemsError:
        return None


def _inspect(layout: Layout, key: str, files: list[Path], valid: set[str] | None, full: bool = True
             ) -> tuple[ShardManifest | None, list[str], list[Path], bool]:
    """(manifest, problems with it, files no manifest vouches for, remove the whole shard?) for one partition.
    `full` hashes every file; otherwise a file whose stat is unchanged since it was hashed is not hashed again."""
    try:
        m = read_manifest(layout, key)
    except ShardError as e:
        return None, [str(e)], [], True
    if m is None:
        orphans = [f for f in files if f.exists() and not f.name.endswith(".manifest.json")]
        return None, [], orphans, False
    bad = verify_files(layout, m, _full_hash if full else cached_sha256)
    if valid is not None and key not in valid:
        bad.append("partition no longer exists in processed_items")
    named = {m.shard_file, m.items_file, layout.shard_manifest(key).name}
    orphans = [f for f in files if f.exists() and f.name not in named]
    return m, bad, orphans, bool(bad)


def verify(layout: Layout, repair: bool = False, check_index: bool = True,
           catalog_timeout_s: float = 30.0, full: bool = True) -> dict[str, Any]:
    """What is wrong with HOME, and with `repair` what was fixed. `full` (what `embed-assets verify` runs) hashes every
    shard file and the live index; `full=False` (the repair at the start of every `embed-assets run`) trusts a digest
    remembered for an unchanged stat (`cached_sha256`), so it costs O(files changed since), not O(catalog bytes):
    the leftovers of an interrupted run are new files or changed stats, and bit rot is the full check's job."""
    problems: list[str] = []
    fixed: list[str] = []
    notes: list[str] = []
    live: list[str] = []

    for folder in (layout.processed_dir, layout.embeddings_dir, layout.previous_dir, layout.index_dir,
                   layout.reports_dir, catalog.reader_dir(layout), catalog.items_export_dir(layout)):
        for tmp in sorted(folder.glob(".*.tmp")) if folder.exists() else []:
            if not abandoned_temp_file(tmp):
                continue  # a live writer's file: not ours to judge
            if repair:
                tmp.unlink(missing_ok=True)
                fixed.append(f"removed leftover temp file {tmp.relative_to(layout.home)}")
            else:
                problems.append(f"leftover temp file {tmp.relative_to(layout.home)} (from an interrupted write)")

    # Scratch folders of an interrupted processed_items (spill files of a killed ingest) or index build: never read,
    # only swept.
    scratch = sorted(layout.processed_dir.glob(".ingest-*")) if layout.processed_dir.exists() else []
    scratch += sorted(layout.index_root.glob(".build-*")) if layout.index_root.exists() else []
    for work in scratch:
        if not work.is_dir() or not abandoned_work_dir(work):
            continue
        if repair:
            shutil.rmtree(work, ignore_errors=True)
            fixed.append(f"removed leftover scratch folder {work.relative_to(layout.home)}")
        else:
            problems.append(f"leftover scratch folder {work.relative_to(layout.home)} (from an interrupted "
                            "run); `embed-assets verify --repair` removes it")

    by_key: dict[str, list[Path]] = {}
    for f in sorted(layout.embeddings_dir.glob("shard_*")) if layout.embeddings_dir.exists() else []:
        key = shard_key_of(f.name)
        if key is None:  # no writer ever writes such a name
            if repair:
                f.unlink(missing_ok=True)
                fixed.append(f"removed orphan {f.name} (not a shard file name)")
            else:
                problems.append(f"orphan {f.name}: not a shard file name")
            continue
        by_key.setdefault(key, []).append(f)

    valid = _valid_partitions(layout)
    trusted: dict[str, ShardManifest] = {}
    for key, files in sorted(by_key.items()):
        m, bad, orphans, drop = _inspect(layout, key, files, valid, full)
        if not bad and not orphans:
            if m is not None:
                trusted[key] = m
            continue
        # Something looks wrong: judge again under the partition's lock, against what is on disk now.
        with partition_lock(layout, key, blocking=False) as mine:
            if not mine:
                live.append(key)
                notes.append(f"shard {key} is being written right now; left to its writer")
                continue
            m, bad, orphans, drop = _inspect(layout, key, files, _valid_partitions(layout), full)
            if m is not None and not bad:
                trusted[key] = m  # the writer finished in between: its shard is good
            msg = f"shard {key}: {'; '.join(bad)}"
            if drop:
                if repair:
                    # a vanished partition's trusted shard stays in previous/, for items that moved elsewhere
                    remove_shard(layout, key, keep=True)
                    fixed.append(f"{msg} -> removed; the next run re-encodes {key}")
                else:
                    problems.append(msg)
            for f in orphans:
                if repair:
                    f.unlink(missing_ok=True)
                    fixed.append(f"removed orphan {f.name} (no manifest vouches for it)")
                else:
                    problems.append(f"orphan {f.name}: no manifest vouches for it")

    catalog_checked = None
    if layout.catalog_db.exists() or trusted:
        try:
            if repair:
                sync = catalog.sync(layout, valid_partitions=valid, timeout_s=catalog_timeout_s)
                for k in ("added", "refreshed", "removed"):
                    if sync[k]:
                        fixed.append(f"catalog: {k} {', '.join(sync[k])}")
            with catalog.connect(layout.catalog_db, read_only=True, timeout_s=catalog_timeout_s) as con:
                rows = dict(con.execute("SELECT partition, sha256 FROM shards").fetchall())
                counts = dict(con.execute("SELECT partition, count(*) FROM items GROUP BY partition").fetchall())
                copy = catalog.published(layout)  # read while writers are held off: both are one moment's
            catalog_checked = True
        except catalog.CatalogLocked as e:
            catalog_checked = False
            notes.append(f"catalog busy, not checked (the next sync catches up): {e}")
        if catalog_checked:
            for key, m in trusted.items():
                if rows.get(key) != m.shard_sha256:
                    problems.append(f"catalog: shard {key} missing or out of date")
                elif counts.get(key, 0) != m.n_rows:
                    problems.append(f"catalog: {counts.get(key, 0)} item rows for {key}, shard has {m.n_rows}")
            for key in sorted(set(rows) - set(trusted) - set(live)):
                problems.append(f"catalog lists shard {key}, which is not a trusted shard on disk")
            if copy is not None and {k: v[0] for k, v in copy.items()} != rows:
                problems.append(f"the readers' copy ({catalog.reader_dir(layout).relative_to(layout.home)}/) "
                                "differs from the catalog; `verify --repair` republishes it")

    index_ok = None
    if check_index and layout.index_manifest.exists():
        try:
            _, ids, manifest = load_index(layout, rehash=full)  # the full check hashes it, remembered or not
            shard_ids = {i for m in trusted.values() for i in load_verified(layout, m)[0]}
            index_ok = set(ids) == shard_ids and len(ids) == len(set(ids))
            if not index_ok:
                problems.append(f"index holds {len(ids)} ids, current shards {len(shard_ids)}: "
                                "re-materialize faiss_index")
        except (IndexBuildError, ShardError) as e:
            problems.append(str(e))
            index_ok = False
    return {"ok": not problems, "problems": problems, "fixed": fixed, "notes": notes, "live": sorted(live),
            "n_trusted_shards": len(trusted), "index_consistent": index_ok, "catalog_checked": catalog_checked}


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{'ok' if r['ok'] else 'PROBLEMS'}: {r['n_trusted_shards']} trusted shards, "
             f"index consistent: {r['index_consistent']}"]
    lines += [f"  fixed: {f}" for f in r["fixed"]]
    lines += [f"  note: {n}" for n in r.get("notes", [])]
    lines += [f"  problem: {p}" for p in r["problems"]]
    return "\n".join(lines)

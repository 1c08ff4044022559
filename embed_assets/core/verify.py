"""Verify (and optionally repair) HOME: shard files against their manifests, orphans, leftover temp files, the
catalog against the trusted shards, and the index against the catalog. Says what it found and what it fixed."""

from __future__ import annotations

from typing import Any

from embed_assets.core import catalog
from embed_assets.core.index import IndexBuildError, load_index
from embed_assets.core.items import ItemsError, load_row_groups
from embed_assets.core.layout import Layout
from embed_assets.core.atomic import abandoned_temp_file
from embed_assets.core.shards import list_manifests, load_verified, partition_lock, remove_shard, verify_files


def verify(layout: Layout, repair: bool = False, check_index: bool = True) -> dict[str, Any]:
    problems: list[str] = []
    fixed: list[str] = []

    for folder in (layout.processed_dir, layout.embeddings_dir, layout.previous_dir, layout.index_dir,
                   layout.reports_dir):
        for tmp in sorted(folder.glob(".*.tmp")) if folder.exists() else []:
            if not abandoned_temp_file(tmp):
                continue  # a live writer's file: not ours to judge
            if repair:
                tmp.unlink(missing_ok=True)
                fixed.append(f"removed leftover temp file {tmp.relative_to(layout.home)}")
            else:
                problems.append(f"leftover temp file {tmp.relative_to(layout.home)} (from an interrupted write)")

    try:
        valid = {rg["partition"] for rg in load_row_groups(layout)}
    except ItemsError:
        valid = None
    manifests = {m.partition: m for m in list_manifests(layout)}
    trusted = {}
    for key, m in sorted(manifests.items()):
        bad = verify_files(layout, m)
        if valid is not None and key not in valid:
            bad.append("partition no longer exists in processed_items")
        if bad:
            msg = f"shard {key}: {'; '.join(bad)}"
            if not repair:
                problems.append(msg)
                continue
            with partition_lock(layout, key, blocking=False) as mine:
                if not mine:
                    continue  # being written right now; its writer finishes it
                if (valid is not None and key not in valid) or verify_files(layout, m):
                    remove_shard(layout, key, keep=False)
                    fixed.append(f"{msg} -> removed; the next run re-encodes {key}")
        else:
            trusted[key] = m

    named = {n for m in manifests.values() for n in (m.shard_file, m.items_file)}
    for f in sorted(layout.embeddings_dir.glob("shard_*")) if layout.embeddings_dir.exists() else []:
        if f.name.endswith(".manifest.json") or f.name in named:
            continue
        if repair:
            f.unlink(missing_ok=True)
            fixed.append(f"removed orphan {f.name} (no manifest vouches for it)")
        else:
            problems.append(f"orphan {f.name}: no manifest vouches for it")

    if layout.catalog_db.exists() or trusted:
        if repair:
            sync = catalog.sync(layout, valid_partitions=set(trusted))
            for k in ("added", "refreshed", "removed"):
                if sync[k]:
                    fixed.append(f"catalog: {k} {', '.join(sync[k])}")
        rows = dict(catalog.query(layout, "SELECT partition, sha256 FROM shards"))
        counts = dict(catalog.query(layout, "SELECT partition, count(*) FROM items GROUP BY partition"))
        for key, m in trusted.items():
            if rows.get(key) != m.shard_sha256:
                problems.append(f"catalog: shard {key} missing or out of date")
            elif counts.get(key, 0) != m.n_rows:
                problems.append(f"catalog: {counts.get(key, 0)} item rows for {key}, shard has {m.n_rows}")
        for key in sorted(set(rows) - set(trusted)):
            problems.append(f"catalog lists shard {key}, which is not a trusted shard on disk")

    index_ok = None
    if check_index and layout.index_manifest.exists():
        try:
            _, ids, manifest = load_index(layout)
            shard_ids = {i for m in trusted.values() for i in load_verified(layout, m)[0]}
            index_ok = set(ids) == shard_ids and len(ids) == len(set(ids))
            if not index_ok:
                problems.append(f"index holds {len(ids)} ids, current shards {len(shard_ids)}: "
                                "re-materialize faiss_index")
        except IndexBuildError as e:
            problems.append(str(e))
            index_ok = False
    return {"ok": not problems, "problems": problems, "fixed": fixed, "n_trusted_shards": len(trusted),
            "index_consistent": index_ok}


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{'ok' if r['ok'] else 'PROBLEMS'}: {r['n_trusted_shards']} trusted shards, "
             f"index consistent: {r['index_consistent']}"]
    lines += [f"  fixed: {f}" for f in r["fixed"]]
    lines += [f"  problem: {p}" for p in r["problems"]]
    return "\n".join(lines)

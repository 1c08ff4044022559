import hashlib

import dagster as dg

from embed_assets.core import catalog
from embed_assets.core.items import ItemsError, process_items
from embed_assets.core.shards import list_manifests, partition_lock, remove_shard
from embed_assets.core.metering import metered
from embed_assets.defs import OWNERS
from embed_assets.defs.embeddings.partitions import PARTITION_KEYS_HELP, item_partitions
from embed_assets.defs.metadata import md_table, summary_table
from embed_assets.resources import HomeResource, ItemSource

# code_version: bump when the asset's logic changes what it writes (not for a refactor); the UI then shows it
# and everything downstream as stale ("code version changed"). See README, *The UI*.
PROCESSED_ITEMS_CODE_VERSION = "1"


@dg.asset(group_name="items", kinds={"python", "duckdb", "parquet"}, owners=OWNERS,
          code_version=PROCESSED_ITEMS_CODE_VERSION,
          metadata={"files": "HOME/processed/partitions/<partition>.parquet, HOME/processed/partitions.json, "
                             "HOME/reports/rejects.jsonl",
                    "partition_keys": dg.MetadataValue.md(PARTITION_KEYS_HELP)})
def processed_items(context: dg.AssetExecutionContext, home: HomeResource, items: ItemSource) -> dg.MaterializeResult:
    """The item catalog, cleaned and de-duplicated: one row per item id with its text, title and text hash, in one
    Parquet file per stable partition (a hash prefix of the item id), each one partition of item_embeddings. Read in
    bounded memory; only partitions whose content changed are rewritten."""
    layout = home.layout
    with metered() as usage:
        try:
            result = process_items(layout, items.paths, items.id_field, items.text_fields, items.partition_size,
                                   items.limits, items.title_field, items.memory_budget_mb, log=context.log.info)
        except ItemsError as e:
            raise dg.Failure(description=str(e)) from e
        parts = result.partitions

        # Keep the dynamic partitions equal to the partitions: add new ones, drop (and clean up) vanished ones.
        keys = [p["partition"] for p in parts]
        known = set(context.instance.get_dynamic_partitions(item_partitions.name))
        new = [k for k in keys if k not in known]
        if new:
            context.instance.add_dynamic_partitions(item_partitions.name, new)
        stale = sorted((known | {m.partition for m in list_manifests(layout)}) - set(keys))
        for k in stale:
            if k in known:
                context.instance.delete_dynamic_partition(item_partitions.name, k)
            with partition_lock(layout, k):
                remove_shard(layout, k)  # kept in previous/: a split's children re-use their parent's vectors
        # The manifests on disk are the truth and any later sync catches the catalog up: a busy catalog never fails
        # this.
        try:
            synced = catalog.sync(layout, valid_partitions=set(keys))
            deferred = False
        except catalog.CatalogLocked as e:
            context.log.warning(f"catalog busy, sync deferred to the next one (index build, CLI): {e}")
            synced, deferred = {"removed": []}, True

    counts = result.reject_counts
    if result.n_rejected:
        context.log.warning(f"{result.n_rejected:,} rows rejected ({counts}); details in {layout.rejects_jsonl}")
    context.log.info(f"{result.n_items:,} items in {len(parts)} partitions: {result.n_partitions_written} written, "
                     f"{result.n_partitions_skipped} unchanged; {usage.seconds:.1f} s, peak RSS {usage.peak_rss_mb:,.0f} MB")
    return dg.MaterializeResult(
        metadata={
            "n_items": result.n_items,
            "n_rows_read": result.n_rows_read,
            "n_rejected": result.n_rejected,
            "n_duplicates": result.n_duplicates,
            "n_truncated_texts": result.n_truncated,
            "n_partitions": len(parts),
            "n_partitions_written": result.n_partitions_written,
            "n_partitions_skipped": result.n_partitions_skipped,
            "partition_size": items.partition_size,
            "rows_per_s": round(result.n_rows_read / max(result.seconds_read, 1e-9), 1),
            "seconds_read": round(result.seconds_read, 3),
            "seconds_partition": round(result.seconds_partition, 3),
            **usage.as_metadata(),
            "partitions_added": ", ".join(new) or "none",
            "partitions_removed": ", ".join(stale) or "none",
            "partitions_split": ", ".join(f"{p} -> {'+'.join(k)}" for p, k in result.splits) or "none",
            "catalog_removed": ", ".join(synced["removed"]) or ("deferred" if deferred else "none"),
            "catalog_deferred": deferred,
            "path": dg.MetadataValue.path(str(layout.partitions_dir)),
            "rejects_path": dg.MetadataValue.path(str(layout.rejects_jsonl)),
            "rejects_by_reason": md_table(["reason", "rows"], sorted(counts.items())),
            "partitions": md_table(["partition", "rows", "fingerprint", "written"],
                                   [(p["partition"], p["n_rows"], p["fingerprint"], p["partition"] in result.written)
                                    for p in parts[:100]]),
            "files": md_table(["file"], [(f,) for f in result.files[:50]]),
            "summary": summary_table({
                "items": result.n_items, "rows read": result.n_rows_read, "rejected": result.n_rejected,
                "duplicates": result.n_duplicates, "partitions": len(parts),
                "partitions written": result.n_partitions_written, "partitions unchanged": result.n_partitions_skipped,
                "rows/s (reading)": result.n_rows_read / max(result.seconds_read, 1e-9),
                "seconds": usage.seconds, "peak RSS MB": usage.peak_rss_mb}),
        },
        data_version=dg.DataVersion(
            hashlib.sha256(":".join(p["fingerprint"] for p in parts).encode()).hexdigest()[:32]),
    )

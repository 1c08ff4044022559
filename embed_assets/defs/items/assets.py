import hashlib
import time

import dagster as dg

from embed_assets.core import catalog
from embed_assets.core.items import ItemsError, process_items
from embed_assets.core.shards import list_manifests, partition_lock, remove_shard
from embed_assets.defs.embeddings.partitions import row_group_partitions
from embed_assets.defs.metadata import md_table
from embed_assets.resources import HomeResource, ItemSource


@dg.asset(group_name="items", kinds={"parquet"})
def processed_items(context: dg.AssetExecutionContext, home: HomeResource, items: ItemSource) -> dg.MaterializeResult:
    """The item catalog, cleaned and de-duplicated: one row per item id with its text, title and text hash, in
    Parquet row groups of a fixed size, each row group one partition of item_embeddings."""
    layout = home.layout
    t0 = time.perf_counter()
    try:
        result, row_groups = process_items(layout, items.paths, items.id_field, items.text_fields,
                                           items.row_group_size, items.limits, items.title_field)
    except ItemsError as e:
        raise dg.Failure(description=str(e)) from e

    # Keep the dynamic partitions equal to the row groups: add new ones, drop (and clean up) vanished ones.
    keys = [rg["partition"] for rg in row_groups]
    known = set(context.instance.get_dynamic_partitions(row_group_partitions.name))
    new = [k for k in keys if k not in known]
    if new:
        context.instance.add_dynamic_partitions(row_group_partitions.name, new)
    stale = sorted((known | {m.partition for m in list_manifests(layout)}) - set(keys))
    for k in stale:
        if k in known:
            context.instance.delete_dynamic_partition(row_group_partitions.name, k)
        with partition_lock(layout, k):
            remove_shard(layout, k)
    # The manifests on disk are the truth and any later sync catches the catalog up: a busy catalog never fails this.
    try:
        synced = catalog.sync(layout, valid_partitions=set(keys))
        deferred = False
    except catalog.CatalogLocked as e:
        context.log.warning(f"catalog busy, sync deferred to the next one (index build, CLI): {e}")
        synced, deferred = {"removed": []}, True

    counts = result.reject_counts
    if result.rejects:
        context.log.warning(f"{len(result.rejects):,} rows rejected ({counts}); details in {layout.rejects_jsonl}")
    return dg.MaterializeResult(
        metadata={
            "n_items": len(result.items),
            "n_rows_read": result.n_rows_read,
            "n_rejected": len(result.rejects),
            "n_duplicates": result.n_duplicates,
            "n_truncated_texts": result.n_truncated,
            "n_row_groups": len(row_groups),
            "row_group_size": items.row_group_size,
            "partitions_added": ", ".join(new) or "none",
            "partitions_removed": ", ".join(stale) or "none",
            "catalog_removed": ", ".join(synced["removed"]) or ("deferred" if deferred else "none"),
            "catalog_deferred": deferred,
            "seconds": round(time.perf_counter() - t0, 3),
            "path": dg.MetadataValue.path(str(layout.items_parquet)),
            "rejects_path": dg.MetadataValue.path(str(layout.rejects_jsonl)),
            "rejects_by_reason": md_table(["reason", "rows"], sorted(counts.items())) if counts else "none",
            "row_groups": md_table(["partition", "rows", "fingerprint"],
                                   [(rg["partition"], rg["n_rows"], rg["fingerprint"]) for rg in row_groups[:50]]),
            "files": md_table(["file"], [(f,) for f in result.files[:50]]),
        },
        data_version=dg.DataVersion(
            hashlib.sha256(":".join(rg["fingerprint"] for rg in row_groups).encode()).hexdigest()[:32]),
    )

import json
import warnings

import dagster as dg

from embed_assets.core.items import ItemsError, load_partitions, read_partition
from embed_assets.core.shards import (ShardError, items_mismatch, load_verified, load_verified_items, read_manifest,
                                      validate_shard)
from embed_assets.defs.embeddings.assets import embedding_norms, item_embeddings
from embed_assets.defs.embeddings.partitions import item_partitions
from embed_assets.resources import HomeResource, QualityThresholds


# Partitioned asset checks are a preview feature of dagster 1.13 (hence the pin); we rely on it knowingly.
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*", category=dg.PreviewWarning)


@dg.asset_check(asset=item_embeddings, partitions_def=item_partitions, blocking=True)
def shard_norm_check(context: dg.AssetCheckExecutionContext, home: HomeResource,
                     thresholds: QualityThresholds) -> dg.AssetCheckResult:
    """Every vector of the shard has unit norm (within the tolerance, 5e-3 by default), 384 finite dims, ids are
    unique, and the shard holds exactly the partition's items: the same ids in the same order, each with the text hash
    of the text it was encoded from (so an edited item whose shard was not rewritten fails). Blocking: a failing shard never reaches the index."""
    layout = home.layout
    key = context.partition_key
    try:
        m = read_manifest(layout, key)
        if m is None:
            raise ShardError(f"partition {key} has no shard manifest; re-materialize it")
        ids, emb = load_verified(layout, m)
        if key not in {p["partition"] for p in load_partitions(layout)}:
            raise ShardError(f"partition {key} is not a partition of processed_items any more")
        group = read_partition(layout, key, ("item_id", "text_hash"))
        sidecar = load_verified_items(layout, m)
    except (ShardError, ItemsError) as e:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                   metadata={"problems": str(e)})
    group_ids = group.column("item_id").to_pylist()
    expected = len(group_ids)
    problems, stats = validate_shard(ids, emb, expected, m.dim, thresholds.norm_tolerance)
    problems += items_mismatch(group_ids, group.column("text_hash").to_pylist(), ids,
                               sidecar.column("item_id").to_pylist(), sidecar.column("text_hash").to_pylist())
    if problems:
        context.log.error(f"{key}: " + "; ".join(problems))
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"problems": "; ".join(problems) or "none", "rows": len(ids), "expected_rows": expected,
                  "tolerance": thresholds.norm_tolerance,
                  **{f"norm_{k}": float(v) for k, v in stats.items()}},
    )


@dg.asset_check(asset=embedding_norms, blocking=True)
def all_norms_within_tolerance(home: HomeResource) -> dg.AssetCheckResult:
    """No vector in any shard is outside the norm tolerance. Blocking: the index is built only over unit vectors."""
    summary = json.loads(home.layout.norms_json.read_text("utf-8"))
    o = summary["overall"]
    bad = [s["partition"] for s in summary["shards"] if s["frac_outside_tol"] > 0]
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={"frac_outside_tol": o["frac_outside_tol"], "failing_partitions": ", ".join(bad) or "none"},
    )

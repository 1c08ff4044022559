import dagster as dg

from embed_assets.core.index import IndexBuildError, build_from_shards
from embed_assets.core.items import ItemsError, load_partitions
from embed_assets.core.metering import metered
from embed_assets.core.shards import ShardError
from embed_assets.defs import OWNERS
from embed_assets.defs.embeddings.assets import embedding_norms, item_embeddings
from embed_assets.defs.metadata import as_float, summary_table
from embed_assets.resources import EncoderResource, EvalSettings, HomeResource, QualityThresholds


# code_version: bump when the asset's logic changes what it writes (not for a refactor); the UI then shows it
# and everything downstream as stale ("code version changed"). See README, *The UI*.
FAISS_INDEX_CODE_VERSION = "1"


@dg.asset(deps=[item_embeddings, embedding_norms], group_name="index", kinds={"faiss", "parquet", "duckdb"},
          owners=OWNERS, code_version=FAISS_INDEX_CODE_VERSION,
          metadata={"files": "HOME/index/<version>/ (items.faiss, items.ids.parquet, manifest.json), "
                             "HOME/index/current"})
def faiss_index(context: dg.AssetExecutionContext, home: HomeResource, retrieval: EvalSettings,
                thresholds: QualityThresholds, encoder: EncoderResource) -> dg.MaterializeResult:
    """A FAISS inner-product index over every current, checked shard, with its id map. `auto` (default): exact
    (flat) up to 250,000 items; above, IVF trained on a sample, its nprobe raised on held-out queries until ANN
    recall@10 meets min_ann_recall_at_10; choice, params, recall, QPS and the curve are recorded. Updated in place
    when few partitions changed; an IVF whose partitions mostly changed is refilled with its trained centroids, and
    retrains only when the drift test says so. Each build is a new version;
    `current` moves only after the recall check and the shadow comparison pass. At 10M items a flat index is
    14,648 MB (benchmarks/results/scale_1m_10m.txt); IVF-Flat keeps the bytes and scans nprobe of its lists."""
    layout = home.layout
    from embed_assets.core.index_tune import held_out_queries

    cfg = retrieval.tune_config(thresholds.min_ann_recall_at_10)
    with metered() as usage:
        try:
            manifest = build_from_shards(
                layout, load_partitions(layout), retrieval.index_kind, thresholds.norm_tolerance, tune_config=cfg,
                queries=lambda: held_out_queries(layout, encoder.encoder, cfg.n_queries, retrieval.queries_path),
                promotion=retrieval.promotion_config())
        except (IndexBuildError, ItemsError, ShardError) as e:
            raise dg.Failure(description=str(e)) from e
    how = manifest["update"]
    sync = manifest["catalog_sync"]
    sh = manifest.get("shadow") or {}
    compared = bool(sh.get("compared")) and sh.get("recall_delta") is not None
    context.log.info(f"indexed {manifest['n_items']:,} items from {len(manifest['partitions'])} shards "
                     f"in {manifest['build_seconds']:.2f} s ({how['mode']}: +{how['n_vectors_added']:,} "
                     f"-{how['n_vectors_removed']:,} vectors); catalog sync {sync or 'deferred'}")
    if manifest.get("catalog_deferred"):
        # The index never needs the catalog; the next sync (a run, `embed-assets verify --repair`) catches it up.
        context.log.warning(f"catalog sync deferred: {manifest['catalog_deferred_reason']}")
    return dg.MaterializeResult(
        metadata={
            "index_type": manifest["faiss_type"],
            "kind": manifest["kind"],
            "n_items": manifest["n_items"],
            "n_shards": len(manifest["partitions"]),
            "build_seconds": round(manifest["build_seconds"], 3),
            "bytes": manifest["index_bytes"],
            "update_mode": how["mode"],  # rebuild, refill (IVF, no retraining), in_place or unchanged
            "n_partitions_written": how["n_partitions_added"],
            "n_vectors_added": how["n_vectors_added"],
            "n_vectors_removed": how["n_vectors_removed"],
            **usage.as_metadata(),
            "catalog_deferred": bool(manifest.get("catalog_deferred")),
            "model_id": manifest["version"].get("model_id", ""),
            "model_revision": manifest["version"].get("model_revision", ""),
            "path": dg.MetadataValue.path(str(layout.index_file)),
            "index_version": manifest.get("version_name", ""),
            "structure": manifest["structure"]["factory"],
            # NaN when there was no live version to compare with (the first build): always present, always a float
            **{f"shadow_{k}": as_float(sh.get(k) if compared else None)
               for k in ("overlap_at_10", "recall_delta", "p50_delta_ms")},
            "structure_why": manifest["structure"]["why"],
            **({"tuned_param": f"{t['param']}={t['value']}", "tuned_recall_at_10": float(t["recall"]),
                "tuned_qps": float(t["qps"]), "tuned_meets_target": bool(t["met"])}
               if (t := manifest.get("tuning")) else {}),
            "summary": summary_table({
                "items": manifest["n_items"], "shards": len(manifest["partitions"]),
                "structure": manifest["structure"]["factory"], "index bytes": manifest["index_bytes"],
                "update": how["mode"], "vectors added": how["n_vectors_added"],
                "vectors removed": how["n_vectors_removed"], "build seconds": manifest["build_seconds"],
                "version": manifest.get("version_name", ""),
                "shadow overlap@10": sh.get("overlap_at_10") if compared else None,
                "shadow recall delta": sh.get("recall_delta") if compared else None}),
        },
        data_version=dg.DataVersion(manifest["index_sha256"][:32]),
    )

import dagster as dg

from embed_assets.core.index import IndexBuildError, build_from_shards
from embed_assets.core.items import ItemsError, load_partitions
from embed_assets.core.metering import metered
from embed_assets.core.shards import ShardError
from embed_assets.defs.embeddings.assets import embedding_norms, item_embeddings
from embed_assets.resources import EvalSettings, HomeResource, QualityThresholds


@dg.asset(deps=[item_embeddings, embedding_norms], group_name="index", kinds={"faiss"})
def faiss_index(context: dg.AssetExecutionContext, home: HomeResource, retrieval: EvalSettings,
                thresholds: QualityThresholds) -> dg.MaterializeResult:
    """A FAISS inner-product index over every current, checked shard (exact by default), with its id map."""
    layout = home.layout
    with metered() as usage:
        try:
            manifest = build_from_shards(layout, load_partitions(layout), retrieval.index_kind,
                                         thresholds.norm_tolerance)
        except (IndexBuildError, ItemsError, ShardError) as e:
            raise dg.Failure(description=str(e)) from e
    how = manifest["update"]
    sync = manifest["catalog_sync"]
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
            "update_mode": how["mode"],  # rebuild, in_place or unchanged
            "n_partitions_written": how["n_partitions_added"],
            "n_vectors_added": how["n_vectors_added"],
            "n_vectors_removed": how["n_vectors_removed"],
            **usage.as_metadata(),
            "catalog_deferred": bool(manifest.get("catalog_deferred")),
            "model_id": manifest["version"].get("model_id", ""),
            "model_revision": manifest["version"].get("model_revision", ""),
            "path": dg.MetadataValue.path(str(layout.index_file)),
            "past_1m_items": "switch kind to an IVF-PQ (e.g. IVF4096,PQ48) or HNSW index and watch ann_recall_at_10",
        },
        data_version=dg.DataVersion(manifest["index_sha256"][:32]),
    )

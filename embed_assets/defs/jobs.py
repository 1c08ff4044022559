import dagster as dg

from embed_assets.defs.embeddings.assets import embedding_norms, item_embeddings
from embed_assets.defs.embeddings.partitions import item_partitions
from embed_assets.defs.evaluation.assets import retrieval_report
from embed_assets.defs.index.assets import faiss_index
from embed_assets.defs.items.assets import processed_items
from embed_assets.defs.semantic_ids.assets import semantic_ids

# The graph in three steps, because a run covers one partition of item_embeddings at most:
# items (adds the partitions) -> one run per row group -> norms, index, report and semantic IDs over all shards.
process_items_job = dg.define_asset_job(
    "process_items_job", selection=dg.AssetSelection.assets(processed_items),
    description="Step 1 of 3: read the raw items into processed_items, and add or remove the item_embeddings "
                "partitions to match.")
embed_shards_job = dg.define_asset_job(
    "embed_shards_job", selection=dg.AssetSelection.assets(item_embeddings), partitions_def=item_partitions,
    description="Step 2 of 3: encode one partition into its shard (and check it). Launch it per partition, or backfill "
                "every partition at once: one run each.")
index_and_report_job = dg.define_asset_job(
    "index_and_report_job",
    selection=dg.AssetSelection.assets(embedding_norms, faiss_index, retrieval_report, semantic_ids),
    description="Step 3 of 3: norms, the FAISS index, the retrieval report and semantic IDs over all current shards.")

JOBS = [process_items_job, embed_shards_job, index_and_report_job]

# What each job materializes, for runs whose own asset selection is empty (a job launched whole, e.g. by the
# sensor): the sensor tells what an active run is busy with by its assets, not by its job's name.
JOB_ASSETS: dict[str, frozenset[dg.AssetKey]] = {
    process_items_job.name: frozenset({processed_items.key}),
    embed_shards_job.name: frozenset({item_embeddings.key}),
    index_and_report_job.name: frozenset({embedding_norms.key, faiss_index.key, retrieval_report.key,
                                          semantic_ids.key}),
}

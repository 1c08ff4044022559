import warnings

import dagster as dg

from embed_assets.core.items import ItemsError, load_partitions
from embed_assets.core.embed import embed_partition
from embed_assets.core.atomic import atomic_write_json
from embed_assets.core.faults import pause_point
from embed_assets.core.metering import metered
from embed_assets.core.shards import ShardError, norm_error_max, norm_error_quantile, summarize_norms
from embed_assets.defs import OWNERS
from embed_assets.defs.embeddings.partitions import PARTITION_KEYS_HELP, item_partitions
from embed_assets.defs.embeddings.pipes import encode_externally
from embed_assets.defs.items.assets import processed_items
from embed_assets.defs.metadata import as_float, md_table, norms_metadata, shard_metadata, summary_table
from embed_assets.resources import EncodeCompute, EncoderResource, HomeResource, QualityThresholds

# code_version: bump when the asset's logic changes what it writes (not for a refactor); the UI then shows it
# and everything downstream as stale ("code version changed"). See README, *The UI*.
ITEM_EMBEDDINGS_CODE_VERSION = "1"
EMBEDDING_NORMS_CODE_VERSION = "1"
# The concurrency pool of the encoder: item_embeddings steps across all runs share its slots (the instance sets the
# limit, `concurrency: pools:` in dagster.yaml), so a backfill of many partitions never runs more model copies than
# the machine holds.
ENCODER_POOL = "encoder"
# backfill_policy is a beta parameter of dagster 1.13 (hence the pin); we rely on it knowingly, and the warning would
# otherwise print on every load of the code location (`dagster dev`, each run).
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)


@dg.asset(
    partitions_def=item_partitions,
    deps=[processed_items],
    group_name="embeddings",
    kinds={"pytorch", "parquet", "duckdb"},
    owners=OWNERS,
    code_version=ITEM_EMBEDDINGS_CODE_VERSION,
    pool=ENCODER_POOL,
    metadata={"files": "HOME/embeddings/shard_<partition>.pt (+ .items.parquet, .manifest.json)",
              "partition_keys": dg.MetadataValue.md(PARTITION_KEYS_HELP)},
    # A row group (200,000 rows by default) is tens of minutes of encoding: one run per partition keeps a
    # failed partition retryable alone and lets backfill runs go in parallel.
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=1),
)
def item_embeddings(context: dg.AssetExecutionContext, home: HomeResource, encoder: EncoderResource,
                    encode_compute: EncodeCompute,
                    pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """One shard of unit-length all-MiniLM-L6-v2 vectors (384-d, fp16) per partition of processed items:
    `embeddings/shard_<partition>.pt`, loadable with `torch.load(path, weights_only=True)`."""
    pause_point("embed_start")
    key = context.partition_key
    if encode_compute.checked_runner() != "in_process":  # a subprocess or a K8s GPU pod, through Dagster Pipes
        return encode_externally(context, home, encoder, encode_compute, pipes_subprocess_client)
    with metered() as usage:
        try:
            out = embed_partition(home.layout, key, encoder.encoder, say=context.log.info, reuse=encoder.reuse)
        except (ItemsError, ShardError) as e:
            raise dg.Failure(description=str(e)) from e
    return dg.MaterializeResult(
        metadata=shard_metadata(home.layout, out, usage.as_metadata(), encoder.encoder.precision_probe),
        data_version=dg.DataVersion(out.manifest.fingerprint),
    )


@dg.asset(deps=[item_embeddings], group_name="embeddings", kinds={"numpy", "json"}, owners=OWNERS,
          code_version=EMBEDDING_NORMS_CODE_VERSION, metadata={"files": "HOME/reports/embedding_norms.json"})
def embedding_norms(context: dg.AssetExecutionContext, home: HomeResource,
                    thresholds: QualityThresholds) -> dg.MaterializeResult:
    """Norm statistics over every current shard (mean, std, min, max, fraction outside the tolerance), with one
    row per shard: the seed notebook's sanity cell, kept as a report."""
    layout = home.layout
    with metered() as usage:
        try:
            keys = [p["partition"] for p in load_partitions(layout)]
            summary = summarize_norms(layout, keys, thresholds.norm_tolerance)
        except (ItemsError, ShardError) as e:
            raise dg.Failure(description=str(e)) from e
    atomic_write_json(layout.norms_json, summary)
    o, hist = summary["overall"], summary["histogram"]
    err_max = norm_error_max(o, o["n_vectors"])
    err_p99 = norm_error_quantile(hist, 0.99)
    context.log.info(f"norms over {o['n_vectors']:,} vectors: mean {o['mean']:.6f}, std {o['std']:.2e}, "
                     f"min {o['min']:.6f}, max {o['max']:.6f}, outside ±{o['tolerance']:g}: {o['frac_outside_tol']:.4%}")
    return dg.MaterializeResult(
        metadata={
            "n_vectors": o["n_vectors"],
            "n_shards": len(summary["shards"]),
            **norms_metadata({k: o[k] for k in ("mean", "std", "min", "max", "frac_outside_tol")}),
            "tolerance": o["tolerance"],
            **usage.as_metadata(),
            "shards": md_table(["partition", "rows", "mean", "std", "min", "max", "outside tol"],
                               [(s["partition"], s["rows"], s["mean"], s["std"], s["min"], s["max"],
                                 s["frac_outside_tol"]) for s in summary["shards"][:100]]),
            "path": dg.MetadataValue.path(str(layout.norms_json)),
            "norm_error_max": float(err_max),  # max |norm - 1| over every vector (0.0 with none)
            # the 99th percentile of |norm - 1|, an upper bound within 1.78x (the histogram's bin edge); NaN when
            # no shard recorded a histogram yet
            "norm_error_p99": as_float(err_p99),
            "histogram_n_vectors": int(hist["n_vectors"]),  # vectors the norm histogram covers
            "summary": summary_table({
                "vectors": o["n_vectors"], "shards": len(summary["shards"]), "mean norm": o["mean"],
                "max norm error": err_max, "norm error p99 (upper bound)": err_p99,
                f"outside 1 ± {o['tolerance']:g}": o["frac_outside_tol"],
                "vectors in the histogram": hist["n_vectors"]}),
        }
    )

import dagster as dg

from embed_assets.core import catalog
from embed_assets.core.items import ItemsError, load_partitions, titles_of
from embed_assets.core.metering import metered
from embed_assets.core.semantic_ids import (SemanticIdError, build_semantic_ids, shards_from_layout, sid_root)
from embed_assets.core.shards import ShardError, current_shards
from embed_assets.defs import OWNERS
from embed_assets.defs.embeddings.assets import embedding_norms, item_embeddings
from embed_assets.defs.metadata import md_table, summary_table
from embed_assets.resources import HomeResource, QualityThresholds, SemanticIdSettings

# code_version: bump when the asset's logic changes what it writes (not for a refactor); the UI then shows it
# and everything downstream as stale ("code version changed"). See README, *The UI*.
SEMANTIC_IDS_CODE_VERSION = "1"


class SemanticIdRunConfig(dg.Config):
    """Set `retrain: true` in the launchpad to train new codebooks (a new version with an old -> new ID map)."""

    retrain: bool = False


def sid_metadata(md: dict, levels: int) -> dict[str, dg.MetadataValue]:
    """The build's numbers with types that never change from run to run (lists become one key per level)."""
    out: dict[str, dg.MetadataValue] = {}
    for k in ("action", "reason", "version", "quantizer"):
        out[k] = dg.MetadataValue.text(str(md.get(k) or ""))
    for k in ("n_items", "levels", "codebook_size", "codebook_size_requested", "extra_digit_size",
              "largest_duplicate_group", "max_collision_group", "n_kept", "n_changed_same_id", "n_changed_new_id",
              "n_new", "n_deleted"):
        out[k] = dg.MetadataValue.int(int(md.get(k) or 0))
    for k in ("duplicate_vector_rate", "reconstruction_cosine", "reconstruction_mse", "neighbour_share_first_code",
              "neighbour_share_first_two_codes"):
        if md.get(k) is not None:
            out[k] = dg.MetadataValue.float(float(md[k]))
    for name in ("collision_rate", "codebook_utilization", "perplexity"):
        values = list(md.get(name) or [])
        for level in range(levels):
            if level < len(values) and values[level] is not None:
                out[f"{name}_level_{level + 1}"] = dg.MetadataValue.float(float(values[level]))
    out["unique_full_ids"] = dg.MetadataValue.bool(bool(md.get("unique_full_ids")))
    return out


@dg.asset(deps=[item_embeddings, embedding_norms], group_name="semantic_ids", kinds={"faiss", "parquet", "duckdb"},
          owners=OWNERS, code_version=SEMANTIC_IDS_CODE_VERSION,
          metadata={"files": "HOME/semantic_ids/<version>/, HOME/semantic_ids/current, "
                             "HOME/reports/semantic_ids.md, HOME/reports/semantic_ids.json"})
def semantic_ids(context: dg.AssetExecutionContext, config: SemanticIdRunConfig, home: HomeResource,
                 sids: SemanticIdSettings, thresholds: QualityThresholds) -> dg.MaterializeResult:
    """TIGER-style Semantic IDs for every item: residual-quantization codes of its vector plus a collision digit
    (`<a_7><b_1><c_4><d_0>`), under HOME/semantic_ids/<version> with `current` pointing at the live one.

    Codebooks are trained once on a bounded sample and then frozen: a refresh keeps every unchanged item's ID,
    digit included; retraining (on request, or when new items drift) writes a new version with an old -> new map.
    Also writes the readiness report reports/semantic_ids.{md,json}. Cost at 10M items (RQ-KMeans 3 x 256, 2 cores):
    about 5 minutes and 3.6 GB peak (benchmarks/results/semantic_ids_cost.txt)."""
    layout = home.layout
    cfg = sids.config()
    with metered() as usage:
        try:
            manifests, problems = current_shards(layout, load_partitions(layout), thresholds.norm_tolerance)
            if problems:
                raise SemanticIdError("semantic IDs not built:\n  " + "\n  ".join(problems))
            result = build_semantic_ids(sid_root(layout.home), shards_from_layout(layout, manifests), cfg,
                                        retrain=config.retrain, reports_dir=layout.reports_dir,
                                        titles=lambda ids: titles_of(layout, ids), log=context.log.info,
                                        store=layout.store)
        except (SemanticIdError, ItemsError, ShardError) as e:
            hint = ("; or leave semantic IDs out of runs: `embed-assets run --no-semantic-ids`, "
                    "EMBED_ASSETS_SEMANTIC_IDS=0" if "too small" in str(e) else "")
            raise dg.Failure(description=f"{e}{hint}") from e
    try:
        catalog.publish_semantic_ids(layout)
    except OSError as e:  # the IDs are built; only the catalog's view of them waits for the next run
        context.log.warning(f"catalog view item_semantic_ids not updated: {e}")
    md = result.metadata()
    r = result.report
    context.log.info(f"semantic IDs {result.version}: {result.action}"
                     f"{' (' + result.reason + ')' if result.reason else ''}; {r['n_items']:,} items, "
                     f"K={r['codebook_size']}, largest colliding group {r['max_collision_group']}")
    for line in r.get("recommendations") or []:
        context.log.info(f"recommendation: {line}")
    rows = [(f"level {i + 1}", r["collision_rate"][i], r["codebook_utilization"][i], r["perplexity"][i])
            for i in range(len(r["codebook_utilization"]))]
    return dg.MaterializeResult(
        metadata={
            **sid_metadata(md, cfg.levels),
            **usage.as_metadata(),
            "levels_table": md_table(["level", "collision rate", "codebook utilization", "perplexity"], rows),
            "recommendations": dg.MetadataValue.md("\n".join(f"- {x}" for x in r.get("recommendations") or [])
                                                   or "none"),
            "report": dg.MetadataValue.path(str(layout.reports_dir / "semantic_ids.md")),
            "path": dg.MetadataValue.path(str(result.path)),
            "summary": summary_table({
                "action": result.action, "version": result.version, "items": r["n_items"],
                "codebook size": r["codebook_size"], "largest colliding group": r["max_collision_group"],
                "unique full IDs": bool(md.get("unique_full_ids")),
                "reconstruction cosine": md.get("reconstruction_cosine"),
                "kept / changed (same ID) / changed (new ID) / new / deleted":
                    " / ".join(f"{int(md.get(k) or 0):,}" for k in ("n_kept", "n_changed_same_id", "n_changed_new_id",
                                                                    "n_new", "n_deleted"))}),
        },
        data_version=dg.DataVersion(result.version),
    )

import dagster as dg

from embed_assets.core.index import IndexBuildError
from embed_assets.core.metering import metered
from embed_assets.core.report import evaluate, write_report
from embed_assets.defs import OWNERS
from embed_assets.defs.index.assets import faiss_index
from embed_assets.defs.metadata import md_table
from embed_assets.resources import EncoderResource, EvalSettings, HomeResource

# code_version: bump when the asset's logic changes what it writes (not for a refactor); the UI then shows it
# and everything downstream as stale ("code version changed"). See README, *The UI*.
RETRIEVAL_REPORT_CODE_VERSION = "1"


def _monitoring_metadata(report: dict) -> dict:
    """Coverage, drift, whole-query latency, the TF-IDF baseline and the label-free task as plottable floats (a key
    is present only once its value exists, and then always a float)."""
    cov, drift = report.get("coverage") or {}, report.get("drift") or {}
    qlat, f2i = report.get("query_latency_ms") or {}, report.get("field_to_item") or {}
    pairs = {"vector_coverage": cov.get("vector_coverage"), "drift_mean_cosine": drift.get("mean_cosine"),
             "drift_centroid_shift": drift.get("centroid_shift"), "query_p50_ms": qlat.get("p50"),
             "query_p95_ms": qlat.get("p95"), "query_p99_ms": qlat.get("p99"),
             "tfidf_ndcg_at_10": report.get("tfidf_ndcg_at_10"), "title_to_item_recall_at_10": f2i.get("recall_at_10"),
             "tfidf_title_to_item_recall_at_10": f2i.get("tfidf_recall_at_10")}
    return {k: float(v) for k, v in pairs.items() if v is not None}


@dg.asset(deps=[faiss_index], group_name="evaluation", kinds={"pytorch", "faiss", "markdown"}, owners=OWNERS,
          code_version=RETRIEVAL_REPORT_CODE_VERSION,
          metadata={"files": "HOME/reports/retrieval_eval.md, HOME/reports/retrieval_eval.json"})
def retrieval_report(context: dg.AssetExecutionContext, home: HomeResource, encoder: EncoderResource,
                     retrieval: EvalSettings) -> dg.MaterializeResult:
    """Retrieval quality of the index: nDCG@10, recall@10/100, MRR@10 on labelled queries when configured; ANN
    recall@10 against exact search, query latency and a nearest-neighbour smoke test always. Markdown + JSON."""
    layout = home.layout
    with metered() as usage:
        try:
            report = evaluate(layout, encoder.encoder, retrieval.queries_path, retrieval.qrels_path,
                              retrieval.n_ann_sample, retrieval.n_latency_queries)
        except (IndexBuildError, FileNotFoundError, ValueError) as e:
            raise dg.Failure(description=str(e)) from e
        write_report(layout, report)
    lat = report["latency_ms"]
    keys = ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10", "ann_recall_at_10")
    context.log.info("retrieval: " + ", ".join(f"{k} {report[k]:.5f}" for k in keys if report[k] is not None))
    return dg.MaterializeResult(
        metadata={
            **{k: float(report[k]) for k in keys if report[k] is not None},
            "n_items": report["n_items"],
            "n_queries": report["n_queries"],
            "latency_p50_ms": lat["p50"],
            "latency_p95_ms": lat["p95"],
            "latency_p99_ms": lat["p99"],
            **_monitoring_metadata(report),
            **usage.as_metadata(),
            "metrics": md_table(["metric", "value"], [(k, report[k] if report[k] is not None else "—") for k in keys]),
            "smoke_test": md_table(["item", "nearest neighbours"],
                                   [(s["title"][:60], " · ".join(n["title"][:40] for n in s["neighbours"]))
                                    for s in report["smoke_test"]]),
            "report": dg.MetadataValue.path(str(layout.report_md)),
            "json": dg.MetadataValue.path(str(layout.report_json)),
        }
    )

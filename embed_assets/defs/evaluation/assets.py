import dagster as dg

from embed_assets.core.index import IndexBuildError
from embed_assets.core.metering import metered
from embed_assets.core.report import evaluate, write_report
from embed_assets.defs.index.assets import faiss_index
from embed_assets.defs.metadata import md_table
from embed_assets.resources import EncoderResource, EvalSettings, HomeResource


@dg.asset(deps=[faiss_index], group_name="evaluation", kinds={"markdown"})
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
            **usage.as_metadata(),
            "metrics": md_table(["metric", "value"], [(k, report[k] if report[k] is not None else "—") for k in keys]),
            "smoke_test": md_table(["item", "nearest neighbours"],
                                   [(s["title"][:60], " · ".join(n["title"][:40] for n in s["neighbours"]))
                                    for s in report["smoke_test"]]),
            "report": dg.MetadataValue.path(str(layout.report_md)),
            "json": dg.MetadataValue.path(str(layout.report_json)),
        }
    )

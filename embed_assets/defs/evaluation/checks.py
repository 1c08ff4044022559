import dagster as dg

from embed_assets.core.report import read_report
from embed_assets.defs.evaluation.assets import retrieval_report
from embed_assets.resources import HomeResource, QualityThresholds


def quality_failures(report: dict, t: QualityThresholds) -> list[str]:
    rules = [("ann_recall_at_10", t.min_ann_recall_at_10)]
    if report.get("n_queries"):  # labelled thresholds only apply with labelled queries
        rules += [("ndcg_at_10", t.min_ndcg_at_10), ("recall_at_100", t.min_recall_at_100)]
    return [f"{k} {report[k]:.5f} < {floor}" for k, floor in rules if report.get(k) is None or report[k] < floor]


@dg.asset_check(asset=retrieval_report, blocking=True)
def retrieval_quality_check(home: HomeResource, thresholds: QualityThresholds) -> dg.AssetCheckResult:
    """ANN recall@10 (and, with labelled queries, nDCG@10 and recall@100) are at or above their thresholds."""
    report = read_report(home.layout)
    failures = quality_failures(report, thresholds)
    return dg.AssetCheckResult(
        passed=not failures,
        metadata={"failures": "; ".join(failures) or "none",
                  "ann_recall_at_10": float(report["ann_recall_at_10"]),
                  "min_ann_recall_at_10": thresholds.min_ann_recall_at_10,
                  "min_ndcg_at_10": thresholds.min_ndcg_at_10,
                  "min_recall_at_100": thresholds.min_recall_at_100},
    )

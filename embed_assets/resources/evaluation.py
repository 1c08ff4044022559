from typing import Optional

import dagster as dg

from embed_assets.core.shards import NORM_TOLERANCE


class EvalSettings(dg.ConfigurableResource):
    """Labelled queries for the retrieval report (BEIR queries.jsonl + qrels/*.tsv) and the index kind."""

    queries_path: Optional[str] = None
    qrels_path: Optional[str] = None
    index_kind: str = "auto"  # auto (flat up to flat_max_items, else IVF tuned to the recall target), flat or hnsw
    flat_max_items: int = 250_000
    index_memory_budget_mb: int = 0  # the index's bytes; 0 = none (IVF-Flat); tighter budgets pick SQ8, then PQ
    n_tune_queries: int = 500  # held-out queries the auto index is tuned on (labelled queries, else item titles)
    max_recall_drop: float = 0.02  # a new index version may not lose more ANN recall@10 than this vs the live one
    min_overlap: float = 0.0  # its answers' overlap@10 with the live version's (0: recorded, not enforced)
    keep_index_versions: int = 3
    n_ann_sample: int = 1000
    n_latency_queries: int = 200

    def tune_config(self, recall_target: float):
        from embed_assets.core.index_tune import TuneConfig

        return TuneConfig(recall_target=recall_target, flat_max_items=self.flat_max_items,
                          memory_budget_mb=self.index_memory_budget_mb, n_queries=self.n_tune_queries)

    def promotion_config(self):
        from embed_assets.core.index import PromotionConfig

        return PromotionConfig(max_recall_drop=self.max_recall_drop, min_overlap=self.min_overlap,
                               keep_versions=self.keep_index_versions)


class QualityThresholds(dg.ConfigurableResource):
    """What the blocking checks enforce."""

    norm_tolerance: float = NORM_TOLERANCE
    min_ann_recall_at_10: float = 0.95
    # Only enforced when labelled queries are configured.
    min_ndcg_at_10: float = 0.0
    min_recall_at_100: float = 0.5

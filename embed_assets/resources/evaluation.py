from typing import Optional

import dagster as dg

from embed_assets.core.shards import NORM_TOLERANCE


class EvalSettings(dg.ConfigurableResource):
    """Labelled queries for the retrieval report (BEIR queries.jsonl + qrels/*.tsv) and the index kind."""

    queries_path: Optional[str] = None
    qrels_path: Optional[str] = None
    index_kind: str = "flat"  # flat (exact) or hnsw
    n_ann_sample: int = 1000
    n_latency_queries: int = 200


class QualityThresholds(dg.ConfigurableResource):
    """What the blocking checks enforce."""

    norm_tolerance: float = NORM_TOLERANCE
    min_ann_recall_at_10: float = 0.95
    # Only enforced when labelled queries are configured.
    min_ndcg_at_10: float = 0.0
    min_recall_at_100: float = 0.5

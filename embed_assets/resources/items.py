from typing import List, Optional

import dagster as dg

from embed_assets.core.items import DEFAULT_MEMORY_BUDGET_MB, DEFAULT_PARTITION_ROWS, Limits


class ItemSource(dg.ConfigurableResource):
    """Where the raw items are (files or folders; folders are what the sensor watches) and how to read them."""

    paths: List[str]
    id_field: str = "_id"
    text_fields: List[str] = ["title", "text"]
    title_field: Optional[str] = None
    # Target rows per partition (the seed's batches were 200,000): a partition splits in two past 1.25x this.
    partition_size: int = DEFAULT_PARTITION_ROWS
    # Peak memory of processed_items is bounded by this, not by the catalog (blocks and DuckDB's memory limit).
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB
    max_id_chars: int = Limits.max_id_chars
    max_text_chars: int = Limits.max_text_chars
    max_file_bytes: int = Limits.max_file_bytes
    max_rows_per_file: int = Limits.max_rows_per_file

    @property
    def limits(self) -> Limits:
        return Limits(max_file_bytes=self.max_file_bytes, max_rows_per_file=self.max_rows_per_file,
                      max_id_chars=self.max_id_chars, max_text_chars=self.max_text_chars)

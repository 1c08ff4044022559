"""embed_assets: item catalog -> checked sentence-transformer embeddings -> FAISS index -> retrieval report.

`embed_assets.core` is the Dagster-free engine; `embed_assets.defs` wires it into Dagster assets.
"""

__version__ = "0.1.0"

"""The Dagster layer: one folder per concern (assets, checks, partitions, sensors), thin over embed_assets.core."""

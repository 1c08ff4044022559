"""Dagster-free core: text cleaning, item reading, encoding, shard I/O, catalog, index and metrics."""

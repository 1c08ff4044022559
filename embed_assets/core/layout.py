"""Where everything lives under HOME. One place, so assets, checks, the CLI and tests agree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "EMBED_ASSETS_HOME"


def home_from_env() -> str:
    """HOME as the user set it: $EMBED_ASSETS_HOME, else ./data."""
    return os.environ.get(HOME_ENV, "data")


def check_partition_key(key: str) -> str:
    """A partition key names a hash prefix (`p0110`); it becomes part of file names, so nothing else is accepted."""
    from embed_assets.core.partitioning import is_partition_key

    if not is_partition_key(key):
        raise ValueError(f"not a partition key: {key!r} (expected 'p' and the bits of a hash prefix, e.g. p0110)")
    return key


@dataclass(frozen=True)
class Layout:
    home: Path
    # Where the trusted artifacts are published and fetched from (s3://bucket/prefix, file:///path; core/store.py);
    # None: HOME alone, as before. HOME stays the local working folder either way.
    base_uri: str | None = None

    @classmethod
    def at(cls, home: str | os.PathLike, base_uri: str | None = None) -> "Layout":
        return cls(Path(home).resolve(), base_uri or None)

    @property
    def store(self):
        """The `core.store.Store` of `base_uri` (one per URI in a process), None without one."""
        from embed_assets.core.store import store_for

        return store_for(self.base_uri)

    @property
    def processed_dir(self) -> Path:
        return self.home / "processed"

    @property
    def partitions_dir(self) -> Path:
        """One Parquet file per partition of processed items."""
        return self.processed_dir / "partitions"

    def partition_file(self, key: str) -> Path:
        return self.partitions_dir / f"{check_partition_key(key)}.parquet"

    @property
    def partitions_json(self) -> Path:
        """The partition tree, each partition's fingerprint and file stamp, and the source that was read."""
        return self.processed_dir / "partitions.json"

    @property
    def embeddings_dir(self) -> Path:
        return self.home / "embeddings"

    @property
    def previous_dir(self) -> Path:
        """The generation of each shard before its last rewrite: vectors of items that moved to another row group
        are re-used from here (a split's children read their parent's shard here). Emptied once the index is built over
        current shards."""
        return self.embeddings_dir / "previous"

    def shard_pt(self, key: str) -> Path:
        return self.embeddings_dir / f"shard_{check_partition_key(key)}.pt"

    def shard_items(self, key: str) -> Path:
        return self.embeddings_dir / f"shard_{check_partition_key(key)}.items.parquet"

    def shard_manifest(self, key: str) -> Path:
        return self.embeddings_dir / f"shard_{check_partition_key(key)}.manifest.json"

    @property
    def catalog_db(self) -> Path:
        return self.home / "catalog.duckdb"

    @property
    def index_root(self) -> Path:
        """Index versions: v00001/, v00002/, ... and `current`, a symlink to the live one."""
        return self.home / "index"

    @property
    def index_dir(self) -> Path:
        """The live index version (through the `current` symlink; `index.load_index` resolves it once)."""
        return self.index_root / "current"

    @property
    def index_file(self) -> Path:
        return self.index_dir / "items.faiss"

    @property
    def index_ids(self) -> Path:
        return self.index_dir / "items.ids.parquet"

    @property
    def index_manifest(self) -> Path:
        return self.index_dir / "manifest.json"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def rejects_jsonl(self) -> Path:
        return self.reports_dir / "rejects.jsonl"

    @property
    def report_md(self) -> Path:
        return self.reports_dir / "retrieval_eval.md"

    @property
    def report_json(self) -> Path:
        return self.reports_dir / "retrieval_eval.json"

    @property
    def norms_json(self) -> Path:
        return self.reports_dir / "embedding_norms.json"

    @property
    def run_summary_json(self) -> Path:
        return self.reports_dir / "run_summary.json"

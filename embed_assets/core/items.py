"""processed_items: raw item files -> one Parquet file per stable partition, plus the state file that vouches for them.

Reading is streamed in bounded memory by `core.ingest` (Arrow's readers + DuckDB, every bad row reported); where an
item lives is `core.partitioning` (a hash prefix of its id). This module owns the on-disk state:

  processed/partitions/<key>.parquet   item_id, text, title, text_hash, source_file, source_row; sorted by item_id
  processed/partitions.json            the partition tree (`leaves`), each partition's rows, fingerprint and file stamp,
                                       and the source: each raw file's sha256 (of the very bytes parsed) + settings

A partition file is rewritten only when its content changed, and the state file is written last, so a crash in
between is detected (the stamps disagree) rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from embed_assets.core.atomic import atomic_write_json
from embed_assets.core.ingest import (SUPPORTED_SUFFIXES, IngestResult, ItemsError, Limits, Reject,  # noqa: F401
                                      discover_files, file_stamp, ingest, suffix_of)

DEFAULT_PARTITION_ROWS = 200_000
DEFAULT_MEMORY_BUDGET_MB = 2_048


def items_config(id_field: str, text_fields: Sequence[str], title_field: str | None, partition_size: int,
                 limits: Limits = Limits()) -> dict[str, Any]:
    """Every setting that shapes processed_items' output besides the raw bytes: part of the source fingerprint."""
    return {"id_field": id_field, "text_fields": list(text_fields),
            "title_field": title_field or (text_fields[0] if text_fields else None),
            "partition_size": int(partition_size), "limits": asdict(limits)}


def source_fingerprint(file_sha256: Mapping[str, str], config: Mapping[str, Any]) -> str:
    """One fingerprint of the raw inputs: each file's path and content checksum, plus the processing settings.

    processed_items records it from the bytes it parsed; the sensor computes it from the files as they are now.
    Equal fingerprints: processing the files again would give the same partitions."""
    blob = json.dumps({"files": sorted(file_sha256.items()), "config": dict(config)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def row_group_fingerprint(item_ids: Sequence[str], hashes: Sequence[str]) -> str:
    """A partition's content fingerprint over its (id, text hash) pairs in order (the same bytes DuckDB hashes in
    `core.ingest`: id, 0x1f, hash, 0x1e per row)."""
    h = hashlib.sha256()
    for i, t in zip(item_ids, hashes):
        h.update(i.encode("utf-8"))
        h.update(b"\x1f")
        h.update(t.encode("ascii"))
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def _previous_state(layout) -> dict[str, Any] | None:
    """The last run's state, if it is usable as the starting tree (else None: start from scratch)."""
    try:
        return load_processed(layout)
    except ItemsError:
        try:
            data = json.loads(layout.partitions_json.read_text("utf-8"))
            return {"leaves": data.get("leaves") or [], "partitions": []}  # keep the tree, rewrite every file
        except (OSError, ValueError, AttributeError):
            return None


def process_items(
    layout,
    paths: Sequence[str | os.PathLike],
    id_field: str,
    text_fields: Sequence[str],
    partition_size: int = DEFAULT_PARTITION_ROWS,
    limits: Limits = Limits(),
    title_field: str | None = None,
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB,
    log: Callable[[str], None] = lambda m: None,
) -> IngestResult:
    """Raw files -> the partitions whose content changed, rejects, then partitions.json (written last)."""
    previous = _previous_state(layout)
    result = ingest(paths, id_field, text_fields, layout.partitions_dir, previous, partition_size, limits,
                    title_field, memory_budget_mb, work_dir=layout.processed_dir, rejects_path=layout.rejects_jsonl,
                    log=log)
    config = items_config(id_field, text_fields, title_field, partition_size, limits)
    source = {"fingerprint": source_fingerprint(result.file_sha256, config), "files": result.file_sha256,
              "config": config}
    atomic_write_json(layout.partitions_json, {
        "format": 2, "target_rows": int(partition_size), "leaves": result.leaves,
        "partitions": result.partitions, "source": source,
        "n_items": result.n_items, "splits": [[p, kids] for p, kids in result.splits],
        "n_rows_read": int(result.n_rows_read), "n_rejected": int(result.n_rejected),
        "reject_counts": dict(result.reject_counts),
    })
    for key in result.removed:  # emptied partitions: their files go once the state no longer names them
        layout.partition_file(key).unlink(missing_ok=True)
    return result


def load_processed(layout) -> dict[str, Any]:
    """partitions.json, checked to describe the very partition files on disk (one stat per partition)."""
    try:
        data = json.loads(layout.partitions_json.read_text("utf-8"))
    except FileNotFoundError:
        raise ItemsError(f"{layout.partitions_json}: not found; materialize processed_items first") from None
    except ValueError as e:
        raise ItemsError(f"{layout.partitions_json}: unreadable ({e}); re-materialize processed_items") from e
    if not isinstance(data, dict) or not isinstance(data.get("partitions"), list):
        raise ItemsError(f"{layout.partitions_json}: not a partition state file; re-materialize processed_items")
    for p in data["partitions"]:
        try:
            stamp = file_stamp(layout.partition_file(p["partition"]))
        except FileNotFoundError:
            stamp = None
        if stamp != p.get("stamp"):
            raise ItemsError(f"{layout.partitions_json} does not describe the current file of partition "
                             f"{p['partition']} (an interrupted processed_items run?); re-materialize processed_items")
    return data


def load_partitions(layout) -> list[dict[str, Any]]:
    """The non-empty partitions as processed_items described them: partition, n_rows, fingerprint, file, ..."""
    return load_processed(layout)["partitions"]


def read_partition(layout, key: str, columns: Sequence[str] = ("item_id", "text", "text_hash")):
    """One partition's rows (sorted by item id) as a pyarrow table."""
    import pyarrow.parquet as pq

    path = layout.partition_file(key)
    if not path.exists():
        raise ItemsError(f"partition {key} does not exist in processed_items ({path} is missing); "
                         "re-materialize processed_items, whose run also removes stale partitions")
    return pq.read_table(path, columns=list(columns))


def titles_of(layout, item_ids: Sequence[str]) -> dict[str, str]:
    """Titles of a few items, read from the partition files (only their title column, only the rows asked for)."""
    import duckdb
    import pyarrow as pa

    if not item_ids or not layout.partitions_dir.exists() or not any(layout.partitions_dir.glob("*.parquet")):
        return {}
    con = duckdb.connect()
    try:
        con.register("wanted", pa.table({"item_id": pa.array(list(item_ids), pa.string())}))
        rows = con.execute(f"""SELECT p.item_id, p.title
                               FROM read_parquet('{layout.partitions_dir}/*.parquet') p JOIN wanted USING (item_id)""")
        return dict(rows.fetchall())
    finally:
        con.close()


def sample_by_id_hash(layout, n: int, columns: Sequence[str], where: str = "TRUE", seed: int = 0) -> list[tuple]:
    """`columns` of the n processed items (matching `where`) with the smallest seeded hash of their id: a sample
    that keeps its items from one run to the next but for those changed or removed (the index tuning's held-out
    titles, the report's title -> item pool), so what is measured on it compares across versions and its vectors
    can be cached. One scan of the partitions' files, a top-n: bounded memory."""
    import duckdb

    with duckdb.connect() as con:
        return con.execute(
            f"SELECT {', '.join(columns)} FROM read_parquet('{layout.partitions_dir}/*.parquet') WHERE {where} "
            f"ORDER BY hash(item_id || ?), item_id LIMIT {int(n)}", [str(seed)]).fetchall()

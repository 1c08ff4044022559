"""The DuckDB catalog: every shard and every item, derived from the shard manifests on disk.

DuckDB allows one writer process, and while one holds the file no other process can even read it. So:
- nothing holds a connection across encoding: connections are opened for one short transaction and closed;
- opening retries with jittered back-off while another process holds the lock;
- the manifests on disk are the source of truth and ingestion is idempotent (delete + insert per partition in one
  transaction). A partition whose own ingest gave up on the lock loses nothing: the next sync ingests its manifest.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import duckdb

from embed_assets.core.faults import crash_point
from embed_assets.core.layout import Layout
from embed_assets.core.shards import ShardError, ShardManifest, list_manifests, load_verified_items, verify_files

SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    partition VARCHAR PRIMARY KEY,
    row_group INTEGER,
    path VARCHAR,
    rows BIGINT,
    dim INTEGER,
    dtype VARCHAR,
    model_id VARCHAR,
    model_revision VARCHAR,
    max_seq_length INTEGER,
    fingerprint VARCHAR,
    rows_fingerprint VARCHAR,
    sha256 VARCHAR,
    bytes BIGINT,
    norm_mean DOUBLE,
    norm_std DOUBLE,
    norm_min DOUBLE,
    norm_max DOUBLE,
    frac_outside_tol DOUBLE,
    n_encoded BIGINT,
    n_reused BIGINT,
    created_at TIMESTAMPTZ,
    ingested_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS items (
    item_id VARCHAR,
    partition VARCHAR,
    "row" BIGINT,
    text_hash VARCHAR
);
"""


class CatalogLocked(RuntimeError):
    pass


def _is_lock_error(err: Exception) -> bool:
    msg = str(err).lower()
    return "lock" in msg or "conflicting" in msg or "being used" in msg


@contextmanager
def connect(db_path: Path, read_only: bool = False, timeout_s: float = 600.0) -> Iterator["duckdb.DuckDBPyConnection"]:
    """A short-lived connection, retried while another process holds the file."""
    import duckdb

    db_path.parent.mkdir(parents=True, exist_ok=True)
    if read_only and not db_path.exists():
        read_only = False  # first use creates it
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(db_path), read_only=read_only)
            break
        except (duckdb.IOException, duckdb.ConnectionException) as e:
            if not _is_lock_error(e) or time.monotonic() > deadline:
                raise CatalogLocked(f"{db_path}: could not open the catalog within {timeout_s:.0f} s: {e}") from e
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
    try:
        if not read_only:
            con.execute(SCHEMA)
        yield con
    finally:
        con.close()


def _delete_partition(con, key: str) -> None:
    con.execute("DELETE FROM items WHERE partition = ?", [key])
    con.execute("DELETE FROM shards WHERE partition = ?", [key])


def _ingest(con, layout: Layout, m: ShardManifest) -> None:
    """Replace one partition's rows, from the items sidecar's verified bytes (never a file swapped meanwhile)."""
    items = load_verified_items(layout, m)
    now = datetime.now(timezone.utc)
    created = datetime.fromtimestamp(m.created_at, timezone.utc)
    con.register("_shard_items", items)
    con.execute("BEGIN TRANSACTION")
    try:
        _delete_partition(con, m.partition)
        con.execute(
            "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [m.partition, m.row_group, str(layout.embeddings_dir / m.shard_file), m.n_rows, m.dim, m.dtype,
             m.model_id, m.model_revision, m.max_seq_length, m.fingerprint, m.rows_fingerprint, m.shard_sha256,
             m.shard_bytes, m.norms["mean"], m.norms["std"], m.norms["min"], m.norms["max"],
             m.norms["frac_outside_tol"], m.n_encoded, m.n_reused, created, now],
        )
        con.execute("INSERT INTO items SELECT item_id, ?, \"row\", text_hash FROM _shard_items", [m.partition])
        crash_point("catalog_write")  # inside the transaction, before COMMIT
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("_shard_items")


def ingest_manifest(layout: Layout, m: ShardManifest, timeout_s: float = 600.0) -> None:
    """Record one shard (only if its files are complete and match the manifest)."""
    problems = verify_files(layout, m)
    if problems:
        raise RuntimeError(f"shard {m.partition} is not fully on disk ({'; '.join(problems)}); not cataloged")
    with connect(layout.catalog_db, timeout_s=timeout_s) as con:
        _ingest(con, layout, m)


def sync(layout: Layout, valid_partitions: set[str] | None = None, timeout_s: float = 600.0) -> dict[str, list[str]]:
    """Make the catalog equal the trusted shards on disk. Returns what it added, refreshed and removed.

    The manifests are read while the catalog is held, so a partition ingesting itself meanwhile is never undone.
    """
    added, refreshed, removed, broken = [], [], [], []
    with connect(layout.catalog_db, timeout_s=timeout_s) as con:
        manifests = {m.partition: m for m in list_manifests(layout)}
        if valid_partitions is not None:
            manifests = {k: m for k, m in manifests.items() if k in valid_partitions}
        trusted = {}
        for k, m in manifests.items():
            if verify_files(layout, m):
                broken.append(k)
            else:
                trusted[k] = m
        have = {p: (sha, fp) for p, sha, fp in con.execute("SELECT partition, sha256, fingerprint FROM shards").fetchall()}
        for k, m in sorted(trusted.items()):
            if have.get(k) == (m.shard_sha256, m.fingerprint):
                continue
            try:
                _ingest(con, layout, m)
            except ShardError:
                broken.append(k)  # replaced between the check and the read: the next sync takes it
                continue
            (refreshed if k in have else added).append(k)
        for k in sorted(set(have) - set(trusted)):
            con.execute("BEGIN TRANSACTION")
            _delete_partition(con, k)
            con.execute("COMMIT")
            removed.append(k)
    return {"added": added, "refreshed": refreshed, "removed": removed, "untrusted": sorted(broken)}


def query(layout: Layout, sql: str, params: list | None = None, timeout_s: float = 600.0) -> list[tuple]:
    with connect(layout.catalog_db, read_only=True, timeout_s=timeout_s) as con:
        return con.execute(sql, params or []).fetchall()

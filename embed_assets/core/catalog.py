"""The DuckDB catalog: every shard and every item, derived from the shard manifests on disk.

DuckDB allows one writer process, and while one holds the file no other process can even read it. So:
- nothing holds a connection across long work: the checksums of the shards are verified *before* the connection is
  opened (hashes cached by file stat, so an unchanged shard is hashed once per process), the items of the partitions
  that changed are read before it too, and under the connection only what changed is compared and written;
- opening retries with jittered back-off while another process holds the lock, then raises `CatalogLocked` (the only
  error a busy catalog raises); callers defer: the manifests on disk are the source of truth and ingestion is
  idempotent, so the next sync records what a deferred one did not;
- users never open `catalog.duckdb` (an open reader blocks every writer): each change also publishes, in the same
  locked step, a copy for readers under HOME/catalog/ (`shards.parquet`, `items/<partition>.parquet`), and
  `HOME/catalog/read.duckdb` holds only views over those files. Any number of processes can open it read-only
  while runs write the catalog.
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

from embed_assets.core.atomic import atomic_write, temp_path_for
from embed_assets.core.faults import crash_point
from embed_assets.core.layout import Layout
from embed_assets.core.shards import (
    ShardError,
    ShardManifest,
    cached_sha256,
    list_manifests,
    load_verified_items,
    read_manifest,
    verify_files,
)

# How long a caller waits for the catalog before it defers (a partition, the index build) or fails (a user's query).
DEFAULT_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    partition VARCHAR PRIMARY KEY,
    hash_depth INTEGER,
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
DROP INDEX IF EXISTS items_text_hash;
"""
# No index on items.text_hash. DuckDB keeps an ART index wholly in memory and loads it to write the table: at 10M
# items a partition's catalog write took 2.70 s and 1,804 MB with it, 0.24 s and 286 MB without it, and under the
# memory limit below the index could not even be created (benchmarks/catalog.py; benchmarks/README.md "catalog.py").
# Re-use looks text hashes up with one join scan of the column instead: 0.27 s for 1,500 hashes at 10M rows, in
# bounded memory (363 MB peak with the limit below), against 1.15 s through the index.

# DuckDB's buffer pool for catalog connections (MB): without a limit it grows towards 80% of RAM with the catalog.
CATALOG_MEMORY_MB_ENV = "EMBED_ASSETS_CATALOG_MEMORY_MB"
CATALOG_MEMORY_MB_DEFAULT = 256


def catalog_memory_mb() -> int:
    raw = os.environ.get(CATALOG_MEMORY_MB_ENV, "").strip()
    try:
        return max(64, int(raw)) if raw else CATALOG_MEMORY_MB_DEFAULT
    except ValueError:
        raise ValueError(f"${CATALOG_MEMORY_MB_ENV}={raw!r}: expected a whole number of MB, e.g. 256") from None

# The readers' copy. One file per partition (replaced by rename, so a reader never sees it missing mid-query) that
# carries the checksum of the shard it was written for: the `items` view joins it to `shards` on that checksum, so a
# copy that ran ahead of the catalog (a crash between publishing and COMMIT) shows nothing instead of wrong rows.
_SHARDS_EXPORT_SQL = "SELECT * FROM shards ORDER BY partition"
_ITEMS_EXPORT_SQL = ('SELECT i.item_id, i.partition, i."row", i.text_hash, s.sha256 AS shard_sha256 '
                     'FROM items i JOIN shards s ON s.partition = i.partition WHERE i.partition = ? ORDER BY i."row"')
READER_VERSION = 2  # 2: the item_semantic_ids view


class CatalogLocked(RuntimeError):
    """Another process holds the catalog (a writer, or a reader of catalog.duckdb itself) past the timeout."""


def deferrable_errors() -> tuple[type[BaseException], ...]:
    """What a writer that only *records* its shard in the catalog defers on instead of failing: the catalog busy, or
    any DuckDB error (the catalog is derived from the manifests, which are written already; the next sync, or
    `embed-assets verify --repair`, which does fail loudly on a broken catalog, records it)."""
    import duckdb

    return (CatalogLocked, duckdb.Error)


def _is_lock_error(err: Exception) -> bool:
    msg = str(err).lower()
    # "different configuration": this very process holds the file with the other mode (read-only vs read-write)
    return "lock" in msg or "conflicting" in msg or "being used" in msg or "different configuration" in msg


def reader_dir(layout: Layout) -> Path:
    return layout.home / "catalog"


def reader_db(layout: Layout) -> Path:
    """What users open: `duckdb -readonly HOME/catalog/read.duckdb` (views `shards` and `items`)."""
    return reader_dir(layout) / "read.duckdb"


def shards_export(layout: Layout) -> Path:
    return reader_dir(layout) / "shards.parquet"


def items_export_dir(layout: Layout) -> Path:
    return reader_dir(layout) / "items"


def semantic_ids_dir(layout: Layout) -> Path:
    """Where the readers' view finds the live semantic IDs: an empty file with their schema, and a link to
    HOME/semantic_ids/current/semantic_ids.parquet once there is a version (`publish_semantic_ids`)."""
    return reader_dir(layout) / "semantic_ids"


SID_LINK = "current.parquet"


def publish_semantic_ids(layout: Layout) -> Path:
    """Point the readers' `item_semantic_ids` view at HOME/semantic_ids/current (a relative symlink, made once:
    `current` itself moves atomically with each new version, so the view always reads the live one)."""
    ensure_reader(layout)
    link = semantic_ids_dir(layout) / SID_LINK
    target = os.path.relpath(layout.home / "semantic_ids" / "current" / "semantic_ids.parquet", link.parent)
    if not (link.is_symlink() and os.readlink(link) == target):
        tmp = temp_path_for(link)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return link


def _sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


@contextmanager
def connect(db_path: Path, read_only: bool = False,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator["duckdb.DuckDBPyConnection"]:
    """A short-lived connection, retried while another process holds the file; `CatalogLocked` past the timeout."""
    import duckdb

    db_path.parent.mkdir(parents=True, exist_ok=True)
    if read_only and not db_path.exists():
        read_only = False  # first use creates it
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    odd = 0
    while True:
        try:
            con = duckdb.connect(str(db_path), read_only=read_only,
                                 config={"memory_limit": f"{catalog_memory_mb()}MB"})
            break
        except (duckdb.IOException, duckdb.ConnectionException) as e:
            if not _is_lock_error(e):
                # Not a lock conflict: retried twice (an open racing another process's checkpoint has been seen to
                # fail once, "could not read enough bytes"), then raised as what it is.
                odd += 1
                if odd > 2:
                    raise
                time.sleep(0.2 * odd)
                continue
            if time.monotonic() > deadline:
                raise CatalogLocked(f"{db_path}: could not open the catalog within {timeout_s:.0f} s: {e}") from e
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
    try:
        if not read_only:
            con.execute(SCHEMA)
        yield con
    finally:
        con.close()


# ---- the readers' copy -------------------------------------------------------------------------------------------

_READERS_READY: set[str] = set()


def _create_if_absent(path: Path, write) -> None:
    """Write a file only if none is there, atomically (link fails on an existing name): never clobbers a newer copy."""
    if path.exists():
        return
    tmp = temp_path_for(path)
    try:
        write(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def ensure_reader(layout: Layout) -> Path:
    """Create HOME/catalog/read.duckdb (views only) and empty exports if missing; returns its path.

    Needs no catalog connection. read.duckdb is written once, to a temp file renamed into place; runs never write it
    afterwards (it is rebuilt only if HOME moved or the view definitions changed), so readers holding it open block
    nobody."""
    import duckdb

    path = reader_db(layout)
    if str(path) in _READERS_READY and path.exists():
        return path
    items_dir = items_export_dir(layout)
    items_dir.mkdir(parents=True, exist_ok=True)
    # Empty files with exactly the types the real exports have (a view whose column types change stops binding).
    with duckdb.connect() as mem:
        mem.execute(SCHEMA)
        _create_if_absent(shards_export(layout), lambda tmp: mem.execute(
            f"COPY ({_SHARDS_EXPORT_SQL}) TO {_sql_path(tmp)} (FORMAT parquet)"))
        _create_if_absent(items_dir / "_schema.parquet", lambda tmp: mem.execute(
            f"COPY ({_ITEMS_EXPORT_SQL}) TO {_sql_path(tmp)} (FORMAT parquet)", [""]))
        semantic_ids_dir(layout).mkdir(parents=True, exist_ok=True)
        _create_if_absent(semantic_ids_dir(layout) / "_schema.parquet", lambda tmp: mem.execute(
            "COPY (SELECT ''::VARCHAR AS item_id, []::INTEGER[] AS codes, ''::VARCHAR AS sid LIMIT 0) "
            f"TO {_sql_path(tmp)} (FORMAT parquet)"))
    if not _reader_current(layout):
        tmp = temp_path_for(path)
        try:
            with duckdb.connect(str(tmp)) as con:
                for sql in _reader_views(layout):
                    con.execute(sql)
                con.execute("CHECKPOINT")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            Path(f"{tmp}.wal").unlink(missing_ok=True)
    _READERS_READY.add(str(path))
    return path


def _reader_views(layout: Layout) -> list[str]:
    home = str(layout.home).replace("'", "''")
    return [
        f"CREATE VIEW shards AS SELECT * FROM read_parquet({_sql_path(shards_export(layout))})",
        # only the items of cataloged shards: the copy must carry the very checksum the catalog lists
        f'CREATE VIEW items AS SELECT i.item_id, i.partition, i."row", i.text_hash '
        f"FROM read_parquet({_sql_path(items_export_dir(layout) / '*.parquet')}) AS i "
        f"JOIN shards AS s ON s.partition = i.partition AND s.sha256 = i.shard_sha256",
        # every item's semantic ID (HOME/semantic_ids/current), empty until semantic_ids is materialized
        f"CREATE VIEW item_semantic_ids AS SELECT i.item_id, i.partition, s.codes, s.sid FROM items AS i "
        f"JOIN (SELECT item_id, codes, sid FROM read_parquet("
        f"{_sql_path(semantic_ids_dir(layout) / '*.parquet')}, union_by_name = true)) AS s USING (item_id)",
        f"CREATE VIEW catalog_info AS SELECT '{home}' AS home, {READER_VERSION} AS version",
    ]


def _reader_current(layout: Layout) -> bool:
    import duckdb

    path = reader_db(layout)
    if not path.exists():
        return False
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            return con.execute("SELECT home, version FROM catalog_info").fetchone() == (
                str(layout.home), READER_VERSION)
    except duckdb.Error as e:
        # held by ... nobody writes it; a conflicting lock means an old writer mode: leave it, readers may hold it
        return _is_lock_error(e)


def _published(layout: Layout) -> dict[str, tuple[str, str]] | None:
    """{partition: (sha256, fingerprint)} as the readers' copy lists them; None if there is no readable copy."""
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(shards_export(layout), columns=["partition", "sha256", "fingerprint"])
    except (OSError, ValueError, KeyError):
        return None
    return {p: (s, f) for p, s, f in zip(*(t.column(c).to_pylist() for c in ("partition", "sha256", "fingerprint")))}


def _publish(con, layout: Layout, write: Iterable[str], drop: Iterable[str]) -> None:
    """Refresh the readers' copy inside the writing transaction, before COMMIT: the shards table first, then the
    partitions' items. Whatever a crash interrupts, the shards copy is then ahead of (differs from) the catalog, which
    the next sync sees (`sync` compares the two) and republishes; the items of a partition whose two copies disagree
    are hidden by the view's join meanwhile, never shown wrong."""
    items_dir = items_export_dir(layout)
    items_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(shards_export(layout), lambda tmp: con.execute(
        f"COPY ({_SHARDS_EXPORT_SQL}) TO {_sql_path(tmp)} (FORMAT parquet)"))
    for k in sorted(set(write)):
        atomic_write(items_dir / f"{k}.parquet", lambda tmp: con.execute(
            f"COPY ({_ITEMS_EXPORT_SQL}) TO {_sql_path(tmp)} (FORMAT parquet)", [k]))
    for k in sorted(set(drop)):
        (items_dir / f"{k}.parquet").unlink(missing_ok=True)


# ---- writing -----------------------------------------------------------------------------------------------------

def _identity(m: ShardManifest | None) -> tuple | None:
    return None if m is None else (m.shard_sha256, m.items_sha256, m.fingerprint, m.created_at)


def _manifest_now(layout: Layout, key: str) -> tuple | None:
    """The identity of the partition's manifest on disk right now (None: no readable manifest)."""
    try:
        return _identity(read_manifest(layout, key))
    except (ShardError, ValueError):
        return None


def _delete_partition(con, key: str) -> None:
    con.execute("DELETE FROM items WHERE partition = ?", [key])
    con.execute("DELETE FROM shards WHERE partition = ?", [key])


def _insert(con, layout: Layout, m: ShardManifest, items: "pa.Table") -> None:
    now = datetime.now(timezone.utc)
    created = datetime.fromtimestamp(m.created_at, timezone.utc)
    _delete_partition(con, m.partition)
    con.execute(
        "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [m.partition, len(m.partition) - 1, str(layout.embeddings_dir / m.shard_file), m.n_rows, m.dim, m.dtype,
         m.model_id, m.model_revision, m.max_seq_length, m.fingerprint, m.rows_fingerprint, m.shard_sha256,
         m.shard_bytes, m.norms["mean"], m.norms["std"], m.norms["min"], m.norms["max"],
         m.norms["frac_outside_tol"], m.n_encoded, m.n_reused, created, now],
    )
    con.register("_shard_items", items)
    try:
        con.execute("INSERT INTO items SELECT item_id, ?, \"row\", text_hash FROM _shard_items", [m.partition])
    finally:
        con.unregister("_shard_items")


def _write(con, layout: Layout, ingest: list[tuple[ShardManifest, "pa.Table"]], remove: list[str],
           republish: Iterable[str] = (), unpublish: Iterable[str] = ()) -> None:
    """One transaction: replace the partitions in `ingest`, delete those in `remove`, refresh the readers' copy."""
    con.execute("BEGIN TRANSACTION")
    try:
        for m, items in ingest:
            _insert(con, layout, m, items)
        for k in remove:
            _delete_partition(con, k)
        _publish(con, layout, write=[m.partition for m, _ in ingest] + list(republish),
                 drop=list(remove) + list(unpublish))
        crash_point("catalog_write")  # inside the transaction, before COMMIT
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except Exception:
            pass  # the connection is gone; closing it discards the transaction anyway
        raise


def ingest_manifest(layout: Layout, m: ShardManifest, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Record one shard (only if its files are complete and match the manifest). The checksums and the items are
    read before the catalog is opened; under it, one partition's rows are replaced. False when a newer manifest
    replaced this one meanwhile (its own writer records it)."""
    problems = verify_files(layout, m, cached_sha256)
    if problems:
        raise RuntimeError(f"shard {m.partition} is not fully on disk ({'; '.join(problems)}); not cataloged")
    items = load_verified_items(layout, m)
    ensure_reader(layout)
    with connect(layout.catalog_db, timeout_s=timeout_s) as con:
        if _manifest_now(layout, m.partition) != _identity(m):
            return False
        _write(con, layout, [(m, items)], [])
    return True


def _current_row_groups(layout: Layout) -> set[str] | None:
    from embed_assets.core.items import ItemsError, load_partitions

    try:
        return {p["partition"] for p in load_partitions(layout)}
    except (ItemsError, OSError, ValueError, KeyError):
        return None


def sync(layout: Layout, valid_partitions: set[str] | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, list[str]]:
    """Make the catalog equal the trusted shards on disk. Returns what it added, refreshed and removed, the untrusted
    shards, and `moved`: partitions rewritten by a live writer meanwhile (that writer records them).

    Before the catalog is opened: list the manifests, verify every shard's checksums (cached by file stat), read the
    items of the partitions that look changed. Under it: compare with the catalog's shards table and write only the
    differences, each re-checked against the manifest now on disk, so a partition ingesting itself meanwhile is
    never undone. `valid_partitions` (the caller's row groups) is widened by the row groups processed_items wrote
    last, so a caller with an older view never drops a partition added since."""
    ensure_reader(layout)
    listed = {m.partition: m for m in list_manifests(layout)}
    valid = None
    if valid_partitions is not None:
        valid = set(valid_partitions) | (_current_row_groups(layout) or set())
    manifests = {k: m for k, m in listed.items() if valid is None or k in valid}
    broken, trusted = [], {}
    for k, m in manifests.items():
        if verify_files(layout, m, cached_sha256):
            broken.append(k)
        else:
            trusted[k] = m
    published = _published(layout) or {}
    staged: dict[str, Any] = {}
    for k, m in sorted(trusted.items()):
        if published.get(k) != (m.shard_sha256, m.fingerprint):  # probably not in the catalog yet: read it now
            try:
                staged[k] = load_verified_items(layout, m)
            except ShardError:
                broken.append(k)
    trusted = {k: m for k, m in trusted.items() if k not in broken}

    added, refreshed, removed, moved = [], [], [], []
    with connect(layout.catalog_db, timeout_s=timeout_s) as con:
        have = {p: (sha, fp) for p, sha, fp in
                con.execute("SELECT partition, sha256, fingerprint FROM shards").fetchall()}
        ingest = []
        for k, m in sorted(trusted.items()):
            if have.get(k) == (m.shard_sha256, m.fingerprint):
                continue
            if _manifest_now(layout, k) != _identity(m):
                moved.append(k)  # rewritten since it was verified: its writer records the new one
                continue
            items = staged.get(k)
            if items is None:  # the readers' copy was behind: rare, one partition's read
                try:
                    items = load_verified_items(layout, m)
                except ShardError:
                    broken.append(k)
                    continue
            ingest.append((m, items))
            (refreshed if k in have else added).append(k)
        for k in sorted(set(have) - set(trusted)):
            # Not a row group any more: goes. Untrusted or without a manifest: goes only if the manifest on disk is
            # still the one judged; one that appeared or changed since means a writer is at it, and records it.
            if (valid is None or k in valid) and _manifest_now(layout, k) != _identity(listed.get(k)):
                moved.append(k)
                continue
            removed.append(k)
        after = {k: v for k, v in have.items() if k not in removed}
        after.update({m.partition: (m.shard_sha256, m.fingerprint) for m, _ in ingest})
        # The readers' copy must list exactly the catalog: fix what a crash or an older version left behind.
        pub = _published(layout)
        copies = {p.stem for p in items_export_dir(layout).glob("*.parquet") if not p.name.startswith("_")}
        republish = {k for k in after if pub is None or pub.get(k) != after[k] or k not in copies}
        unpublish = (copies | set(pub or {})) - set(after)
        if ingest or removed or republish or unpublish or pub is None:
            _write(con, layout, ingest, removed, republish, unpublish)
    return {"added": added, "refreshed": refreshed, "removed": removed, "untrusted": sorted(set(broken)),
            "moved": sorted(set(moved))}


# ---- reading -----------------------------------------------------------------------------------------------------

def partitions_holding(layout: Layout, text_hashes: Iterable[str], version: dict,
                       timeout_s: float = 5.0) -> list[str]:
    """Partitions whose cataloged shard (same model id, revision, window and dim) holds any of these text hashes,
    most hits first. Read-only and short; raises CatalogLocked when busy (callers then simply encode)."""
    hashes = sorted(set(text_hashes))
    if not hashes or not layout.catalog_db.exists():
        return []
    same = ("SELECT partition FROM shards WHERE model_id = ? AND model_revision = ? AND max_seq_length = ? "
            "AND dim = ?")
    vparams = [version.get("model_id"), version.get("model_revision"), version.get("max_seq_length"),
               version.get("dim")]
    hits: dict[str, int] = {}
    with connect(layout.catalog_db, read_only=True, timeout_s=timeout_s) as con:
        ok = {p for (p,) in con.execute(same, vparams).fetchall()}
        if not ok:
            return []
        import pyarrow as pa

        # One scan of the text_hash column (no index: see SCHEMA), ~0.2 s at 10M rows whatever the number asked.
        con.register("_wanted", pa.table({"text_hash": hashes}))
        try:
            hits = dict(con.execute("SELECT partition, count(*) FROM items JOIN _wanted USING (text_hash) "
                                    "GROUP BY partition").fetchall())
        finally:
            con.unregister("_wanted")
    return [p for p, _ in sorted(hits.items(), key=lambda kv: -kv[1]) if p in ok]


def query(layout: Layout, sql: str, params: list | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[tuple]:
    """A short read of catalog.duckdb itself, for the code's own checks (it blocks writers while it runs: keep it
    short). Users query HOME/catalog/read.duckdb instead, which blocks nobody."""
    with connect(layout.catalog_db, read_only=True, timeout_s=timeout_s) as con:
        return con.execute(sql, params or []).fetchall()


def published(layout: Layout) -> dict[str, tuple[str, str]] | None:
    """What the readers' copy lists ({partition: (sha256, fingerprint)}); None when it does not exist yet."""
    return _published(layout)

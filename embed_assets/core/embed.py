"""Embed one partition into one shard: skip when current, re-use unchanged items' vectors, encode the rest.

Idempotent: the shard's fingerprint covers the partition's (id, text hash) pairs and the embedding version, so a
re-run of a finished partition finds its shard current and changes nothing.

Re-use looks vectors up by (text hash, embedding version) at a cost that grows with the items looked up, never with
the catalog: first in the few shards an item of this partition can have lived in (its own, its previous generation,
its ancestors' after a split: partitions are hash prefixes of the id, so items never move elsewhere), then, for texts
still missing, one indexed query of the catalog for the same text anywhere else (a duplicated description).

With a base URI (core/store.py): a partition whose shard is not current here is first looked up in the store (one
GET of its manifest); a current one there is downloaded and verified instead of encoded, and failing that the
partition's earlier shard there is downloaded to re-use its vectors. A shard written here, or found current here, is
published (idempotent: 1 GET + 2 HEADs when the store already has it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from embed_assets.core import catalog
from embed_assets.core.encoder import EncodeStats, Encoder
from embed_assets.core.items import read_partition, row_group_fingerprint
from embed_assets.core.layout import Layout
from embed_assets.core.partitioning import leaf_of_key
from embed_assets.core.shards import (
    NORM_TOLERANCE,
    ShardError,
    ShardManifest,
    cached_sha256,
    embedding_fingerprint,
    fetch_shard,
    list_manifests,
    load_verified,
    load_verified_items,
    norm_summary,
    partition_lock,
    publish_shard,
    read_manifest,
    shard_key_of,
    verify_files,
    write_shard,
)

log = logging.getLogger(__name__)


@dataclass
class EmbedOutcome:
    manifest: ShardManifest
    skipped: bool
    n_encoded: int = 0
    n_reused: int = 0
    stats: EncodeStats = field(default_factory=EncodeStats)
    seconds: float = 0.0
    cataloged: bool = True
    fetched: bool = False  # taken from the base URI's store (checksums verified), not encoded here


def _same_version(m: ShardManifest, version: dict) -> bool:
    return m.version == version


class Reused:
    """Vectors found for text hashes, one block per shard read: taking and filling cost array operations (pyarrow's
    hash lookups), not a Python step per row (4 partitions of 125,000 rows: 1.55 -> 1.23 s warm,
    benchmarks/results/reuse_time_9ba1e56.txt)."""

    def __init__(self, wanted: set[str]) -> None:
        import pyarrow as pa

        self.wanted = pa.array(list(wanted), pa.string())
        self.n_wanted = len(wanted)
        self.hashes: list = []  # per block: the text hashes (pyarrow), each found once over all blocks
        self.blocks: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(h) for h in self.hashes)

    def missing(self) -> set[str]:
        import pyarrow as pa
        import pyarrow.compute as pc

        if not self.hashes:
            return set(self.wanted.to_pylist())
        return set(self.wanted.filter(pc.invert(pc.is_in(self.wanted, value_set=pa.concat_arrays(self.hashes))))
                   .to_pylist())

    def rows_to_take(self, hashes) -> np.ndarray:
        """Rows of a shard (its text hashes) holding a wanted text not found yet, each text's first row only."""
        import pyarrow as pa
        import pyarrow.compute as pc

        hashes = hashes.combine_chunks() if isinstance(hashes, pa.ChunkedArray) else hashes
        take = pc.index_in(hashes, value_set=hashes).to_numpy(zero_copy_only=False) == np.arange(len(hashes))
        take &= pc.is_in(hashes, value_set=self.wanted).to_numpy(zero_copy_only=False)
        if self.hashes:
            take &= ~pc.is_in(hashes, value_set=pa.concat_arrays(self.hashes)).to_numpy(zero_copy_only=False)
        return np.flatnonzero(take)

    def add(self, hashes, block: np.ndarray) -> None:
        self.hashes.append(hashes)
        self.blocks.append(block)

    def fill(self, hashes, out: np.ndarray) -> np.ndarray:
        """Write the found vector into each row of `out` whose text hash (`hashes`, one per row) was found; returns
        which rows were filled."""
        import pyarrow as pa
        import pyarrow.compute as pc

        filled = np.zeros(len(out), dtype=bool)
        for h, block in zip(self.hashes, self.blocks):
            pos = pc.index_in(hashes, value_set=h).fill_null(-1).to_numpy(zero_copy_only=False)
            rows = np.flatnonzero(pos >= 0)
            out[rows] = block[pos[rows]]
            filled[rows] = True
        return filled


def _take(layout: Layout, m: ShardManifest, folder, found: Reused, say) -> None:
    """Copy the vectors of wanted text hashes out of one trusted shard of the same version."""
    try:
        hashes = load_verified_items(layout, m, folder).column("text_hash").combine_chunks()
        rows = found.rows_to_take(hashes)
        if not len(rows):
            return
        _, emb = load_verified(layout, m, folder)
    except ShardError as e:
        say(f"not re-using shard {m.partition}: {e}")  # its items are encoded again instead
        return
    found.add(hashes.take(rows), emb[rows])  # one copy of the wanted rows: never the whole shard kept alive


def previous_holding(layout: Layout, text_hashes: set[str]) -> list[str]:
    """Partitions whose previous generation holds any of these text hashes, most hits first. previous/ holds only
    the shards replaced since the last index build (the changed partitions), so this reads O(change), not O(catalog):
    it finds a text whose partition was re-encoded earlier in the same backfill, which the catalog no longer lists."""
    folder = layout.previous_dir
    files = sorted(folder.glob("shard_*.items.parquet")) if text_hashes and folder.exists() else []
    if not files:
        return []
    import duckdb
    import pyarrow as pa

    try:
        with duckdb.connect() as con:
            con.register("_wanted", pa.table({"text_hash": pa.array(sorted(text_hashes), pa.string())}))
            rows = con.execute("SELECT filename, count(*) AS n FROM read_parquet(?, filename = true) "
                               "JOIN _wanted USING (text_hash) GROUP BY filename ORDER BY n DESC",
                               [[str(f) for f in files]]).fetchall()
    except duckdb.Error:  # a file cleared meanwhile (the index build): those texts are encoded instead
        return []
    return [k for k in (shard_key_of(Path(f).name) for f, _ in rows) if k]


def reuse_vectors(layout: Layout, version: dict, wanted: set[str], key: str | None = None,
                  say: Callable[[str], None] = log.info, catalog_timeout_s: float = 5.0) -> Reused:
    """Vectors of already-embedded texts (by text hash) from trusted shards of the same embedding version.

    1. The shards this partition's items can have lived in: its own current shard and previous generation, then its
       ancestors' (a split's parent moved to previous/): O(depth) shards.
    2. Texts still missing: the catalog's items table, by text hash (an indexed lookup of exactly those hashes), for
       the same text in another partition; the shards that hold them are read, nothing else. A busy catalog skips this
       step (those texts are encoded instead; never wrong, only slower).
    3. Texts still missing: other partitions' previous generation (`previous_holding`), for a text whose partition
       was re-encoded before this one in the same backfill; so the order partitions run in does not matter."""
    found = Reused(wanted)
    if not wanted:
        return found
    keys = [key] + [a.key for a in leaf_of_key(key).ancestors()] if key else []
    for k in keys:
        for folder in (None, layout.previous_dir):
            try:
                m = read_manifest(layout, k, folder)
            except ShardError:
                m = None
            if m is not None and _same_version(m, version):
                _take(layout, m, folder, found, say)
            if len(found) == found.n_wanted:
                return found
    rest = found.missing()
    try:
        holders = catalog.partitions_holding(layout, rest, version, timeout_s=catalog_timeout_s)
    except catalog.deferrable_errors() as e:
        say(f"catalog lookup skipped ({type(e).__name__}); {len(rest):,} texts are encoded instead")
        holders = []
    for k in holders:
        if k in keys:
            continue
        try:
            m = read_manifest(layout, k)
        except ShardError:
            continue
        if m is not None and _same_version(m, version):
            _take(layout, m, None, found, say)
        if len(found) == found.n_wanted:
            return found
    for k in previous_holding(layout, found.missing()):
        if k in keys:
            continue
        try:
            m = read_manifest(layout, k, layout.previous_dir)
        except ShardError:
            continue
        if m is not None and _same_version(m, version):
            _take(layout, m, layout.previous_dir, found, say)
        if len(found) == found.n_wanted:
            break
    return found


def embed_partition(
    layout: Layout,
    key: str,
    encoder: Encoder,
    say: Callable[[str], None] = log.info,
    reuse: bool = True,
    catalog_timeout_s: float = catalog.DEFAULT_TIMEOUT_S,
    record: bool = True,
) -> EmbedOutcome:
    """`record`: record the shard in the catalog here (`ensure_cataloged`). False leaves that to the caller, e.g. the
    orchestrator after an external encode step (Dagster Pipes) whose process has no business writing the DuckDB file;
    the outcome then says `cataloged=False` until the caller records it."""
    # One writer per partition at a time: a second run of the same partition waits, then finds the shard current.
    with partition_lock(layout, key):
        return _embed_partition(layout, key, encoder, say, reuse, catalog_timeout_s, record)


def _embed_partition(layout: Layout, key: str, encoder: Encoder, say: Callable[[str], None], reuse: bool,
                     catalog_timeout_s: float, record: bool) -> EmbedOutcome:
    t0 = time.perf_counter()
    table = read_partition(layout, key)
    ids = table.column("item_id").to_pylist()
    texts = table.column("text").to_pylist()
    hashes = table.column("text_hash").to_pylist()
    rows_fp = row_group_fingerprint(ids, hashes)
    version = encoder.version
    fp = embedding_fingerprint(rows_fp, version)

    try:
        current = read_manifest(layout, key)
    except ShardError as e:
        say(str(e))
        current = None
    trusted = current is not None and not verify_files(layout, current, cached_sha256)  # hashed once per file state
    fetched = False
    if layout.store is not None and not (trusted and current.fingerprint == fp):
        # Not current here: the store may hold it (an earlier pod, another machine), or at least this partition's
        # earlier shard of the same embedding version, whose vectors are re-used below instead of encoded again.
        from embed_assets.core.store import Untrusted

        try:
            got = fetch_shard(layout, key, accept=lambda m: m.fingerprint == fp or (
                not trusted and m.version == version))
        except Untrusted as e:
            say(f"{key}: {e}")
            got = None
        if got is not None:
            current, trusted, fetched = got, True, got.fingerprint == fp
            say(f"{key}: {'current' if fetched else 'earlier'} shard taken from {layout.store.uri('embeddings')} "
                "(checksums verified)")
    if trusted and current.fingerprint == fp:
        say(f"{key}: shard is current (fingerprint {fp}); nothing to {'encode' if fetched else 'do'}")
        if not fetched:  # (a shard just taken from the store is there already)
            publish_shard(layout, current)
        out = EmbedOutcome(current, skipped=True, seconds=time.perf_counter() - t0, cataloged=False, fetched=fetched)
        return record_outcome(layout, out, say, catalog_timeout_s) if record else out

    n = len(ids)
    emb = np.empty((n, encoder.dim), dtype=np.float16)
    todo = np.ones(n, dtype=bool)
    if reuse:
        todo = ~reuse_vectors(layout, version, set(hashes), key=key, say=say).fill(
            table.column("text_hash").combine_chunks(), emb)
    n_reused = int((~todo).sum())
    idx = np.flatnonzero(todo)
    say(f"{key}: {n:,} items, {n_reused:,} re-used from earlier shards, {len(idx):,} to encode")
    stats = EncodeStats()
    if len(idx):
        vecs, stats = encoder.encode([texts[i] for i in idx], progress=lambda m: say(f"{key}: {m}"))
        emb[idx] = vecs.astype(np.float16)

    norms, norm_hist = norm_summary(emb, NORM_TOLERANCE)
    manifest = ShardManifest(
        partition=key, fingerprint=fp, rows_fingerprint=rows_fp, n_rows=n, dim=encoder.dim,
        dtype="float16", model_id=version["model_id"], model_revision=version["model_revision"],
        max_seq_length=version["max_seq_length"], chunking=version["chunking"], shard_file="", shard_sha256="",
        shard_bytes=0, items_file="", items_sha256="", norms=norms, norm_hist=norm_hist,
        n_encoded=len(idx), n_reused=n_reused, precision=getattr(encoder, "precision", "") if len(idx) else "",
    )
    write_shard(layout, manifest, ids, hashes, emb)
    out = EmbedOutcome(manifest, skipped=False, n_encoded=len(idx), n_reused=n_reused, stats=stats,
                       seconds=time.perf_counter() - t0, cataloged=False)
    return record_outcome(layout, out, say, catalog_timeout_s) if record else out


def record_outcome(layout: Layout, out: EmbedOutcome, say: Callable[[str], None] = log.info,
                   timeout_s: float = catalog.DEFAULT_TIMEOUT_S) -> EmbedOutcome:
    """Record a partition's shard in the catalog as `embed_partition` does: a shard written now is recorded, a current
    one only if its catalog row differs. Sets and returns `out.cataloged` (False: deferred to the next sync)."""
    out.cataloged = ensure_cataloged(layout, out.manifest, say, timeout_s, force=not out.skipped)
    return out


def ensure_cataloged(layout: Layout, m: ShardManifest, say: Callable[[str], None] = log.info,
                     timeout_s: float = catalog.DEFAULT_TIMEOUT_S, force: bool = False) -> bool:
    """Record a written shard in the catalog (`force`), or only if its row there differs (a skipped, current shard).
    False when the catalog is busy or broken: deferred to the next sync, never a failure."""
    try:
        if not force:
            rows = catalog.query(layout, "SELECT sha256, fingerprint FROM shards WHERE partition = ?", [m.partition],
                                 timeout_s=timeout_s)
            if rows and rows[0] == (m.shard_sha256, m.fingerprint):
                return True
        if not catalog.ingest_manifest(layout, m, timeout_s=timeout_s):
            say(f"{m.partition}: a newer shard replaced this one meanwhile; its writer records it")
        return True
    except catalog.deferrable_errors() as e:
        # The manifest is on disk; the next catalog sync (index build, CLI) records it. Nothing is lost.
        what = "busy" if isinstance(e, catalog.CatalogLocked) else f"error ({type(e).__name__})"
        say(f"{m.partition}: catalog {what}, deferred to the next sync ({e})")
        return False

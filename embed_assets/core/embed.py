"""Embed one row group into one shard: skip when current, re-use unchanged items' vectors, encode the rest.

Idempotent: the shard's fingerprint covers the row group's (id, text hash) pairs and the embedding version, so a
re-run of a finished partition finds its shard current and changes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from embed_assets.core import catalog
from embed_assets.core.encoder import EncodeStats, Encoder
from embed_assets.core.items import read_row_group, row_group_fingerprint
from embed_assets.core.layout import Layout, row_group_of
from embed_assets.core.shards import (
    NORM_TOLERANCE,
    ShardError,
    ShardManifest,
    embedding_fingerprint,
    list_manifests,
    load_verified,
    load_verified_items,
    norm_stats,
    partition_lock,
    read_manifest,
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


def _same_version(m: ShardManifest, version: dict) -> bool:
    return m.version == version


def reuse_vectors(layout: Layout, version: dict, wanted: set[str],
                  say: Callable[[str], None] = log.info) -> dict[str, np.ndarray]:
    """Vectors of already-embedded texts (by text hash) from trusted shards of the same embedding version: the
    current shards, then the previous generation (an item that moved may have left its old shard already)."""
    found: dict[str, np.ndarray] = {}
    if not wanted:
        return found
    candidates = [(None, m) for m in list_manifests(layout)]
    candidates += [(layout.previous_dir, m) for m in list_manifests(layout, layout.previous_dir)]
    for folder, m in candidates:
        if not _same_version(m, version):
            continue
        try:
            items = load_verified_items(layout, m, folder)
            hashes = items.column("text_hash").to_pylist()
            rows = [r for r, h in enumerate(hashes) if h in wanted and h not in found]
            if not rows:
                continue
            _, emb = load_verified(layout, m, folder)
        except ShardError as e:
            say(f"not re-using shard {m.partition}: {e}")  # it will be encoded again instead
            continue
        for r in rows:
            found.setdefault(hashes[r], emb[r].copy())  # a copy: never keep a whole shard alive for one row
        if len(found) == len(wanted):
            break
    return found


def embed_partition(
    layout: Layout,
    key: str,
    encoder: Encoder,
    say: Callable[[str], None] = log.info,
    reuse: bool = True,
    catalog_timeout_s: float = catalog.DEFAULT_TIMEOUT_S,
) -> EmbedOutcome:
    # One writer per partition at a time: a second run of the same partition waits, then finds the shard current.
    with partition_lock(layout, key):
        return _embed_partition(layout, key, encoder, say, reuse, catalog_timeout_s)


def _embed_partition(layout: Layout, key: str, encoder: Encoder, say: Callable[[str], None], reuse: bool,
                     catalog_timeout_s: float) -> EmbedOutcome:
    t0 = time.perf_counter()
    rg = row_group_of(key)
    table = read_row_group(layout.items_parquet, rg)
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
    if current is not None and current.fingerprint == fp and not verify_files(layout, current):
        say(f"{key}: shard is current (fingerprint {fp}); nothing to do")
        _ensure_cataloged(layout, current, say, catalog_timeout_s)
        return EmbedOutcome(current, skipped=True, seconds=time.perf_counter() - t0)

    n = len(ids)
    emb = np.empty((n, encoder.dim), dtype=np.float16)
    todo = np.ones(n, dtype=bool)
    if reuse:
        found = reuse_vectors(layout, version, set(hashes), say=say)
        for r, h in enumerate(hashes):
            v = found.get(h)
            if v is not None:
                emb[r] = v
                todo[r] = False
    n_reused = int((~todo).sum())
    idx = np.flatnonzero(todo)
    say(f"{key}: {n:,} items, {n_reused:,} re-used from earlier shards, {len(idx):,} to encode")
    stats = EncodeStats()
    if len(idx):
        vecs, stats = encoder.encode([texts[i] for i in idx], progress=lambda m: say(f"{key}: {m}"))
        emb[idx] = vecs.astype(np.float16)

    manifest = ShardManifest(
        partition=key, row_group=rg, fingerprint=fp, rows_fingerprint=rows_fp, n_rows=n, dim=encoder.dim,
        dtype="float16", model_id=version["model_id"], model_revision=version["model_revision"],
        max_seq_length=version["max_seq_length"], chunking=version["chunking"], shard_file="", shard_sha256="",
        shard_bytes=0, items_file="", items_sha256="", norms=norm_stats(emb, NORM_TOLERANCE),
        n_encoded=len(idx), n_reused=n_reused, precision=getattr(encoder, "precision", "") if len(idx) else "",
    )
    write_shard(layout, manifest, ids, hashes, emb)
    cataloged = _ensure_cataloged(layout, manifest, say, catalog_timeout_s, force=True)
    return EmbedOutcome(manifest, skipped=False, n_encoded=len(idx), n_reused=n_reused, stats=stats,
                        seconds=time.perf_counter() - t0, cataloged=cataloged)


def _ensure_cataloged(layout: Layout, m: ShardManifest, say, timeout_s: float, force: bool = False) -> bool:
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

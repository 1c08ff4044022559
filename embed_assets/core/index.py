"""FAISS index over the shards: build, save atomically with its id map, load with checksums verified.

Exact search (IndexFlatIP on unit vectors = cosine) is the default and right up to ~1M items (1M x 384 fp32 =
1.5 GB, ~50 ms/query on 2 cores). Past one million items choose IVF-PQ or HNSW (e.g. "IVF4096,PQ48" trained on a
sample, nprobe tuned until ann_recall_at_10 >= 0.95 in the report); `kind="hnsw"` is offered for that.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embed_assets.core.atomic import atomic_write, atomic_write_json, sha256_file
from embed_assets.core.encoder import EMBEDDING_DIM
from embed_assets.core.faults import crash_point
from embed_assets.core.layout import Layout


log = logging.getLogger(__name__)


class IndexBuildError(RuntimeError):
    pass


class ItemIds(Sequence):
    """The index's row -> item id map, held as one Arrow string array (about the ids file's size in memory, where a
    Python list of 10M str objects costs ~0.8 GB). `ids[row]` is a str; slicing and `list()` work as on a list."""

    def __init__(self, arr=None):
        import pyarrow as pa

        if arr is None:
            arr = pa.array([], pa.string())
        elif isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
        elif not isinstance(arr, pa.Array):
            arr = pa.array(list(arr), pa.string())
        self.arrow = arr

    @classmethod
    def concat(cls, parts) -> "ItemIds":
        import pyarrow as pa

        parts = [p.arrow if isinstance(p, ItemIds) else pa.array(list(p), pa.string()) for p in parts]
        return cls(pa.concat_arrays(parts) if parts else None)

    def __len__(self) -> int:
        return len(self.arrow)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.arrow[i].to_pylist()
        return self.arrow[int(i)].as_py()

    def __iter__(self):
        return iter(self.arrow.to_pylist())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    def filter(self, keep: np.ndarray) -> "ItemIds":
        import pyarrow as pa

        return ItemIds(self.arrow.filter(pa.array(keep)))


def build_index(vectors: np.ndarray, kind: str = "flat"):
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"unknown index kind {kind!r}; use 'flat' or 'hnsw'")
    index.add(x)
    return index


def save_index(layout: Layout, index, item_ids: Sequence[str], meta: dict[str, Any]) -> dict[str, Any]:
    """ids, then index, then the manifest that names both by checksum: a reader trusts only a matching set."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout.index_dir.mkdir(parents=True, exist_ok=True)
    arr = item_ids.arrow if isinstance(item_ids, ItemIds) else pa.array(list(item_ids), pa.string())
    ids_table = pa.table({"item_id": arr})
    atomic_write(layout.index_ids, lambda tmp: pq.write_table(ids_table, tmp))
    atomic_write(layout.index_file, lambda tmp: faiss.write_index(index, str(tmp)))
    crash_point("index_write")  # new index in place, manifest still the old one
    manifest = {
        **meta,
        "n_items": int(index.ntotal),
        "index_file": layout.index_file.name,
        "index_sha256": sha256_file(layout.index_file),
        "index_bytes": layout.index_file.stat().st_size,
        "ids_file": layout.index_ids.name,
        "ids_sha256": sha256_file(layout.index_ids),
        "created_at": time.time(),
    }
    atomic_write_json(layout.index_manifest, manifest)
    return manifest


def read_index_manifest(layout: Layout) -> dict[str, Any]:
    if not layout.index_manifest.exists():
        raise IndexBuildError(f"{layout.index_manifest}: no index yet; materialize faiss_index")
    try:
        return json.loads(layout.index_manifest.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise IndexBuildError(f"{layout.index_manifest}: unreadable ({e}); re-materialize faiss_index") from e


def _read_checked(path, sha256: str, index_manifest, read):
    """`read(fh)` on a file whose sha256 matched, from the same open file (a rebuild that replaces the file in
    between cannot slip another one in), streamed: no copy of the bytes is held beside what `read` builds."""
    import hashlib

    try:
        with open(path, "rb") as fh:
            h = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
            if h.hexdigest() == sha256:
                fh.seek(0)
                return read(fh)
    except FileNotFoundError:
        pass
    raise IndexBuildError(f"{path}: missing or does not match {index_manifest.name}; re-materialize faiss_index")


def load_index(layout: Layout):
    """Index, ids (`ItemIds`) and manifest, each file checked against the manifest and read from the handle that was
    hashed. Memory: the index and the ids, nothing more (no serialized copy)."""
    import faiss
    import pyarrow.parquet as pq

    manifest = read_index_manifest(layout)
    index = _read_checked(layout.index_file, manifest["index_sha256"], layout.index_manifest,
                          lambda fh: faiss.read_index(faiss.PyCallbackIOReader(fh.read, 1 << 22)))
    ids = _read_checked(layout.index_ids, manifest["ids_sha256"], layout.index_manifest,
                        lambda fh: ItemIds(pq.read_table(fh).column("item_id")))
    return index, ids, manifest


IN_PLACE_MAX_CHANGED = 0.5  # past this share of changed partitions a rebuild is as cheap as an update


def _build(layout: Layout, manifests, kind: str):
    """A fresh index over the shards, in partition order, added shard by shard (memory: the index plus one shard);
    returns (index, ids, {partition: [start, count]})."""
    from embed_assets.core.shards import load_verified

    index = build_index(np.zeros((0, EMBEDDING_DIM), dtype=np.float32), kind)
    parts: list[list[str]] = []
    ranges, n = {}, 0
    for m in manifests:
        shard_ids, emb = load_verified(layout, m)
        ranges[m.partition] = [n, len(shard_ids)]
        n += len(shard_ids)
        parts.append(ItemIds(shard_ids))
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
        del emb, shard_ids
    return index, ItemIds.concat(parts), ranges


def _update_in_place(layout: Layout, kind: str, version: dict, manifests, want: dict[str, str]):
    """Remove the rows of changed and vanished partitions from the current index and add the new shards' rows, when
    the index type allows it (flat: exact, so an update equals a rebuild) and few partitions changed. Returns None
    when a rebuild is due (no trusted index, another kind or version, HNSW, too many changes). Only the changed
    shards are read."""
    import faiss

    from embed_assets.core.shards import load_verified

    if kind != "flat":
        return None
    try:
        index, ids, old = load_index(layout)
    except IndexBuildError:
        return None
    ranges = old.get("partition_ranges")
    built = old.get("shard_fingerprints") or {}
    if (old.get("kind") != kind or old.get("version") != version or not isinstance(ranges, dict)
            or not isinstance(index, faiss.IndexFlat) or sum(c for _, c in ranges.values()) != len(ids)):
        return None
    removed = sorted(k for k in ranges if built.get(k) != want.get(k))
    added = [m for m in manifests if built.get(m.partition) != m.fingerprint]
    if not removed and not added:
        return index, ids, ranges, {"mode": "unchanged", "n_partitions_added": 0, "n_partitions_removed": 0,
                                    "n_vectors_added": 0, "n_vectors_removed": 0}
    if len(set(removed) | {m.partition for m in added}) > IN_PLACE_MAX_CHANGED * max(len(manifests), 1):
        return None
    drop = np.zeros(len(ids), dtype=bool)
    for k in removed:
        start, count = ranges[k]
        drop[start:start + count] = True
    if drop.any():
        index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(drop).astype(np.int64)))  # flat: compacts, keeps order
    kept = [ids.filter(~drop)]
    n_kept = len(kept[0])
    new_ranges, pos = {}, 0
    for k, (start, count) in sorted(ranges.items(), key=lambda kv: kv[1][0]):
        if k not in removed:
            new_ranges[k] = [pos, count]
            pos += count
    for m in added:
        shard_ids, emb = load_verified(layout, m)
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
        new_ranges[m.partition] = [n_kept, len(shard_ids)]
        n_kept += len(shard_ids)
        kept.append(ItemIds(shard_ids))
        del emb, shard_ids
    kept = ItemIds.concat(kept)
    how = {"mode": "in_place", "n_partitions_added": len(added), "n_partitions_removed": len(removed),
           "n_vectors_added": sum(new_ranges[m.partition][1] for m in added), "n_vectors_removed": int(drop.sum())}
    return index, kept, new_ranges, how


def build_from_shards(layout: Layout, row_groups: list[dict[str, Any]], kind: str = "flat",
                      tol: float | None = None, catalog_timeout_s: float = 30.0) -> dict[str, Any]:
    """Index every current shard, refusing stale, untrusted, mixed-version or failing-norm shards.

    When a trusted flat index of the same version exists and few partitions changed, it is updated in place: the
    rows of changed and vanished partitions removed, the new shards' rows added (`update.mode` in the manifest says
    which happened). Otherwise it is rebuilt from the shards.

    What to index comes from the manifests and the files' checksums alone, never from the catalog. The catalog is
    synced on the way (so it lists the indexed shards), but a busy one (`CatalogLocked` after `catalog_timeout_s`)
    only defers that: the index is built, `catalog_deferred` is recorded, and the next sync catches up."""
    from embed_assets.core import catalog
    from embed_assets.core.shards import NORM_TOLERANCE, clear_previous, current_shards

    tol = NORM_TOLERANCE if tol is None else tol
    t0 = time.perf_counter()
    valid = {rg["partition"] for rg in row_groups}
    manifests, problems = current_shards(layout, row_groups, tol)
    # Before failing or building: the catalog drops untrusted shards and lists the good ones (checksums cached).
    try:
        sync, deferred = catalog.sync(layout, valid_partitions=valid, timeout_s=catalog_timeout_s), ""
    except catalog.deferrable_errors() as e:
        sync, deferred = {}, f"{type(e).__name__}: {e}"
        log.warning(f"catalog sync deferred to the next run or `embed-assets verify --repair` ({deferred})")
    if problems:
        raise IndexBuildError("index not built:\n  " + "\n  ".join(problems))
    version = manifests[0].version if manifests else {}
    want = {m.partition: m.fingerprint for m in manifests}
    updated = _update_in_place(layout, kind, version, manifests, want)
    if updated is not None:
        index, ids, ranges, how = updated
    else:
        index, ids, ranges = _build(layout, manifests, kind)
        how = {"mode": "rebuild", "n_partitions_added": len(manifests), "n_partitions_removed": 0,
               "n_vectors_added": len(ids), "n_vectors_removed": 0}
    # No id can sit in two shards: an item's partition is a function of its id (core/partitioning.py) and every
    # shard above was checked to hold exactly its partition's current rows. So no catalog-sized set() is built here.
    build_s = time.perf_counter() - t0
    meta = {"kind": kind, "faiss_type": type(index).__name__, "metric": "inner_product", "build_seconds": build_s,
            "version": version, "partitions": [m.partition for m in manifests],
            "shard_fingerprints": want, "partition_ranges": ranges, "update": how, "catalog_sync": sync,
            "catalog_deferred": bool(deferred), "catalog_deferred_reason": deferred}
    saved = save_index(layout, index, ids, meta)
    # Every shard is current and indexed: the previous generation has served its purpose (except a partition being
    # written now, or an indexed shard replaced since: a writer may still re-use those vectors).
    clear_previous(layout, meta["shard_fingerprints"])
    return saved

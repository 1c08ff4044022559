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
from typing import Any, Callable

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

    def with_holes(self, drop: np.ndarray) -> "ItemIds":
        """The same positions, dropped ones null (an IVF index keeps its labels: removed rows leave holes)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        return ItemIds(pc.if_else(pa.array(drop), pa.scalar(None, pa.string()), self.arrow))

    def valid_positions(self) -> np.ndarray:
        """Positions that hold an item (all of them, unless removals left holes)."""
        import pyarrow.compute as pc

        if self.arrow.null_count == 0:
            return np.arange(len(self.arrow), dtype=np.int64)
        return np.flatnonzero(pc.is_valid(self.arrow).to_numpy(zero_copy_only=False))


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
    tuned = manifest.get("tuning") or {}
    if tuned.get("param"):  # the search knob the tuning chose (also in the file; set again, explicitly)
        faiss.ParameterSpace().set_index_parameter(index, tuned["param"], tuned["value"])
    return index, ids, manifest


IN_PLACE_MAX_CHANGED = 0.5  # past this share of changed partitions a rebuild is as cheap as an update
def in_place_memory_limit() -> int:
    """Bytes an in-place update may hold at once: 80% of the memory available now (Linux MemAvailable)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 8 // 10
    except OSError:
        pass
    return 8 << 30


MAX_HOLES = 0.25  # an IVF index whose removed positions pass this share of its id map is rebuilt (compacted)


def stored_blocks(layout: Layout, manifest: dict[str, Any]):
    """(positions, vectors) of every indexed shard, one shard at a time, from the shards themselves (checksummed;
    fp16, the exact values any index was built from): the reference exact search runs over, whatever the index
    stores (IVF-SQ8/PQ codes are lossy). Raises IndexBuildError when a shard changed since the index was built."""
    from embed_assets.core.shards import load_verified, read_manifest

    fps = manifest.get("shard_fingerprints") or {}
    for key, (start, count) in sorted((manifest.get("partition_ranges") or {}).items(), key=lambda kv: kv[1][0]):
        m = read_manifest(layout, key)
        if m is None or m.fingerprint != fps.get(key):
            raise IndexBuildError(f"shard {key} changed since the index was built; re-materialize faiss_index")
        _, emb = load_verified(layout, m)
        yield np.arange(start, start + count, dtype=np.int64), emb


def exact_search(layout: Layout, manifest: dict[str, Any], queries: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, index positions) over the indexed shards, streamed (memory: one shard)."""
    from embed_assets.core.metrics import exact_top_k_blocks

    positions: list[np.ndarray] = []

    def blocks():
        for pos, emb in stored_blocks(layout, manifest):
            positions.append(pos)
            yield emb

    rows, scores = exact_top_k_blocks(blocks(), queries, k)
    pos_of_row = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    return scores, np.where(rows >= 0, pos_of_row[np.maximum(rows, 0)], -1)


def _build(layout: Layout, manifests, kind: str):
    """A fresh index over the shards, in partition order, added shard by shard (memory: the index plus one shard);
    returns (index, ids, {partition: [start, count]})."""
    from embed_assets.core.shards import load_verified

    index = build_index(np.zeros((0, EMBEDDING_DIM), dtype=np.float32), kind)
    parts: list[list[str]] = []
    ranges, n = {}, 0
    if kind == "flat":
        # The flat index's storage is allocated once, at its final size, and filled shard by shard: growing it
        # with add() reallocates (the old and the new buffer at once, 2-3x the index: 15 GB -> 30+ GB at 10M).
        total = sum(int(m.n_rows) for m in manifests)
        index.codes.resize(total * EMBEDDING_DIM * 4)
        store = faiss_view(index, total) if total else None
    for m in manifests:
        shard_ids, emb = load_verified(layout, m)
        ranges[m.partition] = [n, len(shard_ids)]
        if kind == "flat":
            store[n:n + len(shard_ids)] = emb
        else:
            index.add(np.ascontiguousarray(emb, dtype=np.float32))
        n += len(shard_ids)
        parts.append(ItemIds(shard_ids))
        del emb, shard_ids
    if kind == "flat":
        index.ntotal = n
    return index, ItemIds.concat(parts), ranges


def faiss_view(index, n: int) -> np.ndarray:
    """The first n stored vectors of a flat index as a writable float32 numpy view (no copy)."""
    import faiss

    return faiss.rev_swig_ptr(index.codes.data(), n * index.d * 4).view(np.float32).reshape(n, index.d)


def _add_shards(index, layout: Layout, manifests, start: int, ids: list, ranges: dict, with_ids: bool) -> int:
    """Add each shard's vectors (labels = positions from `start` when `with_ids`); returns the next position."""
    from embed_assets.core.shards import load_verified

    pos = start
    for m in manifests:
        shard_ids, emb = load_verified(layout, m)
        x = np.ascontiguousarray(emb, dtype=np.float32)
        if with_ids:
            index.add_with_ids(x, np.arange(pos, pos + len(x), dtype=np.int64))
        else:
            index.add(x)
        ranges[m.partition] = [pos, len(shard_ids)]
        ids.append(ItemIds(shard_ids))
        pos += len(shard_ids)
        del emb, x, shard_ids
    return pos


def _build_ivf(layout: Layout, manifests, structure: dict[str, Any], cfg):
    """Train an IVF index on a bounded sample of the shards, then add every shard (labels = positions)."""
    import faiss

    from embed_assets.core.index_tune import centroid_distance, sample_rows, train_ivf
    from embed_assets.core.shards import load_verified

    picks = sample_rows([m.n_rows for m in manifests], cfg.train_sample, cfg.seed)
    sample = np.concatenate([load_verified(layout, m)[1][rows].astype(np.float32)
                             for m, rows in zip(manifests, picks) if len(rows)])
    t0 = time.perf_counter()
    index = train_ivf(structure, sample, cfg.seed)
    # a hashtable direct map: stored vectors can be looked up by label (similar-item queries), and removed
    faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.Hashtable)
    trained = {"train_sample": int(len(sample)), "train_seconds": time.perf_counter() - t0,
               "train_centroid_distance": centroid_distance(index, sample)}
    del sample
    parts: list = []
    ranges: dict = {}
    _add_shards(index, layout, manifests, 0, parts, ranges, with_ids=True)
    return index, ItemIds.concat(parts), ranges, trained


def _update_ivf_in_place(layout: Layout, version: dict, manifests, want: dict[str, str],
                         structure: dict[str, Any], cfg):
    """Remove changed partitions' labels from the current IVF index and add the new shards at fresh positions, when
    the trained structure still fits: the new vectors' mean squared distance to their centroids is within
    `cfg.drift_ratio` of the training sample's. Returns (index, ids, ranges, trained, how) or (None, why)."""
    import faiss

    from embed_assets.core.index_tune import centroid_distance
    from embed_assets.core.shards import load_verified

    try:
        index, ids, old = load_index(layout)
    except IndexBuildError:
        return None, "no trusted index"
    ranges = old.get("partition_ranges")
    built = old.get("shard_fingerprints") or {}
    trained = old.get("trained") or {}
    if (old.get("kind") != "ivf" or (old.get("structure") or {}).get("factory") != structure["factory"]
            or old.get("version") != version or not isinstance(ranges, dict) or not trained):
        return None, "no IVF index of this structure and embedding version"
    removed = sorted(k for k in ranges if built.get(k) != want.get(k))
    added = [m for m in manifests if built.get(m.partition) != m.fingerprint]
    if not removed and not added:
        return (index, ids, ranges, trained, {"mode": "unchanged", "n_partitions_added": 0, "n_partitions_removed": 0,
                                              "n_vectors_added": 0, "n_vectors_removed": 0}), ""
    if len(set(removed) | {m.partition for m in added}) > IN_PLACE_MAX_CHANGED * max(len(manifests), 1):
        return None, "too many partitions changed"
    # the drift test, on the new vectors only (a bounded sample of them)
    fresh = [load_verified(layout, m)[1][:20_000].astype(np.float32) for m in added[:8]]
    drift = (centroid_distance(index, np.concatenate(fresh)) / trained["train_centroid_distance"]
             if fresh and trained.get("train_centroid_distance") else 1.0)
    if drift > cfg.drift_ratio:
        return None, (f"drift: new vectors sit {drift:.2f}x farther from their centroids than the training sample "
                      f"(limit {cfg.drift_ratio}); retrained")
    drop = np.zeros(len(ids), dtype=bool)
    for k in removed:
        start, count = ranges[k]
        drop[start:start + count] = True
    if drop.any():
        gone = np.ascontiguousarray(np.flatnonzero(drop).astype(np.int64))
        index.remove_ids(faiss.IDSelectorArray(len(gone), faiss.swig_ptr(gone)))  # what a hashtable map accepts
    parts = [ids.with_holes(drop)]
    new_ranges = {k: r for k, r in ranges.items() if k not in removed}
    _add_shards(index, layout, added, len(ids), parts, new_ranges, with_ids=True)
    ids = ItemIds.concat(parts)
    if ids.arrow.null_count > MAX_HOLES * len(ids):
        return None, f"removed positions past {MAX_HOLES:.0%} of the id map: rebuilt to compact it"
    how = {"mode": "in_place", "n_partitions_added": len(added), "n_partitions_removed": len(removed),
           "n_vectors_added": sum(m.n_rows for m in added), "n_vectors_removed": int(drop.sum()),
           "drift_ratio": float(drift)}
    return (index, ids, new_ranges, trained, how), ""


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
        peek = read_index_manifest(layout)
    except IndexBuildError:
        return None
    if isinstance(peek.get("partition_ranges"), dict):
        # Growing a loaded flat index reallocates its storage: the old and the new buffer at once. When they would
        # not fit in memory (a 15 GB index at 10M items on 24 GB), rebuild instead: one allocation at the final
        # size, the shards streamed into it. Decided before the index is loaded.
        fps, pr = peek.get("shard_fingerprints") or {}, peek["partition_ranges"]
        n_old = sum(c for _, c in pr.values())
        n_new = n_old - sum(c for k, (_, c) in pr.items() if fps.get(k) != want.get(k)) + sum(
            int(m.n_rows) for m in manifests if fps.get(m.partition) != m.fingerprint)
        if n_new > n_old and (n_old + n_new) * EMBEDDING_DIM * 4 > in_place_memory_limit():
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
                      tol: float | None = None, catalog_timeout_s: float = 30.0, tune_config=None,
                      queries: Callable[[], tuple[np.ndarray, str]] | None = None) -> dict[str, Any]:
    """Index every current shard, refusing stale, untrusted, mixed-version or failing-norm shards.

    When a trusted flat index of the same version exists and few partitions changed, it is updated in place: the
    rows of changed and vanished partitions removed, the new shards' rows added (`update.mode` in the manifest says
    which happened). Otherwise it is rebuilt from the shards.

    `kind="auto"` picks the structure by size and memory budget (`index_tune.choose_structure`: flat up to
    `flat_max_items`, else IVF), and tunes a non-flat index's search knob on held-out `queries()` (vectors and where
    they came from) until recall@k against exact search meets the target; the choice, the params, the measured
    recall, QPS and curve go in the manifest (`structure`, `tuning`). An IVF index is updated in place like a flat one
    unless the drift test or the holes left by removals call for a retrain (`update.mode`, `update.reason`).

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
    from embed_assets.core.index_tune import TuneConfig, choose_structure, tune

    version = manifests[0].version if manifests else {}
    want = {m.partition: m.fingerprint for m in manifests}
    cfg = tune_config or TuneConfig()
    structure = choose_structure(sum(m.n_rows for m in manifests), EMBEDDING_DIM, cfg) if kind == "auto" else \
        {"kind": kind, "factory": {"flat": "Flat", "hnsw": "HNSW32,Flat"}.get(kind, kind), "why": "asked for"}
    built_kind, trained, tuning = structure["kind"], None, None
    if built_kind == "ivf":
        updated, why = _update_ivf_in_place(layout, version, manifests, want, structure, cfg)
        if updated is not None:
            index, ids, ranges, trained, how = updated
        else:
            index, ids, ranges, trained = _build_ivf(layout, manifests, structure, cfg)
            how = {"mode": "rebuild", "reason": why, "n_partitions_added": len(manifests), "n_partitions_removed": 0,
                   "n_vectors_added": len(ids), "n_vectors_removed": 0}
    else:
        updated = _update_in_place(layout, built_kind, version, manifests, want)
        if updated is not None:
            index, ids, ranges, how = updated
        else:
            index, ids, ranges = _build(layout, manifests, built_kind)
            how = {"mode": "rebuild", "n_partitions_added": len(manifests), "n_partitions_removed": 0,
                   "n_vectors_added": len(ids), "n_vectors_removed": 0}
    if built_kind != "flat":
        q, source = queries() if queries is not None else (None, "")
        if q is None or not len(q):
            raise IndexBuildError(f"index not built: a {built_kind} index is tuned on held-out queries, and none "
                                  "were given (configure labelled queries, or items with a title field)")
        gt = exact_search(layout, {"partition_ranges": ranges, "shard_fingerprints": want}, q, cfg.k)
        tuning = {**tune(index, q, gt, cfg), "target": cfg.recall_target, "k": cfg.k, "queries": source,
                  "n_queries": int(len(q))}
    # No id can sit in two shards: an item's partition is a function of its id (core/partitioning.py) and every
    # shard above was checked to hold exactly its partition's current rows. So no catalog-sized set() is built here.
    build_s = time.perf_counter() - t0
    meta = {"kind": built_kind, "kind_requested": kind, "structure": structure, "trained": trained,
            "tuning": tuning, "tune_config": cfg.as_dict() if kind == "auto" else None,
            "faiss_type": type(index).__name__, "metric": "inner_product", "build_seconds": build_s,
            "version": version, "partitions": [m.partition for m in manifests],
            "shard_fingerprints": want, "partition_ranges": ranges, "update": how, "catalog_sync": sync,
            "catalog_deferred": bool(deferred), "catalog_deferred_reason": deferred}
    saved = save_index(layout, index, ids, meta)
    # Every shard is current and indexed: the previous generation has served its purpose (except a partition being
    # written now, or an indexed shard replaced since: a writer may still re-use those vectors).
    clear_previous(layout, meta["shard_fingerprints"])
    return saved

"""FAISS index over the shards: build, write as a version with its id map, promote, load with checksums verified.

Versions: HOME/index/v00001/, v00002/, ... each with items.faiss, items.ids.parquet and manifest.json (shard
fingerprints, model id and revision, structure, tuning, shadow comparison); `HOME/index/current` is a symlink to the
live one, moved atomically only after the recall check and the shadow comparison pass. A blocked candidate is kept as
vNNNNN.rejected with why.json; the newest `keep_versions` (3) versions are kept.

Exact search (IndexFlatIP on unit vectors = cosine) is the default and right up to ~1M items (1M x 384 fp32 =
1.5 GB, ~50 ms/query on 2 cores). Past one million items choose IVF-PQ or HNSW (e.g. "IVF4096,PQ48" trained on a
sample, nprobe tuned until ann_recall_at_10 >= 0.95 in the report); `kind="hnsw"` is offered for that.

With a base URI (core/store.py), `promote` publishes the version it makes current under `<base URI>/index/<version>/`
(items.faiss and items.ids.parquet, then manifest.json) and then the store's `index/current` pointer, and prunes
the store's versions as it prunes HOME's; `build_from_shards` first brings the store's current version here when it
is newer than HOME's (a fresh HOME, another machine), so that the in-place update and the shadow comparison see the
live index. Version names are unique across HOME and the store.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embed_assets.core.atomic import atomic_write, atomic_write_json, write_hashed
from embed_assets.core.encoder import EMBEDDING_DIM
from embed_assets.core.faults import crash_point
from embed_assets.core.layout import Layout
from embed_assets.core.shards import backdated_mtime_ns, remember_written


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


def _version_names(layout: Layout) -> list[str]:
    root = layout.index_root
    return sorted((d.name for d in root.iterdir() if _VERSION.match(d.name) and d.is_dir()),
                  key=lambda n: int(n[1:6])) if root.exists() else []


_VERSION = re.compile(r"^v\d{5}(\.rejected)?$")
KEEP_VERSIONS = 3


def current_version(layout: Layout) -> str | None:
    """The live version's folder name (`current`'s target), None before the first promotion."""
    try:
        return Path(os.readlink(layout.index_dir)).name
    except OSError:
        return None


def version_dir(layout: Layout, name: str | None = None) -> Path:
    """A version's folder; the live one (resolved once, so a swap meanwhile cannot mix two versions) by default."""
    if name is None:
        name = current_version(layout)
        if name is None:
            raise IndexBuildError(f"{layout.index_dir}: no index yet; materialize faiss_index")
    return layout.index_root / name


class IndexDiskFull(RuntimeError):
    """Not enough free disk for a new index version, even after dropping the versions promotion would drop."""


def version_bytes(index, n_ids_bytes: int = 0) -> int:
    """What a version of this index takes on disk, about: its codes (+ 8 bytes of label or list entry per vector)
    and its id map."""
    try:
        per_vector = int(index.sa_code_size())
    except Exception:  # an index type without a standalone code size: fp32 vectors, the most any of ours takes
        per_vector = int(index.d) * 4
    return int(index.ntotal) * (per_vector + 8) + int(n_ids_bytes) + (1 << 20)


def make_room(layout: Layout, need: int, keep: int = KEEP_VERSIONS, say: Callable[[str], None] = log.warning
              ) -> list[str]:
    """Before a new version is written: when the disk under index/ has less free space than `need`, remove rejected
    candidates, then the oldest versions that promoting the new one would remove anyway (all but the live one and
    the newest keep - 2, so `keep` remain after promotion), until it fits. Raises IndexDiskFull, naming the sizes
    and the settings to change, when even that is not enough. At 10M items a flat version is 15 GB: `keep` 3 means
    45 GB kept and, without this, a fourth 15 GB during each build."""
    root = layout.index_root
    free = shutil.disk_usage(root).free
    if free >= need:
        return []
    live = current_version(layout)
    old = [n for n in _version_names(layout) if not n.endswith(".rejected") and n != live]
    spare = old[:max(0, len(old) - max(0, keep - 2))]
    rejected = [n for n in _version_names(layout) if n.endswith(".rejected")]
    removed = []
    for n in rejected + spare:  # rejected candidates first: nobody rolls back to them
        if free >= need:
            break
        size = sum(f.stat().st_size for f in (root / n).glob("*") if f.is_file())
        shutil.rmtree(root / n, ignore_errors=True)
        free = shutil.disk_usage(root).free
        removed.append(n)
        say(f"index: removed {n} ({size / 2**30:.1f} GB) before the build, to make room: promotion would have "
            f"removed it (keep_index_versions={keep})")
    if free < need:
        raise IndexDiskFull(
            f"{root}: a new index version needs about {need / 2**30:.1f} GB, {free / 2**30:.1f} GB is free "
            f"(versions kept: {', '.join(_version_names(layout)) or 'none'}). Free disk space there, lower "
            f"keep_index_versions (now {keep}), or set index_memory_budget_mb so the index is compressed "
            f"(SQ8/PQ). No version was written{'; removed to make room: ' + ', '.join(removed) if removed else ''}")
    return removed


def write_version(layout: Layout, index, item_ids: Sequence[str], meta: dict[str, Any],
                  keep: int = KEEP_VERSIONS, ground_truth: dict[str, np.ndarray] | None = None) -> tuple[str, dict]:
    """A new version folder: ids, index, then the manifest naming both by checksum, built under a temp name and
    renamed into place whole. It is not live until `promote`. Room is made first (`make_room`), so a full disk
    fails before anything is written, with a message, rather than half-way through a 15 GB file."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embed_assets.core.atomic import abandoned_work_dir

    root = layout.index_root
    root.mkdir(parents=True, exist_ok=True)
    for old in list(root.glob(".build-*")) + list(root.glob(".current-*")):  # a killed build's leftovers
        if abandoned_work_dir(old):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    names = _version_names(layout)
    if layout.store is not None:  # never re-use a name the store holds (another HOME may have published it)
        from embed_assets.core.store import remote_versions

        names += remote_versions(layout.store, INDEX_REL)
    name = f"v{max([int(n[1:6]) for n in names] or [0]) + 1:05d}"
    arr = item_ids.arrow if isinstance(item_ids, ItemIds) else pa.array(list(item_ids), pa.string())
    made_room = make_room(layout, version_bytes(index, arr.nbytes), keep)
    work = root / f".build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        # each file hashed as it is written (no second read of a 15 GB index), its mtime set back so the digest
        # is remembered for the loads that follow (the shadow comparison, the report): see shards.write_vouched
        mtime = backdated_mtime_ns()
        buf = io.BytesIO()  # (pyarrow writes only to its own or a full Python file object)
        pq.write_table(pa.table({"item_id": arr}), buf)
        ids_sha = write_hashed(work / layout.index_ids.name, lambda fh: fh.write(buf.getbuffer()), mtime)
        del buf
        index_sha = write_hashed(work / layout.index_file.name,
                                 lambda fh: faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write)), mtime)
        gt_sha = None
        if ground_truth is not None:  # the tuning's exact answers, for the next refill to carry (CarriedTopK)
            gt = io.BytesIO()
            np.savez(gt, **ground_truth)
            gt_sha = write_hashed(work / GROUND_TRUTH_FILE, lambda fh: fh.write(gt.getbuffer()), mtime)
        crash_point("index_write")  # a half-built version: never named vNNNNN, never current
        manifest = {
            **meta,
            "version_name": name,
            "n_items": int(index.ntotal),
            "index_file": layout.index_file.name,
            "index_sha256": index_sha,
            "index_bytes": (work / layout.index_file.name).stat().st_size,
            "ids_file": layout.index_ids.name,
            "ids_sha256": ids_sha,
            "created_at": time.time(),
            "made_room": made_room,  # older versions removed before this one was written (disk short): names
            "ground_truth_file": GROUND_TRUTH_FILE if gt_sha else None,
            "ground_truth_sha256": gt_sha,
        }
        atomic_write_json(work / layout.index_manifest.name, manifest)
        os.rename(work, root / name)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for f, digest in ((layout.index_file.name, index_sha), (layout.index_ids.name, ids_sha),
                      (GROUND_TRUTH_FILE, gt_sha)):
        if digest:
            remember_written(root / name / f, digest, mtime)
    return name, manifest


GROUND_TRUTH_FILE = "ground_truth.npz"
GROUND_TRUTH_DEPTH = 2  # x the deepest k measured (100): answers kept per query, so most stay exact after a change


def load_ground_truth(layout: Layout, manifest: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The tuning's exact answers stored with an index version (`write_version`), checked against its manifest;
    None when it has none or the file does not match (the next build then searches every row)."""
    name, sha = manifest.get("ground_truth_file"), manifest.get("ground_truth_sha256")
    if not name or not sha or not manifest.get("version_name"):
        return None
    folder = version_dir(layout, manifest["version_name"])

    def read(fh):
        with np.load(io.BytesIO(fh.read())) as z:
            return {k: z[k] for k in ("keys", "scores", "positions", "cutoff")}

    try:
        return _read_checked(folder / name, sha, folder / layout.index_manifest.name, read)
    except (IndexBuildError, OSError, ValueError, KeyError):
        return None


def save_index(layout: Layout, index, item_ids: Sequence[str], meta: dict[str, Any]) -> dict[str, Any]:
    """Write a version and make it current at once, with no recall check or shadow comparison (tools and tests;
    `build_from_shards` gates its promotion)."""
    name, manifest = write_version(layout, index, item_ids, meta)
    promote(layout, name)
    return manifest


def _point_current(layout: Layout, name: str) -> None:
    """`current` -> `name`: a symlink replaced atomically (a reader sees the old or the new version, whole)."""
    tmp = layout.index_root / f".current-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.symlink(name, tmp)
    os.replace(tmp, layout.index_dir)


def promote(layout: Layout, name: str, keep: int = KEEP_VERSIONS) -> list[str]:
    """Point `current` at version `name` (a symlink replaced atomically: a reader sees the old or the new version,
    whole), then remove all but the newest `keep` versions (never the live one). Returns the removed names. With a
    base URI the version is then published and the store's `current` moved to it (`publish_index`)."""
    _point_current(layout, name)
    gone = _prune(layout, name, keep)
    if layout.store is not None:
        publish_index(layout, name, keep, check=False)  # its files were hashed as they were written
    return gone


def _prune(layout: Layout, name: str, keep: int) -> list[str]:
    for legacy in ("items.faiss", "items.ids.parquet", "manifest.json"):  # the single-folder layout before versions
        (layout.index_root / legacy).unlink(missing_ok=True)
    names = [n for n in _version_names(layout) if n != name and not n.endswith(".rejected")]
    rejected = [n for n in _version_names(layout) if n.endswith(".rejected")]
    gone = names[:max(0, len(names) - (keep - 1))] + rejected[:max(0, len(rejected) - keep)]
    for n in gone:
        shutil.rmtree(layout.index_root / n, ignore_errors=True)
    return gone


INDEX_REL = "index"  # index versions and the `current` pointer under the base URI


def _index_files(manifest: dict[str, Any]) -> dict[str, str]:
    """The data files an index manifest vouches for: {name: sha256}."""
    return {manifest["index_file"]: manifest["index_sha256"], manifest["ids_file"]: manifest["ids_sha256"]}


def publish_index(layout: Layout, name: str, keep: int = KEEP_VERSIONS, check: bool = True
                  ) -> dict[str, Any] | None:
    """Publish version `name` (its files checked against its manifest first, unless `check` is False: `promote`
    right after `write_version` hashed them) and point the store's `current` at it; older versions in the store past
    the newest `keep` are deleted. Idempotent (one GET when the store's pointer already names it). None without a
    base URI."""
    if layout.store is None:
        return None
    from embed_assets.core.store import publish_version

    out = publish_version(layout.store, INDEX_REL, layout.index_root / name, _index_files(
        read_index_manifest(layout, name)), keep, check=check)
    if not out["skipped"]:
        log.info(f"index {name} published to {layout.store.uri(INDEX_REL)}: {out['uploaded']} objects, "
                 f"{out['bytes']:,} bytes; pruned {out['pruned'] or 'none'}")
    return out


def sync_index_with_store(layout: Layout, say: Callable[[str], None] = log.info) -> str:
    """Make HOME's live index and the store's agree before a build (`core.store.sync_current`): the store's newer
    version is fetched and made current here, HOME's newer one is published, an untrusted one is reported and left
    alone (the build then starts from HOME's state). Returns what it did."""
    from embed_assets.core.store import sync_current, work_dir_name

    if layout.store is None:
        return "no store"
    return sync_current(layout.store, INDEX_REL, layout.index_root, current_version(layout), _index_files,
                        publish=lambda name: publish_index(layout, name),
                        point=lambda name: _point_current(layout, name), work_name=lambda _: work_dir_name(".build"),
                        what="index", on_untrusted="the index is built here from the shards instead", say=say)


def reject(layout: Layout, name: str, why: dict[str, Any]) -> str:
    """Keep a blocked version for inspection under `vNNNNN.rejected` with why.json; it is never made current."""
    folder = layout.index_root / name
    atomic_write_json(folder / "why.json", why)
    os.rename(folder, layout.index_root / f"{name}.rejected")
    return f"{name}.rejected"


def read_index_manifest(layout: Layout, name: str | None = None) -> dict[str, Any]:
    path = version_dir(layout, name) / layout.index_manifest.name
    if not path.exists():
        raise IndexBuildError(f"{path}: no index yet; materialize faiss_index")
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise IndexBuildError(f"{path}: unreadable ({e}); re-materialize faiss_index") from e


def _read_checked(path, sha256: str, index_manifest, read, rehash: bool = False):
    """`read(fh)` on a file whose sha256 matched, from the same open file (a rebuild that replaces the file in
    between cannot slip another one in), streamed: no copy of the bytes is held beside what `read` builds. The hash
    is skipped when this very file was hashed to this digest before (`shards.unchanged_since_hashed`), so loading
    the live index again (the shadow comparison, the report) costs a read, not a read and a 15 GB hash at 10M items.
    `rehash` always hashes (`embed-assets verify`)."""
    import hashlib

    from embed_assets.core.shards import remember_sha256, remembered_sha256, stat_key, unchanged_since_hashed

    name = str(path)
    try:
        with open(name, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not rehash and remembered_sha256(name, stat_key(st)) == sha256:  # worth a read without a hash
                out = read(fh)
                if unchanged_since_hashed(name, st, stat_key(os.fstat(fh.fileno())), sha256):
                    return out
                fh.seek(0)
                del out
            h = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
            if h.hexdigest() == sha256:
                remember_sha256(name, st, stat_key(os.fstat(fh.fileno())), sha256)
                fh.seek(0)
                return read(fh)
    except FileNotFoundError:
        pass
    raise IndexBuildError(f"{path}: missing or does not match {index_manifest.name}; re-materialize faiss_index")


def load_index(layout: Layout, name: str | None = None, rehash: bool = False):
    """Index, ids (`ItemIds`) and manifest of the live version (or `name`), all read from one resolved folder, each
    file checked against the manifest and read from the handle that was hashed. Memory: the index and the ids, no
    serialized copy."""
    import faiss
    import pyarrow.parquet as pq

    folder = version_dir(layout, name)
    manifest = read_index_manifest(layout, folder.name)
    mpath = folder / layout.index_manifest.name
    index = _read_checked(folder / layout.index_file.name, manifest["index_sha256"], mpath,
                          lambda fh: faiss.read_index(faiss.PyCallbackIOReader(fh.read, 1 << 22)), rehash)
    ids = _read_checked(folder / layout.index_ids.name, manifest["ids_sha256"], mpath,
                        lambda fh: ItemIds(pq.read_table(fh).column("item_id")), rehash)
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


MAX_HOLES = 0.25  # an IVF index whose removed positions pass this share of its id map is refilled (compacted)
FRESH_SAMPLE_ROWS = 5_000  # per changed shard, at most: the vectors the IVF drift test measures (`drift_sample`)


def drift_sample(emb: np.ndarray, n: int = FRESH_SAMPLE_ROWS) -> np.ndarray:
    """n rows spread evenly over a shard (every len/n-th row), as fp32: the drift test's sample of it. Not its first
    n rows: a shard's rows are in item-id order, and ids made from one source record sit together, so the first
    5,000 rows of a 125,000-row Myntra shard held a few hundred products and measured 1.34x where the spread sample
    measures (benchmarks/README.md, eighth session)."""
    step = max(1, -(-len(emb) // n))  # ceil: at most n rows
    return np.asarray(emb[::step][:n], dtype=np.float32)


def stored_vectors(index, positions) -> np.ndarray:
    """The stored vectors of a few positions (fp32, n x d; never a copy of the whole index)."""
    if not len(positions):
        return np.zeros((0, index.d), dtype=np.float32)
    return np.ascontiguousarray(index.reconstruct_batch(np.asarray(positions, dtype=np.int64)), dtype=np.float32)


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


def _add_shards(index, layout: Layout, manifests, start: int, ids: list, ranges: dict, with_ids: bool,
                assigned: dict[str, np.ndarray] | None = None, exact=None,
                old_positions: dict[str, np.ndarray] | None = None) -> int:
    """Add each shard's vectors (labels = positions from `start` when `with_ids`); returns the next position.
    `assigned` (IVF, with ids): per partition, each row's inverted list where already known, else -1; those rows
    skip the centroid search (the others are searched, and the array is filled in). `exact` (metrics.ExactTopK) is
    fed each shard's vectors with their positions: the tuning's ground truth from this same read; with
    `old_positions` (per partition, each row's position in the index being refilled when its vector is unchanged,
    else -1) a `metrics.CarriedTopK` searches only the other rows."""
    import faiss

    from embed_assets.core.shards import load_verified

    pos = start
    for m in manifests:
        shard_ids, emb = load_verified(layout, m)
        x = np.ascontiguousarray(emb, dtype=np.float32)
        labels = np.arange(pos, pos + len(x), dtype=np.int64)
        assign = (assigned or {}).get(m.partition)
        if assign is not None:
            todo = assign < 0
            if todo.any():
                assign[todo] = index.quantizer.assign(np.ascontiguousarray(x[todo]), 1)[:, 0]
            index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(labels), faiss.swig_ptr(assign))
        elif with_ids:
            index.add_with_ids(x, labels)
        else:
            index.add(x)
        if exact is not None:
            exact.add(labels, x, (old_positions or {}).get(m.partition))
        ranges[m.partition] = [pos, len(shard_ids)]
        ids.append(ItemIds(shard_ids))
        pos += len(shard_ids)
        del emb, x, shard_ids
    return pos


def _build_ivf(layout: Layout, manifests, structure: dict[str, Any], cfg, exact=None):
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
    _add_shards(index, layout, manifests, 0, parts, ranges, with_ids=True, exact=exact)
    return index, ItemIds.concat(parts), ranges, trained


def _partition_diff(ranges: dict, built: dict, want: dict, manifests) -> tuple[list[str], list]:
    """(partitions whose indexed rows must go, shards to add): what changed between the index and the shards."""
    removed = sorted(k for k in ranges if built.get(k) != want.get(k))
    added = [m for m in manifests if built.get(m.partition) != m.fingerprint]
    return removed, added


def _too_many(removed: list[str], added: list, manifests) -> bool:
    return len(set(removed) | {m.partition for m in added}) > IN_PLACE_MAX_CHANGED * max(len(manifests), 1)


def _drop_mask(n: int, ranges: dict, removed: list[str]) -> np.ndarray:
    drop = np.zeros(n, dtype=bool)
    for k in removed:
        start, count = ranges[k]
        drop[start:start + count] = True
    return drop


def _update_ivf_in_place(layout: Layout, version: dict, manifests, want: dict[str, str],
                         structure: dict[str, Any], cfg, exact: list | None = None):
    """Remove changed partitions' labels from the current IVF index and add the new shards at fresh positions, when
    the trained structure still fits: the new vectors' mean squared distance to their centroids is within
    `cfg.drift_ratio` of the training sample's. Returns (index, ids, ranges, trained, how) or (None, why).
    `exact`: [the tuning's ExactTopK]; a refill that carries the unchanged vectors replaces it with a CarriedTopK
    over the live version's stored answers, when it has them."""
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
    removed, added = _partition_diff(ranges, built, want, manifests)
    if not removed and not added:
        return (index, ids, ranges, trained, {"mode": "unchanged", "n_partitions_added": 0, "n_partitions_removed": 0,
                                              "n_vectors_added": 0, "n_vectors_removed": 0}), ""
    refill = _too_many(removed, added, manifests)
    carried = None
    drift_from = added[:8]  # the drift test, on the new shards' vectors (a bounded sample of them)
    if refill and isinstance(index, faiss.IndexIVFFlat):
        # one read of each shard finds the unchanged vectors (kept in their lists by the refill) and takes the sample
        lists, fresh, olds = _carried_lists(layout, index, ids, ranges, manifests, FRESH_SAMPLE_ROWS,
                                            {m.partition for m in drift_from})
        carried = (lists, olds)
        fresh += [drift_sample(load_verified(layout, m)[1])
                  for m in drift_from if m.partition not in ranges]  # partitions new to the index (a split)
    else:
        fresh = [drift_sample(load_verified(layout, m)[1]) for m in drift_from]
    fresh = [f for f in fresh if len(f)]
    drift = (centroid_distance(index, np.concatenate(fresh)) / trained["train_centroid_distance"]
             if fresh and trained.get("train_centroid_distance") else 1.0)
    del fresh
    if drift > cfg.drift_ratio:
        return None, (f"drift: new vectors sit {drift:.2f}x farther from their centroids than the training sample "
                      f"(limit {cfg.drift_ratio}); retrained")
    if refill:
        n_changed = len(set(removed) | {m.partition for m in added})
        acc = exact[0] if exact else None
        prev = load_ground_truth(layout, old) if acc is not None and carried is not None else None
        if prev is not None and prev["positions"].shape[1] == acc.k:
            from embed_assets.core.metrics import CarriedTopK

            acc = exact[0] = CarriedTopK(acc.queries, acc.k, prev, len(ids))  # the old answers, carried over
        return _refill_ivf(layout, index, ids, ranges, manifests, trained, drift, cfg.drift_ratio,
                           f"{n_changed} of {len(manifests)} partitions changed (more than "
                           f"{IN_PLACE_MAX_CHANGED:.0%})", carried, acc), ""
    drop = _drop_mask(len(ids), ranges, removed)
    n_added = sum(int(m.n_rows) for m in added)
    if ids.arrow.null_count + int(drop.sum()) > MAX_HOLES * (len(ids) + n_added):
        return _refill_ivf(layout, index, ids, ranges, manifests, trained, drift, cfg.drift_ratio,
                           f"removed positions past {MAX_HOLES:.0%} of the id map (compacted)",
                           exact=exact[0] if exact else None), ""
    if drop.any():
        gone = np.ascontiguousarray(np.flatnonzero(drop).astype(np.int64))
        index.remove_ids(faiss.IDSelectorArray(len(gone), faiss.swig_ptr(gone)))  # what a hashtable map accepts
    parts = [ids.with_holes(drop)]
    new_ranges = {k: r for k, r in ranges.items() if k not in removed}
    _add_shards(index, layout, added, len(ids), parts, new_ranges, with_ids=True)
    ids = ItemIds.concat(parts)
    how = {"mode": "in_place", "n_partitions_added": len(added), "n_partitions_removed": len(removed),
           "n_vectors_added": sum(m.n_rows for m in added), "n_vectors_removed": int(drop.sum()),
           "drift_ratio": float(drift)}
    return (index, ids, new_ranges, trained, how), ""


def _list_of_labels(ivf, n: int) -> np.ndarray:
    """The inverted list each stored label sits in (-1: none), read from the lists themselves."""
    import faiss

    out = np.full(n, -1, dtype=np.int64)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            out[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size)] = lst
    return out


def _carried_lists(layout: Layout, ivf, old_ids: ItemIds, ranges: dict, manifests, sample_rows: int = 0,
                   sample_from: set[str] = frozenset()
                   ) -> tuple[dict[str, np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """Per partition still in `ranges`: for each row of its current shard, the inverted list its unchanged vector
    already sits in (same item id in the same partition, and the stored vector equal to the shard's, compared
    exactly: IVF-Flat stores the fp32 of the fp16 values), else -1. One shard in memory at a time. Also returns the
    `drift_sample` (fp32) of each shard of `sample_from`: the drift test's sample, from the same read, and per
    partition each row's old position where its vector is unchanged, else -1 (`metrics.CarriedTopK`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from embed_assets.core.shards import load_verified

    list_of = _list_of_labels(ivf, len(old_ids))
    out: dict[str, np.ndarray] = {}
    old_positions: dict[str, np.ndarray] = {}
    fresh: list[np.ndarray] = []
    # last shard first: the refill then adds them first shard first, and its first reads find the shards read last
    # here still parsed (shards.load_verified keeps the last two), not the ones read longest ago
    for m in reversed(manifests):
        if m.partition not in ranges:
            continue
        start, count = ranges[m.partition]
        shard_ids, emb = load_verified(layout, m)
        idx = pc.index_in(pa.array(shard_ids, pa.string()), value_set=old_ids.arrow.slice(start, count))
        idx = idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        rows = np.flatnonzero(idx >= 0)
        labels = start + idx[rows]
        assign = np.full(len(shard_ids), -1, dtype=np.int64)
        olds = np.full(len(shard_ids), -1, dtype=np.int64)
        for c in range(0, len(rows), 32_768):  # bounded: 2 x 50 MB of fp32 at a time
            r, lab = rows[c:c + 32_768], labels[c:c + 32_768]
            same = (ivf.reconstruct_batch(lab) == emb[r].astype(np.float32)).all(axis=1)
            assign[r[same]] = list_of[lab[same]]
            olds[r[same]] = lab[same]
        out[m.partition] = assign
        old_positions[m.partition] = olds
        if m.partition in sample_from:
            fresh.append(drift_sample(emb, sample_rows))
        del emb, shard_ids
    return out, fresh, old_positions


def _refill_ivf(layout: Layout, index, old_ids: ItemIds, ranges: dict, manifests, trained: dict, drift: float,
                limit: float, why: str, carried: tuple | None = None, exact=None):
    """Empty the trained IVF index and add every shard again: a rebuild without k-means (the drift test passed, so
    the centroids and the codec still fit); `trained` stays the original training's record, the drift baseline of
    later updates. On IVF-Flat an unchanged vector goes back into the list it was in (`_carried_lists`), so only
    new and changed vectors are assigned to a centroid: the catalog-sized assignment pass is what a refill saves
    besides k-means. What the lists hold is what a plain refill would put there (test: core/test_index_tune.py)."""
    import faiss

    if carried is None:  # (`carried`: (lists, old positions), computed already by the caller's drift test)
        lists, _, olds = (_carried_lists(layout, index, old_ids, ranges, manifests)
                          if isinstance(index, faiss.IndexIVFFlat) and isinstance(ranges, dict) else ({}, [], {}))
    else:
        lists, olds = carried
    carried = lists
    del old_ids
    n_carried = sum(int((a >= 0).sum()) for a in carried.values())  # counted before the adds fill the rest in
    index.reset()  # inverted lists and the direct map emptied; the coarse quantizer and the codec kept
    parts: list = []
    new_ranges: dict = {}
    _add_shards(index, layout, manifests, 0, parts, new_ranges, with_ids=True, assigned=carried, exact=exact,
                old_positions=olds)
    ids = ItemIds.concat(parts)
    how = {"mode": "refill", "reason": f"{why}: trained centroids re-used (drift {drift:.2f} <= {limit})",
           "n_partitions_added": len(manifests), "n_partitions_removed": 0, "n_vectors_added": len(ids),
           "n_vectors_removed": 0, "drift_ratio": float(drift), "n_assignments_carried": n_carried}
    return index, ids, new_ranges, trained, how


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
        pr = peek["partition_ranges"]
        gone, new = _partition_diff(pr, peek.get("shard_fingerprints") or {}, want, manifests)
        n_old = sum(c for _, c in pr.values())
        n_new = n_old - sum(pr[k][1] for k in gone) + sum(int(m.n_rows) for m in new)
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
    removed, added = _partition_diff(ranges, built, want, manifests)
    if not removed and not added:
        return index, ids, ranges, {"mode": "unchanged", "n_partitions_added": 0, "n_partitions_removed": 0,
                                    "n_vectors_added": 0, "n_vectors_removed": 0}
    if _too_many(removed, added, manifests):
        return None
    drop = _drop_mask(len(ids), ranges, removed)
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
                      queries: Callable[[], tuple[np.ndarray, str]] | None = None,
                      promotion: "PromotionConfig | None" = None) -> dict[str, Any]:
    """Index every current shard, refusing stale, untrusted, mixed-version or failing-norm shards.

    When a trusted flat index of the same version exists and few partitions changed, it is updated in place: the
    rows of changed and vanished partitions removed, the new shards' rows added (`update.mode` in the manifest says
    which happened). Otherwise it is rebuilt from the shards.

    `kind="auto"` picks the structure by size and memory budget (`index_tune.choose_structure`: flat up to
    `flat_max_items`, else IVF), and tunes a non-flat index's search knob on held-out `queries()` (vectors and where
    they came from) until recall@k against exact search meets the target; the choice, the params, the measured
    recall, QPS and curve go in the manifest (`structure`, `tuning`). An IVF index is updated in place like a flat one
    while few partitions changed; past that, or once removals leave too many holes, it is refilled (every shard
    added again to the trained index, no k-means); only the drift test calls for a retrain (`update.mode`,
    `update.reason`).

    What to index comes from the manifests and the files' checksums alone, never from the catalog. The catalog is
    synced on the way (so it lists the indexed shards), but a busy one (`CatalogLocked` after `catalog_timeout_s`)
    only defers that: the index is built, `catalog_deferred` is recorded, and the next sync catches up."""
    from embed_assets.core import catalog
    from embed_assets.core.shards import NORM_TOLERANCE, clear_previous, current_shards

    tol = NORM_TOLERANCE if tol is None else tol
    t0 = time.perf_counter()
    store_sync = sync_index_with_store(layout) if layout.store is not None else None
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
    from embed_assets.core.index_tune import TuneConfig, choose_structure, recall_curve, tune
    from embed_assets.core.metrics import CURVE_KS, CarriedTopK, ExactTopK, cutoffs, vector_keys

    version = manifests[0].version if manifests else {}
    want = {m.partition: m.fingerprint for m in manifests}
    cfg = tune_config or TuneConfig()
    structure = choose_structure(sum(m.n_rows for m in manifests), EMBEDDING_DIM, cfg) if kind == "auto" else \
        {"kind": kind, "factory": {"flat": "Flat", "hnsw": "HNSW32,Flat"}.get(kind, kind), "why": "asked for"}
    built_kind, trained, tuning = structure["kind"], None, None
    exact, k_gt = None, max(cfg.k, *CURVE_KS)
    if built_kind != "flat":
        q, source = queries() if queries is not None else (None, "")
        if q is None or not len(q):
            raise IndexBuildError(f"index not built: a {built_kind} index is tuned on held-out queries, and none "
                                  "were given (configure labelled queries, or items with a title field)")
        # one exact pass at k = 100 serves the tuning (recall@k) and the recall@k curve the report shows; an IVF
        # build or refill, which reads every shard anyway, computes it on the way. It is kept twice as deep, with
        # the version (ground_truth.npz), so that the next refill can carry it over (CarriedTopK)
        exact = ExactTopK(q, GROUND_TRUTH_DEPTH * k_gt)
    if built_kind == "ivf":
        holder = [exact]  # a refill may answer from the previous version's ground truth (CarriedTopK) instead
        updated, why = _update_ivf_in_place(layout, version, manifests, want, structure, cfg, holder)
        if updated is not None:
            index, ids, ranges, trained, how = updated
            exact = holder[0]
        else:
            index, ids, ranges, trained = _build_ivf(layout, manifests, structure, cfg, exact)
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
    ground_truth = None
    if exact is not None:
        # a full pass fed it every indexed vector once; after an in-place update (only the new shards were read)
        # the exact search reads the shards itself
        full_pass = exact.n_seen == len(ids) == index.ntotal
        where = {"partition_ranges": ranges, "shard_fingerprints": want}
        if full_pass and isinstance(exact, CarriedTopK):
            scores, pos, cut, again = exact.result(need=k_gt)
            if len(again):  # too many of their answers changed: searched again, over every shard
                scores[again], pos[again] = exact_search(layout, where, q[again], exact.k)
                cut[again] = cutoffs(scores[again], pos[again])
            how_gt = f"carried from the previous version ({len(q) - len(exact.fresh_q) - len(again)} of {len(q)} " \
                     "queries; the others searched)"
        else:
            scores, pos = exact.result() if full_pass else exact_search(layout, where, q, exact.k)
            cut = cutoffs(scores, pos)
            how_gt = "index pass" if full_pass else "exact search"
        ground_truth = {"keys": vector_keys(q), "scores": scores, "positions": pos, "cutoff": cut}
        gt = (scores[:, :k_gt], pos[:, :k_gt])
        tuning = {**tune(index, q, gt, cfg), "target": cfg.recall_target, "k": cfg.k, "queries": source,
                  "n_queries": int(len(q)), "ground_truth": how_gt}
        tuning["recall_at_k"] = recall_curve(index, q, gt)
    # No id can sit in two shards: an item's partition is a function of its id (core/partitioning.py) and every
    # shard above was checked to hold exactly its partition's current rows. So no catalog-sized set() is built here.
    build_s = time.perf_counter() - t0
    meta = {"kind": built_kind, "kind_requested": kind, "structure": structure, "trained": trained,
            "tuning": tuning, "tune_config": cfg.as_dict() if kind == "auto" else None,
            "faiss_type": type(index).__name__, "metric": "inner_product", "build_seconds": build_s,
            "version": version, "partitions": [m.partition for m in manifests],
            "shard_fingerprints": want, "partition_ranges": ranges, "update": how, "catalog_sync": sync,
            "catalog_deferred": bool(deferred), "catalog_deferred_reason": deferred}
    pcfg = promotion or PromotionConfig()
    if how["mode"] == "unchanged" and current_version(layout):
        saved = {**read_index_manifest(layout), "update": how}  # nothing to write: the live version is this index
    else:
        if built_kind == "flat" and queries is not None and current_version(layout):
            q, source = queries()  # the shadow comparison needs held-out queries for a flat candidate too
        elif built_kind == "flat":
            q = None
        meta["shadow"] = shadow_compare(layout, index, ids, q, tuning, pcfg) if q is not None and len(q) else \
            {"compared": False, "reason": "no current version" if not current_version(layout) else "no queries"}
        name, saved = write_version(layout, index, ids, meta, pcfg.keep_versions, ground_truth)
        blocked = promotion_blockers(tuning, meta["shadow"], pcfg)
        if blocked:
            live = current_version(layout)
            rejected = reject(layout, name, {"blocked_by": blocked, "shadow": meta["shadow"], "tuning": tuning})
            raise IndexBuildError(f"promotion blocked: {'; '.join(blocked)}. Version {live or '(none)'} stays "
                                  f"current; the candidate is kept as {layout.index_root / rejected}")
        saved["pruned"] = promote(layout, name, pcfg.keep_versions)
    # Every shard is current and indexed: the previous generation has served its purpose (except a partition being
    # written now, or an indexed shard replaced since: a writer may still re-use those vectors).
    clear_previous(layout, meta["shard_fingerprints"])
    if store_sync is not None:
        saved["store_sync"] = store_sync  # what sync_index_with_store did first: same, fetched, published, ...
    return saved


@dataclass(frozen=True)
class PromotionConfig:
    """What a new index version must show before `current` moves to it."""

    max_recall_drop: float = 0.02  # its ANN recall@10 may be at most this far below the live version's
    min_overlap: float = 0.0  # mean overlap@10 with the live version's answers (0: recorded, not enforced; a
    # changed catalog legitimately changes answers)
    keep_versions: int = KEEP_VERSIONS
    shadow_queries: int = 200  # of the held-out queries, this many answer on both versions


def shadow_compare(layout: Layout, index, ids, queries: np.ndarray, tuning: dict | None,
                   cfg: PromotionConfig, k: int = 10) -> dict[str, Any]:
    """The candidate and the live version answer the same held-out queries: overlap@10 of their answers (by item
    id), the recall delta (each against exact search over its own shards: the tuning's measure, 1 for flat) and the
    latency delta (single queries, p50). Skipped, with the reason, when there is no live version, it holds another
    embedding version, or the two would not fit in memory at once."""
    from embed_assets.core.metrics import latency_ms

    live = current_version(layout)
    if live is None:
        return {"compared": False, "reason": "no current version"}
    try:
        cur_m = read_index_manifest(layout, live)
    except IndexBuildError as e:
        return {"compared": False, "reason": f"current version unreadable: {e}"}
    if cur_m.get("index_bytes", 0) > in_place_memory_limit():
        return {"compared": False, "reason": "the live version and the candidate would not fit in memory at once"}
    try:
        cur, cur_ids, cur_m = load_index(layout, live)
    except IndexBuildError as e:
        return {"compared": False, "reason": f"current version unreadable: {e}"}
    q = np.ascontiguousarray(queries[:cfg.shadow_queries], dtype=np.float32)
    _, a = cur.search(q, k)
    _, b = index.search(q, k)
    overlap = float(np.mean([len({cur_ids[int(x)] for x in ra if x >= 0} & {ids[int(y)] for y in rb if y >= 0}) / k
                             for ra, rb in zip(a, b)])) if len(q) else None
    cur_recall = (cur_m.get("tuning") or {}).get("recall", 1.0 if cur_m.get("kind") == "flat" else None)
    new_recall = (tuning or {}).get("recall", 1.0)
    lat_cur, lat_new = latency_ms(cur, q[:50], k, budget_s=5.0), latency_ms(index, q[:50], k, budget_s=5.0)
    return {"compared": True, "against": live, "n_queries": int(len(q)), "overlap_at_10": overlap,
            "recall_at_10": new_recall, "live_recall_at_10": cur_recall,
            "recall_delta": None if cur_recall is None else new_recall - cur_recall,
            "p50_ms": lat_new["p50"], "live_p50_ms": lat_cur["p50"], "p50_delta_ms": lat_new["p50"] - lat_cur["p50"]}


def promotion_blockers(tuning: dict | None, shadow: dict[str, Any], cfg: PromotionConfig) -> list[str]:
    """Why `current` must not move to the candidate (empty: promote). The recall check: a tuned index must meet
    its target. The shadow check: recall may not fall more than max_recall_drop below the live version's (or the
    target, when that is lower), overlap not below min_overlap."""
    out = []
    if tuning and not tuning.get("met"):
        out.append(f"recall check: ANN recall@10 {tuning['recall']:.4f} < target {tuning.get('target')}")
    if shadow.get("compared"):
        # The floor is the live version's recall, or the target when that is lower (a catalog that crossed the flat
        # threshold moves from exact search, recall 1, to a tuned index: the target is the contract), minus the drop.
        live = shadow.get("live_recall_at_10")
        target = (tuning or {}).get("target", 1.0)
        floor = None if live is None else min(live, target) - cfg.max_recall_drop
        if floor is not None and shadow["recall_at_10"] < floor:
            out.append(f"shadow: recall@10 {shadow['recall_at_10']:.4f} is below {floor:.4f} (the live version's "
                       f"{live:.4f} or the target {target}, whichever is lower, minus {cfg.max_recall_drop})")
        if shadow.get("overlap_at_10") is not None and shadow["overlap_at_10"] < cfg.min_overlap:
            out.append(f"shadow: overlap@10 with the live version {shadow['overlap_at_10']:.3f} < {cfg.min_overlap}")
    return out

"""Choosing and tuning the ANN index for a recall target, autofaiss-style: small functions, every choice recorded.

    structure = choose_structure(n, dim, TuneConfig(...))      # flat below a size, else IVF (Flat / SQ8 / PQ by budget)
    index     = train_ivf(structure, sample)                   # k-means on a bounded sample
    gt        = metrics.exact_top_k_blocks(blocks(), q, k)     # brute force, streamed: the reference
    tuned     = tune(index, queries, gt, cfg)                  # nprobe (IVF) or efSearch (HNSW) raised until the
                                                               # target holds; the whole recall/QPS curve is kept

Recall is recall@k against exact search on *held-out* queries (texts that are not the indexed items: labelled
queries, or item titles searched against title+text vectors), tie-aware (`metrics.ann_recall_at_k`). QPS is measured
on the same queries, batched, on this machine's threads.

Why IVF and not HNSW above the flat threshold: an HNSW graph cannot drop items in place, and its build grows with
every item; IVF trains on a bounded sample (117 s for 4,096 lists at 1M on these 2 busy cores,
benchmarks/results/index_1m.txt), adds and removes ids in place, and its one knob (nprobe) moves recall
monotonically. HNSW stays available (`kind="hnsw"`) and is tuned the same way (efSearch).

faiss is imported inside functions only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from embed_assets.core.metrics import CURVE_KS, ann_recall_at_k


@dataclass(frozen=True)
class TuneConfig:
    recall_target: float = 0.95  # ANN recall@k against exact search, on held-out queries
    k: int = 10
    flat_max_items: int = 250_000  # at or below: exact search (flat) is fast enough and needs no tuning
    memory_budget_mb: int = 0  # the index's bytes; 0 = no budget (IVF-Flat, vectors in fp32)
    n_queries: int = 500  # held-out queries the tuning measures recall and QPS on
    train_sample: int = 160_000  # k-means sample for the IVF centroids (bounded: not the catalog); 39 x 4,096
    points_per_list: int = 39  # faiss's rule of thumb: at least this many training points per centroid
    nprobe_grid: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    ef_grid: tuple[int, ...] = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    drift_ratio: float = 1.2  # retrain when new vectors sit this much farther from their centroids than at training
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def n_lists(n: int, cfg: TuneConfig) -> int:
    """IVF list count: the power of two nearest 4 sqrt(n) (faiss's guideline), no more than the sample can train."""
    want = 2 ** max(4, round(math.log2(4 * math.sqrt(max(n, 1)))))
    cap = 2 ** int(math.log2(max(16, min(cfg.train_sample, n) // cfg.points_per_list)))
    return int(min(want, cap))


def choose_structure(n: int, dim: int, cfg: TuneConfig) -> dict[str, Any]:
    """What to build for n vectors of dim, and why (recorded in the index manifest)."""
    if n <= cfg.flat_max_items:
        return {"kind": "flat", "factory": "Flat", "why": f"{n:,} items <= flat_max_items {cfg.flat_max_items:,}: "
                                                             "exact search, recall 1 by definition"}
    nlist = n_lists(n, cfg)
    budget = cfg.memory_budget_mb * 2 ** 20
    options = [("Flat", n * dim * 4), ("SQ8", n * dim), ("PQ" + str(dim // 8), n * (dim // 8))]
    codec, size = next(((c, s) for c, s in options if not budget or s <= budget), options[-1])
    why = (f"{n:,} items > flat_max_items {cfg.flat_max_items:,}: IVF with {nlist:,} lists (~4 sqrt(n)); "
           f"codes {codec} ({size / 2**20:,.0f} MB of vectors"
           + (f", budget {cfg.memory_budget_mb:,} MB)" if budget else ", no memory budget)"))
    return {"kind": "ivf", "factory": f"IVF{nlist},{codec}", "nlist": nlist, "codec": codec, "why": why}


def train_ivf(structure: dict[str, Any], sample: np.ndarray, seed: int = 0):
    """An empty, trained IVF index (inner product) from the structure's factory string (seeded k-means)."""
    import faiss

    x = np.ascontiguousarray(sample, dtype=np.float32)
    index = faiss.index_factory(x.shape[1], structure["factory"], faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = seed
    index.train(x)
    return index


def _set_param(index, name: str, value: int) -> None:
    import faiss

    faiss.ParameterSpace().set_index_parameter(index, name, value)


def measure(index, queries: np.ndarray, gt: tuple[np.ndarray, np.ndarray], k: int,
            label_of: Callable[[np.ndarray], np.ndarray] | None = None, repeats: int = 2) -> dict[str, float]:
    """Recall@k against `gt` (scores, ids) and QPS (batched, best of `repeats`) of the index as set now."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores, ids = index.search(q, k)
        best = min(best, time.perf_counter() - t0)
    if label_of is not None:
        ids = label_of(ids)
    gt_scores, gt_ids = gt
    return {"recall": ann_recall_at_k(ids, scores, gt_ids, gt_scores, k), "qps": len(q) / max(best, 1e-9)}


def recall_curve(index, queries: np.ndarray, gt: tuple[np.ndarray, np.ndarray], ks: Sequence[int] = CURVE_KS,
                 label_of: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """ANN recall@k against `gt` (exact top-max(ks)) at the index's current setting, for each k: one search per k (an
    HNSW search widens with k, so recall@10 comes from what a top-10 query gets). Measured once per index version,
    when it is built, on the tuning's held-out queries; the report reads it from the manifest (`tuning.recall_at_k`)
    instead of a second exact pass over the catalog. Cost: len(ks) batched searches of the tuning queries."""
    return {"k": [int(k) for k in ks],
            "ann": [measure(index, queries, gt, int(k), label_of, repeats=1)["recall"] for k in ks]}


def tune(index, queries: np.ndarray, gt: tuple[np.ndarray, np.ndarray], cfg: TuneConfig,
         label_of: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """Raise the index's search knob (nprobe for IVF, efSearch for HNSW) until recall@k meets the target.

    Returns {"param", "value", "recall", "qps", "met", "curve": [{value, recall, qps}, ...]}. When no value meets
    the target, the best recall found is set and `met` is False (the recall check then fails, and says so)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexHNSW) else None
    if ivf is not None:
        name, grid = "nprobe", [v for v in cfg.nprobe_grid if v <= ivf.nlist] or [ivf.nlist]
    elif isinstance(index, faiss.IndexHNSW):
        name, grid = "efSearch", list(cfg.ef_grid)
    else:
        m = measure(index, queries, gt, cfg.k, label_of)
        return {"param": None, "value": None, **m, "met": m["recall"] >= cfg.recall_target, "curve": [m]}
    curve, chosen = [], None
    for v in grid:
        _set_param(index, name, v)
        m = {"value": v, **measure(index, queries, gt, cfg.k, label_of)}
        curve.append(m)
        if m["recall"] >= cfg.recall_target:
            chosen = m
            break
    if chosen is None:
        chosen = max(curve, key=lambda m: m["recall"])
    _set_param(index, name, chosen["value"])
    return {"param": name, "value": chosen["value"], "recall": chosen["recall"], "qps": chosen["qps"],
            "met": chosen["recall"] >= cfg.recall_target, "curve": curve}


def centroid_distance(index, vectors: np.ndarray) -> float:
    """Mean squared distance of vectors to their nearest IVF centroid: the drift test's statistic (how well the
    trained structure fits these vectors). NaN for an index without a coarse quantizer."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or len(vectors) == 0:
        return float("nan")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    sims, _ = ivf.quantizer.search(x, 1)
    return float(np.mean(np.maximum(0.0, 2.0 - 2.0 * sims[:, 0])))  # unit vectors: |x - c|^2 = 2 - 2 x.c (c ~ unit)


def sample_rows(sizes: Sequence[int], m: int, seed: int) -> list[np.ndarray]:
    """A uniform sample of m rows over blocks of these sizes: the rows to take from each block, sorted."""
    n = int(sum(sizes))
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=min(m, n), replace=False)) if n else np.zeros(0, dtype=np.int64)
    out, start = [], 0
    for s in sizes:
        lo, hi = np.searchsorted(picked, [start, start + s])
        out.append(picked[lo:hi] - start)
        start += s
    return out


QUERY_CACHE_NAME = "tuning_queries.parquet"  # under HOME/index: the held-out queries' vectors, by text


def held_out_queries(layout, encoder, n: int, queries_path: str | None = None, seed: int = 0
                     ) -> tuple[np.ndarray, str]:
    """Query vectors the index does not hold, encoded with the index's own model: the labelled queries when a
    queries file is configured, else the titles of the n items with the smallest seeded hash of their id (searched
    against title + text vectors, they are near their item but not it). That sample keeps its items from one build
    to the next but for those changed or removed, so each build's tuning measures nearly the same queries, and their
    vectors are re-used (`encode_cached`: 500 titles, 0.4 s of a refill at 500k items). Returns (vectors, where they
    came from)."""
    texts: list[str] = []
    if queries_path:
        from embed_assets.core.beir import load_queries

        texts = sorted(load_queries(queries_path).values())[:n]
        source = f"labelled queries ({queries_path})"
    if not texts:
        texts = sample_titles(layout, n, seed)
        source = "item titles (a seeded sample by item-id hash)"
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), "none"
    return encode_cached(encoder, texts, layout.index_root / QUERY_CACHE_NAME), source


def sample_titles(layout, n: int, seed: int = 0) -> list[str]:
    """The non-empty titles of the n items with the smallest seeded hash of their id (`items.sample_by_id_hash`)."""
    from embed_assets.core.items import sample_by_id_hash

    return [t for (t,) in sample_by_id_hash(layout, n, ["title"], "length(title) > 0", seed)]


def encode_cached(encoder, texts: list[str], path) -> np.ndarray:
    """encoder.encode(texts) as fp32, taking the vectors that `path` holds for the same texts and the same embedding
    version, then replacing `path` (atomically) with exactly these texts' vectors: bounded by one call's texts. A
    missing or unreadable file, or one of another embedding version, is no cache: everything is encoded."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from embed_assets.core.atomic import atomic_write

    version = json.dumps(encoder.version, sort_keys=True, default=str)
    known: dict[str, np.ndarray] = {}
    try:
        t = pq.read_table(path)
        if (t.schema.metadata or {}).get(b"embedding_version", b"").decode() == version:
            col = t.column("vector").combine_chunks()
            vecs = col.flatten().to_numpy().reshape(len(t), col.type.list_size)
            known = dict(zip(t.column("text").to_pylist(), vecs))
    except (OSError, ValueError, KeyError, pa.ArrowException):
        known = {}
    missing = [x for x in dict.fromkeys(texts) if x not in known]
    if missing:
        vecs, _ = encoder.encode(missing)
        known.update(zip(missing, vecs))
    out = np.ascontiguousarray(np.stack([known[x] for x in texts]), dtype=np.float32)
    table = pa.table({"text": pa.array(texts, pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(out.ravel()), out.shape[1])})
    table = table.replace_schema_metadata({"embedding_version": version})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return out

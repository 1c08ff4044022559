"""What the seeds' production notes ask to watch, each bounded whatever the catalog size:

- coverage: all rows read / items with text / items with vectors, and the rejects (from processed_items' state and
  the index);
- drift between versions: the same sampled items' vectors now and at the last report (mean cosine), the shift of
  their centroid, and per-shard norm statistics (from the manifests, no vector read);
- tail latency of a whole query: encode (warm model) plus search, p50/p95/p99;
- the seeds' TF-IDF baseline beside the embeddings: on labelled queries (nDCG@10 etc., corpora up to
  `TFIDF_MAX_CORPUS` items) and on the label-free field -> item task;
- eval without labels: an item's title searched among a pool of items must find that item (recall@1/10), for the
  embeddings and for TF-IDF on the same pool.

Costs at 10M items: the drift sample and the field -> item pool read O(sample) rows (DuckDB over the partition
files, an index lookup per sampled id); nothing here reads every vector.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from embed_assets.core.index import stored_vectors
from embed_assets.core.layout import Layout

DRIFT_SAMPLE = 1_000
POOL = 20_000
TFIDF_MAX_CORPUS = 200_000


def coverage(layout: Layout, n_indexed: int) -> dict[str, Any]:
    from embed_assets.core.items import load_processed

    st = load_processed(layout)
    n_items = int(st.get("n_items") or sum(p["n_rows"] for p in st["partitions"]))
    n_read = st.get("n_rows_read")
    return {"items_total": int(n_read) if n_read is not None else None, "items_with_text": n_items,
            "items_with_vectors": int(n_indexed), "rejects": st.get("n_rejected"),
            "reject_counts": st.get("reject_counts") or {},
            "vector_coverage": n_indexed / n_items if n_items else 0.0,
            "text_coverage": n_items / n_read if n_read else None}


def _positions_of(ids, wanted: list[str]) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    pos = pc.index_in(pa.array(wanted, pa.string()), value_set=ids.arrow)
    return np.array([-1 if v is None else v for v in pos.to_pylist()], dtype=np.int64)


def vector_drift(layout: Layout, index, ids, version: dict, seed: int = 0, n: int = DRIFT_SAMPLE) -> dict[str, Any]:
    """The same items' vectors against the last report's sample (reports/drift_sample.parquet): mean and min cosine,
    centroid shift (1 - cos between the sample centroids). The sample is kept while at least half of it is still
    indexed, then drawn again. Per-shard norms come from the manifests."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embed_assets.core.atomic import atomic_write
    from embed_assets.core.shards import list_manifests

    path = layout.reports_dir / "drift_sample.parquet"
    out: dict[str, Any] = {"n_compared": 0, "mean_cosine": None, "min_cosine": None, "centroid_shift": None,
                           "previous_model_revision": None}
    keep_ids: list[str] = []
    if path.exists():
        try:
            old = pq.read_table(path)
            old_ids = old.column("item_id").to_pylist()
            pos = _positions_of(ids, old_ids)
            have = pos >= 0
            if have.any():
                prev = np.array(old.column("vector").to_pylist(), dtype=np.float32)[have]
                now = stored_vectors(index, pos[have])
                cos = np.sum(prev * now, axis=1) / (np.linalg.norm(prev, axis=1) * np.linalg.norm(now, axis=1))
                c0, c1 = prev.mean(axis=0), now.mean(axis=0)
                out.update(n_compared=int(have.sum()), mean_cosine=float(cos.mean()), min_cosine=float(cos.min()),
                           centroid_shift=max(0.0, float(1 - c0 @ c1 / (np.linalg.norm(c0) * np.linalg.norm(c1)))),
                           previous_model_revision=(old.schema.metadata or {}).get(b"model_revision", b"").decode())
            if have.sum() >= len(old_ids) / 2:
                keep_ids = [i for i, h in zip(old_ids, have) if h]
        except Exception as e:  # a damaged sample is drawn again; drift is unknown this once
            out["error"] = f"{type(e).__name__}: {e}"
    if not keep_ids:
        valid = ids.valid_positions()
        rng = np.random.default_rng(seed)
        keep_ids = [ids[int(p)] for p in np.sort(rng.choice(valid, size=min(n, len(valid)), replace=False))]
    vecs = stored_vectors(index, _positions_of(ids, keep_ids))
    table = pa.table({"item_id": pa.array(keep_ids, pa.string()),
                      "vector": pa.array(list(vecs.astype(np.float32)), pa.list_(pa.float32()))},
                     metadata={"model_revision": str(version.get("model_revision", ""))})
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    norms = [m.norms for m in list_manifests(layout)]
    out["shard_norms"] = {"min": min((x["min"] for x in norms), default=None),
                          "max": max((x["max"] for x in norms), default=None),
                          "mean": float(np.mean([x["mean"] for x in norms])) if norms else None,
                          "n_shards": len(norms)}
    out["sample_size"] = len(keep_ids)
    return out


def query_latency(index, encoder, texts: list[str], k: int = 10, budget_s: float = 10.0) -> dict[str, Any]:
    """p50/p95/p99 (ms) of one whole query, encode + search, one at a time with a warm model, over `texts` or as
    many as fit in `budget_s` (at least 10)."""
    if not texts:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    encoder.encode(texts[:1])  # warm: the model is loaded and its first call paid
    times, start = [], time.perf_counter()
    for t in texts:
        if len(times) >= 10 and time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        v, _ = encoder.encode([t])
        index.search(np.ascontiguousarray(v, dtype=np.float32), k)
        times.append((time.perf_counter() - t0) * 1000)
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "n": len(times)}


def _tfidf(texts: list[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True, dtype=np.float32)
    return vec, vec.fit_transform(texts)


def _top_k_sparse(q, docs, k: int) -> np.ndarray:
    """Top-k rows of docs for each query row by cosine (TF-IDF rows are L2-normalized), in blocks of queries."""
    out = []
    for i in range(0, q.shape[0], 256):
        s = (q[i:i + 256] @ docs.T).toarray()
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        order = np.take_along_axis(-s, top, axis=1).argsort(axis=1)
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def tfidf_labelled(layout: Layout, queries: dict[str, str], qrels: dict, n_items: int) -> dict[str, Any]:
    """TF-IDF (the seeds' baseline) on the labelled queries over the whole corpus, when it has at most
    TFIDF_MAX_CORPUS items (the sparse matrix grows with the corpus); else {"skipped": why}."""
    import duckdb

    from embed_assets.core.metrics import evaluate_run

    if n_items > TFIDF_MAX_CORPUS:
        return {"skipped": f"{n_items:,} items > {TFIDF_MAX_CORPUS:,}: the TF-IDF matrix would grow with the catalog"}
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT item_id, text FROM read_parquet('{layout.partitions_dir}/*.parquet') "
                           "ORDER BY item_id").fetchall()
    item_ids, texts = [r[0] for r in rows], [r[1] for r in rows]
    vec, docs = _tfidf(texts)
    qids = sorted(q for q in queries if q in qrels)
    top = _top_k_sparse(vec.transform([queries[q] for q in qids]), docs, 100)
    return evaluate_run({q: [item_ids[j] for j in row] for q, row in zip(qids, top)}, qrels)


def field_to_item(layout: Layout, index, ids, encoder, pool: int = POOL, n_queries: int = 500,
                  seed: int = 0) -> dict[str, Any]:
    """Label-free eval on every catalog: each of `n_queries` items' title is searched among a pool of `pool` items
    (the queried items among them); recall@1 and @10 of finding the item itself, for the embeddings (exact search
    over the pool's stored vectors) and for TF-IDF over the pool's texts. Items whose title is their whole text are
    left out (the task would be trivial). The pool is the items with the smallest seeded hash of their id, the
    queries its first eligible items in that order: the same items from one report to the next but for those
    changed, so the numbers compare across versions, and the queries' vectors are re-used
    (`index_tune.encode_cached`, HOME/reports/field_to_item_queries.parquet)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from embed_assets.core.index_tune import encode_cached
    from embed_assets.core.items import sample_by_id_hash

    rows = sample_by_id_hash(layout, pool, ["item_id", "title", "text"], seed=seed)
    at = pc.index_in(pa.array([r[0] for r in rows], pa.string()), value_set=ids.arrow)
    held = pc.is_valid(at)  # the items the index holds (processed_items may have changed since it was built)
    rows = [r for r, h in zip(rows, held.to_numpy(zero_copy_only=False)) if h]
    picked = at.filter(held).to_numpy(zero_copy_only=False).astype(np.int64)  # their positions in the index
    pool_ids, texts = [r[0] for r in rows], [r[2] or "" for r in rows]
    cand = [j for j, r in enumerate(rows) if r[1] and r[1].strip() != (r[2] or "").strip()]
    if not cand:
        return {"skipped": "no item has a title distinct from its text", "pool": len(pool_ids)}
    qrows = np.asarray(cand[:n_queries], dtype=np.int64)
    titles = [rows[j][1] for j in qrows]
    qv = encode_cached(encoder, titles, layout.reports_dir / "field_to_item_queries.parquet")
    pool_vecs = stored_vectors(index, picked)
    from embed_assets.core.metrics import exact_top_k

    emb_top, _ = exact_top_k(pool_vecs, np.ascontiguousarray(qv, dtype=np.float32), 10)
    vec, docs = _tfidf(texts)
    tf_top = _top_k_sparse(vec.transform(titles), docs, 10)

    def recall(top, k):
        return float(np.mean([r in row[:k] for r, row in zip(qrows, top)]))

    return {"task": "title -> item", "pool": len(pool_ids), "n_queries": int(len(qrows)),
            "recall_at_1": recall(emb_top, 1), "recall_at_10": recall(emb_top, 10),
            "tfidf_recall_at_1": recall(tf_top, 1), "tfidf_recall_at_10": recall(tf_top, 10)}

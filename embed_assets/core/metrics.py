"""Retrieval metrics (trec_eval / BEIR definitions), ANN recall against exact search, latency percentiles."""

from __future__ import annotations

import math
import time
from typing import Mapping, Sequence

import numpy as np


def ndcg_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    """trec_eval's ndcg_cut: linear gain, log2(rank + 1) discount, ideal from the judged relevant docs."""
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate_run(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean metrics over the judged queries that have a ranking (as BEIR's pytrec_eval evaluation does)."""
    qids = [q for q in qrels if q in run and any(r > 0 for r in qrels[q].values())]
    if not qids:
        raise ValueError("no judged query has a ranking: check that query ids in qrels match queries.jsonl")

    def mean(fn, k):
        return float(np.mean([fn(run[q], qrels[q], k) for q in qids]))

    return {
        "ndcg_at_1": mean(ndcg_at_k, 1),
        "ndcg_at_10": mean(ndcg_at_k, 10),
        "ndcg_at_100": mean(ndcg_at_k, 100),
        "recall_at_1": mean(recall_at_k, 1),
        "recall_at_10": mean(recall_at_k, 10),
        "recall_at_100": mean(recall_at_k, 100),
        "mrr_at_10": mean(mrr_at_k, 10),
        "n_queries": len(qids),
    }


# The recall@k curve's k values (the report's `recall_at_k`, its chart, and the index's measured curve).
CURVE_KS: tuple[int, ...] = (1, 5, 10, 20, 50, 100)


def ann_recall_at_k(ann_ids: np.ndarray, ann_scores: np.ndarray, exact_ids: np.ndarray, exact_scores: np.ndarray,
                    k: int = 10, eps: float = 1e-5) -> float:
    """Mean share of exact search's top-k that the index found. Tie-aware: a returned item scoring at least the
    exact k-th score counts (duplicate texts have identical vectors, and either copy is a right answer)."""
    hits = []
    for a, sa, e, se in zip(ann_ids, ann_scores, exact_ids, exact_scores):
        valid = e[:k] >= 0
        k_eff = int(valid.sum())
        if not k_eff:
            continue
        kth = se[:k][valid][-1]
        want = {int(i) for i in e[:k][valid]}
        got = sum(1 for i, sc in zip(a[:k], sa[:k]) if i >= 0 and (int(i) in want or sc >= kth - eps))
        hits.append(min(got, k_eff) / k_eff)
    return float(np.mean(hits)) if hits else 0.0


def drop_self(ids: np.ndarray, scores: np.ndarray, self_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k lists with each query's own row removed (searched with k + 1): an item used as a query is not its own
    neighbour, so rank 1 is never a free hit."""
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    for q, (row, sc, me) in enumerate(zip(ids, scores, self_rows)):
        keep = row != me
        out_ids[q, : min(k, int(keep.sum()))] = row[keep][:k]
        out_scores[q, : min(k, int(keep.sum()))] = sc[keep][:k]
    return out_ids, out_scores


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k (ids, scores) by inner product: FAISS's blocked BLAS k-NN, no index involved."""
    import faiss

    k_eff = min(k, len(vectors))
    if len(queries) == 0 or k_eff == 0:
        return np.zeros((len(queries), k), dtype=np.int64), np.zeros((len(queries), k), dtype=np.float32)
    scores, ids = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                            np.ascontiguousarray(vectors, dtype=np.float32), k_eff, metric=faiss.METRIC_INNER_PRODUCT)
    return ids, scores


def exact_top_k_blocks(blocks, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k (ids = rows in block order, scores) over vectors given block by block (`ExactTopK`, as
    faiss.contrib's knn_ground_truth): memory is one block, whatever the catalog."""
    acc, start = ExactTopK(queries, k), 0
    for b in blocks:
        acc.add(np.arange(start, start + len(b), dtype=np.int64), b)
        start += len(b)
    scores, ids = acc.result()
    return ids, scores


class ExactTopK:
    """Exact inner-product top-k of fixed queries over vectors fed block by block with their positions (faiss's
    ResultHeap, as `knn_ground_truth` merges blocks): a pass that reads every shard anyway (an index build) yields the
    tuning's ground truth on the way, instead of a second read of the catalog. `n_seen` counts the vectors fed, so
    the caller can tell a full pass from a partial one. `exclude` (one position per query) leaves that position out
    of the query's answer: an item used as a query is not its own neighbour."""

    def __init__(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None):
        import faiss

        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.exclude = None if exclude is None else np.asarray(exclude, dtype=np.int64)[:, None]
        self.heap = faiss.ResultHeap(len(self.queries), k, keep_max=True)
        self.n_seen = 0

    def add(self, positions: np.ndarray, x: np.ndarray, old_positions: np.ndarray | None = None) -> None:
        """`old_positions` is for `CarriedTopK` (same call); ignored here."""
        import faiss

        kk = min(self.k + (self.exclude is not None), len(x))  # one more, for the excluded position
        self.n_seen += len(x)
        if kk == 0 or not len(self.queries):
            return
        d, i = faiss.knn(self.queries, np.ascontiguousarray(x, dtype=np.float32), kk,
                         metric=faiss.METRIC_INNER_PRODUCT)
        pos = np.where(i >= 0, np.asarray(positions, dtype=np.int64)[np.maximum(i, 0)], -1)
        if self.exclude is not None:
            gone = pos == self.exclude
            d[gone], pos[gone] = -np.inf, -1
        self.heap.add_result(d, pos)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), best first; -1 where fewer than k vectors were fed."""
        self.heap.finalize()
        self.heap.I[~np.isfinite(self.heap.D)] = -1
        return self.heap.D, self.heap.I


def cutoffs(scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per query, the score at or below which a top-k list may miss rows: its last score when the list is full (rows
    beyond k score no higher), -inf when it holds every row there was."""
    if scores.shape[1] == 0:
        return np.full(len(scores), -np.inf, dtype=np.float32)
    return np.where(positions[:, -1] >= 0, scores[:, -1], -np.inf).astype(np.float32)


def vector_keys(vectors: np.ndarray) -> np.ndarray:
    """One 8-byte key per vector (blake2b of its fp32 bytes): which stored answers were computed for these very
    query vectors."""
    import hashlib

    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") for r in v],
                    dtype=np.uint64)


class CarriedTopK:
    """`ExactTopK` after a change, from the previous answers instead of a search over every vector: what a refill
    that keeps most vectors needs (index.py), fed the same way, block by block, with each row's old position when
    its vector is the one the previous answers saw (else -1).

    `prev` holds the previous top-k (`scores`, `positions`, `cutoff` per query, and `keys`: `vector_keys` of its
    queries). A query found there keeps its answers whose row was carried (moved to its new position) and gains
    the exact top-k of the rows not carried; the result is exact down to the larger of the two cutoffs, since every
    carried row missing from the old answers scores no higher than the old cutoff. A query not found there is
    searched over every row. `result` says which carried queries kept fewer than `need` exact answers (many of
    theirs changed): their caller searches them again. Cost: the rows not carried x the carried queries, plus every
    row x the new queries; memory: one position per old row (the old -> new map) and the answers."""

    def __init__(self, queries: np.ndarray, k: int, prev: dict[str, np.ndarray], n_old: int):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        at = {int(key): i for i, key in enumerate(prev["keys"])}
        self.from_prev = np.array([at.get(int(key), -1) for key in vector_keys(self.queries)], dtype=np.int64)
        self.carried_q = np.flatnonzero(self.from_prev >= 0)
        self.fresh_q = np.flatnonzero(self.from_prev < 0)
        self.changed = ExactTopK(self.queries[self.carried_q], k)  # fed only the rows not carried
        self.full = ExactTopK(self.queries[self.fresh_q], k)  # fed every row
        self.prev = prev
        self.new_position = np.full(n_old, -1, dtype=np.int64)
        self.n_seen = 0

    def add(self, positions: np.ndarray, x: np.ndarray, old_positions: np.ndarray | None = None) -> None:
        positions = np.asarray(positions, dtype=np.int64)
        self.n_seen += len(x)
        if len(self.fresh_q):
            self.full.add(positions, x)
        kept = np.zeros(len(x), dtype=bool) if old_positions is None else np.asarray(old_positions) >= 0
        if kept.any():
            self.new_position[np.asarray(old_positions)[kept]] = positions[kept]
        if len(self.carried_q) and (~kept).any():
            self.changed.add(positions[~kept], np.asarray(x)[~kept])

    def result(self, need: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(scores, positions, cutoff per query, the queries to search again: fewer than `need` exact answers)."""
        n, k = len(self.queries), self.k
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        pos = np.full((n, k), -1, dtype=np.int64)
        cut = np.full(n, -np.inf, dtype=np.float32)
        again = np.zeros(n, dtype=bool)
        if len(self.fresh_q):
            d, i = self.full.result()
            scores[self.fresh_q], pos[self.fresh_q], cut[self.fresh_q] = d, i, cutoffs(d, i)
        if len(self.carried_q):
            cd, ci = self.changed.result()
            cc = cutoffs(cd, ci)
            for j, q in enumerate(self.carried_q):
                p = self.from_prev[q]
                old_i = self.prev["positions"][p]
                moved = np.where(old_i >= 0, self.new_position[np.maximum(old_i, 0)], -1)
                keep, fresh = moved >= 0, ci[j] >= 0
                d = np.concatenate([self.prev["scores"][p][keep], cd[j][fresh]])
                i = np.concatenate([moved[keep], ci[j][fresh]])
                order = np.argsort(-d, kind="stable")
                d, i = d[order], i[order]
                c = max(float(self.prev["cutoff"][p]), float(cc[j]))
                if len(d) > k:
                    c = max(c, float(d[k]))
                exact = d > c if np.isfinite(c) else np.ones(len(d), dtype=bool)
                d, i = d[exact][:k], i[exact][:k]
                scores[q, :len(d)], pos[q, :len(d)], cut[q] = d, i, c
                again[q] = len(d) < need
        return scores, pos, cut, np.flatnonzero(again)


def latency_ms(index, queries: np.ndarray, k: int = 10, budget_s: float | None = None,
               min_queries: int = 10) -> dict[str, float]:
    """Single-query search latency percentiles in milliseconds, over the queries given or as many as fit in
    `budget_s` seconds (at least `min_queries`): bounded work whatever the index size. `n` says how many ran."""
    times = []
    start = time.perf_counter()
    for q in np.ascontiguousarray(queries, dtype=np.float32):
        if budget_s is not None and len(times) >= min_queries and time.perf_counter() - start > budget_s:
            break
        t = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - t) * 1000)
    p50, p95, p99 = np.percentile(times, [50, 95, 99]) if times else (0.0, 0.0, 0.0)
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "n": len(times)}

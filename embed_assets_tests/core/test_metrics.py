import math

import numpy as np
import pytest

from embed_assets.core.metrics import (ann_recall_at_k, evaluate_run, exact_top_k, mrr_at_k, ndcg_at_k,
                                       recall_at_k)


def test_ranking_metrics_by_hand():
    rels = {"d1": 1, "d3": 1}
    ranked = ["d2", "d1", "d4", "d3"]
    assert ndcg_at_k(ranked, rels, 10) == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    assert recall_at_k(ranked, rels, 2) == 0.5 and recall_at_k(ranked, rels, 10) == 1.0
    assert mrr_at_k(ranked, rels, 10) == 0.5 and mrr_at_k(["x"], rels, 10) == 0.0
    assert ndcg_at_k(["d1", "d3"], rels, 10) == pytest.approx(1.0)


def test_evaluate_run_averages_over_judged_queries_only():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
    run = {"q1": ["a"], "q2": ["x", "b"], "unjudged": ["a"]}
    m = evaluate_run(run, qrels)
    assert m["n_queries"] == 2
    assert m["mrr_at_10"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no judged query"):
        evaluate_run({"zz": ["a"]}, qrels)


def test_exact_top_k_and_ann_recall():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    top, scores = exact_top_k(x, x[:5], 3)
    brute = np.argsort(-(x[:5] @ x.T), axis=1)[:, :3]
    assert (top == brute).all()
    assert np.allclose(scores, np.take_along_axis(x[:5] @ x.T, brute, axis=1))
    assert ann_recall_at_k(brute, scores, top, scores, 3) == 1.0
    wrong = np.array([[0, 9, 8]])
    assert ann_recall_at_k(wrong, np.array([[5.0, 0.1, 0.0]]), np.array([[0, 1, 2]]),
                           np.array([[5.0, 4.0, 3.0]]), 3) == pytest.approx(1 / 3)


def test_ann_recall_counts_ties_and_handles_fewer_items_than_k():
    # item 1 and 2 are identical (a duplicated text): returning 2 instead of 1 is right
    assert ann_recall_at_k(np.array([[0, 2]]), np.array([[1.0, 0.9]]), np.array([[0, 1]]),
                           np.array([[1.0, 0.9]]), 2) == 1.0
    x = np.eye(3, dtype=np.float32)
    top, scores = exact_top_k(x, x, 10)
    assert top.shape == (3, 3)
    assert ann_recall_at_k(top, scores, top, scores, 10) == 1.0


def test_leaving_the_query_item_out_removes_the_free_rank_one_hit():
    """An index that only ever finds the query item itself scores 1/k with its own row counted, 0 without it."""
    from embed_assets.core.metrics import drop_self

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = np.array([3, 17, 42])
    exact, exact_scores = exact_top_k(x, x[rows], 11)
    assert (exact[:, 0] == rows).all()  # each item is its own nearest neighbour
    # a useless "index": the item itself, then the farthest items
    far = np.argsort(x[rows] @ x.T, axis=1)[:, :10]
    useless = np.concatenate([rows[:, None], far], axis=1)
    useless_scores = np.take_along_axis(x[rows] @ x.T, useless, axis=1).astype(np.float32)
    with_self = ann_recall_at_k(useless, useless_scores, exact, exact_scores, 10)
    assert with_self == pytest.approx(0.1)
    a, sa = drop_self(useless, useless_scores, rows, 10)
    e, se = drop_self(exact, exact_scores, rows, 10)
    assert not (a == rows[:, None]).any() and not (e == rows[:, None]).any()
    assert ann_recall_at_k(a, sa, e, se, 10) == 0.0
    assert ann_recall_at_k(e, se, e, se, 10) == 1.0


def test_streamed_ground_truth_equals_brute_force_for_an_approximate_index():
    """A non-flat index is judged against brute force streamed over the vectors block by block (the shards)."""
    import faiss

    from embed_assets.core.metrics import exact_top_k_blocks

    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexHNSWFlat(32, 8, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 8
    index.add(x)
    q = x[:50] + 0.1 * rng.normal(size=(50, 32)).astype(np.float32)
    ids, scores = exact_top_k_blocks((x[i:i + 700] for i in range(0, len(x), 700)), q, 10)  # five blocks
    ref, ref_scores = exact_top_k(x, q, 10)
    assert (ids == ref).all() and np.allclose(scores, ref_scores, atol=1e-5)
    ann_scores, ann = index.search(q, 10)
    assert ann_recall_at_k(ann, ann_scores, ids, scores, 10) < 1.0  # a small efSearch misses some


def test_exact_top_k_over_blocks_equals_one_exact_search():
    """`ExactTopK` fed uneven blocks with their positions (one smaller than k) gives the exact search's answer over
    the whole matrix; positions are the caller's, not block rows."""
    import faiss

    from embed_assets.core.metrics import ExactTopK

    rng = np.random.default_rng(9)
    x = rng.standard_normal((1_000, 24)).astype(np.float32)
    q = rng.standard_normal((30, 24)).astype(np.float32)
    acc = ExactTopK(q, 20)
    for lo, hi in ((0, 7), (7, 400), (400, 1_000)):
        acc.add(np.arange(lo, hi) + 5_000, x[lo:hi])
    scores, pos = acc.result()
    want_s, want_i = faiss.knn(q, x, 20, metric=faiss.METRIC_INNER_PRODUCT)
    assert acc.n_seen == 1_000
    assert (pos == want_i + 5_000).all() and np.allclose(scores, want_s, atol=1e-5)


def test_exact_top_k_leaves_each_query_out_of_its_own_answer():
    """The semantic-ID neighbour check (`encode_pass`): items as queries, fed chunk by chunk with uneven chunks, each
    query's own row excluded; against numpy's exact top-k over the whole matrix."""
    from embed_assets.core.metrics import ExactTopK

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows_q = np.sort(rng.choice(len(x), 40, replace=False))
    q, k = x[rows_q], 10
    acc = ExactTopK(q, k, exclude=rows_q)
    for c0 in range(0, len(x), 700):
        acc.add(np.arange(c0, min(c0 + 700, len(x))), x[c0:c0 + 700])
    best_s, best_i = acc.result()
    sims = q @ x.T
    sims[np.arange(len(q)), rows_q] = -np.inf
    want = np.argsort(-sims, axis=1)[:, :k]
    assert (best_i == want).all()
    assert np.allclose(best_s, np.take_along_axis(sims, want, 1), atol=1e-5)
    assert not (best_i == rows_q[:, None]).any()


def test_carried_top_k_equals_a_search_over_the_changed_catalog():
    """The previous answers carried over (rows moved to new positions, changed and removed rows dropped) plus a search
    of the rows not carried give every query exactly what a search over the whole new catalog gives, to the depth
    its cutoff allows; a new query is searched over every row, and a query that lost most of its answers is flagged
    to be searched again."""
    from embed_assets.core.metrics import CarriedTopK, ExactTopK, cutoffs, vector_keys

    rng = np.random.default_rng(3)
    old = rng.standard_normal((3_000, 32)).astype(np.float32)
    q = rng.standard_normal((40, 32)).astype(np.float32)
    q[7] = old[11]  # a query whose answers are mostly about to change
    k = 40
    d0 = ExactTopK(q, k)
    d0.add(np.arange(len(old)), old)
    s0, p0 = d0.result()
    prev = {"keys": vector_keys(q), "scores": s0, "positions": p0, "cutoff": cutoffs(s0, p0)}

    # the change: 300 rows edited, 200 removed, 250 added, and every kept row at a new position (in a new order)
    edited = rng.choice(len(old), 300, replace=False)
    removed = np.setdiff1d(rng.choice(len(old), 200, replace=False), edited)
    removed = np.union1d(removed, p0[7])  # query 7 loses all its 40 answers
    new = old.copy()
    new[edited] = rng.standard_normal((len(edited), 32)).astype(np.float32)
    keep = np.setdiff1d(np.arange(len(old)), removed)
    rows = np.concatenate([new[keep], rng.standard_normal((250, 32)).astype(np.float32)])
    olds = np.concatenate([np.where(np.isin(keep, edited), -1, keep), np.full(250, -1)])
    order = rng.permutation(len(rows))
    rows, olds = rows[order], olds[order]
    q2 = q.copy()
    q2[3] += 0.5  # an edited query: not in the previous answers

    acc = CarriedTopK(q2, k, prev, len(old))
    assert acc.fresh_q.tolist() == [3]
    for c in range(0, len(rows), 700):
        acc.add(np.arange(c, min(c + 700, len(rows))), rows[c:c + 700], olds[c:c + 700])
    scores, pos, cut, again = acc.result(need=10)
    assert 7 in again.tolist()
    full = ExactTopK(q2, k)
    full.add(np.arange(len(rows)), rows)
    fs, fp = full.result()
    for j in range(len(q2)):
        n = int((pos[j] >= 0).sum())
        assert n >= 10 or j in again
        if j in again:
            continue
        assert pos[j, :n].tolist() == fp[j, :n].tolist(), j
        np.testing.assert_allclose(scores[j, :n], fs[j, :n], rtol=1e-6)
        assert n == k or scores[j, n - 1] > cut[j]

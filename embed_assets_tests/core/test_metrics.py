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
    top = exact_top_k(x, x[:5], 3)
    brute = np.argsort(-(x[:5] @ x.T), axis=1)[:, :3]
    assert (top == brute).all()
    assert ann_recall_at_k(brute, top, 3) == 1.0
    assert ann_recall_at_k(np.array([[0, 1, 2]]), np.array([[0, 9, 8]]), 3) == pytest.approx(1 / 3)

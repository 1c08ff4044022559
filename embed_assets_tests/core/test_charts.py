"""The norm-error histogram (recorded per shard, summed from the manifests), the recall@k curve and the PNG charts."""

import io
import json
from pathlib import Path

import numpy as np
import pytest

from embed_assets.core import charts
from embed_assets.core.shards import (NORM_HIST_EDGES, add_histograms, norm_error_histogram, norm_error_max,
                                      norm_error_quantile, norm_summary)


def _png_shape(png: bytes) -> tuple[int, int]:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2]


def test_histogram_bins_errors_on_fixed_log_edges():
    norms = np.array([1.0, 1 + 5e-8, 1 - 2e-6, 1 + 2e-6, 1 - 3e-3, 1.5, 3.0, 0.0, np.nan, np.inf], dtype=np.float64)
    h = norm_error_histogram(norms)
    counts = h["counts"]
    assert len(counts) == len(NORM_HIST_EDGES) == 30 and h["nonfinite"] == 2
    edges = np.asarray(NORM_HIST_EDGES)

    def bin_of(e):
        return int(np.searchsorted(edges, e, side="right") - 1)

    assert counts[0] == 2  # |err| < 1e-7: exactly 1, and 5e-8
    assert counts[bin_of(2e-6)] == 2 and NORM_HIST_EDGES[bin_of(2e-6)] <= 2e-6 < NORM_HIST_EDGES[bin_of(2e-6) + 1]
    assert counts[bin_of(3e-3)] == 1
    assert counts[bin_of(0.5)] == 1 and counts[-1] == 2  # 3.0 and 0.0 are >= 1 off: the last bin
    assert sum(counts) + h["nonfinite"] == len(norms)


def test_histograms_add_up_and_skip_what_they_cannot_add():
    rng = np.random.default_rng(0)
    a, b = 1 + rng.normal(0, 1e-4, 1000), 1 + rng.normal(0, 1e-3, 500)
    total = add_histograms([norm_error_histogram(a), norm_error_histogram(b), {}, {"scheme": "other", "counts": [1]}])
    assert total["counts"] == norm_error_histogram(np.concatenate([a, b]))["counts"]
    assert total["n_vectors"] == 1500 and total["edges"] == list(NORM_HIST_EDGES)
    assert add_histograms([])["n_vectors"] == 0 and np.isnan(norm_error_quantile(add_histograms([]), 0.99))


@pytest.mark.parametrize("scale", [1e-6, 1e-4, 3e-3])
def test_quantile_from_the_histogram_is_an_upper_bound_within_one_bin(scale):
    err = np.abs(np.random.default_rng(1).normal(0, scale, 20_000))
    h = add_histograms([norm_error_histogram(1 + err)])
    for q in (0.5, 0.99):
        true = float(np.quantile(err, q))
        got = norm_error_quantile(h, q)
        assert true <= got <= true * 10 ** 0.25 * 1.0001, (q, true, got)


def test_norm_summary_is_norm_stats_plus_the_histogram_and_max_error():
    x = np.random.default_rng(2).normal(size=(500, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[7] *= 1.01  # one vector 1% long
    stats, hist = norm_summary(x.astype(np.float16), 5e-3)
    assert abs(norm_error_max(stats) - 0.01) < 1e-3 and stats["frac_outside_tol"] == 1 / 500
    assert sum(hist["counts"]) == 500 and hist["counts"][int(np.searchsorted(NORM_HIST_EDGES, 0.01) - 1)] == 1
    assert norm_error_max(stats, 0) == 0.0 and norm_error_max({"min": np.nan, "max": 1.0}) == float("inf")


def test_embedding_norms_sums_the_manifests_histograms_without_reading_shards(tmp_path, monkeypatch):
    """The catalog's histogram is the sum of what each manifest recorded; a manifest written before histograms
    existed is not read for one, and the coverage says so."""
    from embed_assets.core import shards
    from embed_assets.core.items import load_partitions
    from embed_assets.core.layout import Layout
    from embed_assets.testing import StandInEncoder
    from embed_assets_tests.conftest import embed_catalog, sample_docs, write_jsonl

    layout = Layout.at(tmp_path / "home")
    embed_catalog(layout, write_jsonl(tmp_path / "c.jsonl", sample_docs(120)), StandInEncoder(), 30)
    keys = [p["partition"] for p in load_partitions(layout)]
    reads = []
    monkeypatch.setattr(shards, "load_verified", lambda *a, **k: reads.append(a) or pytest.fail("read a shard"))
    full = shards.summarize_norms(layout, keys)
    assert full["histogram"]["n_vectors"] == full["overall"]["n_vectors"] == 120 and not reads
    # every vector's error, from the vectors themselves, lands in the same bins
    import torch

    vecs = np.concatenate([torch.load(layout.shard_pt(k), weights_only=True)["embeddings"].numpy() for k in keys])
    assert full["histogram"]["counts"] == norm_error_histogram(shards.row_norms(vecs))["counts"]

    old = layout.shard_manifest(keys[0])  # as written before manifests held a histogram
    data = json.loads(old.read_text())
    data.pop("norm_hist")
    old.write_text(json.dumps(data))
    part = shards.summarize_norms(layout, keys)
    n0 = shards.read_manifest(layout, keys[0]).n_rows
    assert part["histogram"]["n_vectors"] == 120 - n0 and part["overall"]["n_vectors"] == 120 and not reads


def test_charts_are_small_deterministic_pngs():
    rng = np.random.default_rng(3)
    h = add_histograms([norm_error_histogram(1 + rng.normal(0, 1e-4, 5000))])
    png = charts.norm_histogram_png(h, 5e-3)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 2_000 < len(png) < 60_000
    assert _png_shape(png) == (224, 384)
    assert charts.norm_histogram_png(h, 5e-3) == png  # same numbers, same bytes
    h2 = add_histograms([norm_error_histogram(1 + rng.normal(0, 1e-2, 5000))])
    assert charts.norm_histogram_png(h2, 5e-3) != png

    curve = charts.recall_curve_png([1, 5, 10, 20, 50, 100], {"labelled": [0.3, 0.5, 0.6, 0.7, 0.8, 0.9],
                                                                 "ANN vs exact": [1.0, 1.0, None, 1.0, 1.0, 1.0]})
    assert curve.startswith(b"\x89PNG") and 2_000 < len(curve) < 60_000 and _png_shape(curve) == (224, 384)
    md = charts.markdown_image("recall@k", curve)
    assert md.startswith("![recall@k](data:image/png;base64,")
    import base64

    assert base64.b64decode(md[len("![recall@k](data:image/png;base64,"):-1]) == curve


def test_rendering_leaves_the_pyplot_backend_alone():
    import matplotlib

    before = matplotlib.get_backend()
    charts.recall_curve_png([1, 10], {"a": [0.5, 0.9]})
    assert matplotlib.get_backend() == before


def test_recall_curve_matches_the_beir_metrics():
    from embed_assets.core.metrics import evaluate_run
    from embed_assets.core.report import CURVE_KS, recall_curve

    rng = np.random.default_rng(4)
    docs = [f"d{i}" for i in range(300)]
    qrels = {f"q{i}": {d: 1 for d in rng.choice(docs, 3, replace=False)} for i in range(50)}
    qrels["q_unjudged"] = {"d1": 0}
    run = {q: list(rng.permutation(docs)[:100]) for q in qrels}
    curve = recall_curve(run, qrels)
    m = evaluate_run(run, qrels)
    assert [curve[CURVE_KS.index(k)] for k in (1, 10, 100)] == [m["recall_at_1"], m["recall_at_10"], m["recall_at_100"]]
    assert curve == sorted(curve) and curve[0] < curve[-1]


def test_render_charts_writes_both_and_drops_a_stale_histogram(tmp_path: Path):
    from embed_assets.core.layout import Layout
    from embed_assets.core.report import render_charts, to_markdown

    layout = Layout.at(tmp_path / "home")
    layout.reports_dir.mkdir(parents=True)
    h = add_histograms([norm_error_histogram(1 + np.random.default_rng(5).normal(0, 1e-4, 100))])
    layout.norms_json.write_text(json.dumps({"overall": {"tolerance": 5e-3}, "histogram": h}))
    report = {"recall_at_k": {"k": [1, 5, 10, 20, 50, 100], "labelled": None, "ann": [1.0] * 6}}
    pngs = render_charts(layout, report)
    assert sorted(pngs) == ["norm_histogram", "recall_at_k"]
    assert (layout.reports_dir / "norm_histogram.png").read_bytes() == pngs["norm_histogram"]
    assert (layout.reports_dir / "recall_at_k.png").read_bytes() == pngs["recall_at_k"]
    assert not [p for p in layout.reports_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    assert report["norm_histogram"]["n_vectors"] == 100

    layout.norms_json.write_text(json.dumps({"overall": {"tolerance": 5e-3}, "histogram": add_histograms([])}))
    report = {"recall_at_k": report["recall_at_k"], "n_items": 1, "latency_ms": {"p50": 0, "p95": 0, "p99": 0, "n": 0},
              "smoke_test": []}
    assert sorted(render_charts(layout, report)) == ["recall_at_k"]
    assert not (layout.reports_dir / "norm_histogram.png").exists()  # never a stale chart beside the report
    md = to_markdown(report)
    assert "![recall@k](recall_at_k.png)" in md and "No norm histogram" in md and "norm_histogram.png" not in md


def test_the_curve_on_a_non_flat_index_is_against_exact_search(tmp_path: Path):
    """On an HNSW index the ANN curve is measured against brute force streamed over the shards, once, when the index
    is built (one exact pass at k = 100 serves the tuning and the curve): the report reads it from the manifest and
    runs no exact pass of its own. The index's own miss rate shows, it is not 1 by definition. An index without a
    recorded curve is measured by the report itself (items as queries, each with itself left out)."""
    import json

    import numpy as np

    from embed_assets.core.index import build_from_shards, exact_search, load_index
    from embed_assets.core.index_tune import held_out_queries
    from embed_assets.core.items import load_partitions
    from embed_assets.core.layout import Layout
    from embed_assets.core.metrics import ann_recall_at_k
    from embed_assets.core.report import evaluate
    from embed_assets.testing import StandInEncoder
    from embed_assets_tests.conftest import embed_catalog, sample_docs, write_jsonl

    layout, enc = Layout.at(tmp_path / "home"), StandInEncoder()
    embed_catalog(layout, write_jsonl(tmp_path / "c.jsonl", sample_docs(3000)), enc, 1000)
    build_from_shards(layout, load_partitions(layout), "hnsw", queries=lambda: held_out_queries(layout, enc, 200))
    report = evaluate(layout, enc, n_ann_sample=300)
    curve = report["recall_at_k"]
    assert report["ann_ground_truth"] == "brute force over the shards, streamed, when this index version was built"
    assert report["ann_sample"] == 200 and "tuning queries" in report["ann_query_source"] and curve["labelled"] is None
    assert len(curve["ann"]) == 6 and all(0.5 < r <= 1.0 for r in curve["ann"]) and min(curve["ann"]) < 1.0, curve
    assert curve["ann"][curve["k"].index(10)] == report["ann_recall_at_10"]
    # the recorded recall@10 is what the live index gives those queries against an exact search done here
    index, _, manifest = load_index(layout)
    q, _ = held_out_queries(layout, enc, 200)
    exact_scores, exact = exact_search(layout, manifest, q, 10)
    scores, found = index.search(np.ascontiguousarray(q, dtype=np.float32), 10)
    assert ann_recall_at_k(found, scores, exact, exact_scores, 10) == report["ann_recall_at_10"]
    # no recorded curve: the report measures it, on items as queries
    mpath = layout.index_dir / layout.index_manifest.name
    m = json.loads(mpath.read_text())
    del m["tuning"]["recall_at_k"]
    mpath.write_text(json.dumps(m))
    report = evaluate(layout, enc, n_ann_sample=300)
    curve = report["recall_at_k"]
    assert report["ann_ground_truth"] == "brute force over the shards, streamed" and report["ann_sample"] == 300
    assert report["ann_query_source"] == "items, each with itself left out"
    assert len(curve["ann"]) == 6 and all(0.5 < r < 1.0 for r in curve["ann"]), curve
    assert abs(curve["ann"][curve["k"].index(10)] - report["ann_recall_at_10"]) < 0.05

"""The retrieval-eval report: labelled-query metrics, ANN recall vs exact search, latency, neighbour smoke test."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from embed_assets.core.atomic import atomic_write_json, atomic_write_text
from embed_assets.core.beir import load_qrels, load_queries
from embed_assets.core.encoder import Encoder
from embed_assets.core.index import IndexBuildError, exact_search, load_index, stored_vectors
from embed_assets.core.items import titles_of
from embed_assets.core.layout import Layout
from embed_assets.core.metrics import CURVE_KS, ann_recall_at_k, drop_self, evaluate_run, latency_ms, recall_at_k

# The recall@k curve's k values (the report's `recall_at_k`, its chart and recall_at_5/20/50 beside BEIR's 1/10/100)
# live in core/metrics.py as CURVE_KS, shared with the index's own measured curve.
NORM_HISTOGRAM_PNG = "norm_histogram.png"  # under HOME/reports/, beside retrieval_eval.md
RECALL_CURVE_PNG = "recall_at_k.png"


def recall_curve(run: dict[str, list[str]], qrels: dict[str, dict[str, int]],
                 ks: tuple[int, ...] = CURVE_KS) -> list[float]:
    """Mean recall@k for each k over the judged queries that have a ranking (the queries evaluate_run averages)."""
    qids = [q for q in qrels if q in run and any(r > 0 for r in qrels[q].values())]
    return [float(np.mean([recall_at_k(run[q], qrels[q], k) for q in qids])) if qids else float("nan") for k in ks]


def evaluate(
    layout: Layout,
    encoder: Encoder,
    queries_path: str | Path | None = None,
    qrels_path: str | Path | None = None,
    n_ann_sample: int = 1000,
    n_latency: int = 200,
    n_smoke: int = 5,
    seed: int = 0,
    latency_budget_s: float = 20.0,
) -> dict[str, Any]:
    """The report's work is bounded whatever the catalog: a sample of `n_ann_sample` rows (100 on a flat index, which
    is its own ground truth), single-query latency over at most `n_latency` queries or `latency_budget_s` seconds,
    titles of the smoke-test items only. A flat index scans every vector per query, so on a large flat index the
    budget, not the count, bounds the latency sample (`latency_ms.n` says how many ran).

    `recall_at_k` is the curve at k = 1, 5, 10, 20, 50, 100: labelled recall (from the top-100 lists already
    searched) and ANN recall against exact search. A non-flat index recorded its ANN curve when it was built
    (`tuning.recall_at_k`), and the report takes it from there: no exact pass over the catalog here (it was the
    report's largest cost, 2.9 s of 7.2 s at 500k items, and it grows with the catalog). Only an index without that
    record is measured here (`_measure_ann`)."""
    t0 = time.perf_counter()
    index, ids, manifest = load_index(layout)
    built = manifest.get("version") or {}
    if built and built != encoder.version:
        raise IndexBuildError(f"the index was built with {built}, queries would be encoded with {encoder.version}; "
                              "re-materialize item_embeddings and faiss_index with one model")
    n = int(index.ntotal)
    rng = np.random.default_rng(seed)
    # Bounded work: a sample of rows, and exact search streamed over the stored vectors; never a copy of them all. A
    # flat index is exact search itself, so its recall needs no large sample (each flat query scans every vector:
    # ~0.3 s at 1M items on 2 cores); 100 queries confirm it.
    import faiss

    exact_index = isinstance(index, faiss.IndexFlat)
    if exact_index:
        n_ann_sample, n_latency = min(n_ann_sample, 100), min(n_latency, 100)
    valid = ids.valid_positions()  # an IVF index updated in place has holes where items were removed
    sample = np.sort(rng.choice(valid, size=min(n_ann_sample, len(valid)), replace=False))
    sample_vecs = stored_vectors(index, sample)

    report: dict[str, Any] = {
        "n_items": n,
        "index_kind": manifest.get("kind"),
        "model_id": manifest.get("version", {}).get("model_id"),
        "model_revision": manifest.get("version", {}).get("model_revision"),
        "n_queries": 0,
        "ndcg_at_1": None,
        "ndcg_at_10": None,
        "ndcg_at_100": None,
        "recall_at_1": None,
        "recall_at_10": None,
        "recall_at_100": None,
        "mrr_at_10": None,
    }

    query_vecs, qrels, queries, query_texts, labelled_curve = None, None, {}, [], None
    if queries_path and qrels_path:
        qrels = load_qrels(qrels_path)
        queries = load_queries(queries_path, only=set(qrels))
        qids = sorted(queries)
        query_texts = [queries[q] for q in qids]
        qv, _ = encoder.encode([queries[q] for q in qids])
        query_vecs = np.ascontiguousarray(qv, dtype=np.float32)
        _, top = index.search(query_vecs, min(100, n))
        run = {q: [ids[j] for j in row if j >= 0] for q, row in zip(qids, top)}
        report.update(evaluate_run(run, qrels))
        labelled_curve = recall_curve(run, qrels)
        report["queries_path"], report["qrels_path"] = str(queries_path), str(qrels_path)

    # ANN recall against exact search. A non-flat index measured it when it was built (`tuning.recall_at_k` in its
    # manifest: the tuning's held-out queries, exact search streamed over the very shards it indexed), so the report
    # reads it and runs no exact pass of its own over the catalog (one pass over every stored vector). A flat index
    # *is* exact search: its answers are the ground truth (recall 1 by definition, not by a free hit). An index whose
    # manifest has no curve (built before it was recorded, or saved by a tool) is measured here, as before.
    measured = (manifest.get("tuning") or {}).get("recall_at_k") if not exact_index else None
    if measured:
        tuning = manifest["tuning"]
        ks = list(measured["k"])
        report["ann_recall_at_10"] = measured["ann"][ks.index(10)] if 10 in ks else None
        report["recall_at_k"] = {"k": ks, "labelled": labelled_curve, "ann": list(measured["ann"])}
        report["ann_sample"] = int(tuning.get("n_queries") or 0)
        report["ann_query_source"] = f"{tuning.get('queries') or 'held-out queries'} (the index's tuning queries)"
        report["ann_ground_truth"] = "brute force over the shards, streamed, when this index version was built"
    else:
        _measure_ann(report, layout, manifest, index, exact_index, query_vecs, sample, sample_vecs, n_ann_sample,
                     labelled_curve)
    if query_vecs is None:
        query_vecs = sample_vecs

    report["latency_ms"] = latency_ms(index, query_vecs[:n_latency], k=10, budget_s=latency_budget_s)

    picks = rng.choice(valid, size=min(n_smoke, len(valid)), replace=False)
    _, nbs = index.search(stored_vectors(index, picks), 6)
    found = [(ids[i], [ids[j] for j in nb if j >= 0 and j != i][:5]) for i, nb in zip(picks, nbs)]
    titles = titles_of(layout, [x for item, nb in found for x in (item, *nb)])
    smoke = [{"item_id": item, "title": titles.get(item, ""),
              "neighbours": [{"item_id": j, "title": titles.get(j, "")} for j in nb]} for item, nb in found]
    report["smoke_test"] = smoke

    # Monitoring (core/monitoring.py), each bounded by a sample or a budget.
    from embed_assets.core import monitoring

    report["coverage"] = monitoring.coverage(layout, len(valid))
    report["drift"] = monitoring.vector_drift(layout, index, ids, manifest.get("version") or {}, seed)
    texts = query_texts or [t for t in titles_of(layout, [ids[int(r)] for r in sample[:n_latency]]).values() if t]
    report["query_latency_ms"] = monitoring.query_latency(index, encoder, texts[:n_latency],
                                                          budget_s=latency_budget_s / 2)
    report["field_to_item"] = monitoring.field_to_item(layout, index, ids, encoder, seed=seed)
    report["tfidf_ndcg_at_10"] = None
    if qrels is not None:
        report["tfidf"] = monitoring.tfidf_labelled(layout, queries, qrels, len(valid))
        report["tfidf_ndcg_at_10"] = report["tfidf"].get("ndcg_at_10")
    tuning = manifest.get("tuning") or {}
    report["index"] = {"type": manifest.get("faiss_type"), "kind": manifest.get("kind"),
                       "structure": (manifest.get("structure") or {}).get("factory"),
                       "params": {tuning["param"]: tuning["value"]} if tuning.get("param") else {},
                       "recall_at_10": tuning.get("recall", 1.0 if exact_index else None),
                       "qps": tuning.get("qps"), "bytes": manifest.get("index_bytes"),
                       "build_seconds": manifest.get("build_seconds"),
                       "update_mode": (manifest.get("update") or {}).get("mode")}
    report["shadow"] = manifest.get("shadow") or {"compared": False, "reason": "not recorded"}
    report["index_version"] = manifest.get("version_name")
    report["seconds"] = time.perf_counter() - t0
    return report


def _measure_ann(report, layout, manifest, index, exact_index, query_vecs, sample, sample_vecs, n_ann_sample,
                 labelled_curve) -> None:
    """ANN recall@10 against exact search, on queries the index does not hold: the labelled queries when there are
    any (held-out texts), else a sample of items searched with k + 1 and their own row removed from both lists.
    recall@10 comes from a k = 10 search (what a top-10 query gets: an HNSW search widens with k), the curve from a
    k = 100 one; both against one exact pass at k = 100 (none on a flat index, which is exact search)."""
    kmax = max(CURVE_KS)
    if query_vecs is not None and len(query_vecs):
        ann_q = query_vecs[:n_ann_sample]
        ann_scores, ann = index.search(ann_q, 10)
        wide_scores, wide = index.search(ann_q, kmax)
        exact_scores, exact = (wide_scores, wide) if exact_index else exact_search(layout, manifest, ann_q, kmax)
        report["ann_query_source"] = "labelled queries (held out)"
    else:
        ann_q = sample_vecs
        ann_scores, ann = index.search(ann_q, 11)
        wide_scores, wide = index.search(ann_q, kmax + 1)
        exact_scores, exact = (wide_scores, wide) if exact_index else exact_search(layout, manifest, ann_q, kmax + 1)
        ann, ann_scores = drop_self(ann, ann_scores, sample, 10)
        wide, wide_scores = drop_self(wide, wide_scores, sample, kmax)
        exact, exact_scores = drop_self(exact, exact_scores, sample, kmax)
        report["ann_query_source"] = "items, each with itself left out"
    report["ann_recall_at_10"] = ann_recall_at_k(ann, ann_scores, exact, exact_scores, 10)
    report["recall_at_k"] = {
        "k": list(CURVE_KS),
        "labelled": labelled_curve,  # None without labelled queries
        "ann": [ann_recall_at_k(wide, wide_scores, exact, exact_scores, k) for k in CURVE_KS],
    }
    report["ann_sample"] = int(len(ann_q))
    report["ann_ground_truth"] = ("the flat index itself (exact search)" if exact_index
                                  else "brute force over the shards, streamed")


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.5f}" if isinstance(v, float) else str(v))


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["# Retrieval evaluation", "",
             f"Model `{report.get('model_id')}` (revision `{report.get('model_revision')}`), "
             f"{report['n_items']:,} items, index `{report.get('index_kind')}`.", "",
             "| metric | value |", "|---|---|"]
    for k in ("ndcg_at_1", "ndcg_at_10", "ndcg_at_100", "recall_at_1", "recall_at_10", "recall_at_100", "mrr_at_10",
              "ann_recall_at_10", "n_queries", "n_items"):
        lines.append(f"| {k} | {_fmt(report.get(k))} |")
    lat = report["latency_ms"]
    lines += ["", f"Query latency (single query, top-10): p50 {lat['p50']:.3f} ms, p95 {lat['p95']:.3f} ms, "
                  f"p99 {lat['p99']:.3f} ms over {lat['n']} queries.", ""]
    curve = report.get("recall_at_k")
    if curve:
        lines += ["## Recall@k", "", "| k | " + " | ".join(str(k) for k in curve["k"]) + " |",
                  "|---|" + "---:|" * len(curve["k"])]
        if curve.get("labelled"):
            lines.append("| labelled recall | " + " | ".join(_fmt(v) for v in curve["labelled"]) + " |")
        lines += ["| ANN recall vs exact | " + " | ".join(_fmt(v) for v in curve["ann"]) + " |", ""]
    charts = report.get("charts") or {}
    for name, alt in (("recall_at_k", "recall@k"), ("norm_histogram", "norm histogram")):
        if charts.get(name):
            lines += [f"![{alt}]({charts[name]})", ""]
    if charts.get("norm_histogram_missing"):
        lines += [f"No norm histogram: {charts['norm_histogram_missing']}.", ""]
    lines += ["## Nearest neighbours (smoke test)", ""]
    for s in report["smoke_test"]:
        lines.append(f"- **{s['title'][:100]}** (`{s['item_id']}`)")
        for nb in s["neighbours"]:
            lines.append(f"  - {nb['title'][:100]} (`{nb['item_id']}`)")
    return "\n".join(lines) + "\n"


def render_charts(layout: Layout, report: dict[str, Any]) -> dict[str, bytes]:
    """The report's charts as PNG bytes, also written (atomically) to HOME/reports/: the recall@k curve from
    `report["recall_at_k"]`, and the norm-error histogram from embedding_norms' summary (reports/embedding_norms.json,
    the sum of the shards' recorded histograms: no vector is read). Records the file names in `report["charts"]`
    and the histogram in `report["norm_histogram"]`. Cost: ~0.2 s each once matplotlib is imported (~1 s), whatever
    the catalog's size."""
    from embed_assets.core import charts

    out: dict[str, bytes] = {}
    names: dict[str, Any] = {}
    curve = report.get("recall_at_k")
    if curve:
        series = {"ANN recall vs exact": curve["ann"]}
        if curve.get("labelled"):
            series = {"labelled recall": curve["labelled"], **series}
        out["recall_at_k"] = charts.recall_curve_png(curve["k"], series)
    try:
        norms = json.loads(layout.norms_json.read_text("utf-8"))
    except (OSError, ValueError):
        norms = {}
    hist = norms.get("histogram") or {}
    if hist.get("n_vectors"):
        report["norm_histogram"] = hist
        out["norm_histogram"] = charts.norm_histogram_png(hist, (norms.get("overall") or {}).get("tolerance"))
    else:
        (layout.reports_dir / NORM_HISTOGRAM_PNG).unlink(missing_ok=True)  # never a stale chart beside the report
        names["norm_histogram_missing"] = (
            "embedding_norms recorded none (materialize embedding_norms)" if not norms else
            "the shards were written before manifests recorded one; they get one when re-encoded")
    for name, png in out.items():
        path = charts.write_png(layout.reports_dir / (NORM_HISTOGRAM_PNG if name == "norm_histogram"
                                                      else RECALL_CURVE_PNG), png)
        names[name] = path.name
    report["charts"] = names
    return out


def write_report(layout: Layout, report: dict[str, Any]) -> dict[str, bytes]:
    """reports/retrieval_eval.{json,md} with its charts (render_charts: PNG files beside them, returned as bytes),
    and the JSON also beside the index version it evaluated (its bundle: index, ids, manifest, eval), unless that
    version was pruned meanwhile. With a base URI, HOME's reports (charts included) are then published under
    `<base URI>/reports/` (core/store.py: publish_reports)."""
    from embed_assets.core.index import version_dir

    pngs = render_charts(layout, report)
    atomic_write_json(layout.report_json, report)
    atomic_write_text(layout.report_md, to_markdown(report))
    if report.get("index_version"):
        folder = version_dir(layout, report["index_version"])
        if folder.is_dir():
            atomic_write_json(folder / "eval.json", report)
    if layout.store is not None:
        # every report HOME holds (this one, the norms, the rejects, the semantic IDs' and the run summary), each as
        # one object with a manifest beside it; unchanged ones are skipped (one GET each)
        from embed_assets.core.store import publish_reports

        publish_reports(layout.store, layout.reports_dir)
    return pngs


def read_report(layout: Layout) -> dict[str, Any]:
    return json.loads(layout.report_json.read_text("utf-8"))

"""Acceptance: the full bundled SciFact corpus reproduces the published all-MiniLM-L6-v2 numbers (MTEB).

- fp32 reproduces every published number (settings.SAMPLE_PUBLISHED) within 0.0002.
- The default path (precision=auto) is whatever the faithfulness probe chose on the CPU the test runs on. If that is
  not fp32, its shard vectors must be faithful to the fp32 run's (mean cosine >= 0.9999, min >= 0.999: the probe's
  bounds, now over all 5,183 items) and its metrics within DEFAULT_PATH_TOL of fp32's (and of the published numbers,
  plus fp32's 0.0002). That tolerance is measured, not guessed: see DEFAULT_PATH_TOL. Which CPU CI lands on changes
  which path runs, not what must hold; a failure message names the CPU, its bf16 flags and the probe's verdict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embed_assets.cli import run_pipeline
from embed_assets.core.encoder import FAITHFUL_MEAN_COS, FAITHFUL_MIN_COS, cpu_info
from embed_assets.settings import SAMPLE_PUBLISHED, SAMPLE_QRELS, SAMPLE_QUERIES, Settings

FP32_TOL = 0.0002
# How far vectors ON the faithfulness bound (mean cosine 0.9999 to fp32) moved each metric from fp32's: the max over
# 3 perturbation shapes x 200 seeds (600 draws), rounded up at the 5th decimal. Source: `python
# benchmarks/precision.py --seeds 200 --json benchmarks/results/precision.json`, key "max_abs_delta" (AMD EPYC,
# torch 2.13.0+cpu; the isotropic and concentrated shapes are CPU-independent, their max for nDCG@10 is 0.00418;
# the third shape, this CPU's own bf16 errors scaled up to the bound, gave the 0.00536). Intel AMX's bf16 moved
# nDCG@10 by 0.00202 (the bug report): inside it. For scale: bf16 on AMD EPYC (mean cosine 0.999983) moved it 0.00051.
DEFAULT_PATH_TOL = {
    "ndcg_at_1": 0.00667,
    "ndcg_at_10": 0.00537,
    "ndcg_at_100": 0.00349,
    "recall_at_1": 0.00667,
    "recall_at_10": 0.01000,
    "recall_at_100": 0.00334,
}
EPS = 1e-9  # float noise: several metrics move in steps of 1/300


def _cpu() -> str:
    info = cpu_info()
    return f"CPU {info['model']!r} (bf16 flags: {', '.join(info['bf16_flags']) or 'none'})"


def _all_metrics(home: Path, precision: str) -> dict[str, float]:
    """Every published metric, from the run's own index, with queries encoded at the precision the run used, and
    the same metric code as the report (the report itself has nDCG@10, recall@10/100, MRR@10)."""
    from embed_assets.core.beir import load_qrels, load_queries
    from embed_assets.core.encoder import Encoder
    from embed_assets.core.index import load_index
    from embed_assets.core.layout import Layout
    from embed_assets.core.metrics import ndcg_at_k, recall_at_k

    index, ids, _ = load_index(Layout.at(home))
    qrels = load_qrels(SAMPLE_QRELS)
    queries = load_queries(SAMPLE_QUERIES, only=set(qrels))
    qids = sorted(queries)
    qv, _ = Encoder(precision=precision).encode([queries[q] for q in qids])
    _, top = index.search(np.ascontiguousarray(qv, dtype=np.float32), 100)
    run = {q: [ids[j] for j in row if j >= 0] for q, row in zip(qids, top)}
    judged = [q for q in qids if any(r > 0 for r in qrels[q].values())]
    fns = {"ndcg": ndcg_at_k, "recall": recall_at_k}
    out = {}
    for name in SAMPLE_PUBLISHED:
        kind, k = name.split("_at_")
        out[name] = float(np.mean([fns[kind](run[q], qrels[q], int(k)) for q in judged]))
    return out


def _shard_vectors(home: Path) -> tuple[list[str], np.ndarray]:
    from embed_assets.core.index import load_index
    from embed_assets.core.layout import Layout

    index, ids, _ = load_index(Layout.at(home))
    return ids, index.reconstruct_n(0, index.ntotal)


def _run(home: Path, precision: str) -> dict:
    settings = Settings.sample(str(home))
    settings.precision = precision
    code, summary = run_pipeline(settings)
    assert code == 0, summary
    report = json.loads((home / "reports" / "retrieval_eval.json").read_text())
    assert report["n_items"] == 5183 and report["n_queries"] == 300
    assert report["ann_recall_at_10"] == 1.0
    assert summary["n_partitions"] == 8 and summary["n_encoded"] == 5183
    ran = summary["precision"]
    assert isinstance(ran, str), f"{_cpu()}: partitions ran at different precisions: {ran}"
    manifests = [json.loads(p.read_text()) for p in sorted((home / "embeddings").glob("shard_*.manifest.json"))]
    assert len(manifests) == 8 and {m["precision"] for m in manifests} == {ran}, _cpu()
    assert json.loads((home / "reports" / "run_summary.json").read_text())["precision"] == ran
    metrics = _all_metrics(home, ran)
    for k in ("ndcg_at_10", "recall_at_10", "recall_at_100"):  # our recomputation is the report's
        assert metrics[k] == pytest.approx(report[k], abs=1e-9), k
    print(f"\n{_cpu()}: precision {precision} ran {ran}; probe {summary.get('precision_probe')}")
    for k, pub in SAMPLE_PUBLISHED.items():
        print(f"  {k:<14} {metrics[k]:.5f}  published {pub:.5f}  delta {metrics[k] - pub:+.5f}")
    return {"home": home, "summary": summary, "report": report, "precision": ran, "metrics": metrics}


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """One fp32 run of the whole pipeline, shared: the auto test compares its vectors with these."""
    return _run(tmp_path_factory.mktemp("scifact_fp32") / "home", "fp32")


@pytest.mark.slow
def test_fp32_reproduces_every_published_number(fp32_run):
    assert fp32_run["precision"] == "fp32"
    assert fp32_run["summary"]["precision_probe"] is None  # asked for, not probed
    off = {k: round(fp32_run["metrics"][k] - pub, 5) for k, pub in SAMPLE_PUBLISHED.items()
           if abs(fp32_run["metrics"][k] - pub) > FP32_TOL + EPS}
    assert not off, f"{_cpu()}: fp32 off the published table by more than {FP32_TOL}: {off}"


@pytest.mark.slow
def test_default_path_is_faithful_and_within_the_measured_tolerance(fp32_run, tmp_path_factory):
    auto = _run(tmp_path_factory.mktemp("scifact_auto") / "home", "auto")
    ran, probe = auto["precision"], auto["summary"]["precision_probe"]
    where = f"{_cpu()}: auto ran {ran}; probe {probe}"
    assert probe is not None and probe.get("candidate") in ("bf16", "fp16", "fp32"), where
    if ran != "fp32":
        assert probe["passed"] is True and probe["candidate"] == ran, where
    else:
        assert probe["candidate"] == "fp32" or probe["passed"] is not True, where

    ids32, v32 = _shard_vectors(fp32_run["home"])
    ids, v = _shard_vectors(auto["home"])
    assert ids == ids32
    cos = np.sum(v.astype(np.float64) * v32, axis=1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(v32, axis=1))
    print(f"{where}; shard vectors vs fp32 run: mean cos {cos.mean():.6f}, min {cos.min():.6f}")
    assert cos.mean() >= FAITHFUL_MEAN_COS and cos.min() >= FAITHFUL_MIN_COS, \
        f"{where}: shard vectors vs fp32: mean cos {cos.mean():.6f}, min {cos.min():.6f}"

    for k, pub in SAMPLE_PUBLISHED.items():
        got, ref, tol = auto["metrics"][k], fp32_run["metrics"][k], DEFAULT_PATH_TOL[k]
        assert abs(got - ref) <= tol + EPS, f"{where}: {k} {got:.5f} vs fp32 {ref:.5f}: more than {tol} apart"
        assert abs(got - pub) <= tol + FP32_TOL + EPS, f"{where}: {k} {got:.5f} vs published {pub:.5f}"


@pytest.mark.slow
def test_the_run_builds_semantic_ids_the_catalog_joins_and_the_cli_exports(fp32_run, tmp_path):
    """`embed-assets run` materializes semantic_ids with its checks; read.duckdb joins items to their IDs; each export
    loads with the reader its project uses (torch.load, np.load + json.load, pyarrow)."""
    import duckdb
    import pyarrow.parquet as pq
    import torch

    from embed_assets.core import catalog
    from embed_assets.core.layout import Layout
    from embed_assets_tests.conftest import run_cli

    home, summary = fp32_run["home"], fp32_run["summary"]
    sid = summary["semantic_ids"]
    assert sid["action"] == "created" and sid["n_items"] == 5183 and sid["unique_full_ids"] is True
    checks = {c["check"]: c["passed"] for c in summary["checks"] if c["asset"] == "semantic_ids"}
    assert checks["unique_semantic_ids"] and checks["extra_digit_capacity"] and "codebook_utilization" in checks
    report = json.loads((home / "reports" / "semantic_ids.json").read_text())
    for key in ("n_items", "duplicate_vector_rate", "largest_duplicate_group", "collision_rate", "max_collision_group",
                "codebook_utilization", "perplexity", "reconstruction_cosine", "reconstruction_mse",
                "neighbour_share_first_code", "neighbour_share_first_two_codes", "recommendations"):
        assert key in report, key
    assert len(report["collision_rate"]) == len(report["codebook_utilization"]) == 3
    live = pq.read_table(home / "semantic_ids" / "current" / "semantic_ids.parquet")
    by_id = dict(zip(live.column("item_id").to_pylist(), live.column("sid").to_pylist()))

    with duckdb.connect(str(catalog.reader_db(Layout.at(home))), read_only=True) as con:
        n, n_sid, sample = con.execute("SELECT count(*), count(DISTINCT sid), any_value(item_id || ' ' || sid) "
                                       "FROM item_semantic_ids").fetchone()
    assert (n, n_sid) == (5183, 5183)
    item, s = sample.split(" ")
    assert by_id[item] == s

    for fmt in ("grid", "lcrec", "parquet"):
        out = run_cli(["export", "--home", str(home), "--format", fmt, "--out", str(tmp_path / fmt)], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
    emb = torch.load(tmp_path / "grid" / "embeddings.pt")
    ids = json.loads((tmp_path / "grid" / "item_ids.json").read_text())
    assert emb.shape == (5183, 384) and emb.dtype == torch.float32 and sorted(ids) == sorted(by_id)
    codes = torch.load(tmp_path / "grid" / "semantic_ids.pt")
    assert codes.shape == (5183, 4)
    npy = next((tmp_path / "lcrec").glob("*.npy"))
    index = json.loads(next((tmp_path / "lcrec").glob("*.index.json")).read_text())
    assert np.load(npy).shape == (5183, 384) and "".join(index["0"]) == by_id[ids[0]]
    table = pq.read_table(next((tmp_path / "parquet").glob("*.parquet")))
    assert table.num_rows == 5183 and {"item_id", "sid", "codes", "embedding"} <= set(table.column_names)
    assert table.column("item_id").to_pylist() == ids  # every format in the shards' row order
    assert np.array_equal(np.array(table.column("embedding")[0].as_py(), np.float32), emb[0].numpy())


@pytest.mark.slow
def test_the_tuned_index_meets_its_recall_target_where_a_fixed_hnsw_does_not(fp32_run, encoder32):
    """On the real sample, with its held-out test queries: `auto` (IVF here, the flat threshold lowered to 1,000
    items) raises nprobe until ANN recall@10 against exact search is >= 0.95, records the curve, and needs no
    exhaustive scan; a fixed HNSW (M=32, efConstruction 80, efSearch 16: the issue's setting) stays below 0.95."""
    import faiss

    from embed_assets.core.index import build_from_shards, exact_search, load_index, stored_blocks
    from embed_assets.core.index_tune import TuneConfig, held_out_queries, measure
    from embed_assets.core.items import load_partitions
    from embed_assets.core.layout import Layout

    layout = Layout.at(fp32_run["home"])
    groups = load_partitions(layout)
    cfg = TuneConfig(flat_max_items=1_000, n_queries=300)
    queries = lambda: held_out_queries(layout, encoder32, 300, str(SAMPLE_QUERIES))  # noqa: E731
    try:
        m = build_from_shards(layout, groups, "auto", tune_config=cfg, queries=queries)
        t = m["tuning"]
        assert m["kind"] == "ivf" and m["structure"]["factory"] == "IVF128,Flat", m["structure"]
        assert t["met"] and t["recall"] >= 0.95 and t["param"] == "nprobe" and t["n_queries"] == 300
        assert 1 < t["value"] < m["structure"]["nlist"]  # tuned, and not a scan of every list
        assert [c["value"] for c in t["curve"]][-1] == t["value"] and t["curve"][0]["recall"] < 0.95
        index, ids, manifest = load_index(layout)
        assert faiss.extract_index_ivf(index).nprobe == t["value"] and len(ids) == 5183

        q, _ = queries()
        gt = exact_search(layout, manifest, q, 10)
        assert measure(index, q, gt, 10)["recall"] == pytest.approx(t["recall"])
        fixed = faiss.IndexHNSWFlat(384, 32, faiss.METRIC_INNER_PRODUCT)
        fixed.hnsw.efConstruction = 80
        for _, emb in stored_blocks(layout, manifest):
            fixed.add(np.ascontiguousarray(emb, dtype=np.float32))
        fixed.hnsw.efSearch = 16
        got = measure(fixed, q, gt, 10)["recall"]
        print(f"\n{_cpu()}: tuned IVF nprobe={t['value']} recall {t['recall']:.4f}; fixed HNSW ef16 {got:.4f}")
        assert got < 0.95 <= t["recall"]
    finally:
        build_from_shards(layout, groups, "flat")  # the module's other tests read the flat index

"""The auto-tuned index against exact search, at catalog scale, on this machine.

    python benchmarks/index.py [--n 1000000] [--queries 1000] [--vectors /tmp/sid_bench/myntra_desc.vectors.npy]
                               [--json benchmarks/results/index_1m.json]

Vectors: the Myntra catalog's product descriptions encoded with all-MiniLM-L6-v2 (12,491 fp16 unit vectors, cached
by benchmarks/semantic_ids.py), grown to --n by perturbed copies (each copy = the vector plus Gaussian noise of norm
~0.45, renormalized: copies of one product sit at cosine ~0.9 of each other, near what distinct products of one kind
do). Queries are held out: product *names*, encoded with the same model (the issue's name -> description task), with
the same noise added so they fall among the copies.

Measured, in one process: flat (IndexFlatIP) QPS on the queries (batched, all threads); then the platform's own path
(`index_tune.choose_structure` -> `train_ivf` on a bounded sample -> add -> `tune` to recall@10 >= 0.95 against
exact search): its structure, build seconds, bytes, peak RSS, the recall/QPS curve, and the QPS ratio against flat.
A fixed HNSW (M=32, efConstruction 80) is measured on the 12,491 real vectors alone (building it at 1M takes longer
than this machine's session allows).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MYNTRA = Path(os.environ.get("EMBED_ASSETS_MYNTRA_CSV",
                             HERE.parent.parent / "shared" / "data" / "myntra" / "myntra_products_catalog.csv"))


def grow(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        x = base[np.arange(i, i + m) % len(base)].astype(np.float32)
        x += rng.normal(scale=noise / np.sqrt(base.shape[1]), size=x.shape).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[i:i + m] = x
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.45)
    p.add_argument("--vectors", default="/tmp/sid_bench/myntra_desc.vectors.npy")
    p.add_argument("--json")
    a = p.parse_args()

    import faiss

    from embed_assets.core.encoder import Encoder, cpu_info
    from embed_assets.core.index_tune import TuneConfig, choose_structure, measure, train_ivf, tune
    from embed_assets.core.metering import metered
    from embed_assets.core.metrics import exact_top_k

    cpu = cpu_info()
    print(f"cpu: {cpu['model']} (bf16 flags: {', '.join(cpu['bf16_flags']) or 'none'}; {os.cpu_count()} cores); "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    base = np.load(a.vectors).astype(np.float32)
    with open(MYNTRA, newline="", encoding="utf-8") as fh:
        names = [r["ProductName"] for r in csv.DictReader(fh)]
    rng = np.random.default_rng(1)
    qn = [names[i] for i in rng.choice(len(names), size=a.queries, replace=False)]
    enc = Encoder()
    qv, _ = enc.encode(qn)
    queries = grow(np.asarray(qv, dtype=np.float32), len(qv), a.noise, 2)
    x = grow(base, a.n, a.noise, 0)
    res: dict = {"command": "python benchmarks/index.py " + " ".join(sys.argv[1:]), "cpu": cpu, "n": a.n,
                 "n_queries": len(queries), "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads()}

    # exact search: the reference and the baseline
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    t0 = time.perf_counter()
    gt_ids, gt_scores = exact_top_k(x, queries, 10)
    gt = (gt_scores, gt_ids)
    flat_m = measure(flat, queries, gt, 10)
    res["flat"] = {"qps": flat_m["qps"], "recall": flat_m["recall"], "bytes": int(x.nbytes),
                   "ground_truth_seconds": time.perf_counter() - t0}
    print(f"flat: {flat_m['qps']:,.0f} QPS, recall {flat_m['recall']:.4f}, {x.nbytes / 2**20:,.0f} MB", flush=True)
    del flat

    cfg = TuneConfig()
    structure = choose_structure(a.n, x.shape[1], cfg)
    with metered() as usage:
        t0 = time.perf_counter()
        sample = x[np.sort(np.random.default_rng(0).choice(a.n, size=min(cfg.train_sample, a.n), replace=False))]
        index = train_ivf(structure, sample, cfg.seed)
        t_train = time.perf_counter() - t0
        index.add(x)
        t_build = time.perf_counter() - t0
        tuned = tune(index, queries, gt, cfg)
    nbytes = int(faiss.serialize_index(index).nbytes)
    res["tuned"] = {"structure": structure, "train_seconds": t_train, "build_seconds": t_build, "bytes": nbytes,
                    "peak_rss_mb": usage.peak_rss_mb, **{k: v for k, v in tuned.items()},
                    "qps_vs_flat": tuned["qps"] / flat_m["qps"]}
    print(f"tuned: {structure['factory']} built in {t_build:.1f} s (train {t_train:.1f} s), {nbytes / 2**20:,.0f} MB, "
          f"peak RSS {usage.peak_rss_mb:,.0f} MB", flush=True)
    print("  nprobe   recall@10        QPS   x flat")
    for c in tuned["curve"]:
        print(f"  {c['value']:>6} {c['recall']:>10.4f} {c['qps']:>10,.0f} {c['qps'] / flat_m['qps']:>8.1f}")
    print(f"chosen nprobe={tuned['value']}: recall@10 {tuned['recall']:.4f} (target {cfg.recall_target}), "
          f"{tuned['qps']:,.0f} QPS = {tuned['qps'] / flat_m['qps']:.1f}x flat", flush=True)

    # the fixed HNSW on the real vectors (12,491), same kind of held-out queries
    real_gt_ids, real_gt_scores = exact_top_k(base, np.asarray(qv, dtype=np.float32), 10)
    h = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    h.hnsw.efConstruction = 80
    h.add(base)
    res["hnsw_fixed_real"] = []
    for ef in (16, 32, 64, 128):
        h.hnsw.efSearch = ef
        m = measure(h, np.asarray(qv, dtype=np.float32), (real_gt_scores, real_gt_ids), 10)
        res["hnsw_fixed_real"].append({"efSearch": ef, **m})
        print(f"fixed HNSW on the {len(base):,} real vectors, efSearch {ef}: recall@10 {m['recall']:.4f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

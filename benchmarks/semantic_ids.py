"""Semantic IDs: cost at 1M / 10M vectors, and the readiness report on real catalogs (Myntra, SciFact).

    .venv/bin/python benchmarks/semantic_ids.py --synthetic 1000000 10000000 --threads 1 \
        --json benchmarks/results/semantic_ids_cost.json
    .venv/bin/python benchmarks/semantic_ids.py --catalogs myntra myntra_desc scifact --threads 1 \
        --json benchmarks/results/semantic_ids_catalogs.json
    # on a GPU machine (torch only, no faiss): the RQ-VAE alone on the cached catalog vectors
    python3 benchmarks/semantic_ids.py --catalogs myntra myntra_desc scifact --rqvae-only --workdir DIR --json OUT

Cost: synthetic clustered unit vectors (a 256 x 16 x 16 hierarchy of Gaussian clusters in 384-d, fp16, shards of
200,000 rows as the platform stores them) written once to --workdir as .npy, then `build_semantic_ids` with the
defaults (RQ-KMeans 3 x 256 on a 65,536-vector sample, 500 neighbour queries) in a fresh process per size, which
reports its peak RSS and the time of each phase (read off the build's own log lines). At the smallest size a second
build after 1% of the items changed (frozen codebooks, IDs carried) is timed too. Synthetic vectors measure cost
only: their collision numbers say nothing about real catalogs.

Catalogs: myntra (ProductName + " " + Description, ../shared/data, ids = ProductID), myntra_desc (the Description
alone, as the issue measured it) and scifact (the bundled sample, title + " " + text), raw text, encoded with the
platform's encoder (default precision; vectors cached in --workdir), then `assess` (nothing written): RQ-KMeans
3 x 256 with the defaults (small-catalog rule on), the same with the rule off (K=256 forced, as the issue measured
with faiss), and the RQ-VAE compared with RQ-KMeans on the same vectors. Benchmarks read ../shared; tests never do.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

MYNTRA = REPO.parent / "shared" / "data" / "myntra" / "myntra_products_catalog.csv"
SHARD_ROWS = 200_000
DIM = 384


def machine() -> dict:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    return {"cpu_model": model, "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
            "python": platform.python_version(), "command": " ".join([Path(sys.executable).name, *sys.argv])}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- synthetic ------------------------------------------------------------------------------------------------
def _centers(seed: int = 0) -> np.ndarray:
    """A three-level hierarchy of cluster centres (256 x 16 x 16 = 65,536 leaves), like topics/sub-topics/products."""
    rng = np.random.default_rng(seed)
    top = rng.normal(size=(256, DIM)).astype(np.float32)
    mid = (np.repeat(top, 16, axis=0) + 0.7 * rng.normal(size=(4096, DIM))).astype(np.float32)
    return (np.repeat(mid, 16, axis=0) + 0.5 * rng.normal(size=(65536, DIM))).astype(np.float32)


def _draw(centers: np.ndarray, m: int, seed) -> np.ndarray:
    r = np.random.default_rng(seed)
    x = centers[r.integers(0, len(centers), m)] + 0.3 * r.normal(size=(m, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def make_synthetic(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Clustered unit vectors in fp16 .npy shards of SHARD_ROWS (written once; generation is not timed)."""
    folder.mkdir(parents=True, exist_ok=True)
    centers = None
    paths = []
    for i, start in enumerate(range(0, n, SHARD_ROWS)):
        p = folder / f"shard_{i:05d}.npy"
        paths.append(p)
        if p.exists():
            continue
        centers = _centers(seed) if centers is None else centers
        tmp = p.with_name("." + p.name)
        with open(tmp, "wb") as fh:
            np.save(fh, _draw(centers, min(SHARD_ROWS, n - start), [seed, i]))
        os.replace(tmp, p)
    return paths


def synthetic_shards(paths: list[Path], changed_frac: float = 0.0):
    """The shards; with changed_frac, that share of all items (at the start of shard 0) has new vectors drawn from
    the same distribution (edited items, no drift)."""
    from embed_assets.core.semantic_ids import ShardInput

    def loader(i, p):
        def load():
            x = np.load(p)
            if changed_frac and i == 0:
                k = int(changed_frac * SHARD_ROWS * len(paths))
                x = x.copy()
                x[:k] = _draw(_centers(0), k, 12345)
            return [f"s{i}_{j}" for j in range(len(x))], x
        return load

    version = {"model_id": "SYNTHETIC/clustered-unit-vectors", "model_revision": "1", "dim": DIM}
    out = []
    for i, p in enumerate(paths):
        n = int(np.load(p, mmap_mode="r").shape[0])
        out.append(ShardInput(f"s{i:05d}", n, f"{p.name}:{changed_frac if i == 0 else 0}", version, loader(i, p)))
    return out


def phases(events: list[tuple[float, str]], t0: float) -> dict:
    """Phase times read off the build's log lines."""
    marks = {}
    for t, msg in events:
        if msg.startswith("training sample:") or msg.startswith("drift:"):
            marks.setdefault("sample_pass_end", t)
        if msg.startswith("trained rq_kmeans"):
            marks["train_end"] = t
        if msg.startswith("encoded shard"):
            marks["encode_end"] = t
    out = {}
    start = t0
    if "sample_pass_end" in marks and "train_end" in marks:
        out["sample_pass_s"] = marks["sample_pass_end"] - t0
        out["train_s"] = marks["train_end"] - marks["sample_pass_end"]
        start = marks["train_end"]
    if "encode_end" in marks:
        out["encode_pass_s"] = marks["encode_end"] - start
    return out


def worker_synthetic(folder: Path, n: int, update: bool, threads: int) -> dict:
    from embed_assets.core.semantic_ids import SidConfig, build_semantic_ids

    paths = make_synthetic(folder / f"data_{n}", n)
    root = folder / f"sid_{n}"
    shutil.rmtree(root, ignore_errors=True)
    events: list[tuple[float, str]] = []

    def log(msg: str) -> None:
        events.append((time.perf_counter(), msg))
        print(f"  [{n:,}] {msg}", flush=True)

    cfg = SidConfig(threads=threads)
    t0 = time.perf_counter()
    res = build_semantic_ids(root, synthetic_shards(paths), cfg, log=log)
    total = time.perf_counter() - t0
    out = {"n": n, "shards": len(paths), "threads": threads, "action": res.action, "total_s": total,
           **phases(events, t0),
           "peak_rss_mb_after_build": peak_rss_mb(),
           "parquet_mb": (res.path / "semantic_ids.parquet").stat().st_size / 2 ** 20,
           "report": {k: res.report.get(k) for k in (
               "codebook_size", "duplicate_vector_rate", "collision_rate", "max_collision_group",
               "codebook_utilization", "perplexity", "reconstruction_cosine", "reconstruction_mse",
               "neighbour_share_first_code", "neighbour_share_first_two_codes")}}
    out["write_and_report_s"] = total - sum(out.get(k, 0) for k in ("sample_pass_s", "train_s", "encode_pass_s"))
    if update:
        events.clear()
        t1 = time.perf_counter()
        res2 = build_semantic_ids(root, synthetic_shards(paths, changed_frac=0.01), cfg, log=log)
        out["update_1pct"] = {"total_s": time.perf_counter() - t1, "action": res2.action,
                              "changes": {k: v for k, v in res2.report["changes"].items() if k != "drift"},
                              "drift_ratio": (res2.report["changes"].get("drift") or {}).get("ratio")}
    out["peak_rss_mb"] = peak_rss_mb()
    shutil.rmtree(root, ignore_errors=True)
    return out


# -- catalogs -------------------------------------------------------------------------------------------------
def load_catalog(name: str) -> tuple[list[str], list[str], dict[str, str]]:
    if name in ("myntra", "myntra_desc"):  # myntra_desc: the Description alone (the measurement)
        with open(MYNTRA, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        ids = [r["ProductID"].strip() for r in rows]
        texts = [(f"{r['ProductName']} {r['Description']}" if name == "myntra" else r["Description"]).strip()
                 for r in rows]
        titles = {i: r["ProductName"] for i, r in zip(ids, rows)}
        seen: dict[str, int] = {}
        for j, i in enumerate(ids):  # the platform keeps a duplicated id's last row
            seen[i] = j
        keep = sorted(seen.values())
        return [ids[j] for j in keep], [texts[j] for j in keep], titles
    if name == "scifact":
        from embed_assets.settings import SAMPLE_CORPUS

        with gzip.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as fh:
            docs = [json.loads(line) for line in fh]
        return ([d["_id"] for d in docs], [f"{d['title']} {d['text']}".strip() for d in docs],
                {d["_id"]: d["title"] for d in docs})
    raise SystemExit(f"unknown catalog {name}")


def catalog_vectors(folder: Path, name: str) -> tuple[list[str], np.ndarray, dict[str, str], dict]:
    """(ids, fp16 vectors, titles, encoding info), encoded once and cached in `folder` (the cache alone is enough
    to re-run the report elsewhere, e.g. on a GPU machine without ../shared)."""
    cache, meta_path = folder / f"{name}.vectors.npy", folder / f"{name}.vectors.json"
    if cache.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return meta.pop("ids"), np.load(cache), meta.pop("titles"), meta
    ids, texts, titles = load_catalog(name)
    from embed_assets.core.encoder import Encoder

    enc = Encoder()
    t0 = time.perf_counter()
    vecs, stats = enc.encode(texts, progress=lambda m: print(f"  [{name}] {m}", flush=True))
    meta = {"n": len(ids), "encode_s": time.perf_counter() - t0, "precision": enc.precision,
            "version": enc.version, "n_unique_texts": stats.n_unique}
    folder.mkdir(parents=True, exist_ok=True)
    np.save(cache, vecs.astype(np.float16))
    meta_path.write_text(json.dumps({**meta, "ids": ids, "titles": {i: titles.get(i, "") for i in ids}},
                                    default=str))
    return ids, vecs.astype(np.float16), titles, meta


def device_vs_cpu_codes(vecs: np.ndarray, steps: int, folder: Path) -> dict:
    """Train an RQ-VAE where torch picks (GPU if any), save it, load it on the CPU (as a refresh does) and compare
    the codes of every item: the share that agrees is what a refresh on another device would re-derive."""
    from embed_assets.core.rqvae import RqVaeConfig, RqVaeQuantizer

    x = vecs.astype(np.float32)
    q = RqVaeQuantizer.train(x, 3, 256, RqVaeConfig(steps=steps, device="auto"))
    codes_dev = q.encode(x)[0]
    folder.mkdir(parents=True, exist_ok=True)
    q.save(folder)
    codes_cpu = RqVaeQuantizer.load(folder, device="cpu").encode(x)[0]
    return {"device": q.training["device"], "train_s": q.training["seconds"],
            "share_items_same_codes": float((codes_dev == codes_cpu).all(axis=1).mean()),
            "share_same_code_by_level": [float(v) for v in (codes_dev == codes_cpu).mean(axis=0)]}


def worker_catalog(folder: Path, name: str, rqvae_steps: int, threads: int, rqvae_only: bool = False) -> dict:
    """rqvae_steps=0: RQ-KMeans only."""
    from embed_assets.core.rqvae import RqVaeConfig
    from embed_assets.core.semantic_ids import SidConfig, assess, shards_from_arrays

    ids, vecs, titles, meta = catalog_vectors(folder, name)
    shards = shards_from_arrays([(f"{name}_{i}", ids[s:s + SHARD_ROWS], vecs[s:s + SHARD_ROWS])
                                 for i, s in enumerate(range(0, len(ids), SHARD_ROWS))],
                                {k: v for k, v in meta["version"].items()})

    def lookup(xs):
        return {x: titles.get(x, "") for x in xs}

    def log(m):
        print(f"  [{name}] {m}", flush=True)

    runs = {}
    if rqvae_only:  # torch only (no faiss needed): the RQ-VAE alone, e.g. on a GPU machine
        t0 = time.perf_counter()
        runs["rqvae"] = assess(shards, SidConfig(quantizer="rqvae", compare=False, min_points_per_centroid=1,
                                                 rqvae=RqVaeConfig(steps=rqvae_steps, device="auto")), lookup, log)
        runs["rqvae"]["seconds"] = time.perf_counter() - t0
        return {"catalog": name, "n_items": len(ids), "encoding": meta, "runs": runs, "peak_rss_mb": peak_rss_mb(),
                "device_vs_cpu": device_vs_cpu_codes(vecs, rqvae_steps, folder / f"{name}.rqvae_check")}
    t0 = time.perf_counter()
    runs["rq_kmeans_default"] = assess(shards, SidConfig(threads=threads), lookup, log)
    runs["rq_kmeans_default"]["seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runs["rq_kmeans_k256_forced"] = assess(shards, SidConfig(min_points_per_centroid=1, threads=threads), lookup, log)
    runs["rq_kmeans_k256_forced"]["seconds"] = time.perf_counter() - t0
    if not rqvae_steps:
        return {"catalog": name, "n_items": len(ids), "encoding": meta, "runs": runs, "peak_rss_mb": peak_rss_mb()}
    t0 = time.perf_counter()
    runs["rqvae_vs_rq_kmeans"] = assess(shards, SidConfig(quantizer="rqvae", min_points_per_centroid=1, threads=threads,
                                                          rqvae=RqVaeConfig(steps=rqvae_steps, device="auto")),
                                        lookup, log)
    runs["rqvae_vs_rq_kmeans"]["seconds"] = time.perf_counter() - t0
    return {"catalog": name, "n_items": len(ids), "encoding": meta, "runs": runs, "peak_rss_mb": peak_rss_mb()}


# -- driver ---------------------------------------------------------------------------------------------------
def run_worker(args: list[str]) -> dict:
    """A fresh process per measurement (its own peak RSS); the result comes back as the last stdout line."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=REPO)
    last = ""
    for line in proc.stdout:
        if line.startswith("RESULT "):
            last = line[len("RESULT "):]
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0 or not last:
        raise SystemExit(f"worker {args} failed (exit {proc.returncode})")
    return json.loads(last)


def summary_synthetic(r: dict) -> str:
    rep = r["report"]
    s = (f"n={r['n']:>12,}  total {r['total_s']:7.1f} s  (sample pass {r.get('sample_pass_s', 0):6.1f}, train "
         f"{r.get('train_s', 0):6.1f}, encode pass {r.get('encode_pass_s', 0):7.1f}, digits+report+write "
         f"{r['write_and_report_s']:6.1f})  peak RSS {r['peak_rss_mb']:,.0f} MB  parquet {r['parquet_mb']:.0f} MB\n"
         f"    collision_rate {[round(c, 4) for c in rep['collision_rate']]}, max group {rep['max_collision_group']}, "
         f"utilization {[round(u, 3) for u in rep['codebook_utilization']]}, recon cos "
         f"{rep['reconstruction_cosine']:.4f}")
    if "update_1pct" in r:
        u, c = r["update_1pct"], r["update_1pct"]["changes"]
        s += (f"\n    after 1% changed: {u['total_s']:.1f} s ({u['action']}; kept {c.get('n_kept', 0):,}, changed "
              f"{c.get('n_changed_same_id', 0) + c.get('n_changed_new_id', 0):,}, drift ratio {u['drift_ratio']:.2f})")
    return s


def summary_catalog(r: dict) -> str:
    lines = [f"{r['catalog']}: {r['n_items']:,} items (encoded in {r['encoding']['encode_s']:.0f} s, "
             f"{r['encoding']['precision']}, {r['encoding']['n_unique_texts']:,} distinct texts)"]
    for name, rep in r["runs"].items():
        lines.append(
            f"  {name}: K={rep['codebook_size']} ({rep['codebook_size_reason'] or 'as requested'})\n"
            f"    duplicate_vector_rate {rep['duplicate_vector_rate']:.2%} ({rep['n_items_in_duplicate_groups']:,} "
            f"items), largest_duplicate_group {rep['largest_duplicate_group']}\n"
            f"    collision_rate {[f'{c:.2%}' for c in rep['collision_rate']]}, max_collision_group "
            f"{rep['max_collision_group']}, utilization {[f'{u:.1%}' for u in rep['codebook_utilization']]}, "
            f"perplexity {[round(p, 1) for p in rep['perplexity']]}\n"
            f"    reconstruction_cosine {rep['reconstruction_cosine']:.4f}, mse {rep['reconstruction_mse']:.3g}, "
            f"neighbours sharing code 1: {rep['neighbour_share_first_code']:.1%}, codes 1-2: "
            f"{rep['neighbour_share_first_two_codes']:.1%}  ({rep['seconds']:.1f} s)")
        for name2, c in (rep.get("comparison") or {}).items():
            lines.append(f"      {name2}: collision_rate {[f'{x:.2%}' for x in c['collision_rate']]}, max group "
                         f"{c['max_collision_group']}, utilization {[f'{u:.1%}' for u in c['codebook_utilization']]}, "
                         f"recon cos {c['reconstruction_cosine']:.4f}, nbr code1 "
                         f"{c['neighbour_share_first_code']:.1%}, codes1-2 {c['neighbour_share_first_two_codes']:.1%}, "
                         f"train {c['train_seconds']:.1f} s")
        lines += [f"    - {x}" for x in rep["recommendations"]]
    if r.get("device_vs_cpu"):
        d = r["device_vs_cpu"]
        lines.append(f"  RQ-VAE trained on {d['device']} ({d['train_s']:.1f} s), re-loaded on CPU: "
                     f"{d['share_items_same_codes']:.2%} of items get the same codes "
                     f"(by level {[f'{v:.2%}' for v in d['share_same_code_by_level']]})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=int, nargs="*", default=[])
    p.add_argument("--catalogs", nargs="*", default=[])
    p.add_argument("--rqvae-steps", type=int, default=3000, help="0: no RQ-VAE")
    p.add_argument("--rqvae-only", action="store_true",
                   help="catalogs: only the RQ-VAE (torch, no faiss), from vectors cached in --workdir")
    p.add_argument("--workdir", default="/tmp/sid_bench")
    p.add_argument("--threads", type=int, default=0, help="faiss threads (0: all cores)")
    p.add_argument("--keep-data", action="store_true", help="keep the synthetic shards in --workdir")
    p.add_argument("--json")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    work = Path(a.workdir)
    if a.worker:
        kind = a.worker[0]
        if kind == "synthetic":
            res = worker_synthetic(work, int(a.worker[1]), a.worker[2] == "update", a.threads)
        else:
            res = worker_catalog(work, a.worker[1], int(a.worker[2]), a.threads, a.rqvae_only)
        print("RESULT " + json.dumps(res, default=str), flush=True)
        return
    out = {"machine": machine(), "synthetic": [], "catalogs": []}
    print(json.dumps(out["machine"]))
    for i, n in enumerate(a.synthetic):
        r = run_worker(["--workdir", str(work), "--threads", str(a.threads), "--worker", "synthetic", str(n),
                        "update" if i == 0 else "no"])
        out["synthetic"].append(r)
        print(summary_synthetic(r), flush=True)
        if not a.keep_data:
            shutil.rmtree(work / f"data_{n}", ignore_errors=True)
    for name in a.catalogs:
        only = ["--rqvae-only"] if a.rqvae_only else []
        r = run_worker(["--workdir", str(work), "--threads", str(a.threads), *only, "--worker", "catalog", name,
                        str(a.rqvae_steps)])
        out["catalogs"].append(r)
        print(summary_catalog(r), flush=True)
    out["machine"]["load_avg_at_end"] = os.getloadavg()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

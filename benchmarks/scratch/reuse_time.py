"""Re-use's own time per partition after a 1% change: reuse_vectors and the fill of the partition's vector array,
without the encoder. Prepare once (a copy of a benchmark HOME, the 1% change of change_again.py, processed_items):

    cp -r /tmp/embed_incr_88ct0sd9 /tmp/s8/rh && .venv/bin/python benchmarks/scratch/reuse_time.py --prepare /tmp/s8/rh
    .venv/bin/python benchmarks/scratch/reuse_time.py /tmp/s8/rh      # twice: cold, then warm (same process)

A/B: PYTHONPATH=<a worktree of the old commit> for the old code (its reuse_vectors returns a dict).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

if sys.argv[1] == "--prepare":
    from embed_assets.core.items import process_items
    from embed_assets.core.layout import Layout

    root = Path(sys.argv[2]); items = root / "items.jsonl"
    rows = [json.loads(l) for l in items.read_text().splitlines()]
    n = int(len(rows) * 0.01); step = len(rows) // (n - n // 2)
    for i in range(0, len(rows), step)[: n - n // 2]:
        rows[i]["description"] += " Edited Z."
    rows += [{"id": f"new-Z-{i}", "name": rows[i]["name"], "description": f"{rows[i]['description']} new Z"} for i in range(n // 2)]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    process_items(Layout.at(root / "home"), [items], "id", ["name", "description"], partition_size=200000)
    sys.exit(0)

from embed_assets.core.embed import reuse_vectors
from embed_assets.core.encoder import Encoder
from embed_assets.core.items import read_partition
from embed_assets.core.layout import Layout

lay = Layout.at(Path(sys.argv[1]) / "home")
version = Encoder(precision="bf16").version
for rep in range(2):
    tot = 0
    for key in ("p00", "p01", "p10", "p11"):
        t = read_partition(lay, key); hashes = t.column("text_hash").to_pylist()
        t0 = time.perf_counter()
        found = reuse_vectors(lay, version, set(hashes), key=key)
        emb = np.empty((len(hashes), 384), np.float16)
        if hasattr(found, "fill"):
            n = int(found.fill(t.column("text_hash").combine_chunks(), emb).sum())
        else:
            n = 0
            for r, h in enumerate(hashes):
                v = found.get(h)
                if v is not None:
                    emb[r] = v; n += 1
        dt = time.perf_counter() - t0; tot += dt
        print(f"  {key} {dt:.3f}s filled {n}")
    print("total", round(tot, 3))

"""Re-use's copy of a shard's wanted rows (core/embed.py `_take`): one row at a time (before 26e152b) vs one fancy-
index copy (since), then the rows written into the new shard as `_embed_partition` does. 124,000 x 384 fp16 rows,
a partition of the 500k benchmark. CPU seconds, two trials each.

    .venv/bin/python benchmarks/scratch/take_rows.py
"""
import time

import numpy as np

emb = np.random.default_rng(0).random((124_000, 384)).astype(np.float16)
hashes = [f"h{i}" for i in range(len(emb))]
rows = list(range(len(emb)))


def fill(found):
    out = np.empty_like(emb)
    for r, h in enumerate(hashes):
        out[r] = found[h]
    return out


for trial in range(2):
    t = time.process_time()
    found = {}
    for r in rows:
        found.setdefault(hashes[r], emb[r].copy())
    fill(found)
    old = time.process_time() - t
    t = time.process_time()
    found = {}
    block = emb[np.asarray(rows, dtype=np.int64)]
    for r, v in zip(rows, block):
        found.setdefault(hashes[r], v)
    fill(found)
    new = time.process_time() - t
    print(f"row by row {old:.3f} CPU s, one copy {new:.3f} CPU s, ratio {old / new:.2f}x")

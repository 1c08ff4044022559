"""What the tuning's exact answers cost against every vector (`ExactTopK`, 500 queries, k = 200 as stored), and what a
refill that carries them over pays instead (`CarriedTopK`: only the changed rows searched, plus the merge), at
500,000 random 384-d rows with a 1% change.

    .venv/bin/python benchmarks/scratch/exact_top_k_cost.py
"""
import time

import numpy as np

from embed_assets.core.encoder import cpu_info
from embed_assets.core.metrics import CarriedTopK, ExactTopK, cutoffs, vector_keys

rng = np.random.default_rng(0)
n, d, nq, k = 500_000, 384, 500, 200
x = rng.standard_normal((n, d)).astype(np.float32)
q = rng.standard_normal((nq, d)).astype(np.float32)
t = time.perf_counter()
full = ExactTopK(q, k)
for c in range(0, n, 125_000):
    full.add(np.arange(c, c + 125_000), x[c:c + 125_000])
s0, p0 = full.result()
t_full = time.perf_counter() - t
prev = {"keys": vector_keys(q), "scores": s0, "positions": p0, "cutoff": cutoffs(s0, p0)}
changed = rng.choice(n, n // 100, replace=False)
x[changed] = rng.standard_normal((len(changed), d)).astype(np.float32)
olds = np.arange(n)
olds[changed] = -1
t = time.perf_counter()
acc = CarriedTopK(q, k, prev, n)
for c in range(0, n, 125_000):
    acc.add(np.arange(c, c + 125_000), x[c:c + 125_000], olds[c:c + 125_000])
scores, pos, cut, again = acc.result(need=100)
t_carried = time.perf_counter() - t
print(f"cpu {cpu_info()['model']}; {nq} queries x {n:,} rows, k = {k}, 1% of rows changed")
print(f"ExactTopK over every row: {t_full:.2f} s; CarriedTopK: {t_carried:.2f} s ({t_full / t_carried:.0f}x); "
      f"queries searched again: {len(again)}")

"""The IVF drift statistic (mean squared distance to the nearest centroid / the training sample's) of each shard of a
benchmark HOME, measured on its first rows, on `index.drift_sample` (rows spread over the shard) and on all rows.

    .venv/bin/python benchmarks/scratch/drift_sample.py HOME [index version]
"""
import numpy as np, sys, json
from embed_assets.core.layout import Layout
from embed_assets.core.index import load_index, drift_sample
from embed_assets.core.index_tune import centroid_distance
from embed_assets.core.shards import list_manifests, load_verified
lay = Layout.at(sys.argv[1])
index, ids, man = load_index(lay, sys.argv[2] if len(sys.argv) > 2 else None)
base = man["trained"]["train_centroid_distance"]
for m in list_manifests(lay):
    sid, emb = load_verified(lay, m)
    print(m.partition, len(sid), sid[:3], sid[-2:])
    for label, x in (("first 5k", emb[:5000]), ("first 20k", emb[:20000]), ("spread 5k", drift_sample(emb, 5000)), ("spread 20k", drift_sample(emb, 20000)), ("all", emb)):
        d = centroid_distance(index, np.asarray(x, np.float32))
        print(f"   {label:10s} {d / base:.3f}")

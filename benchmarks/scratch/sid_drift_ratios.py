"""The semantic-ID drift ratios quoted in the notes for drift_test, on the tests' synthetic clustered vectors:
(1) a 600-item catalog grown by 10,000 items of the same clusters (test_small_catalog_...), (2) three refreshes of
5 far-off items each on an 800-item catalog (test_drift_is_the_whole_catalogs_...), (3) 80 novel items.

    .venv/bin/python benchmarks/scratch/sid_drift_ratios.py
"""
import dataclasses
import tempfile

import numpy as np

from embed_assets.core import semantic_ids as S
from embed_assets_tests.core.test_semantic_ids import _clustered, _shards

with tempfile.TemporaryDirectory() as d:
    x, ids = _clustered(600, centers=40), [f"i{i}" for i in range(600)]
    S.build_semantic_ids(d + "/a", _shards(ids, x), S.SidConfig(neighbour_queries=20))
    more = _clustered(10_000, centers=40, seed=0)
    g = S.build_semantic_ids(d + "/a", _shards(ids + [f"g{i}" for i in range(10_000)], np.concatenate([x, more])),
                             S.SidConfig(neighbour_queries=20))
    dr = g.report["changes"]["drift"]
    print(f"(1) growth 600 -> 10,600, same clusters: catalog {dr['ratio']:.3f}x, new items "
          f"{dr['fresh_ratio']:.3f}x, action {g.action}")
    cfg = S.SidConfig(levels=2, codebook_size=16, min_points_per_centroid=8, neighbour_queries=0)
    x, novel, ids = _clustered(800), _clustered(15, seed=99), [f"i{i}" for i in range(800)]
    S.build_semantic_ids(d + "/b", _shards(ids, x), cfg)
    seen = []
    for step, min_items in enumerate((5, 6, 5)):
        seen += [f"n{step}_{j}" for j in range(5)]
        r = S.build_semantic_ids(d + "/b", _shards(ids + seen, np.concatenate([x, novel[:len(seen)]])),
                                 dataclasses.replace(cfg, drift_min_items=min_items))
        dr = r.report["changes"]["drift"]
        print(f"(2) refresh {step + 1} (drift_min_items={min_items}): catalog {dr['ratio']:.3f}x, its 5 new items "
              f"{dr['fresh_ratio']:.2f}x, action {r.action}")
    S.build_semantic_ids(d + "/c", _shards(ids, x), dataclasses.replace(cfg, drift_min_items=50))
    r = S.build_semantic_ids(d + "/c", _shards(ids + [f"n{i}" for i in range(80)],
                                               np.concatenate([x, _clustered(80, seed=99)])),
                             dataclasses.replace(cfg, drift_min_items=50))
    dr = r.report["changes"]["drift"]
    print(f"(3) 80 novel items on 800: catalog {dr['ratio']:.3f}x, new items {dr['fresh_ratio']:.2f}x, "
          f"action {r.action}")

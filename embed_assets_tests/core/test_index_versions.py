"""Index versions: each build is a new folder, `current` moves only after the recall check and the shadow
comparison pass, a blocked candidate leaves the previous version live, old versions are pruned."""

import json
import os

import pytest

from embed_assets.core.index import (IndexBuildError, PromotionConfig, build_from_shards, current_version,
                                     load_index)
from embed_assets.core.index_tune import TuneConfig, held_out_queries
from embed_assets.core.items import load_partitions
from embed_assets.core.layout import Layout
from embed_assets_tests.conftest import embed_catalog, sample_docs, write_jsonl


def test_versions_shadow_and_blocked_promotions(tmp_path, encoder):
    docs = sample_docs(300)
    corpus = write_jsonl(tmp_path / "raw" / "corpus.jsonl", docs)
    layout = Layout.at(tmp_path / "home")
    embed_catalog(layout, corpus, encoder, 40)
    queries = lambda: held_out_queries(layout, encoder, 60)  # noqa: E731
    first = build_from_shards(layout, load_partitions(layout), "auto", queries=queries)
    assert current_version(layout) == "v00001" and os.path.islink(layout.index_dir)
    assert first["shadow"] == {"compared": False, "reason": "no current version"}

    docs[3] = {**docs[3], "title": "An edited title about protein folding"}
    write_jsonl(corpus, docs)
    embed_catalog(layout, corpus, encoder, 40)
    second = build_from_shards(layout, load_partitions(layout), "auto", queries=queries)
    sh = second["shadow"]
    assert current_version(layout) == "v00002" and sh["compared"] and sh["against"] == "v00001"
    assert sh["recall_delta"] == 0.0 and 0.9 <= sh["overlap_at_10"] <= 1.0 and "p50_delta_ms" in sh

    # a recall check that cannot pass (IVF on 300 items, target above 1): blocked, v00002 stays live
    docs[4] = {**docs[4], "title": "Another edited title"}
    write_jsonl(corpus, docs)
    embed_catalog(layout, corpus, encoder, 40)
    with pytest.raises(IndexBuildError, match="promotion blocked: recall check"):
        build_from_shards(layout, load_partitions(layout), "auto", queries=queries,
                          tune_config=TuneConfig(flat_max_items=100, recall_target=1.01))
    assert current_version(layout) == "v00002"
    _, _, live = load_index(layout)
    assert live["version_name"] == "v00002"
    why = json.loads((layout.index_root / "v00003.rejected" / "why.json").read_text())
    assert why["blocked_by"][0].startswith("recall check")

    # a shadow comparison that fails (a new version must beat the live one's recall by 0.5): blocked too
    with pytest.raises(IndexBuildError, match="promotion blocked: shadow"):
        build_from_shards(layout, load_partitions(layout), "auto", queries=queries,
                          promotion=PromotionConfig(max_recall_drop=-0.5))
    assert current_version(layout) == "v00002"

    # it passes: promoted; only the newest versions are kept, the live one always
    third = build_from_shards(layout, load_partitions(layout), "auto", queries=queries,
                              promotion=PromotionConfig(keep_versions=2))
    assert current_version(layout) == third["version_name"] == "v00005"
    kept = sorted(p.name for p in layout.index_root.iterdir() if p.name.startswith("v"))
    assert kept == ["v00002", "v00003.rejected", "v00004.rejected", "v00005"]  # 2 promoted, 2 rejected at most


def _flat(n: int, seed: int):
    import faiss
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((n, 384)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(384)
    index.add(x)
    return index, [f"item-{seed}-{i}" for i in range(n)]


def _disk_of(monkeypatch, layout: Layout, capacity: int) -> None:
    """A disk of `capacity` bytes holding only index/: free space is what the version folders leave."""
    import collections
    import shutil

    import embed_assets.core.index as index_mod

    usage = collections.namedtuple("usage", "total used free")

    def disk_usage(path):
        used = sum(f.stat().st_size for f in layout.index_root.rglob("*") if f.is_file() and not f.is_symlink())
        return usage(capacity, used, max(0, capacity - used))

    monkeypatch.setattr(index_mod.shutil, "disk_usage", disk_usage)
    assert shutil.disk_usage is disk_usage  # the module's own shutil: what make_room asks


def test_a_full_disk_removes_what_promotion_would_remove_first_then_fails_clearly(tmp_path, monkeypatch):
    from embed_assets.core.index import IndexDiskFull, save_index, version_bytes

    layout = Layout.at(tmp_path / "home")
    for seed in range(3):  # v00001..v00003, v00003 live: the steady state with keep_index_versions 3
        index, ids = _flat(2_000, seed)
        save_index(layout, index, ids, {"kind": "flat"})
    one = version_bytes(index, 0)
    sizes = {p.name: sum(f.stat().st_size for f in p.iterdir()) for p in layout.index_root.glob("v*")}
    real = sizes["v00003"]
    assert real <= one <= real + (1 << 20) + 8 * 2_000 + 64 * 2_000, (sizes, one)  # an upper bound, and a close one

    # free space just short of a version: it fits once the oldest, which promotion removes anyway, is gone first
    _disk_of(monkeypatch, layout, sum(sizes.values()) + one - 1)
    index, ids = _flat(2_000, 3)
    save_index(layout, index, ids, {"kind": "flat"})
    assert current_version(layout) == "v00004"
    assert sorted(p.name for p in layout.index_root.glob("v*")) == ["v00002", "v00003", "v00004"]
    assert load_index(layout)[2]["made_room"] == ["v00001"]
    assert len(load_index(layout)[1]) == 2_000

    # short by more than a spare version frees: a clear error, the live version kept, nothing half-written
    _disk_of(monkeypatch, layout, 3 * real + (one - real) - 1)
    index, ids = _flat(2_000, 4)
    with pytest.raises(IndexDiskFull, match=r"needs about .* GB, .* GB is free .*keep_index_versions"):
        save_index(layout, index, ids, {"kind": "flat"})
    assert current_version(layout) == "v00004"
    left = sorted(p.name for p in layout.index_root.iterdir() if p.name != "current")
    assert left == ["v00003", "v00004"], left  # v00002 went (promotion would drop it); no build folder left

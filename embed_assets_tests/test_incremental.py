"""Item-level re-use: only new and changed texts reach the model, and the result equals a full rebuild."""

import json

import numpy as np
import torch

from embed_assets.cli import run_pipeline
from embed_assets.settings import Settings
from embed_assets_tests.conftest import sample_docs, write_jsonl


def _settings(home, corpus):
    # titles only: 1,000 short real texts encode in seconds
    return Settings(home=str(home), items=[str(corpus)], text_fields=["title"], row_group_size=300)


def _shards(home):
    out = {}
    for p in sorted((home / "embeddings").glob("shard_*.pt")):
        d = torch.load(p, weights_only=True)
        out[p.name] = (d["item_id"], d["embeddings"].float().numpy())
    return out


def test_second_run_encodes_only_the_30_new_or_changed_texts(tmp_path):
    docs = sample_docs(1020)
    first, extra = docs[:1000], docs[1000:]
    corpus = write_jsonl(tmp_path / "raw" / "items.jsonl", first)
    home = tmp_path / "home"
    code, s1 = run_pipeline(_settings(home, corpus))
    assert code == 0 and s1["n_encoded"] == 1000 and s1["n_reused"] == 0

    changed = [dict(d) for d in first]
    for i in range(0, 1000, 100):  # 10 descriptions rewritten, spread over every row group
        changed[i]["title"] = changed[i]["title"] + " (revised edition)"
    # 20 new items arrive, and one existing item moves to another row group (it must be re-used, not encoded)
    moved = changed.pop(5)
    write_jsonl(corpus, changed + extra + [moved])
    code, s2 = run_pipeline(_settings(home, corpus))
    assert code == 0
    assert s2["n_encoded"] == 30
    assert s2["n_reused"] > 0
    totals = json.loads((home / "reports" / "run_summary.json").read_text())
    assert totals["n_encoded"] == 30 and totals["n_reused"] == s2["n_reused"]

    rebuild = tmp_path / "rebuild"
    code, s3 = run_pipeline(_settings(rebuild, corpus))
    assert code == 0 and s3["n_encoded"] == 1020
    inc, full = _shards(home), _shards(rebuild)
    assert inc.keys() == full.keys()
    for name in full:
        assert inc[name][0] == full[name][0]
        np.testing.assert_allclose(inc[name][1], full[name][1], atol=2e-3)  # fp16 precision


def test_deleted_items_and_vanished_partitions_disappear_everywhere(tmp_path, dagster_home):
    import dagster as dg

    from embed_assets.core import catalog
    from embed_assets.core.index import load_index
    from embed_assets.core.layout import Layout

    docs = sample_docs(90)
    corpus = write_jsonl(tmp_path / "raw" / "items.jsonl", docs)
    s = Settings(home=str(tmp_path / "home"), items=[str(corpus)], text_fields=["title"], row_group_size=30)
    code, _ = run_pipeline(s)
    assert code == 0
    keep = [d for i, d in enumerate(docs[:50]) if i not in (3, 17, 33, 41, 48)]  # 40 deleted in all
    write_jsonl(corpus, keep)
    code, summary = run_pipeline(s)
    assert code == 0 and summary["n_encoded"] == 0  # nothing new: every vector re-used

    layout = Layout.at(s.home)
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("row_groups") == ["rg_00000", "rg_00001"]
    assert sorted(p.name for p in layout.embeddings_dir.glob("shard_*.pt")) == ["shard_00000.pt", "shard_00001.pt"]
    assert catalog.query(layout, "SELECT partition FROM shards ORDER BY 1") == [("rg_00000",), ("rg_00001",)]
    want = sorted(d["_id"] for d in keep)
    assert sorted(i for (i,) in catalog.query(layout, "SELECT item_id FROM items")) == want
    _, ids, _ = load_index(layout)
    assert sorted(ids) == want
    assert not layout.previous_dir.exists() or not any(layout.previous_dir.iterdir())

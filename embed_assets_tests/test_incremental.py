"""Item-level re-use: only new and changed texts reach the model, and the result equals a full rebuild.

Partitions are hash prefixes of the item id, so an item never moves: an edit, an insert or a delete rewrites the one
partition that holds it. Vectors are re-used by text hash from the partition's own shard, from its parent's after a
split, and through the catalog from any other partition holding the same text.
"""

import json
import math

import numpy as np
import torch

from embed_assets.cli import run_pipeline
from embed_assets.core import catalog
from embed_assets.core.items import load_partitions, read_partition
from embed_assets.core.layout import Layout
from embed_assets.core.partitioning import SPLIT_FACTOR, id_hash, leaf_of_key
from embed_assets.core.shards import read_manifest
from embed_assets.settings import Settings
from embed_assets_tests.conftest import sample_docs, write_jsonl


def _settings(home, corpus, partition_size=300):
    # titles only: 1,000 short real texts encode in seconds; fp32 in every run, so a rebuild is comparable exactly
    return Settings(home=str(home), items=[str(corpus)], text_fields=["title"], partition_size=partition_size,
                    precision="fp32")


def _vectors(home) -> dict[str, np.ndarray]:
    """item id -> its fp16 vector, over every shard (the seed's loader)."""
    out = {}
    for p in sorted((home / "embeddings").glob("shard_*.pt")):
        d = torch.load(p, weights_only=True)
        out.update(zip(d["item_id"], d["embeddings"].numpy()))
    return out


def _one_rounding_apart(x: np.ndarray, y: np.ndarray) -> bool:
    """fp16 vectors whose components differ by at most one fp16 step (at the larger magnitude) plus fp32 noise."""
    step = np.spacing(np.maximum(np.abs(x), np.abs(y))).astype(np.float32)
    return bool(np.all(np.abs(x.astype(np.float32) - y.astype(np.float32)) <= step + 1e-6))


def _partition_of(keys, item_id: str) -> str:
    return next(k for k in keys if leaf_of_key(k).holds(id_hash(item_id)))


def _manifests(layout):
    return {p["partition"]: read_manifest(layout, p["partition"]) for p in load_partitions(layout)}


def _rewritten(before: dict, after: dict) -> set[str]:
    """Partitions whose shard was (re)written between two snapshots of the manifests."""
    return {k for k, m in after.items() if k not in before or m.created_at != before[k].created_at}


def test_second_run_encodes_only_new_or_changed_texts_and_equals_a_rebuild(tmp_path, monkeypatch):
    docs = sample_docs(1022)
    first, extra, late = docs[:1000], docs[1000:1020], docs[1020]
    corpus = write_jsonl(tmp_path / "raw" / "items.jsonl", first)
    home = tmp_path / "home"
    layout = Layout.at(home)
    code, s1 = run_pipeline(_settings(home, corpus))
    assert code == 0 and s1["n_encoded"] == 1000 and s1["n_reused"] == 0
    v1 = _vectors(home)
    keys = [p["partition"] for p in load_partitions(layout)]
    assert len(keys) == 4  # 1,000 items at a target of 300: the 2-bit hash prefixes

    # Watch the catalog's text-hash lookup (the re-use path for the same text in another partition).
    lookups = []
    real_lookup = catalog.partitions_holding

    def watched_lookup(layout_, hashes, *a, **k):
        hashes = set(hashes)
        found = real_lookup(layout_, hashes, *a, **k)
        lookups.append((hashes, found))
        return found

    monkeypatch.setattr(catalog, "partitions_holding", watched_lookup)

    # 10 titles rewritten, one every 100 items, from an offset that puts them in every partition
    offset = next(o for o in range(10, 100) if {_partition_of(keys, first[i]["_id"])
                                                 for i in range(o, 1000, 100)} == set(keys))
    changed = [dict(d) for d in first]
    edited = [changed[i]["_id"] for i in range(offset, 1000, 100)]
    for i in range(offset, 1000, 100):
        changed[i]["title"] = changed[i]["title"] + " (revised edition)"
    # An unchanged item's text arrives again under a new id that lands in another partition: re-used through the
    # catalog, not encoded.
    src = changed[5]
    src_key = _partition_of(keys, src["_id"])
    assert sum(d["title"] == src["title"] for d in first) == 1
    copy_id = next(f"copy-{n}" for n in range(100) if _partition_of(keys, f"copy-{n}") != src_key)
    copy_key = _partition_of(keys, copy_id)
    copy = {**src, "_id": copy_id}
    write_jsonl(corpus, changed + extra + [copy])  # and 20 new items
    code, s2 = run_pipeline(_settings(home, corpus))
    assert code == 0
    assert s2["n_encoded"] == 30  # 10 edited + 20 new; the copy is not among them
    assert s2["n_reused"] == 1021 - 30 and s2["n_partitions_written"] == 4
    totals = json.loads((home / "reports" / "run_summary.json").read_text())
    assert totals["n_encoded"] == 30 and totals["n_reused"] == s2["n_reused"]
    new_or_edited = set(edited) | {d["_id"] for d in extra}
    for k, m in _manifests(layout).items():
        ids = read_partition(layout, k, ("item_id",)).column("item_id").to_pylist()
        assert m.n_encoded == len(new_or_edited & set(ids)), k
        assert m.n_reused == m.n_rows - m.n_encoded == len(ids) - m.n_encoded, k
    # The copy's partition found its text only through the catalog, in the source's partition ...
    table = read_partition(layout, copy_key, ("item_id", "text_hash")).to_pylist()
    copy_hash = next(r["text_hash"] for r in table if r["item_id"] == copy_id)
    assert sum(r["text_hash"] == copy_hash for r in table) == 1
    assert [found for hashes, found in lookups if copy_hash in hashes] == [[src_key]]
    # ... and holds the very bytes of the source's vector.
    v2 = _vectors(home)
    assert np.array_equal(v2[copy_id], v2[src["_id"]])

    # A delete, an insert and an edit each rewrite exactly the one partition that holds the item.
    rows = changed + extra + [copy]
    for what, item, n_encoded in (("delete", rows[7]["_id"], 0), ("insert", late["_id"], 1),
                                  ("edit", rows[9]["_id"], 1)):
        if what == "delete":
            rows = [d for d in rows if d["_id"] != item]
        elif what == "insert":
            rows = rows + [late]
        else:
            rows = [{**d, "title": d["title"] + " (second printing)"} if d["_id"] == item else d for d in rows]
        write_jsonl(corpus, rows)
        before = _manifests(layout)
        code, s = run_pipeline(_settings(home, corpus))
        assert code == 0, (what, s)
        after = _manifests(layout)
        assert after.keys() == before.keys() == set(keys), what
        assert _rewritten(before, after) == {_partition_of(keys, item)}, what
        assert s["n_partitions_written"] == 1 and s["steps"]["processed_items"]["n_partitions_written"] == 1, what
        assert s["n_encoded"] == n_encoded, what
    assert len(rows) == 1021

    # A split: the target shrinks so that exactly the largest partition outgrows it; its two children re-use every
    # vector from it (their parent's shard, kept in previous/), the other partitions are left as they are.
    sizes = sorted(((p["n_rows"], p["partition"]) for p in load_partitions(layout)), reverse=True)
    (big_n, parent), (second_n, _) = sizes[0], sizes[1]
    target = math.ceil(second_n / SPLIT_FACTOR)
    assert second_n <= SPLIT_FACTOR * target < big_n, sizes  # the data makes exactly one partition split
    children = [c.key for c in leaf_of_key(parent).children()]
    before = _manifests(layout)
    code, s6 = run_pipeline(_settings(home, corpus, target))
    assert code == 0
    after = _manifests(layout)
    assert set(after) == set(keys) - {parent} | set(children)
    assert _rewritten(before, after) == set(children)
    for c in children:
        assert after[c].n_encoded == 0 and after[c].n_reused == after[c].n_rows > 0, c
    assert sum(after[c].n_rows for c in children) == big_n
    assert s6["n_encoded"] == 0 and s6["n_partitions_written"] == 2
    assert not layout.previous_dir.exists() or not any(layout.previous_dir.iterdir())
    assert sorted(i for (i,) in catalog.query(layout, "SELECT partition FROM shards")) == sorted(after)

    # Re-use copies bytes: every item whose text did not change since a run still has that run's very vector,
    # whichever way it came (its own shard, the previous generation, the split's parent, the catalog).
    inc = _vectors(home)
    now = {d["_id"]: d["title"] for d in rows}
    for snapshot, texts, n_same in ((v1, {d["_id"]: d["title"] for d in first}, 1000 - 10 - 2),
                                    (v2, {d["_id"]: d["title"] for d in changed + extra + [copy]}, 1021 - 2)):
        same = [i for i, t in now.items() if texts.get(i) == t]
        assert len(same) == n_same
        assert [i for i in same if not np.array_equal(inc[i], snapshot[i])] == []

    # A full rebuild of the final data in a fresh HOME (its own partition tree): the same ids and vectors.
    rebuild = tmp_path / "rebuild"
    code, s7 = run_pipeline(_settings(rebuild, corpus, target))
    # (the copy shares its source's text: one of the two is re-used through the catalog in a fresh build too)
    assert code == 0 and s7["n_encoded"] == 1020 and s7["n_reused"] == 1
    full = _vectors(rebuild)
    assert sorted(inc) == sorted(full) == sorted(now)
    # Not bit for bit: a text's fp32 vector depends on the padded width of the batch it was encoded in (~1e-7, the
    # encoder pads each batch to its longest text), and that moves some fp16 roundings by one step. Every component
    # must be within one fp16 rounding step (plus that fp32 noise) of the rebuild's.
    far = [i for i in full if not _one_rounding_apart(inc[i], full[i])]
    assert not far, f"{len(far)} items' vectors differ from a rebuild by more than fp16 rounding, e.g. {far[:5]}"


def test_deleted_items_and_vanished_partitions_disappear_everywhere(tmp_path, dagster_home):
    import dagster as dg

    from embed_assets.core.index import load_index

    docs = sample_docs(90)
    corpus = write_jsonl(tmp_path / "raw" / "items.jsonl", docs)
    s = Settings(home=str(tmp_path / "home"), items=[str(corpus)], text_fields=["title"], partition_size=30)
    code, _ = run_pipeline(s)
    assert code == 0
    layout = Layout.at(s.home)
    keys = [p["partition"] for p in load_partitions(layout)]
    assert len(keys) == 4
    # Every item of two partitions is deleted (they vanish), and 5 more scattered over the other two.
    vanish, stay = keys[2:], keys[:2]
    survivors = [d for d in docs if _partition_of(keys, d["_id"]) in stay]
    dropped = {survivors[i]["_id"] for i in (3, 11, 17, 29, 41)}
    assert {_partition_of(keys, i) for i in dropped} == set(stay)
    keep = [d for d in survivors if d["_id"] not in dropped]
    write_jsonl(corpus, keep)
    code, summary = run_pipeline(s)
    assert code == 0 and summary["n_encoded"] == 0  # nothing new: every vector re-used

    assert [p["partition"] for p in load_partitions(layout)] == stay
    with dg.DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions("item_partitions")) == stay
    assert sorted(p.name for p in layout.embeddings_dir.glob("shard_*.pt")) == [f"shard_{k}.pt" for k in stay]
    assert not [p for k in vanish for p in layout.embeddings_dir.glob(f"shard_{k}.*")]
    assert not [p for k in vanish if layout.partition_file(k).exists()]
    assert catalog.query(layout, "SELECT partition FROM shards ORDER BY 1") == [(k,) for k in stay]
    want = sorted(d["_id"] for d in keep)
    assert sorted(i for (i,) in catalog.query(layout, "SELECT item_id FROM items")) == want
    _, ids, _ = load_index(layout)
    assert sorted(ids) == want
    assert not layout.previous_dir.exists() or not any(layout.previous_dir.iterdir())

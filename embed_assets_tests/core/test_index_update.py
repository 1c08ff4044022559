"""When few partitions changed, the index is updated in place (rows of changed partitions removed, new rows added),
and the result equals a rebuild: same ids, same vectors, same search results."""

import numpy as np

from embed_assets.core.embed import embed_partition
from embed_assets.core.index import build_from_shards, load_index
from embed_assets.core.items import load_partitions, process_items
from embed_assets.core.layout import Layout
from embed_assets_tests.conftest import sample_docs, write_jsonl


def _materialize(layout, corpus, encoder):
    process_items(layout, [corpus], "_id", ["title"], 40)
    for p in load_partitions(layout):
        embed_partition(layout, p["partition"], encoder)
    return build_from_shards(layout, load_partitions(layout))


def test_in_place_update_equals_a_rebuild(tmp_path, encoder):
    docs = sample_docs(200)
    corpus = write_jsonl(tmp_path / "raw" / "corpus.jsonl", docs)
    layout = Layout.at(tmp_path / "home")
    first = _materialize(layout, corpus, encoder)
    assert first["update"]["mode"] == "rebuild"

    docs[10] = {**docs[10], "title": "An edited title about protein folding"}  # edit
    deleted = docs.pop(20)["_id"]  # delete
    docs.append({"_id": "new-item", "title": "A new item about gene expression", "text": ""})  # insert
    write_jsonl(corpus, docs)
    second = _materialize(layout, corpus, encoder)
    how = second["update"]
    assert how["mode"] == "in_place"
    assert 1 <= how["n_partitions_added"] <= 3 and how["n_partitions_removed"] == how["n_partitions_added"]
    assert how["n_vectors_added"] < 200 / 2  # only the changed partitions' rows went in again

    index, ids, manifest = load_index(layout)
    layout.index_manifest.unlink()  # the same shards, indexed from scratch
    assert build_from_shards(layout, load_partitions(layout))["update"]["mode"] == "rebuild"
    index2, ids2, _ = load_index(layout)
    assert sorted(ids) == sorted(ids2) and deleted not in ids and "new-item" in ids
    mine = {i: index.reconstruct(r) for r, i in enumerate(ids)}
    theirs = {i: index2.reconstruct(r) for r, i in enumerate(ids2)}
    assert all(np.array_equal(mine[i], theirs[i]) for i in ids)
    rng = np.random.default_rng(0)
    queries = np.stack([mine[i] for i in rng.choice(ids, 30, replace=False)])
    s1, r1 = index.search(queries, 10)
    s2, r2 = index2.search(queries, 10)
    assert np.allclose(s1, s2)
    assert [[ids[j] for j in row] for row in r1] == [[ids2[j] for j in row] for row in r2]
    ranges = manifest["partition_ranges"]
    assert sum(c for _, c in ranges.values()) == len(ids) == manifest["n_items"]

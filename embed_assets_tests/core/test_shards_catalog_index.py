"""Shard I/O, the DuckDB catalog and the FAISS index on real vectors."""

import json

import numpy as np
import pytest
import torch

from embed_assets.core import catalog
from embed_assets.core.embed import embed_partition
from embed_assets.core.index import IndexBuildError, build_from_shards, load_index
from embed_assets.core.items import load_partitions, process_items
from embed_assets.core.layout import Layout
from embed_assets.core.partitioning import id_hash, leaf_of_key
from embed_assets.core.shards import ShardError, load_verified, read_manifest, shard_key_of, validate_shard
from embed_assets_tests.conftest import sample_docs
from embed_assets.core.verify import verify


@pytest.fixture
def built(tmp_path, small_corpus, encoder):
    layout = Layout.at(tmp_path / "home")
    res = process_items(layout, [small_corpus], "_id", ["title", "text"], partition_size=40)
    groups = load_partitions(layout)
    assert groups == res.partitions
    outcomes = [embed_partition(layout, g["partition"], encoder) for g in groups]
    return layout, groups, outcomes


def test_shard_is_the_seed_format_and_passes_validation(built):
    layout, groups, outcomes = built
    # 120 items at a target of 40: the 2-bit hash prefixes, none over 1.25 x 40 (so no split)
    assert [g["partition"] for g in groups] == ["p00", "p01", "p10", "p11"]
    assert sum(g["n_rows"] for g in groups) == 120
    assert [o.n_encoded for o in outcomes] == [g["n_rows"] for g in groups]
    ids = [d["_id"] for d in sample_docs(120)]
    for g in groups:
        key, n = g["partition"], g["n_rows"]
        data = torch.load(layout.embeddings_dir / f"shard_{key}.pt", weights_only=True)  # the seed's loader
        assert set(data) == {"item_id", "embeddings"}
        assert isinstance(data["item_id"], list) and isinstance(data["item_id"][0], str)
        # exactly the items whose id-hash falls in the partition, sorted by id
        assert data["item_id"] == sorted(i for i in ids if leaf_of_key(key).holds(id_hash(i)))
        assert data["embeddings"].dtype == torch.float16 and tuple(data["embeddings"].shape) == (n, 384)
        problems, stats = validate_shard(data["item_id"], data["embeddings"].numpy(), n, 384)
        assert problems == [] and abs(stats["mean"] - 1) < 1e-3


def test_validate_shard_catches_each_problem():
    emb = np.ones((3, 384), dtype=np.float16) / np.sqrt(384)
    emb[1] *= 2
    emb[2, 0] = np.nan
    problems, _ = validate_shard(["a", "a", "b"], emb, 4, 384)
    text = " | ".join(problems)
    for needle in ("3 rows, expected 4", "NaN or inf", "1 duplicated item ids", "outside 1 ±"):
        assert needle in text


def test_catalog_tracks_every_shard_and_item(built):
    layout, groups, _ = built
    rows = catalog.query(layout, "SELECT partition, rows, dim, dtype, model_id FROM shards ORDER BY partition")
    assert rows == [(g["partition"], g["n_rows"], 384, "float16", "sentence-transformers/all-MiniLM-L6-v2")
                    for g in groups]
    assert catalog.query(layout, "SELECT partition, hash_depth FROM shards ORDER BY partition") == [
        (g["partition"], len(g["partition"]) - 1) for g in groups]
    assert catalog.query(layout, "SELECT count(*), count(DISTINCT item_id) FROM items") == [(120, 120)]
    assert catalog.sync(layout)["added"] == []  # already in sync


def test_rerun_changes_nothing(built, encoder):
    layout, groups, _ = built
    files = lambda: {p: p.stat().st_mtime_ns for p in layout.embeddings_dir.rglob("*") if p.is_file()}  # noqa
    before = files()
    out = embed_partition(layout, groups[1]["partition"], encoder)
    assert out.skipped and out.n_encoded == 0
    assert files() == before


def test_corrupt_shard_is_detected_not_used_and_rebuilt(built, encoder):
    layout, groups, _ = built
    key = groups[2]["partition"]
    pt = layout.shard_pt(key)
    good = read_manifest(layout, key)
    raw = bytearray(pt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    pt.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="checksum mismatch"):
        load_verified(layout, good)
    with pytest.raises(IndexBuildError, match=f"{key}: shard files do not match"):
        build_from_shards(layout, groups)
    assert catalog.query(layout, "SELECT count(*) FROM shards WHERE partition = ?", [key]) == [(0,)]
    out = embed_partition(layout, key, encoder)
    assert not out.skipped and out.n_reused == 0  # its own corrupt vectors are never re-used
    manifest = build_from_shards(layout, groups)
    assert manifest["n_items"] == 120


def test_index_is_exact_and_saved_with_its_ids(built):
    layout, groups, _ = built
    build_from_shards(layout, groups)
    index, ids, manifest = load_index(layout)
    assert index.ntotal == 120 and len(ids) == 120 == len(set(ids))
    key = groups[0]["partition"]
    _, emb = load_verified(layout, read_manifest(layout, key))
    _, top = index.search(emb[:3].astype(np.float32), 1)
    assert [ids[i] for i in top[:, 0]] == torch.load(layout.shard_pt(key), weights_only=True)["item_id"][:3]
    assert manifest["faiss_type"] == "IndexFlatIP"
    layout.index_ids.write_bytes(layout.index_ids.read_bytes() + b"x")
    with pytest.raises(Exception, match="does not match"):
        load_index(layout)


def test_index_refuses_stale_shards_and_mixed_versions(built, tmp_path):
    layout, groups, _ = built
    stale = [dict(g) for g in groups]
    stale[0]["fingerprint"] = "different"
    with pytest.raises(IndexBuildError, match=f"{groups[0]['partition']}: shard is stale"):
        build_from_shards(layout, stale)
    mpath = layout.shard_manifest(groups[1]["partition"])
    m = json.loads(mpath.read_text())
    m["model_revision"] = "other"
    mpath.write_text(json.dumps(m))
    with pytest.raises(IndexBuildError, match="2 embedding versions would mix"):
        build_from_shards(layout, groups)


def test_sync_hashes_nothing_under_the_catalog_lock_and_unchanged_shards_only_once(built, monkeypatch):
    """The catalog is held for comparing and writing only: every checksum is verified before the connection is
    opened, and a shard whose file did not change is not hashed again by the next sync."""
    import hashlib
    import os
    import time
    from contextlib import contextmanager

    layout, groups, _ = built
    # The catalog lacks a partition whose shard is on disk (as after a deferred ingest): the shard goes away, a sync
    # drops it, it comes back.
    key = groups[1]["partition"]
    away = layout.home / "away"
    away.mkdir()
    for p in layout.embeddings_dir.glob(f"shard_{key}.*"):
        p.rename(away / p.name)
    assert len(list(away.iterdir())) == 3
    assert catalog.sync(layout)["removed"] == [key]
    for p in away.iterdir():
        p.rename(layout.embeddings_dir / p.name)
    aged = time.time() - 60  # files written in the last 2 s are always re-hashed (mtime granularity)
    for p in layout.embeddings_dir.glob("shard_*"):
        os.utime(p, (aged, aged))

    held, hashes = [False], []
    real_connect, real_sha256 = catalog.connect, hashlib.sha256

    @contextmanager
    def watched_connect(*a, **k):
        with real_connect(*a, **k) as con:
            held[0] = True
            try:
                yield con
            finally:
                held[0] = False

    def watched_sha256(*a, **k):
        hashes.append(held[0])
        return real_sha256(*a, **k)

    monkeypatch.setattr(catalog, "connect", watched_connect)
    monkeypatch.setattr(hashlib, "sha256", watched_sha256)
    assert catalog.sync(layout)["added"] == [key]
    assert hashes and not any(hashes), f"{sum(hashes)} of {len(hashes)} hashes taken while holding the catalog"
    assert catalog.query(layout, "SELECT count(*) FROM items") == [(120,)]
    hashes.clear()
    assert catalog.sync(layout) == {"added": [], "refreshed": [], "removed": [], "untrusted": [], "moved": []}
    assert hashes == []  # nothing changed on disk: nothing hashed at all


def test_readers_copy_lists_exactly_the_catalog(built):
    import duckdb

    layout, groups, _ = built
    key, n = groups[2]["partition"], groups[2]["n_rows"]
    with duckdb.connect(str(catalog.reader_db(layout)), read_only=True) as con:
        shards = con.execute("SELECT partition, sha256, rows FROM shards ORDER BY partition").fetchall()
        items = con.execute("SELECT item_id, partition, \"row\", text_hash FROM items ORDER BY item_id").fetchall()
    assert shards == catalog.query(layout, "SELECT partition, sha256, rows FROM shards ORDER BY partition")
    assert items == catalog.query(layout, "SELECT item_id, partition, \"row\", text_hash FROM items ORDER BY item_id")
    assert len(items) == 120
    # A crash between publishing and COMMIT leaves the shards copy ahead of the catalog: the items of that partition
    # are hidden (the two copies disagree), never shown wrong, and the next sync republishes from the catalog.
    export = layout.home / "catalog" / "shards.parquet"
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT * REPLACE (CASE WHEN partition = '{key}' THEN 'ahead' ELSE sha256 END "
                    f"AS sha256) FROM read_parquet('{export}')) TO '{export}.new' (FORMAT parquet)")
    export.with_name(export.name + ".new").replace(export)
    with duckdb.connect(str(catalog.reader_db(layout)), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM items WHERE partition = ?", [key]).fetchone() == (0,)
    assert not verify(layout)["ok"]  # verify notices the copy differs
    assert catalog.sync(layout)["added"] == []  # the catalog itself is right; only the copy is republished
    with duckdb.connect(str(catalog.reader_db(layout)), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM items WHERE partition = ?", [key]).fetchone() == (n,)
    assert verify(layout)["ok"]


def test_clear_previous_spares_live_writers_and_the_indexed_generation(built):
    from embed_assets.core.atomic import atomic_write_json
    from embed_assets.core.shards import clear_previous, keep_previous, partition_lock

    layout, groups, _ = built
    keys = [g["partition"] for g in groups]
    for k in keys:
        keep_previous(layout, k)
    previous = lambda: sorted(p.name for p in layout.previous_dir.iterdir())  # noqa: E731
    assert len(keys) >= 3 and len(previous()) == 3 * len(keys)
    fingerprints = {k: read_manifest(layout, k).fingerprint for k in keys}
    # keys[1]'s indexed generation was replaced after the index read it: a running writer may re-use it
    replaced = json.loads(layout.shard_manifest(keys[1]).read_text())  # replaced by rename, as writers do
    atomic_write_json(layout.shard_manifest(keys[1]), {**replaced, "fingerprint": "a newer generation"})
    with partition_lock(layout, keys[0]):  # a writer of keys[0] is at work (and may be filling previous/)
        clear_previous(layout, fingerprints)  # keys[2:]: the indexed generation is still current, nothing to keep
    assert [shard_key_of(n) for n in previous()] == [keys[0]] * 3 + [keys[1]] * 3
    clear_previous(layout, {})
    assert previous() == []


def _count_sha256(monkeypatch) -> list:
    import hashlib

    calls, real = [], hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _edit_in_place_keeping_mtime(path):
    import os

    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))  # same inode, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be


def test_a_shard_loaded_again_is_not_hashed_again_but_an_edit_in_place_is_caught(built, monkeypatch):
    """A pipeline run loads each shard several times (norm check, re-use, index, semantic IDs): the bytes are hashed
    the first time, and later loads of the very same file (size, mtime, ctime, inode) trust that digest; a shard still
    parsed in memory is then not even read. An edit in place moves ctime even when mtime is put back, so it is read,
    hashed again and refused."""
    import os
    import time

    layout, groups, _ = built
    key = groups[0]["partition"]
    m, pt = read_manifest(layout, key), layout.shard_pt(key)
    aged = time.time() - 60  # files written in the last 2 s are always re-hashed (mtime granularity)
    os.utime(pt, (aged, aged))
    from embed_assets.core import shards

    calls = _count_sha256(monkeypatch)
    ids1, emb1 = load_verified(layout, m)
    assert len(calls) == 1
    reads, real_read = [], shards.read_verified_bytes
    monkeypatch.setattr(shards, "read_verified_bytes", lambda *a: reads.append(a) or real_read(*a))
    ids2, emb2 = load_verified(layout, m)
    assert len(calls) == 1 and ids2 == ids1 and np.array_equal(emb1, emb2)
    assert reads == []  # parsed already and its stat unchanged: not even read
    _edit_in_place_keeping_mtime(pt)
    with pytest.raises(ShardError, match="checksum mismatch"):
        load_verified(layout, m)
    assert len(calls) == 2 and len(reads) == 1


def test_the_live_index_loaded_again_is_not_hashed_again_but_an_edit_in_place_is_caught(built, monkeypatch):
    import os
    import time

    layout, groups, _ = built
    build_from_shards(layout, groups)
    f = layout.index_dir / layout.index_file.name
    aged = time.time() - 60
    for p in (f, layout.index_dir / layout.index_ids.name):
        os.utime(p, (aged, aged))
    calls = _count_sha256(monkeypatch)
    a, _, _ = load_index(layout)
    assert len(calls) == 2  # the index file and the ids file
    b, _, _ = load_index(layout)
    assert len(calls) == 2 and a.ntotal == b.ntotal == 120
    _edit_in_place_keeping_mtime(f)
    with pytest.raises(IndexBuildError, match="does not match"):
        load_index(layout)
    assert len(calls) == 3


def test_files_this_process_writes_are_not_hashed_again_yet_an_edit_in_place_is_caught(built, monkeypatch):
    """A shard and an index version are hashed as they are written, and their mtime is set back past the racy window,
    so the readers right after the writer (the catalog record, the norm check, the shadow comparison, the report)
    trust the remembered digest without hashing: 0 hashes, with no waiting. An edit in place a moment later, mtime
    put back, moves ctime: hashed again and refused."""
    layout, groups, _ = built
    key = groups[0]["partition"]
    m, pt = read_manifest(layout, key), layout.shard_pt(key)
    build_from_shards(layout, groups)
    calls = _count_sha256(monkeypatch)
    ids, emb = load_verified(layout, m)
    assert catalog.ingest_manifest(layout, m)
    a, _, _ = load_index(layout)
    assert calls == [] and len(ids) == len(emb) and a.ntotal == 120
    _edit_in_place_keeping_mtime(pt)
    with pytest.raises(ShardError, match="checksum mismatch"):
        load_verified(layout, m)
    f = layout.index_dir / layout.index_file.name
    _edit_in_place_keeping_mtime(f)
    with pytest.raises(IndexBuildError, match="does not match"):
        load_index(layout)
    assert len(calls) == 2


def test_the_repair_a_run_starts_with_hashes_only_what_changed_and_verify_hashes_everything(built, monkeypatch):
    """`embed-assets run` repairs leftovers first (`verify(full=False)`): an unchanged shard is not hashed again, so
    the run's start costs O(change), not O(catalog bytes). A shard edited in place is still found and removed.
    `embed-assets verify` (full) hashes every shard file whatever is remembered."""
    import os
    import time

    from embed_assets.core import shards

    layout, groups, _ = built
    aged = time.time() - 60
    files = sorted(layout.embeddings_dir.glob("shard_*.pt")) + sorted(layout.embeddings_dir.glob("shard_*.parquet"))
    assert len(files) == 2 * len(groups)
    for f in files:
        os.utime(f, (aged, aged))
        shards.cached_sha256(f)  # remembered, as a run's loads leave them
    hashed: list[str] = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file",
                        lambda p, *a, **k: hashed.append(os.path.basename(p)) or real(p, *a, **k))
    r = verify(layout, repair=True, check_index=False, full=False)
    assert not r["problems"] and not r["fixed"] and hashed == []
    r = verify(layout, repair=False, check_index=False)
    assert not r["problems"] and sorted(hashed) == sorted(f.name for f in files)
    # an edit in place (mtime put back) is a changed stat: the quick repair hashes it, finds it and removes it
    hashed.clear()
    _edit_in_place_keeping_mtime(layout.shard_pt(groups[1]["partition"]))
    r = verify(layout, repair=True, check_index=False, full=False)
    assert hashed == [layout.shard_pt(groups[1]["partition"]).name]
    assert any(groups[1]["partition"] in line and "removed" in line for line in r["fixed"]), r["fixed"]

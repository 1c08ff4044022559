"""The sensor's decision without Dagster: the recorded source fingerprint, the plan over HOME and the attempt policy."""

import csv
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embed_assets.core.atomic import atomic_write_json, sha256_file
from embed_assets.core.changes import (MAX_ATTEMPTS, MAX_REDO, REDO_WINDOW_S, PastRun, fingerprint_files, next_attempt,
                                       plan)
from embed_assets.core.items import Limits, items_config, load_partitions, load_processed, process_items
from embed_assets.core.layout import Layout
from embed_assets.core.shards import ShardManifest, embedding_fingerprint, norm_stats, write_shard

VERSION = {"model_id": "test/model", "model_revision": "r1", "max_seq_length": 256, "dim": 4, "chunking": False}


def _rows(n, start=0, title="item"):
    return [{"_id": str(i), "title": f"{title} {i}"} for i in range(start, start + n)]


def _jsonl(path, rows, trailer=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + trailer)
    return path


def _config(partition_size=10):
    return items_config("_id", ["title"], None, partition_size, Limits())


def test_processed_items_records_the_checksum_of_the_very_bytes_it_parsed(tmp_path):
    raw = tmp_path / "raw"
    files = [_jsonl(raw / "a.jsonl", _rows(5), trailer=b"\n\n  \n")]
    with gzip.open(raw / "b.jsonl.gz", "wb") as fh:
        fh.write(b"".join(json.dumps(r).encode() + b"\n" for r in _rows(3, 5)))
    files.append(raw / "b.jsonl.gz")
    with open(raw / "c.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["_id", "title"])
        w.writerows([[r["_id"], r["title"]] for r in _rows(4, 8)])
    files.append(raw / "c.csv")
    pq.write_table(pa.table({"_id": ["p1", "p2"], "title": ["x", "y"]}), raw / "d.parquet")
    files.append(raw / "d.parquet")
    layout = Layout.at(tmp_path / "home")
    res = process_items(layout, [raw], "_id", ["title"])
    assert res.file_sha256 == {str(f): sha256_file(f) for f in files}
    assert load_processed(layout)["source"]["files"] == res.file_sha256


def test_processed_items_is_current_exactly_when_the_raw_files_are_what_it_read(tmp_path):
    raw, layout = tmp_path / "raw", Layout.at(tmp_path / "home")
    a = _jsonl(raw / "a.jsonl", _rows(25))
    state_a = a.read_bytes()
    assert plan(layout, fingerprint_files([str(raw)], _config())[1], VERSION).items.reason.startswith("no usable")

    process_items(layout, [str(raw)], "_id", ["title"], 10)
    files, fp = fingerprint_files([str(raw)], _config())
    assert load_processed(layout)["source"]["fingerprint"] == fp
    keys = [p["partition"] for p in load_partitions(layout)]
    assert len(keys) >= 3
    p = plan(layout, fp, VERSION, registered=set(keys))
    assert p.items is None and p.partitions == keys
    assert [w.reason for w in p.shards] == ["no shard yet"] * len(keys)
    assert [w.partition for w in p.shards] == keys

    # Touched, not changed: same fingerprint, and the stat cache hashes it again only because its stat moved.
    a.touch()
    assert fingerprint_files([str(raw)], _config(), files)[1] == fp
    # A -> B: processed items are not current; B -> A: they are again (whatever happened in between).
    _jsonl(a, _rows(25, title="changed"))
    fp_b = fingerprint_files([str(raw)], _config(), files)[1]
    assert fp_b != fp and plan(layout, fp_b, VERSION).items.key == f"items-{fp_b}"
    a.write_bytes(state_a)
    assert fingerprint_files([str(raw)], _config(), files)[1] == fp
    assert plan(layout, fp, VERSION).items is None
    # Other settings (partitions of 5) are another wanted state; so are unregistered partitions.
    assert plan(layout, fingerprint_files([str(raw)], _config(5))[1], VERSION).items is not None
    assert f"unregistered: [{keys[-1]!r}]" in plan(layout, fp, VERSION, registered=set(keys[:-1])).items.reason


def _fake_shards(layout):
    for part in load_processed(layout)["partitions"]:
        emb = np.tile(np.array([1, 0, 0, 0], np.float16), (part["n_rows"], 1))
        ids = [str(i) for i in range(part["n_rows"])]
        m = ShardManifest(partition=part["partition"],
                          fingerprint=embedding_fingerprint(part["fingerprint"], VERSION),
                          rows_fingerprint=part["fingerprint"], n_rows=part["n_rows"], dim=4, dtype="float16",
                          model_id="test/model", model_revision="r1", max_seq_length=256, chunking=False,
                          shard_file="", shard_sha256="", shard_bytes=0, items_file="", items_sha256="",
                          norms=norm_stats(emb))
        write_shard(layout, m, ids, ["h"] * len(ids), emb)


def _fake_index(layout, fingerprints, sids=True):
    """An index (and, with `sids`, live semantic IDs) vouching for these shards: only the manifests plan() reads."""
    if sids:
        version = layout.home / "semantic_ids" / "v00001"
        version.mkdir(parents=True, exist_ok=True)
        atomic_write_json(version / "manifest.json", {"input_shards": fingerprints})
        if not (layout.home / "semantic_ids" / "current").is_symlink():
            (layout.home / "semantic_ids" / "current").symlink_to("v00001")
    (layout.index_root / "v00001").mkdir(parents=True, exist_ok=True)
    if not layout.index_dir.is_symlink():
        layout.index_dir.symlink_to("v00001")
    layout.index_file.write_bytes(b"index")
    layout.index_ids.write_bytes(b"ids")
    atomic_write_json(layout.index_manifest, {"shard_fingerprints": fingerprints,
                                              "index_sha256": sha256_file(layout.index_file),
                                              "ids_sha256": sha256_file(layout.index_ids)})


def test_missing_or_corrupt_shards_and_a_damaged_index_are_work_again(tmp_path):
    raw, layout = tmp_path / "raw", Layout.at(tmp_path / "home")
    _jsonl(raw / "a.jsonl", _rows(30))
    process_items(layout, [str(raw)], "_id", ["title"], 10)
    fp = fingerprint_files([str(raw)], _config())[1]
    _fake_shards(layout)
    p = plan(layout, fp, VERSION)
    assert p.shards == [] and p.index.reason.startswith("no index yet")
    index_key = p.index.key
    fps = {m: json.loads(layout.shard_manifest(m).read_text())["fingerprint"] for m in p.partitions}
    _fake_index(layout, fps, sids=False)
    # the index job also refreshes the semantic IDs: without a live version built over these shards, it is work
    assert plan(layout, fp, VERSION).index.reason == "no semantic IDs yet"
    assert plan(layout, fp, VERSION, semantic_ids=False).current  # switched off: the index alone is what counts
    _fake_index(layout, {**fps, p.partitions[0]: "other"})
    assert plan(layout, fp, VERSION).index.reason == "the index is built over other shards"
    _fake_index(layout, fps)
    assert plan(layout, fp, VERSION).current

    keys = p.partitions
    assert keys == [part["partition"] for part in load_partitions(layout)] and len(keys) >= 3
    layout.shard_pt(keys[0]).unlink()
    data = bytearray(layout.shard_pt(keys[1]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    layout.shard_pt(keys[1]).write_bytes(bytes(data))
    p = plan(layout, fp, VERSION)
    assert [(w.partition, w.reason) for w in p.shards] == [
        (keys[0], f"shard_{keys[0]}.pt is missing"),
        (keys[1], f"shard_{keys[1]}.pt checksum mismatch (file changed or corrupt)")]
    # The wanted state is the same as before the damage: the same key (the attempt count makes the run key new).
    assert p.shards[0].key == f"{keys[0]}-{fps[keys[0]]}" and p.index is None
    # Another embedding version: every shard is out of date.
    assert {w.reason for w in plan(layout, fp, {**VERSION, "model_revision": "r2"}).shards} == {
        "out of date (other rows or another embedding version)"}

    _fake_shards(layout)
    assert plan(layout, fp, VERSION).current
    layout.index_file.unlink()
    p = plan(layout, fp, VERSION)
    assert p.index.key == index_key and "items.faiss is missing" in p.index.reason


def test_attempt_policy():
    now = 10_000.0
    ok = lambda i, t=now - 60: PastRun(f"s{i}", "SUCCESS", t - 5, t)  # noqa: E731
    fail = lambda i, t=now - 30: PastRun(f"f{i}", "FAILURE", t - 5, t)  # noqa: E731
    cancel = PastRun("c0", "CANCELED", now - 25, now - 20)

    assert next_attempt([], now).number == 0
    # Needed again after a success (a shard deleted, A -> B -> A): the next attempt number, so a new run key.
    assert next_attempt([ok(1)], now).number == 1
    assert next_attempt([PastRun("r", "STARTED", now), ok(1)], now).number is None
    # A cancel is respected, also after earlier successes...
    a = next_attempt([cancel, ok(1)], now)
    assert a.number is None and "cancelled by a user" in a.reason
    # ... until the target ran for another state or was materialized by hand after it (asked only then).
    asked = []
    assert next_attempt([cancel, ok(1)], now, lambda: asked.append(1) or now - 10).number == 2
    assert next_attempt([cancel, ok(1)], now, lambda: now - 40).number is None
    assert next_attempt([ok(1)], now, lambda: asked.append(2)).number == 1 and asked == [1]
    # Failures: retried up to MAX_ATTEMPTS in a row.
    assert next_attempt([fail(i) for i in range(MAX_ATTEMPTS - 1)], now).number == MAX_ATTEMPTS - 1
    a = next_attempt([fail(i) for i in range(MAX_ATTEMPTS)] + [ok(1)], now)
    assert a.number is None and f"failed {MAX_ATTEMPTS} times" in a.reason
    assert next_attempt([fail(i) for i in range(MAX_ATTEMPTS)], now, lambda: now - 10).number == MAX_ATTEMPTS
    assert next_attempt([fail(0), ok(1), fail(2), fail(3)], now).number == 4
    # Successes that keep not sticking: stop within the window, go on after it or once superseded.
    assert next_attempt([ok(i) for i in range(MAX_REDO)], now).number is None
    assert next_attempt([ok(i) for i in range(MAX_REDO)], now, lambda: now - 10).number == MAX_REDO
    assert next_attempt([ok(i, now - REDO_WINDOW_S - 1) for i in range(MAX_REDO)], now).number == MAX_REDO


def test_source_fingerprint_covers_paths_and_settings(tmp_path):
    raw = tmp_path / "raw"
    _jsonl(raw / "a.jsonl", _rows(3))
    fp = fingerprint_files([str(raw)], _config())[1]
    (raw / "a.jsonl").rename(raw / "b.jsonl")
    assert fingerprint_files([str(raw)], _config())[1] != fp
    assert fingerprint_files([str(raw)], items_config("_id", ["title", "text"], None, 10))[1] != \
        fingerprint_files([str(raw)], _config())[1]


def test_a_restarted_sensor_plans_without_hashing_unchanged_shards(tmp_path, monkeypatch):
    """The first tick after a daemon restart costs a stat per file, not a hash of every byte on disk; a file changed
    while nobody watched (same size, mtime put back) is still hashed and caught."""
    import os
    import time

    from embed_assets.core import shards

    raw, layout = tmp_path / "raw", Layout.at(tmp_path / "home")
    _jsonl(raw / "a.jsonl", _rows(30))
    process_items(layout, [str(raw)], "_id", ["title"], 10)
    fp = fingerprint_files([str(raw)], _config())[1]
    _fake_shards(layout)
    past = time.time() - 60  # older than the racy window: the hashes may be remembered
    for f in list(layout.embeddings_dir.glob("shard_*")):
        os.utime(f, (past, past))
    p = plan(layout, fp, VERSION)
    _fake_index(layout, {m: json.loads(layout.shard_manifest(m).read_text())["fingerprint"] for m in p.partitions})
    for f in (layout.index_file, layout.index_ids):
        os.utime(f, (past, past))
    assert plan(layout, fp, VERSION).current  # hashes everything once, and remembers it on disk
    assert (layout.embeddings_dir / shards.HASH_CACHE_NAME).exists()

    hashed = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda path: hashed.append(os.path.basename(path)) or real(path))
    shards._HASHES.clear()  # a new process: nothing in memory
    shards._DISK.clear()
    assert plan(layout, fp, VERSION).current
    assert hashed == []

    key = p.partitions[0]
    f = layout.shard_pt(key)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, (past, past))  # same size, same mtime: only ctime tells
    shards._HASHES.clear()
    p2 = plan(layout, fp, VERSION)
    assert hashed == [f.name]
    assert [(w.partition, w.reason) for w in p2.shards] == [(key, f"{f.name} checksum mismatch (file changed or corrupt)")]

"""core/store.py and the hooks that publish and fetch shards, index versions and semantic IDs: against a local
S3-compatible server (moto, started by the session's `s3_endpoint` fixture) and a file:// base URI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from embed_assets.core.items import load_partitions
from embed_assets.core.layout import Layout
from embed_assets.core.shards import current_shards, fetch_shard, read_manifest, verify_files
from embed_assets.core.store import (STATS, Store, Untrusted, fetch_version, publish_reports, publish_set,
                                     publish_version, read_pointer, remote_versions, store_for)
from embed_assets_tests.conftest import embed_catalog


@pytest.fixture(params=["s3", "file"])
def base_uri(request, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("new_bucket") + "/some/prefix"
    return (tmp_path / "store").as_uri()  # file:///...


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_file_set_is_published_data_first_and_fetched_only_when_its_checksum_matches(base_uri, tmp_path):
    store = store_for(base_uri)
    assert store.local == base_uri.startswith("file://")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"A" * 1000)
    manifest = json.dumps({"a.bin": _sha(b"A" * 1000)}).encode()
    first = publish_set(store, "set", {"a.bin": src / "a.bin"}, "m.json", manifest)
    assert first == {"uploaded": 2, "bytes": 1000 + len(manifest), "skipped": 0}
    assert store.get_bytes("set/m.json") == manifest and store.get_bytes("set/a.bin") == b"A" * 1000
    puts = STATS.puts
    assert publish_set(store, "set", {"a.bin": src / "a.bin"}, "m.json", manifest)["skipped"] == 1
    assert STATS.puts == puts  # idempotent: nothing uploaded again

    got = tmp_path / "got" / "a.bin"
    assert store.get_file("set/a.bin", got, _sha(b"A" * 1000)) == 1000 and got.read_bytes() == b"A" * 1000

    # a half-uploaded object (truncated) is never trusted, and nothing lands locally
    store.put_bytes("set/a.bin", b"A" * 10)
    with pytest.raises(Untrusted, match=r"/set/a\.bin has sha256 .* its manifest says") as e:
        store.get_file("set/a.bin", tmp_path / "got2" / "a.bin", _sha(b"A" * 1000))
    assert base_uri in str(e.value)
    assert not (tmp_path / "got2" / "a.bin").exists()
    assert not [p for p in (tmp_path / "got2").iterdir()]  # no temp file left behind either
    # ... and re-publishing sees the wrong size and uploads it again
    assert publish_set(store, "set", {"a.bin": src / "a.bin"}, "m.json", manifest)["skipped"] == 0
    assert store.get_bytes("set/a.bin") == b"A" * 1000
    with pytest.raises(Untrusted, match="is missing though its manifest names it"):
        store.get_file("set/nothing.bin", tmp_path / "x", "0" * 64)
    assert store.get_bytes("set/nothing.json") is None and store.size("set/nothing.bin") is None


def test_shards_are_published_as_written_and_a_fresh_home_takes_them_verified(base_uri, tmp_path, small_corpus,
                                                                             encoder32):
    one = Layout.at(tmp_path / "one", base_uri)
    embed_catalog(one, small_corpus, encoder32, 30)
    store = one.store
    keys = [p["partition"] for p in load_partitions(one)]
    assert len(keys) == 4
    for k in keys:
        m = read_manifest(one, k)
        assert store.get_bytes(f"embeddings/{one.shard_manifest(k).name}") == one.shard_manifest(k).read_bytes()
        assert _sha(store.get_bytes(f"embeddings/{m.shard_file}")) == m.shard_sha256
        assert _sha(store.get_bytes(f"embeddings/{m.items_file}")) == m.items_sha256

    # A new HOME with the same base URI: the index's shard check takes every current shard from the store.
    two = Layout.at(tmp_path / "two", base_uri)
    from embed_assets.core.items import process_items

    process_items(two, [small_corpus], "_id", ["title"], 30)
    manifests, problems = current_shards(two, load_partitions(two))
    assert problems == [] and [m.partition for m in manifests] == keys
    for k in keys:
        assert two.shard_pt(k).read_bytes() == one.shard_pt(k).read_bytes()
        assert two.shard_manifest(k).read_bytes() == one.shard_manifest(k).read_bytes()

    # Half-uploaded shards in the store are never trusted:
    a, b, c = keys[:3]
    ma, mc = read_manifest(one, a), read_manifest(one, c)
    store.put_bytes(f"embeddings/{ma.shard_file}", one.shard_pt(a).read_bytes()[:100])  # data cut short
    store.delete(f"embeddings/{one.shard_manifest(b).name}")  # data without a manifest
    wrong = json.loads(one.shard_manifest(c).read_bytes())
    wrong["items_sha256"] = "0" * 64  # a manifest whose checksum does not match its data
    store.put_bytes(f"embeddings/{one.shard_manifest(c).name}", json.dumps(wrong).encode())
    three = Layout.at(tmp_path / "three", base_uri)
    process_items(three, [small_corpus], "_id", ["title"], 30)
    with pytest.raises(Untrusted, match=rf"{base_uri}/embeddings/shard_{a}\.pt has sha256 .*re-materialize "
                                        rf"partition {a}"):
        fetch_shard(three, a)
    assert not three.shard_pt(a).exists() and read_manifest(three, a) is None
    assert fetch_shard(three, b) is None
    with pytest.raises(Untrusted, match=rf"shard_{c}\.items\.parquet has sha256"):
        fetch_shard(three, c)
    assert read_manifest(three, c) is None  # the manifest is written last, so nothing here vouches for it
    manifests, problems = current_shards(three, load_partitions(three))
    assert [m.partition for m in manifests] == [keys[3]]
    assert len(problems) == 3 and f"{base_uri}/embeddings/shard_{a}.pt" in problems[0]
    assert "has no current shard" in problems[1] and "items.parquet has sha256" in problems[2]

    # Re-materializing a partition here encodes it and publishes it again: the store is whole once more.
    from embed_assets.core.embed import embed_partition

    out = embed_partition(three, a, encoder32)
    assert not out.skipped and out.n_encoded == ma.n_rows and not out.fetched
    assert _sha(store.get_bytes(f"embeddings/{ma.shard_file}")) == read_manifest(three, a).shard_sha256
    assert store.get_bytes(f"embeddings/{three.shard_manifest(a).name}") == three.shard_manifest(a).read_bytes()
    # A partition whose current shard is in the store is taken, not encoded (and not published again).
    d = keys[3]
    three.shard_pt(d).unlink()
    puts = STATS.puts
    out = embed_partition(three, d, encoder32)
    assert out.skipped and out.fetched and out.n_encoded == 0 and not verify_files(three, out.manifest)
    assert STATS.puts == puts


def test_versions_are_published_files_then_manifest_then_pointer_and_fetched_only_when_whole(base_uri, tmp_path):
    store = store_for(base_uri)
    root = tmp_path / "versions"

    def make(name: str, payload: bytes, created: float) -> dict:
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "data.bin").write_bytes(payload)
        m = {"files": {"data.bin": _sha(payload)}, "created_at": created}
        (folder / "manifest.json").write_text(json.dumps(m))
        return m["files"]

    files_of = lambda m: m["files"]  # noqa: E731
    for i in range(1, 5):
        out = publish_version(store, "things", root / f"v{i:05d}", make(f"v{i:05d}", b"x" * i, float(i)), keep=2)
    assert out["pruned"] == ["v00002"]  # the newest two stay (v00001 went when v00003 came)
    assert remote_versions(store, "things") == ["v00003", "v00004"]
    ptr = read_pointer(store, "things")
    assert ptr["version"] == "v00004" and ptr["created_at"] == 4.0
    assert ptr["manifest_sha256"] == _sha((root / "v00004" / "manifest.json").read_bytes())
    assert publish_version(store, "things", root / "v00004", {"data.bin": _sha(b"xxxx")})["skipped"] == 1

    dest = tmp_path / "elsewhere"
    got = fetch_version(store, "things", ptr, dest, files_of, ".fetch-1-x")
    assert (got / "data.bin").read_bytes() == b"xxxx" and sorted(p.name for p in dest.iterdir()) == ["v00004"]

    # the pointer names a version whose manifest is missing, or differs from the pointer's checksum: not used
    store.put_bytes("things/v00004/manifest.json", b'{"files": {}, "created_at": 9}')
    with pytest.raises(Untrusted, match="does not match the checksum its `current` pointer gives"):
        fetch_version(store, "things", ptr, tmp_path / "third", files_of, ".fetch-1-y")
    store.delete("things/v00004/manifest.json")
    with pytest.raises(Untrusted, match="is missing, though .*things/current names version v00004"):
        fetch_version(store, "things", ptr, tmp_path / "third", files_of, ".fetch-1-z")
    assert not (tmp_path / "third" / "v00004").exists()
    # a manifest that names a path outside its folder is refused
    evil = json.dumps({"files": {"../../etc/x": "0" * 64}}).encode()
    store.put_bytes("things/v00005/manifest.json", evil)
    with pytest.raises(Untrusted, match="not a plain file name"):
        fetch_version(store, "things", {"version": "v00005", "manifest_sha256": _sha(evil)}, tmp_path / "fourth",
                      files_of, ".fetch-1-w")
    store.put_bytes("things/current", b"v00004\n")
    with pytest.raises(Untrusted, match="is not a version pointer"):
        read_pointer(store, "things")


def test_reports_each_get_a_manifest_and_unchanged_ones_are_skipped(base_uri, tmp_path):
    from embed_assets.core.store import fetch_report

    store = store_for(base_uri)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "a.json").write_text('{"x": 1}\n')
    (reports / "b.md").write_text("# b\n")
    assert publish_reports(store, reports) == {"uploaded": 4, "bytes": 13 + len(
        store.get_bytes("reports/a.json.manifest.json") + store.get_bytes("reports/b.md.manifest.json")), "skipped": 0}
    (reports / "b.md").write_text("# b, changed\n")
    assert publish_reports(store, reports)["skipped"] == 1  # a.json unchanged
    assert fetch_report(store, "b.md", tmp_path / "b.md").read_text() == "# b, changed\n"
    store.put_bytes("reports/b.md", b"# half")
    with pytest.raises(Untrusted):
        fetch_report(store, "b.md", tmp_path / "b2.md")


def test_storage_options_from_the_environment(monkeypatch, s3_endpoint, new_bucket):
    """$EMBED_ASSETS_STORAGE_OPTIONS reaches the file system (here: a wrong endpoint, and the error names the URI
    and what to check); AWS_ENDPOINT_URL alone (the session's fixture) is honoured by s3fs/botocore."""
    from embed_assets.core.store import StoreError

    assert Store(new_bucket).get_bytes("nothing") is None  # reached the session's server through AWS_ENDPOINT_URL
    monkeypatch.setenv("EMBED_ASSETS_STORAGE_OPTIONS", json.dumps({"endpoint_url": "http://127.0.0.1:9",
                                                                   "retries": 1, "config_kwargs": {"retries": {"max_attempts": 1},
                                                                                     "connect_timeout": 1}}))
    with pytest.raises(StoreError, match=rf"{new_bucket}/x: read failed .*check the base URI, the credentials"):
        Store(new_bucket).get_bytes("x")
    monkeypatch.setenv("EMBED_ASSETS_STORAGE_OPTIONS", "[1]")
    with pytest.raises(StoreError, match="must be a JSON object"):
        Store(new_bucket)


def _shard(layout: Layout, key: str, ids: list[str], seed: int):
    """A shard written through `write_shard` (so published when the layout has a base URI), from seeded unit
    vectors: for the store's mechanics, not for what the vectors mean."""
    import numpy as np

    from embed_assets.core.shards import ShardManifest, norm_stats, write_shard

    x = np.random.default_rng(seed).standard_normal((len(ids), 384)).astype(np.float32)
    emb = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    m = ShardManifest(partition=key, fingerprint=f"fp{seed}", rows_fingerprint=f"rows{seed}", n_rows=len(ids), dim=384,
                      dtype="float16", model_id="m", model_revision="r", max_seq_length=256, chunking=False,
                      shard_file="", shard_sha256="", shard_bytes=0, items_file="", items_sha256="",
                      norms=norm_stats(emb))
    return write_shard(layout, m, ids, [f"h{i}" for i in ids], emb)


def test_a_shard_republished_while_it_is_fetched_is_taken_whole_from_the_new_manifest(new_bucket, tmp_path,
                                                                                       monkeypatch):
    uri = f"{new_bucket}/race"
    writer = Layout.at(tmp_path / "writer", uri)
    _shard(writer, "p0", ["a", "b", "c"], seed=1)
    reader = Layout.at(tmp_path / "reader", uri)
    store = reader.store
    real_get_file = type(store).get_file
    calls = []

    def get_file(self, rel, local, sha256):
        if not calls:  # the writer publishes a new generation between the reader's manifest GET and its data GET
            _shard(writer, "p0", ["a", "b", "c", "d"], seed=2)
        calls.append(rel)
        return real_get_file(self, rel, local, sha256)

    monkeypatch.setattr(type(store), "get_file", get_file)
    m = fetch_shard(reader, "p0")
    assert m.fingerprint == "fp2" and m.n_rows == 4 and not verify_files(reader, m)
    assert reader.shard_pt("p0").read_bytes() == writer.shard_pt("p0").read_bytes()
    assert calls == ["embeddings/shard_p0.pt", "embeddings/shard_p0.pt", "embeddings/shard_p0.items.parquet"]
    # a manifest that names another partition's files is refused
    store.put_bytes("embeddings/shard_p1.manifest.json", writer.shard_manifest("p0").read_bytes())
    monkeypatch.undo()
    with pytest.raises(Untrusted, match="not a manifest of shard p1"):
        fetch_shard(reader, "p1")


def test_index_versions_follow_the_newest_of_home_and_store_and_an_untrusted_one_is_left_alone(base_uri, tmp_path):
    import numpy as np

    from embed_assets.core.index import (build_index, current_version, load_index, read_index_manifest, save_index,
                                         sync_index_with_store)

    def index_of(n: int):
        x = np.random.default_rng(n).standard_normal((n, 384)).astype(np.float32)
        return build_index(x / np.linalg.norm(x, axis=1, keepdims=True)), [f"i{j}" for j in range(n)]

    a = Layout.at(tmp_path / "a", base_uri)
    save_index(a, *index_of(5), {"kind": "flat"})  # v00001, published with its pointer
    store = a.store
    assert read_pointer(store, "index")["version"] == "v00001"
    assert sync_index_with_store(a) == "same"

    b = Layout.at(tmp_path / "b", base_uri)
    assert sync_index_with_store(b) == "fetched" and current_version(b) == "v00001"
    assert list(load_index(b)[1]) == [f"i{j}" for j in range(5)]

    # A truncated index object in the store: a fresh HOME does not take it, builds its own, numbered past the store's
    store.put_bytes("index/v00001/items.faiss", store.get_bytes("index/v00001/items.faiss")[:50])
    c = Layout.at(tmp_path / "c", base_uri)
    said = []
    assert sync_index_with_store(c, say=said.append) == "untrusted" and current_version(c) is None
    assert f"{base_uri}/index/v00001/items.faiss has sha256" in said[0]
    save_index(c, *index_of(7), {"kind": "flat"})
    assert current_version(c) == "v00002" and read_pointer(store, "index")["version"] == "v00002"

    # HOME a's live version is now older than the store's: it takes the store's
    assert sync_index_with_store(a) == "fetched" and current_version(a) == "v00002"
    assert read_index_manifest(a)["n_items"] == 7
    # a store that lost its pointer gets HOME's live version published again
    store.delete("index/current")
    assert sync_index_with_store(a) == "published" and read_pointer(store, "index")["version"] == "v00002"

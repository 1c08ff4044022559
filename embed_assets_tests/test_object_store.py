"""The whole pipeline with a base URI on a local S3-compatible server (moto, started by the `s3_endpoint` fixture):
every trusted artifact is published with matching checksums, and a new, empty HOME pointed at the same base URI
takes the shards, the index and the semantic IDs from the store (nothing encoded, nothing retrained)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from embed_assets.core import catalog
from embed_assets.core.changes import plan
from embed_assets.core.index import load_index
from embed_assets.core.items import load_partitions
from embed_assets.core.layout import Layout
from embed_assets.core.semantic_ids import load_version, sid_root
from embed_assets.core.shards import read_manifest
from embed_assets.core.store import STATS, read_pointer, store_for


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_store(store, layout: Layout) -> dict[str, str]:
    """Every artifact HOME trusts is in the store, each data object hashing to what its manifest says; returns
    {object: ETag} of the shard, index and semantic-ID objects."""
    keys = [p["partition"] for p in load_partitions(layout)]
    for k in keys:
        m = read_manifest(layout, k)
        assert store.get_bytes(f"embeddings/{layout.shard_manifest(k).name}") == layout.shard_manifest(k).read_bytes()
        assert _sha(store.get_bytes(f"embeddings/{m.shard_file}")) == m.shard_sha256
        assert _sha(store.get_bytes(f"embeddings/{m.items_file}")) == m.items_sha256
    for root, files_of in (("index", lambda m: {m["index_file"]: m["index_sha256"], m["ids_file"]: m["ids_sha256"]}),
                           ("semantic_ids", lambda m: {f: v["sha256"] for f, v in m["files"].items()})):
        ptr = read_pointer(store, root)
        mbytes = store.get_bytes(f"{root}/{ptr['version']}/manifest.json")
        assert _sha(mbytes) == ptr["manifest_sha256"]
        assert mbytes == (layout.home / root / "current" / "manifest.json").read_bytes()  # HOME's live version
        for f, sha in files_of(json.loads(mbytes)).items():
            assert _sha(store.get_bytes(f"{root}/{ptr['version']}/{f}")) == sha
    for name in ("retrieval_eval.json", "retrieval_eval.md", "embedding_norms.json", "semantic_ids.json",
                 "semantic_ids.md", "run_summary.json"):
        meta = json.loads(store.get_bytes(f"reports/{name}.manifest.json"))
        assert _sha(store.get_bytes(f"reports/{name}")) == meta["sha256"] == _sha((layout.reports_dir / name
                                                                                   ).read_bytes())
    return {f"{p}": info["ETag"] for p, info in store.fs.find(store.root, detail=True).items()
            if "/reports/" not in p}


def test_a_new_home_takes_everything_from_the_store_and_builds_the_same_index(tmp_path: Path, small_corpus,
                                                                             new_bucket, monkeypatch):
    from embed_assets.cli import main, run_pipeline
    from embed_assets.settings import Settings

    uri = f"{new_bucket}/catalogs/books"
    # First HOME, configured from the environment as `dagster dev` would be.
    monkeypatch.setenv("EMBED_ASSETS_HOME", str(tmp_path / "one"))
    monkeypatch.setenv("EMBED_ASSETS_ITEMS", str(small_corpus))
    monkeypatch.setenv("EMBED_ASSETS_PARTITION_SIZE", "30")
    monkeypatch.setenv("EMBED_ASSETS_PRECISION", "fp32")
    monkeypatch.setenv("EMBED_ASSETS_BASE_URI", uri)
    settings = Settings.from_env()
    assert settings.base_uri == uri
    code, first = run_pipeline(settings, log=lambda m: None)
    assert code == 0, first["failures"]
    assert first["n_encoded"] == 120 and first["store"]["puts"] > 0
    one = Layout.at(tmp_path / "one", uri)
    store = store_for(uri)
    objects = _check_store(store, one)
    assert len([o for o in objects if "/embeddings/" in o]) == 12  # 4 partitions x (.pt, items, manifest)

    # A second, empty HOME (no shards, no index, no catalog) with the same base URI, through the CLI flag.
    monkeypatch.delenv("EMBED_ASSETS_BASE_URI")
    assert main(["run", "--home", str(tmp_path / "two"), "--items", str(small_corpus), "--partition-size", "30",
                 "--precision", "fp32", "--base-uri", uri]) == 0
    two = Layout.at(tmp_path / "two", uri)
    second = json.loads(two.run_summary_json.read_text())
    assert second["n_encoded"] == 0 and second["n_reused"] == 0 and second["n_partitions_written"] == 0
    assert second["steps"]["faiss_index"]["update_mode"] == "unchanged"  # the store's live version, verified
    assert second["semantic_ids"]["action"] == "unchanged"  # the same IDs, with the same frozen codebooks
    assert second["store"]["bytes_down"] > 0
    for p in load_partitions(two):
        k = p["partition"]
        assert two.shard_pt(k).read_bytes() == one.shard_pt(k).read_bytes()
    _, ids1, m1 = load_index(one)
    _, ids2, m2 = load_index(two)
    assert list(ids2) == list(ids1) and m2["index_sha256"] == m1["index_sha256"]
    v1, v2 = load_version(sid_root(one.home)), load_version(sid_root(two.home))
    assert v2.name == v1.name and v2.table().equals(v1.table())
    # the catalog of the new HOME is rebuilt from the fetched manifests
    assert catalog.query(two, "SELECT count(*), sum(rows) FROM shards") == [(4, 120)]
    assert catalog.query(two, "SELECT count(*) FROM items") == [(120,)]
    # nothing trusted was uploaded again: the shard, index and semantic-ID objects are the same objects
    assert _check_store(store, two) == objects

    # The sensor's per-tick decision looks at HOME only: no request to the store.
    before = STATS.as_dict()
    p = plan(two, "no-source-fingerprint", read_manifest(two, "p00").version)
    assert p.shards == [] and p.index is None and STATS.as_dict() == before

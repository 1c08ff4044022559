"""Semantic IDs core: real all-MiniLM-L6-v2 vectors of the bundled sample where the acceptance asks for them
(uniqueness, stability across a refresh, forced retrain, blocking check, RQ-VAE), synthetic vectors elsewhere.
Small codebooks (3 levels x 16 codes) keep every test to seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from embed_assets.core import semantic_ids as S
from embed_assets.core.rqvae import RqVaeConfig
from embed_assets_tests.conftest import sample_docs

N_BASE = 220
SID_RE = re.compile(r"^<a_\d+><b_\d+><c_\d+><d_\d+>$")
# 220 real items: 16 codes x 8 points each fit, so the small-catalog rule keeps K=16
CFG = S.SidConfig(levels=3, codebook_size=16, min_points_per_centroid=8, neighbour_queries=50)
REPORT_KEYS = ("n_items", "duplicate_vector_rate", "largest_duplicate_group", "top_duplicate_groups",
               "collision_rate", "max_collision_group", "codebook_utilization", "perplexity",
               "reconstruction_cosine", "reconstruction_mse", "neighbour_share_first_code",
               "neighbour_share_first_two_codes", "neighbour_preservation", "recommendations", "checks")
VERSION = {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "model_revision": "test", "max_seq_length": 256,
           "dim": 384, "chunking": False}


@pytest.fixture(scope="module")
def real(encoder32):
    """220 sample docs + 5 more + 3 of them with revised texts, encoded once by the real model (fp32 -> fp16).
    Title + the abstract's first 300 characters: real vectors at a quarter of the full abstracts' encoding time."""
    docs = sample_docs(N_BASE + 5)
    texts = [f"{d['title']} {d['text'][:300]}" for d in docs]
    revised = ["Revised edition: " + texts[i] for i in (10, 11, 12)]
    vecs, _ = encoder32.encode(texts + revised)
    vecs = vecs.astype(np.float16)
    return {"ids": [d["_id"] for d in docs], "vecs": vecs[:len(docs)], "revised": vecs[len(docs):],
            "titles": {d["_id"]: d["title"] for d in docs}}


def _shards(ids, vecs, n_shards=2, version=VERSION):
    cut = np.array_split(np.arange(len(ids)), n_shards)
    return S.shards_from_arrays([(f"p{i}", [ids[j] for j in part], vecs[part]) for i, part in enumerate(cut)],
                                version)


def _sids(version) -> dict[str, tuple[str, list[int]]]:
    t = version.table()
    return {i: (s, c) for i, s, c in zip(t.column("item_id").to_pylist(), t.column("sid").to_pylist(),
                                          t.column("codes").to_pylist())}


def _clustered(n, seed=0, centers=12, dim=384, noise=0.25):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    x = c[rng.integers(0, centers, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


# -- acceptance on real vectors -------------------------------------------------------------------------------------
def test_ids_unique_manifest_report_and_current(tmp_path, real):
    root, reports = tmp_path / "semantic_ids", tmp_path / "reports"
    ids, vecs = real["ids"][:N_BASE], real["vecs"][:N_BASE]
    res = S.build_semantic_ids(root, _shards(ids, vecs), CFG, reports_dir=reports,
                               titles=lambda xs: {x: real["titles"][x] for x in xs})
    assert (res.action, res.version) == ("created", "v00001")
    assert os.readlink(root / "current") == "v00001" and S.read_current(root) == "v00001"
    v = S.load_version(root)
    t = v.table()
    assert t.column_names[:3] == ["item_id", "codes", "sid"]
    assert t.num_rows == N_BASE and sorted(t.column("item_id").to_pylist()) == sorted(ids)
    sids = t.column("sid").to_pylist()
    assert len(set(sids)) == N_BASE and all(SID_RE.match(s) for s in sids)
    assert all(S.parse_sid(s) == c and len(c) == 4 for s, c in zip(sids, t.column("codes").to_pylist()))
    m = v.manifest
    assert m["quantizer"]["kind"] == "rq_kmeans" and (m["levels"], m["codebook_size"]) == (3, 16)
    assert m["extra_digit_size"] == 16 and m["seed"] == 0 and m["embedding_version"] == VERSION
    assert m["training_sample"]["n_sampled"] == N_BASE and set(m["input_shards"]) == {"p0", "p1"}
    assert set(m["files"]) >= {"semantic_ids.parquet", "codebooks.npy", "retired.parquet", "report.json"}
    assert np.load(v.path / "codebooks.npy").shape == (3, 16, 384)
    rep = json.loads((reports / "semantic_ids.json").read_text())
    assert all(k in rep for k in REPORT_KEYS)
    assert len(rep["collision_rate"]) == len(rep["codebook_utilization"]) == len(rep["perplexity"]) == 3
    assert rep["collision_rate"] == sorted(rep["collision_rate"], reverse=True)  # deeper prefixes collide less
    assert 0.5 < rep["reconstruction_cosine"] <= 1 and rep["reconstruction_mse"] > 0
    assert rep["neighbour_share_first_code"] > rep["neighbour_preservation"]["chance_by_depth"][0]
    assert rep["duplicate_vector_rate"] == 0 and rep["largest_duplicate_group"] == 1
    assert "# Semantic IDs" in (reports / "semantic_ids.md").read_text()
    checks = S.run_checks(v)
    assert checks["unique_semantic_ids"][0] and checks["extra_digit_capacity"][0]
    assert res.metadata()["n_items"] == N_BASE


def test_refresh_keeps_unchanged_ids_byte_identical(tmp_path, real):
    root = tmp_path / "semantic_ids"
    ids, vecs = list(real["ids"][:N_BASE]), real["vecs"][:N_BASE]
    S.build_semantic_ids(root, _shards(ids, vecs), CFG)
    v1 = S.load_version(root)
    before = _sids(v1)
    # refresh: 2 deleted, 3 changed texts, 5 new items, and 1 new item repeating item 50's text (identical vector)
    ids2 = ids[2:] + real["ids"][N_BASE:] + ["dup-of-50"]
    vecs2 = np.concatenate([vecs[2:], real["vecs"][N_BASE:], vecs[50:51]])
    for j, i in enumerate((10, 11, 12)):
        vecs2[i - 2] = real["revised"][j]
    res = S.build_semantic_ids(root, _shards(ids2, vecs2, n_shards=3), CFG)
    assert (res.action, res.version, res.reason) == ("updated", "v00002", "")
    ch = res.report["changes"]
    assert (ch["n_kept"], ch["n_new"], ch["n_deleted"]) == (N_BASE - 5, 6, 2)
    assert ch["n_changed_same_id"] + ch["n_changed_new_id"] == 3 and ch["n_kept_code_mismatch"] == 0
    assert not ch["drift"]["retrained"]
    v2 = S.load_version(root)
    after = _sids(v2)
    unchanged = [i for j, i in enumerate(ids) if j not in (0, 1, 10, 11, 12)]
    assert all(after[i] == before[i] for i in unchanged)  # sid and codes, digit included
    assert len({s for s, _ in after.values()}) == len(after) == len(ids2)
    # the repeated text lands in item 50's group and takes the lowest digit no live or retired item holds
    dup = after["dup-of-50"][1]
    assert dup[:3] == before[ids[50]][1][:3]
    retired = v2.retired()
    held = {c[3] for s, c in after.values() if c[:3] == dup[:3] and s != after["dup-of-50"][0]}
    held |= {c[3] for c in retired.column("codes").to_pylist() if c[:3] == dup[:3]}
    assert dup[3] not in held and set(range(dup[3])) <= held
    assert {ids[0], ids[1]} <= set(retired.column("item_id").to_pylist())
    # same shards again: nothing to do, no new version
    again = S.build_semantic_ids(root, _shards(ids2, vecs2, n_shards=3), CFG)
    assert (again.action, again.version) == ("unchanged", "v00002")
    # a deleted item that comes back unchanged gets its old ID back
    back = S.build_semantic_ids(root, _shards(ids2 + [ids[0]], np.concatenate([vecs2, vecs[:1]])), CFG)
    assert back.action == "updated" and _sids(S.load_version(root))[ids[0]] == before[ids[0]]
    assert back.report["changes"]["n_resurrected"] == 1


def test_forced_retrain_creates_new_version_with_id_map(tmp_path, real):
    root = tmp_path / "semantic_ids"
    ids, vecs = real["ids"][:N_BASE], real["vecs"][:N_BASE]
    S.build_semantic_ids(root, _shards(ids, vecs), CFG)
    before = _sids(S.load_version(root))
    res = S.build_semantic_ids(root, _shards(ids, vecs), CFG, retrain=True)
    assert (res.action, res.reason, res.version) == ("retrained", "requested", "v00002")
    assert S.list_versions(root) == ["v00001", "v00002"] and S.read_current(root) == "v00002"
    v2 = S.load_version(root)
    m = v2.id_map().to_pylist()
    after = _sids(v2)
    assert len(m) == N_BASE
    assert all(r["old_sid"] == before[r["item_id"]][0] and r["new_sid"] == after[r["item_id"]][0] for r in m)
    assert v2.manifest["parent_version"] == "v00001" and v2.manifest["quantizer"]["trained_in"] == "v00002"


def test_blocking_check_fails_when_a_duplicate_group_exceeds_k(tmp_path, real):
    root = tmp_path / "semantic_ids"
    ids = list(real["ids"][:N_BASE]) + [f"copy-{i}" for i in range(20)]
    vecs = np.concatenate([real["vecs"][:N_BASE], np.repeat(real["vecs"][5:6], 20, axis=0)])
    titles = {**real["titles"], **{f"copy-{i}": "copy" for i in range(20)}}
    res = S.build_semantic_ids(root, _shards(ids, vecs), CFG, titles=lambda xs: {x: titles[x] for x in xs})
    rep = res.report
    assert rep["largest_duplicate_group"] == 21 and rep["max_collision_group"] >= 21 > 16
    assert rep["top_duplicate_groups"][0]["size"] == 21 and rep["top_duplicate_groups"][0]["title"]
    ok, detail = S.run_checks(S.load_version(root))["extra_digit_capacity"]
    assert not ok and "de-duplicate" in detail["detail"]
    assert not rep["checks"]["extra_digit_capacity"]["passed"]
    assert S.run_checks(S.load_version(root))["unique_semantic_ids"][0]  # digits past K keep IDs unique anyway
    assert any(r.startswith("BLOCKING") for r in rep["recommendations"])
    assert any("repeat another item's vector" in r for r in rep["recommendations"])


def test_rqvae_trains_reports_and_stays_frozen(tmp_path, real):
    import torch

    root = tmp_path / "semantic_ids"
    ids, vecs = real["ids"][:N_BASE], real["vecs"][:N_BASE]
    cfg = S.SidConfig(quantizer="rqvae", levels=3, codebook_size=16, min_points_per_centroid=8, neighbour_queries=50,
                      rqvae=RqVaeConfig(steps=30, batch_size=64, dead_code_window=10, device="cpu"))
    res = S.build_semantic_ids(root, _shards(ids, vecs), cfg)
    rep = res.report
    assert rep["quantizer"] == "rqvae" and set(rep["comparison"]) == {"rqvae", "rq_kmeans"}
    for name in ("rqvae", "rq_kmeans"):
        c = rep["comparison"][name]
        assert len(c["collision_rate"]) == 3 and 0 < c["reconstruction_cosine"] <= 1 and c["train_seconds"] > 0
    assert rep["unique_full_ids"] and all(k in rep for k in REPORT_KEYS)
    v = S.load_version(root)
    state = torch.load(v.path / "rqvae.pt", weights_only=True)
    assert tuple(state["codebooks"].shape) == (3, 16, 32)
    assert v.manifest["quantizer"]["training"]["steps"] == 30
    # frozen: a refresh with one new item encodes it with the stored model, everyone else keeps their ID
    before = _sids(v)
    res2 = S.build_semantic_ids(root, _shards(list(ids) + [real["ids"][N_BASE]],
                                              np.concatenate([vecs, real["vecs"][N_BASE:N_BASE + 1]])), cfg)
    assert res2.action == "updated" and res2.report["changes"]["n_kept_code_mismatch"] == 0
    after = _sids(S.load_version(root))
    assert all(after[i] == before[i] for i in ids)


# -- synthetic vectors --------------------------------------------------------------------------------------------
def test_drift_of_new_items_triggers_a_retrain(tmp_path):
    root = tmp_path / "semantic_ids"
    x = _clustered(800)
    ids = [f"i{i}" for i in range(800)]
    cfg = S.SidConfig(levels=2, codebook_size=16, min_points_per_centroid=8, neighbour_queries=0,
                      drift_min_items=50)
    assert cfg.drift_threshold == 1.25  # the default: the catalog's error at training, plus 25%
    S.build_semantic_ids(root, _shards(ids, x), cfg)
    # 80 items unlike anything seen in training (another set of clusters): 9% of the catalog, far off
    novel = _clustered(80, seed=99)
    res = S.build_semantic_ids(root, _shards(ids + [f"n{i}" for i in range(80)], np.concatenate([x, novel])), cfg)
    assert (res.action, res.reason) == ("retrained", "drift")
    d = res.report["changes"]["drift"]
    assert d["retrained"] and d["ratio"] > 1.25 and d["n_new_or_changed"] == 80 and d["fresh_ratio"] > d["ratio"]
    assert S.load_version(root).id_map().num_rows == 880
    # a few new items of the known kind: no retrain
    more = _clustered(10, seed=0)[:10]
    res2 = S.build_semantic_ids(root, _shards(ids + [f"n{i}" for i in range(80)] + [f"m{i}" for i in range(10)],
                                              np.concatenate([x, novel, more])), cfg)
    assert res2.action == "updated"


def test_drift_is_the_whole_catalogs_and_accumulates_over_refreshes(tmp_path):
    # One small batch of unusual items does not change every ID; the same items arriving over several refreshes
    # do, once the catalog as a whole fits the codebooks 25% worse than at training.
    root = tmp_path / "semantic_ids"
    x, novel = _clustered(800), _clustered(15, seed=99)
    ids = [f"i{i}" for i in range(800)]
    cfg = S.SidConfig(levels=2, codebook_size=16, min_points_per_centroid=8, neighbour_queries=0)
    S.build_semantic_ids(root, _shards(ids, x), cfg)
    seen, ratios, actions = [], [], []
    for step, min_items in enumerate((5, 6, 5)):  # the second refresh: fewer new items than drift_min_items
        seen += [f"n{step}_{j}" for j in range(5)]
        res = S.build_semantic_ids(root, _shards(ids + seen, np.concatenate([x, novel[:len(seen)]])),
                                   dataclasses.replace(cfg, drift_min_items=min_items))
        d = res.report["changes"]["drift"]
        assert d["n_new_or_changed"] == 5 and d["fresh_ratio"] > 5  # each batch: 5 items, far off
        ratios.append(d["ratio"])
        actions.append((res.action, res.reason, d["retrained"]))
        if res.action == "updated":
            assert any("new or changed items reconstruct" in r for r in res.report["recommendations"])
    # 1st: 0.6% of the catalog, far off, but the catalog as a whole is under 1.25x: IDs kept
    # 2nd: the catalog is past 1.25x, but only 5 items changed (under drift_min_items=6): IDs kept, it waits
    # 3rd: past 1.25x with enough new items: retrained
    assert ratios[0] < 1.25 < ratios[1] < ratios[2]
    assert actions == [("updated", "", False), ("updated", "", False), ("retrained", "drift", True)]


def test_small_catalog_gets_a_smaller_codebook_or_a_clear_error(tmp_path):
    x = _clustered(600, centers=40)
    ids = [f"i{i}" for i in range(600)]
    res = S.build_semantic_ids(tmp_path / "sid", _shards(ids, x), S.SidConfig(neighbour_queries=20))
    m = res.manifest
    assert (m["codebook_size_requested"], m["codebook_size"], m["extra_digit_size"]) == (256, 8, 256)
    assert "lowered from 256 to 8" in m["codebook_size_reason"]
    assert res.report["codebook_size"] == 8 and any("lowered" in r for r in res.report["recommendations"])
    # the catalog grows past 39 x 256 distinct vectors: the codebooks stay frozen (stable IDs), the report says retrain
    more = _clustered(10_000, centers=40, seed=0)
    grown_shards = _shards(ids + [f"g{i}" for i in range(10_000)], np.concatenate([x, more]))
    grown = S.build_semantic_ids(tmp_path / "sid", grown_shards, S.SidConfig(neighbour_queries=20))
    assert grown.action == "updated" and grown.report["codebook_size"] == 8
    assert any("enough for codebook_size=256" in r for r in grown.report["recommendations"])
    with pytest.raises(S.SemanticIdError, match="codebook_size=8"):
        S.build_semantic_ids(tmp_path / "sid2", _shards(ids, x), S.SidConfig(small_catalog="error"))
    with pytest.raises(S.SemanticIdError, match="too small"):
        S.build_semantic_ids(tmp_path / "sid3", _shards(ids[:50], x[:50]), S.SidConfig())


def test_mixed_embedding_versions_and_empty_input_are_refused(tmp_path):
    x = _clustered(100)
    a = S.shards_from_arrays([("p0", [f"a{i}" for i in range(50)], x[:50])], {**VERSION, "model_revision": "1"})
    b = S.shards_from_arrays([("p1", [f"b{i}" for i in range(50)], x[50:])], {**VERSION, "model_revision": "2"})
    with pytest.raises(S.SemanticIdError, match="2 embedding versions"):
        S.build_semantic_ids(tmp_path / "sid", a + b, CFG)
    with pytest.raises(S.SemanticIdError, match="materialize item_embeddings"):
        S.build_semantic_ids(tmp_path / "sid", [], CFG)
    dup = S.shards_from_arrays([("p0", ["x", "y"], x[:2]), ("p1", ["y", "z"], x[2:4])])
    with pytest.raises(S.SemanticIdError, match="occur in two shards"):
        S.build_semantic_ids(tmp_path / "sid", dup, S.SidConfig(codebook_size=2, min_points_per_centroid=1,
                                                                  levels=1, neighbour_queries=0))


def test_embedding_version_change_retrains(tmp_path):
    x = _clustered(300)
    ids = [f"i{i}" for i in range(300)]
    S.build_semantic_ids(tmp_path / "sid", _shards(ids, x), CFG)
    res = S.build_semantic_ids(tmp_path / "sid", _shards(ids, x, version={**VERSION, "model_revision": "new"}), CFG)
    assert (res.action, res.reason) == ("retrained", "embedding version changed")


def test_a_tampered_version_is_never_used(tmp_path):
    root = tmp_path / "sid"
    x = _clustered(300)
    shards = _shards([f"i{i}" for i in range(300)], x)
    S.build_semantic_ids(root, shards, CFG)
    p = root / "v00001" / "semantic_ids.parquet"
    p.write_bytes(p.read_bytes()[:-20] + b"\0" * 20)
    with pytest.raises(S.SemanticIdError, match="does not match its manifest"):
        S.build_semantic_ids(root, shards, CFG)
    with pytest.raises(S.SemanticIdError, match="retrain=True"):
        S.load_version(root)


def test_exports_load_with_the_consumers_own_readers(tmp_path):
    import pyarrow.parquet as pq
    import torch

    from embed_assets.core.sid_export import ExportError, export

    x = _clustered(300)
    ids = [f"item-{i}" for i in range(300)]
    shards = _shards(ids, x, n_shards=3)
    S.build_semantic_ids(tmp_path / "sid", shards, CFG)
    v = S.load_version(tmp_path / "sid")
    sid_of = {i: s for i, (s, _) in _sids(v).items()}
    x32 = x.astype(np.float32)

    export(v, shards, "grid", tmp_path / "grid")
    emb = torch.load(tmp_path / "grid" / "embeddings.pt", weights_only=True)
    assert emb.dtype == torch.float32 and tuple(emb.shape) == (300, 384) and np.array_equal(emb.numpy(), x32)
    assert json.load(open(tmp_path / "grid" / "item_ids.json")) == ids
    codes = torch.load(tmp_path / "grid" / "semantic_ids.pt", weights_only=True)
    assert [S.parse_sid(sid_of[i]) for i in ids] == codes.tolist()

    m = export(v, shards, "lcrec", tmp_path / "lcrec", name="Items")
    arr = np.load(tmp_path / "lcrec" / m["files"][0])
    assert m["files"][0] == "Items.emb-all-MiniLM-L6-v2.npy" and np.array_equal(arr, x32)
    index = json.load(open(tmp_path / "lcrec" / "Items.index.json"))
    assert len(index) == 300 and all("".join(index[str(r)]) == sid_of[i] for r, i in enumerate(ids))
    lines = (tmp_path / "lcrec" / "Items.item2id").read_text().splitlines()
    assert lines[7] == "item-7\t7"

    export(v, shards, "parquet", tmp_path / "pq")
    t = pq.ParquetFile(tmp_path / "pq" / "items.parquet").read()  # (read_table: apache/arrow#39862 at exit)
    assert t.column("item_id").to_pylist() == ids and t.column("sid").to_pylist() == [sid_of[i] for i in ids]
    assert np.array_equal(np.array(t.column("embedding").to_pylist(), dtype=np.float32), x32)

    stale = x.copy()
    stale[3] = stale[4]
    with pytest.raises(ExportError, match="materialize semantic_ids first"):
        export(v, _shards(ids, stale, n_shards=3), "lcrec", tmp_path / "stale")
    assert not any((tmp_path / "stale").iterdir())  # nothing half-written


def test_digits_hashes_and_tokens():
    import pyarrow as pa

    codes = np.array([[1, 2], [1, 2], [0, 0], [1, 2], [0, 0]], np.int32)
    digits = S.assign_fresh_digits(pa.array(["b", "a", "z", "c", "y"]), codes, 4)
    assert digits.tolist() == [1, 0, 1, 2, 0]  # 0.. inside each group, by item id
    full = np.concatenate([codes, digits[:, None]], axis=1)
    assert S.sid_strings(full).to_pylist()[0] == "<a_1><b_2><c_1>"
    assert S.parse_sid("<a_1><b_2><c_1>") == [1, 2, 1]
    x = _clustered(50)
    h = S.vector_hashes(np.concatenate([x, x[:3]]))
    assert len(set(h[:50].tolist())) == 50 and (h[50:] == h[:3]).all()
    y = x.copy()
    y[0, 100] = np.float16(float(y[0, 100]) + 0.01)
    assert S.vector_hashes(y)[0] != h[0]
    assert S.choose_codebook_size(10_000, 256, 39) == (256, "")
    assert S.choose_codebook_size(2_000, 256, 39)[0] == 32


def test_shards_from_layout_reads_trusted_platform_shards(tmp_path):
    from embed_assets.core.layout import Layout
    from embed_assets.core.shards import ShardManifest, write_shard_pt

    layout = Layout.at(tmp_path / "home")
    layout.embeddings_dir.mkdir(parents=True)
    x = _clustered(40)
    ids = [f"i{i}" for i in range(40)]
    pt = layout.shard_pt("p0")
    sha = write_shard_pt(pt, ids, x)
    m = ShardManifest(partition="p0", fingerprint="f", rows_fingerprint="r", n_rows=40, dim=384,
                      dtype="float16", model_id="m", model_revision="1", max_seq_length=256, chunking=False,
                      shard_file=pt.name, shard_sha256=sha, shard_bytes=pt.stat().st_size, items_file="",
                      items_sha256="", norms={})
    shards = S.shards_from_layout(layout, [m])
    got_ids, got = shards[0].load()
    assert got_ids == ids and np.array_equal(got, x) and shards[0].version["model_id"] == "m"


def test_titles_from_parquet_reads_only_the_asked_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"], "text": ["x", "y", "z"]}),
                   tmp_path / "items.parquet")
    assert S.titles_from_parquet(tmp_path / "items.parquet")(["c", "a", "zz"]) == {"c": "C", "a": "A"}
    assert S.titles_from_parquet(tmp_path / "missing.parquet")(["a"]) == {}


def test_refresh_carries_codes_of_unchanged_vectors_bit_identical(tmp_path, real):
    """A refresh does not search the codebooks for a vector the previous version already coded (same item, same
    partition, same fp16 bytes): it takes the stored codes and recomputes the residuals. What comes out equals
    encoding every vector afresh, bit for bit (codes, cosines, errors), and only the changed rows were searched."""
    root = tmp_path / "semantic_ids"
    ids, vecs = list(real["ids"][:N_BASE]), real["vecs"][:N_BASE]
    S.build_semantic_ids(root, _shards(ids, vecs), CFG)
    v1 = S.load_version(root)
    assert v1.manifest["input_rows"] == {"p0": [0, 110], "p1": [110, 110]}
    vecs2 = vecs.copy()
    for j, i in enumerate((10, 11, 150)):
        vecs2[i] = real["revised"][j]
    shards2 = _shards(ids, vecs2)
    q = v1.quantizer()
    fresh = S.encode_pass(shards2, {"rq_kmeans": q})
    carried = S.encode_pass(shards2, {"rq_kmeans": q}, carried=S._carried_codes(v1, v1.table(), 3))
    a, b = fresh.per_q["rq_kmeans"], carried.per_q["rq_kmeans"]
    assert (a["n_carried"], b["n_carried"]) == (0, N_BASE - 3)
    for key in ("codes", "cos", "sqerr"):
        assert a[key].tobytes() == b[key].tobytes(), key
    assert np.array_equal(a["level_sqerr_sum"], b["level_sqerr_sum"])

    res = S.build_semantic_ids(root, shards2, CFG)
    assert res.action == "updated" and res.report["changes"]["n_codes_carried"] == N_BASE - 3
    assert res.manifest["input_rows"] == {"p0": [0, 110], "p1": [110, 110]}
    # a version without input_rows (written before they were recorded): nothing carried, every row searched
    v2 = S.load_version(root)
    old = S.SidVersion(v2.root, v2.name, {k: v for k, v in v2.manifest.items() if k != "input_rows"})
    assert S._carried_codes(old, v2.table(), 3) is None


"""Crashes, corruption and hostile input, through the real CLI: nothing half-written is ever trusted."""

import json
import signal

import numpy as np
import pytest
import torch

from embed_assets.core import catalog
from embed_assets.core.index import load_index
from embed_assets.core.items import load_partitions
from embed_assets.core.layout import Layout
from embed_assets_tests.conftest import run_cli, sample_docs, write_jsonl

def _consistent(layout: Layout):
    """catalog = files = index ids, every shard vouched for by its manifest."""
    shard_ids = []
    for pt in sorted(layout.embeddings_dir.glob("shard_*.pt")):
        shard_ids += torch.load(pt, weights_only=True)["item_id"]
    cat_ids = [i for (i,) in catalog.query(layout, "SELECT item_id FROM items")]
    _, index_ids, _ = load_index(layout)
    assert sorted(shard_ids) == sorted(cat_ids) == sorted(index_ids)
    # what users query (HOME/catalog/read.duckdb) lists the same, whatever the crash left of the readers' copy
    import duckdb

    with duckdb.connect(str(catalog.reader_db(layout)), read_only=True) as con:
        assert sorted(i for (i,) in con.execute("SELECT item_id FROM items").fetchall()) == sorted(cat_ids)
    assert len(set(shard_ids)) == len(shard_ids)
    assert not list(layout.home.rglob(".*.tmp"))
    assert not list(layout.processed_dir.glob(".ingest-*"))  # a killed ingest's spill folder is swept
    verify = run_cli(["verify", "--home", str(layout.home)], layout.home.parent)
    assert verify.returncode == 0, verify.stdout
    return shard_ids


@pytest.mark.parametrize("point", ["ingest_spilled", "encoding", "shard_write", "catalog_write", "index_write"])
def test_sigkill_at_each_point_then_rerun_is_consistent(tmp_path, point):
    corpus = write_jsonl(tmp_path / "raw.jsonl", sample_docs(60))
    home = tmp_path / "home"
    args = ["run", "--home", str(home), "--items", str(corpus), "--text-fields", "title", "--partition-size", "20",
            "--no-semantic-ids"]  # 40-60 items: too few to train a semantic-ID codebook
    if point in ("ingest_spilled", "shard_write", "catalog_write"):
        # crash while *replacing* existing shards: the first run completes, then one title changes
        assert run_cli(args, tmp_path).returncode == 0
        docs = sample_docs(60)
        docs[25]["title"] += " (corrected)"
        write_jsonl(corpus, docs)
    crashed = run_cli(args, tmp_path, crash_at=point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    rerun = run_cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    ids = _consistent(Layout.at(home))
    assert len(ids) == 60


def test_corrupt_shard_is_detected_reported_and_rebuilt(tmp_path):
    corpus = write_jsonl(tmp_path / "raw.jsonl", sample_docs(40))
    home = tmp_path / "home"
    args = ["run", "--home", str(home), "--items", str(corpus), "--text-fields", "title", "--partition-size", "20",
            "--no-semantic-ids"]  # 40-60 items: too few to train a semantic-ID codebook
    assert run_cli(args, tmp_path).returncode == 0
    layout = Layout.at(home)
    parts = load_partitions(layout)
    assert len(parts) == 2 and sum(p["n_rows"] for p in parts) == 40
    key, n = parts[1]["partition"], parts[1]["n_rows"]
    pt = layout.shard_pt(key)
    good = torch.load(pt, weights_only=True)["embeddings"].numpy()
    raw = bytearray(pt.read_bytes())
    raw[-100] ^= 0x55  # flip bits inside the tensor data: still loadable, silently wrong
    pt.write_bytes(bytes(raw))

    verify = run_cli(["verify", "--home", str(home)], tmp_path)
    assert verify.returncode == 1
    assert f"shard {key}: shard_{key}.pt checksum mismatch" in verify.stdout

    rerun = run_cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert f"shard {key}" in rerun.stdout and "removed" in rerun.stdout  # reported
    summary = json.loads(layout.run_summary_json.read_text())
    assert summary["n_encoded"] == n  # rebuilt from the model, not from the corrupt bytes
    rebuilt = torch.load(pt, weights_only=True)["embeddings"].numpy()
    np.testing.assert_allclose(rebuilt.astype(np.float32), good.astype(np.float32), atol=2e-3)
    _consistent(layout)


def test_hostile_rows_are_rejected_and_good_rows_match_a_clean_run(tmp_path):
    docs = sample_docs(12)
    clean = [{"id": d["_id"], "title": d["title"]} for d in docs]
    hostile_lines = [json.dumps(clean[0]), "{oops", json.dumps(clean[1]), json.dumps({"title": "no id"}),
                     json.dumps({"id": "", "title": "empty id"}), json.dumps({"id": "x-empty", "title": " \x00\x01 "}),
                     json.dumps(clean[2])[:-1] + ', "title2": "\\u0000"}']
    hostile_lines += [json.dumps({**c, "title": "\x07" + c["title"] + "\t\r\n"}) for c in clean[3:]]
    hostile_lines += ['{"id": "1e", "title": "\udcff"}']  # a raw 0xFF byte: not UTF-8
    (tmp_path / "hostile.jsonl").write_bytes("\n".join(hostile_lines).encode("utf-8", "surrogateescape") + b"\n")
    write_jsonl(tmp_path / "clean.jsonl", clean)

    def run(name):
        r = run_cli(["run", "--home", str(tmp_path / name), "--items", str(tmp_path / f"{name}.jsonl"),
                  "--id-field", "id", "--text-fields", "title", "--partition-size", "50", "--no-semantic-ids"],
                    tmp_path)
        assert r.returncode == 0, r.stdout[-3000:]
        vectors = {}
        for pt in sorted((tmp_path / name / "embeddings").glob("shard_*.pt")):  # every partition's shard
            d = torch.load(pt, weights_only=True)
            vectors.update(zip(d["item_id"], d["embeddings"].float().numpy()))
        return vectors

    got, ref = run("hostile"), run("clean")
    assert sorted(got) == sorted(ref) and len(ref) == 12
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=2e-3)
    rejects = [json.loads(l) for l in (tmp_path / "hostile" / "reports" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [(2, "invalid_json"), (4, "missing_id"), (5, "missing_id"),
                                                          (6, "empty_text"), (17, "not_utf8")]
    assert rejects[3]["item_id"] == "x-empty"

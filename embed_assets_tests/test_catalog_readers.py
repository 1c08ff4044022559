"""Users query the catalog while runs go on, and a busy catalog never fails a run.

DuckDB lets one process write a file, and while it does no other process can even read it (and an open reader blocks
every writer). Users therefore open HOME/catalog/read.duckdb (views over a copy the writers publish), never
catalog.duckdb; and whoever holds catalog.duckdb itself only delays the catalog, never the run.
"""

import json
import subprocess
import sys
import time

import dagster as dg
import pytest

from embed_assets.cli import run_pipeline
from embed_assets.core import catalog
from embed_assets.core.embed import embed_partition
from embed_assets.core.index import build_from_shards, load_index
from embed_assets.core.items import load_partitions, process_items
from embed_assets.core.layout import Layout
from embed_assets.core.partitioning import id_hash, leaf_of_key
from embed_assets.core.verify import verify
from embed_assets.settings import SAMPLE_QRELS, SAMPLE_QUERIES, Settings
from embed_assets_tests.conftest import sample_docs, write_jsonl

# A user's session: one read-only connection, opened once and kept open, querying again and again until told to stop.
READER = """
import json, sys, time
from pathlib import Path
import duckdb

db, opened, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
con = duckdb.connect(db, read_only=True)
opened.touch()
seen, errors = [], []
def look():
    return con.execute("SELECT (SELECT count(*) FROM shards), (SELECT count(*) FROM items), "
                       "(SELECT count(DISTINCT item_id) FROM items)").fetchone()
while not stop.exists():
    try:
        seen.append(look())
    except Exception as e:
        errors.append(repr(e))
    time.sleep(0.2)
final = look()
where = con.execute("SELECT i.partition, s.path FROM items i JOIN shards s USING (partition) "
                    "WHERE i.item_id = ?", [sys.argv[4]]).fetchall()
con.close()
print(json.dumps({"seen": seen, "errors": errors, "final": final, "where": where}))
"""

# Someone holding catalog.duckdb itself: a `duckdb -readonly catalog.duckdb` shell, or another writer.
HOLDER = """
import sys, time
from pathlib import Path
import duckdb
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "read_only")
Path(sys.argv[3]).touch()
while Path(sys.argv[3]).exists():
    time.sleep(0.05)
con.close()
"""


def _wait_for(path, proc, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"{what} exited: {proc.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_reader_kept_open_during_a_run_blocks_nothing_and_sees_the_rows(tmp_path, dagster_home):
    docs = sample_docs(60)
    corpus = write_jsonl(tmp_path / "raw" / "corpus.jsonl", docs)
    settings = Settings(home=str(tmp_path / "home"), items=[str(corpus)], partition_size=30,
                        queries=str(SAMPLE_QUERIES), qrels=str(SAMPLE_QRELS), min_recall_at_100=0.0,
                        semantic_ids=False)  # 60 items: too few for a semantic-ID codebook
    layout = Layout.at(settings.home)
    read_db = catalog.ensure_reader(layout)  # what any first run creates; here before it, so the reader is early
    assert read_db == layout.home / "catalog" / "read.duckdb"

    opened, stop = tmp_path / "reader-open", tmp_path / "reader-stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(read_db), str(opened), str(stop), docs[40]["_id"]],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(opened, reader, "the reader")
        code, summary = run_pipeline(settings, log=lambda *_: None)
    finally:
        stop.touch()
        out = reader.communicate(timeout=120)[0]
    assert reader.returncode == 0, out[-3000:]
    assert code == 0, summary
    seen = json.loads(out.strip().splitlines()[-1])
    parts = load_partitions(layout)
    keys = [p["partition"] for p in parts]
    assert len(keys) == 2 and sum(p["n_rows"] for p in parts) == 60
    first = parts[0]["n_rows"]  # the CLI runs the partitions in order

    # The run never waited on the reader: every partition and the index wrote the catalog themselves, none deferred.
    with dg.DagsterInstance.get() as instance:
        embeds = instance.fetch_materializations(dg.AssetKey("item_embeddings"), limit=10).records
        index = instance.fetch_materializations(dg.AssetKey("faiss_index"), limit=1).records
    assert len(embeds) == 2 and all(r.asset_materialization.metadata["cataloged"].value for r in embeds)
    assert index[0].asset_materialization.metadata["catalog_deferred"].value is False
    assert catalog.query(layout, "SELECT count(*), count(DISTINCT item_id) FROM items") == [(60, 60)]

    # The reader queried all along on one open connection, watched the catalog fill, and now sees every row.
    assert not seen["errors"], seen["errors"]
    assert seen["seen"][0] == [0, 0, 0] and len(seen["seen"]) >= 10
    assert [1, first, first] in seen["seen"]  # between the two partitions: it saw the run's progress, live
    assert seen["final"] == [2, 60, 60]
    key = next(k for k in keys if leaf_of_key(k).holds(id_hash(docs[40]["_id"])))
    assert seen["where"] == [[key, str(layout.shard_pt(key))]]


@pytest.mark.parametrize("holder", ["read_only", "read_write"])
def test_a_held_catalog_defers_and_never_fails_then_catches_up(tmp_path, small_corpus, encoder, holder):
    layout = Layout.at(tmp_path / "home")
    process_items(layout, [small_corpus], "_id", ["title", "text"], partition_size=40)
    groups = load_partitions(layout)
    keys = [g["partition"] for g in groups]
    assert len(keys) >= 3 and sum(g["n_rows"] for g in groups) == 120
    last, n_last = keys[-1], groups[-1]["n_rows"]
    for k in keys[:-1]:
        assert embed_partition(layout, k, encoder).cataloged

    held = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(layout.catalog_db), holder, str(held)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(held, proc, "the holder")
        with pytest.raises(catalog.CatalogLocked):  # it really is held
            catalog.sync(layout, timeout_s=0.5)
        # A partition finishes (its shard is trusted, the catalog entry waits) ...
        out = embed_partition(layout, last, encoder, catalog_timeout_s=2)
        assert not out.skipped and out.n_encoded == n_last and not out.cataloged
        # ... the index needs no catalog to decide what to index: built over every shard, sync deferred ...
        t0 = time.monotonic()
        manifest = build_from_shards(layout, groups, catalog_timeout_s=2)
        assert time.monotonic() - t0 < 30
        assert manifest["catalog_deferred"] and "could not open the catalog" in manifest["catalog_deferred_reason"]
        assert manifest["n_items"] == 120 and manifest["partitions"] == keys
        # ... and the repair a CLI run starts with goes on too, saying the catalog was not checked.
        r = verify(layout, repair=True, check_index=True, catalog_timeout_s=2)
        assert r["catalog_checked"] is False and r["index_consistent"] and r["ok"], r
    finally:
        held.unlink(missing_ok=True)
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.communicate()[0]

    # Released: the next sync catches the catalog (and the readers' copy) up from the manifests.
    assert catalog.query(layout, "SELECT count(*) FROM items") == [(120 - n_last,)]
    assert catalog.sync(layout)["added"] == [last]
    assert catalog.query(layout, "SELECT partition FROM shards ORDER BY partition") == [(k,) for k in keys]
    assert catalog.query(layout, "SELECT count(*), count(DISTINCT item_id) FROM items") == [(120, 120)]
    import duckdb

    with duckdb.connect(str(catalog.reader_db(layout)), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT item_id) FROM items").fetchone() == (120, 120)
    _, ids, _ = load_index(layout)
    assert sorted(ids) == sorted(i for (i,) in catalog.query(layout, "SELECT item_id FROM items"))
    assert verify(layout)["ok"]

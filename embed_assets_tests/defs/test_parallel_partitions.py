"""Four partitions at once, each its own run through the multiprocess executor (separate processes), all writing
to one DuckDB catalog: nothing fails on the lock and no catalog row is lost or doubled."""

import os
import subprocess
import sys

import dagster as dg
import torch

from embed_assets.core import catalog
from embed_assets.core.items import load_partitions
from embed_assets.core.layout import Layout
from embed_assets.definitions import build_definitions
from embed_assets_tests.conftest import expected_partitions, sample_docs

CHILD = """
import sys, dagster as dg
from embed_assets.definitions import get_embed_shards_job
result = dg.execute_job(dg.reconstructable(get_embed_shards_job), instance=dg.DagsterInstance.get(),
                        tags={"dagster/partition": sys.argv[1]})
sys.exit(0 if result.success else 1)
"""


def test_four_partitions_in_parallel_multiprocess_runs(settings, dagster_home, monkeypatch, tmp_path):
    env = {"EMBED_ASSETS_HOME": settings.home, "EMBED_ASSETS_ITEMS": settings.items[0],
           "EMBED_ASSETS_PARTITION_SIZE": str(settings.partition_size)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with dg.DagsterInstance.get() as instance:
        build_definitions(settings).resolve_job_def("process_items_job").execute_in_process(instance=instance)
        keys = instance.get_dynamic_partitions("item_partitions")
    expected = expected_partitions([d["_id"] for d in sample_docs(120)], settings.partition_size)
    assert sorted(keys) == sorted(expected) and len(keys) == 4

    child_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, k], env=child_env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in keys]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        assert "Could not set lock" not in out

    with dg.DagsterInstance.get() as instance:
        records = instance.get_run_records()
        runs = [r for r in records if r.dagster_run.tags.get("dagster/partition") in keys]
        assert len(runs) == 4 and all(r.dagster_run.is_success for r in runs)
        # They really overlapped in time.
        assert max(r.start_time for r in runs) < min(r.end_time for r in runs)
        # Each went through the multiprocess executor: its step ran in a child process.
        for r in runs:
            logs = instance.all_logs(r.dagster_run.run_id)
            assert any("Launching subprocess for" in (e.message or "") for e in logs)

    layout = Layout.at(settings.home)
    assert catalog.query(layout, "SELECT partition, rows FROM shards ORDER BY partition") == \
        [(p["partition"], p["n_rows"]) for p in load_partitions(layout)] == \
        [(k, len(ids)) for k, ids in sorted(expected.items())]
    for k, want in expected.items():  # each shard holds exactly the items whose id-hash falls in its partition
        assert torch.load(layout.shard_pt(k), weights_only=True)["item_id"] == want
    assert catalog.query(layout, "SELECT count(*), count(DISTINCT item_id) FROM items") == [(120, 120)]
    ids = [i for p in sorted(layout.embeddings_dir.glob("shard_*.pt")) for i in torch.load(p, weights_only=True)["item_id"]]
    assert sorted(ids) == sorted(i for (i,) in catalog.query(layout, "SELECT item_id FROM items"))

"""Four partitions at once, each its own run through the multiprocess executor (separate processes), all writing
to one DuckDB catalog: nothing fails on the lock and no catalog row is lost or doubled."""

import os
import subprocess
import sys

import dagster as dg
import torch

from embed_assets.core import catalog
from embed_assets.core.layout import Layout
from embed_assets.definitions import build_definitions

CHILD = """
import sys, dagster as dg
from embed_assets.definitions import get_embed_shards_job
result = dg.execute_job(dg.reconstructable(get_embed_shards_job), instance=dg.DagsterInstance.get(),
                        tags={"dagster/partition": sys.argv[1]})
sys.exit(0 if result.success else 1)
"""


def test_four_partitions_in_parallel_multiprocess_runs(settings, dagster_home, monkeypatch, tmp_path):
    env = {"EMBED_ASSETS_HOME": settings.home, "EMBED_ASSETS_ITEMS": settings.items[0],
           "EMBED_ASSETS_ROW_GROUP_SIZE": str(settings.row_group_size)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with dg.DagsterInstance.get() as instance:
        build_definitions(settings).resolve_job_def("process_items_job").execute_in_process(instance=instance)
        keys = instance.get_dynamic_partitions("row_groups")
    assert len(keys) == 4

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
    assert catalog.query(layout, "SELECT partition, rows FROM shards ORDER BY partition") == [(k, 30) for k in keys]
    assert catalog.query(layout, "SELECT count(*), count(DISTINCT item_id) FROM items") == [(120, 120)]
    ids = [i for p in sorted(layout.embeddings_dir.glob("shard_*.pt")) for i in torch.load(p, weights_only=True)["item_id"]]
    assert sorted(ids) == sorted(i for (i,) in catalog.query(layout, "SELECT item_id FROM items"))

"""The sensor with the real Dagster daemon on a temporary DAGSTER_HOME: a new file dropped into the watched folder
leads, with no other action, to updated shards, catalog, index and report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from embed_assets.core import catalog
from embed_assets.core.layout import Layout
from embed_assets_tests.conftest import sample_docs, write_jsonl


def _wait_for(pred, timeout_s: float, what: str, proc, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-6000:]}")


def _report_items(layout: Layout) -> int:
    try:
        return json.loads(layout.report_json.read_text())["n_items"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def test_new_file_in_watched_folder_updates_everything(tmp_path, dagster_home):
    raw = tmp_path / "raw"
    docs = sample_docs(60)
    write_jsonl(raw / "part-1.jsonl", docs[:40])
    home = tmp_path / "home"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "EMBED_ASSETS_HOME": str(home),
           "EMBED_ASSETS_ITEMS": str(raw), "EMBED_ASSETS_TEXT_FIELDS": "title", "EMBED_ASSETS_ROW_GROUP_SIZE": "20",
           "EMBED_ASSETS_SENSOR": "on", "EMBED_ASSETS_SENSOR_INTERVAL_S": "2", "OMP_NUM_THREADS": "1"}
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("dagster-daemon")), "run", "-m",
                                 "embed_assets.definitions"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    layout = Layout.at(home)
    try:
        _wait_for(lambda: _report_items(layout) == 40, 480, "first report (40 items)", proc, log)
        assert len(list(layout.embeddings_dir.glob("shard_*.pt"))) == 2
        first_shard = layout.shard_manifest("rg_00000").read_text()

        write_jsonl(raw / "part-2.jsonl", docs[40:])  # the new data lands
        _wait_for(lambda: _report_items(layout) == 60, 480, "updated report (60 items)", proc, log)
        assert sorted(p.name for p in layout.embeddings_dir.glob("shard_*.pt")) == \
            ["shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]
        assert catalog.query(layout, "SELECT count(*), count(DISTINCT item_id) FROM items") == [(60, 60)]
        manifest = json.loads(layout.index_manifest.read_text())
        assert manifest["n_items"] == 60 and manifest["partitions"] == ["rg_00000", "rg_00001", "rg_00002"]
        # The unchanged partition was not touched (same manifest: same checksums, same creation time).
        assert layout.shard_manifest("rg_00000").read_text() == first_shard

        # A backfill of every row group from the CLI: one run per partition, each finds its shard current.
        keys = ["rg_00000", "rg_00001", "rg_00002"]
        manifests = {k: layout.shard_manifest(k).read_text() for k in keys}
        root = Path(__file__).parents[2]
        bf = subprocess.run([str(Path(sys.executable).with_name("dagster")), "job", "backfill", "-w",
                             str(root / "workspace.yaml"), "-j", "embed_shards_job", "--partitions", ",".join(keys),
                             "--noprompt"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert bf.returncode == 0, bf.stdout[-2000:] + bf.stderr[-2000:]

        def backfill_runs():
            with dg.DagsterInstance.get() as instance:
                backfills = instance.get_backfills()
                if not backfills:
                    return []
                return instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfills[0].backfill_id}))

        _wait_for(lambda: len(backfill_runs()) == 3 and all(r.is_success for r in backfill_runs()), 480,
                  "backfill runs", proc, log)
        assert sorted(r.tags["dagster/partition"] for r in backfill_runs()) == keys
        assert {k: layout.shard_manifest(k).read_text() for k in keys} == manifests
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

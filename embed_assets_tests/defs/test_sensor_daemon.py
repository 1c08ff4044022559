"""The sensor with the real Dagster daemon on a temporary DAGSTER_HOME, one daemon for the whole module.

The tests run in order against the same HOME; each starts by waiting until everything has converged (no run active,
and `core.changes.plan` finds nothing to do) and picks its partitions from what is there, so each also runs alone:
- a new file dropped into the watched folder leads, with no other action, to updated shards, catalog, index, report
  (its items all land in one partition, which splits; its children re-use the parent's vectors, the other partition
  is left alone);
- (a) raw contents A -> B -> A converge each time (a state seen before is wanted again);
- (b) a deleted shard, a corrupted shard and a deleted index file are rebuilt (the state regressed after success);
- (c) a partition being materialized by a UI-style run (`__ASSET_JOB`) is not requested again meanwhile;
- (d) a sensor run that the user cancels is not relaunched until the inputs change;
- a CLI backfill of every partition runs one run per partition, each finding its shard current.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from embed_assets.core import catalog
from embed_assets.core.changes import fingerprint_files, plan
from embed_assets.core.items import Limits, items_config, load_partitions
from embed_assets.core.layout import Layout
from embed_assets.core.partitioning import id_hash, leaf_of_key
from embed_assets.core.shards import read_manifest, verify_files
from embed_assets.instance import create_storage
from embed_assets.core.verify import verify
from embed_assets.defs.items.sensors import ACTIVE, REQUEST_TAG
from embed_assets_tests.conftest import expected_partitions, sample_docs, write_jsonl

ROOT = Path(__file__).parents[2]
PARTITION_SIZE = 10
BIN = Path(sys.executable).parent


def _version() -> dict:
    from embed_assets.core.encoder import Encoder

    return Encoder().version  # cheap: the model loads on first encode only


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A running `dagster-daemon` with the sensor on (2 s ticks) over a watched folder of title-only items. Its
    runs hold at the start of item_embeddings while the file `gate_d` exists (for the cancel test)."""
    tmp = tmp_path_factory.mktemp("sensor").resolve()
    dagster_home, raw, home = tmp / "dagster_home", tmp / "raw", tmp / "home"
    dagster_home.mkdir()
    # The default queued run coordinator, polled every second instead of 5 (runs start sooner; nothing else changes).
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nrun_queue:\n  dequeue_interval_seconds: 1\n")
    # 20 items (two 1-bit partitions, p0 and p1), then 10 more that all fall in p0 (for the new-file test)
    pool = sample_docs(80)
    docs = pool[:20] + [x for x in pool[20:] if leaf_of_key("p0").holds(id_hash(x["_id"]))][:10]
    write_jsonl(raw / "part-1.jsonl", docs[:20])
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "EMBED_ASSETS_HOME": str(home),
           "EMBED_ASSETS_ITEMS": str(raw), "EMBED_ASSETS_TEXT_FIELDS": "title",
           "EMBED_ASSETS_PARTITION_SIZE": str(PARTITION_SIZE), "EMBED_ASSETS_SENSOR": "on",
           "EMBED_ASSETS_SENSOR_INTERVAL_S": "2", "OMP_NUM_THREADS": "1",
           "EMBED_ASSETS_SEMANTIC_IDS": "0",  # 20 items at first: too few for a semantic-ID codebook
           "EMBED_ASSETS_PAUSE_AT": "embed_start", "EMBED_ASSETS_PAUSE_FILE": str(tmp / "gate_d")}
    env.pop("EMBED_ASSETS_CRASH_AT", None)
    log = tmp / "daemon.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        # Create the SQLite storage before two processes open it at once (both could stamp its schema version).
        instance = dg.DagsterInstance.get()
        create_storage(instance)
        with open(log, "w") as out:
            proc = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-m", "embed_assets.definitions"], cwd=tmp,
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        ns = SimpleNamespace(tmp=tmp, raw=raw, docs=docs, env=env, log=log, proc=proc, instance=instance,
                             layout=Layout.at(home), version=_version(), others=[],
                             config=items_config("_id", ["title"], None, PARTITION_SIZE, Limits()))
        try:
            yield ns
        finally:
            for p in [proc, *ns.others]:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
            instance.dispose()


def _wait_for(d, pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({d.proc.returncode}) waiting for {what}:\n{d.log.read_text()[-4000:]}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; last sensor ticks: {_skip_reasons(d)[-3:]}\n"
                         f"{d.log.read_text()[-6000:]}")


def _plan(d):
    registered = set(d.instance.get_dynamic_partitions("item_partitions"))
    # as the daemon's sensor sees it: semantic IDs are switched off in its environment (too few items)
    return plan(d.layout, fingerprint_files([str(d.raw)], d.config)[1], d.version, registered, semantic_ids=False)


def _converged(d) -> bool:
    # Active runs first, then the disk (as the sensor does): no run in flight and nothing left to do.
    return not d.instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE), limit=1) and _plan(d).current


def _converge(d, what: str, timeout_s: float = 300):
    _wait_for(d, lambda: _converged(d), timeout_s, what)


def _sensor_state(d):
    return next(s for s in d.instance.all_instigator_state() if s.instigator_name == "raw_items_sensor")


def _ticks_after(d, ts: float):
    """Sensor ticks that started after `ts` and are done (skipped or requested runs), oldest first."""
    s = _sensor_state(d)
    ticks = d.instance.get_ticks(s.instigator_origin_id, s.selector_id, after=ts)
    return sorted((t for t in ticks if t.status.value in ("SKIPPED", "SUCCESS")), key=lambda t: t.timestamp)


def _skip_reasons(d) -> list[str]:
    try:
        return [t.skip_reason or "" for t in _ticks_after(d, time.time() - 60)]
    except StopIteration:
        return []


def _runs_for(d, partition: str, after: float):
    """Runs (any job) for one partition of item_embeddings created after `after`, newest first."""
    recs = d.instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/partition": partition}))
    return [r.dagster_run for r in recs if r.create_timestamp.timestamp() > after]


def _report_items(layout: Layout) -> int:
    try:
        return json.loads(layout.report_json.read_text())["n_items"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def _index_fingerprints(layout: Layout) -> dict:
    return json.loads(layout.index_manifest.read_text())["shard_fingerprints"]


def _keys(d) -> list[str]:
    return [p["partition"] for p in load_partitions(d.layout)]


def _partition_of(d, item_id: str) -> str:
    """The partition holding an item: the one whose hash prefix its id-hash starts with."""
    return next(k for k in _keys(d) if leaf_of_key(k).holds(id_hash(item_id)))


def _last_item(d) -> tuple[Path, str, str]:
    """The last raw file, the id of its first item and that item's partition."""
    last = sorted(d.raw.glob("*.jsonl"))[-1]
    item = json.loads(last.read_text().splitlines()[0])["_id"]
    return last, item, _partition_of(d, item)


def _retitle(path: Path, item_id: str, title: str):
    """Rewrite one raw file with one item's title changed (a user editing the catalog)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        if r["_id"] == item_id:
            r["title"] = title
    write_jsonl(path, rows)


def test_new_file_in_watched_folder_updates_everything(d):
    _converge(d, "first convergence (20 items)", 480)
    assert _report_items(d.layout) == 20
    before = expected_partitions([x["_id"] for x in d.docs[:20]], PARTITION_SIZE)
    assert _keys(d) == sorted(before) == ["p0", "p1"]
    assert sorted(p.name for p in d.layout.embeddings_dir.glob("shard_*.pt")) == [f"shard_{k}.pt" for k in before]
    untouched = d.layout.shard_manifest("p1").read_text()

    write_jsonl(d.raw / "part-2.jsonl", d.docs[20:])  # the new data lands, all of it in p0
    _wait_for(d, lambda: _report_items(d.layout) == 30 and _converged(d), 300, "updated report (30 items)")
    # p0 outgrew 1.25 x the target and split into its children; p1 kept its key
    keys = ["p00", "p01", "p1"]
    assert _keys(d) == keys and sorted(d.instance.get_dynamic_partitions("item_partitions")) == keys
    assert sorted(p.name for p in d.layout.embeddings_dir.glob("shard_*.pt")) == [f"shard_{k}.pt" for k in keys]
    assert catalog.query(d.layout, "SELECT count(*), count(DISTINCT item_id) FROM items") == [(30, 30)]
    assert catalog.query(d.layout, "SELECT partition, count(*) FROM items GROUP BY 1 ORDER BY 1") == \
        [(k, sum(leaf_of_key(k).holds(id_hash(x["_id"])) for x in d.docs)) for k in keys]
    manifest = json.loads(d.layout.index_manifest.read_text())
    assert manifest["n_items"] == 30 and manifest["partitions"] == keys
    # The children re-used all of the parent's vectors and encoded only the new items.
    children = [read_manifest(d.layout, k) for k in ("p00", "p01")]
    assert sum(m.n_reused for m in children) == len(before["p0"]) and sum(m.n_encoded for m in children) == 10
    # The unchanged partition was not touched (same manifest: same checksums, same creation time).
    assert d.layout.shard_manifest("p1").read_text() == untouched


def test_a_raw_contents_a_b_a_converge_each_time(d):
    """(a) A state seen before is wanted again: its keys were used by successful runs, yet it runs again."""
    _converge(d, "convergence before (a)")
    last, item, key = _last_item(d)
    state_a, fps_a = last.read_bytes(), _index_fingerprints(d.layout)

    _retitle(last, item, "A title that was never there before")  # B
    _converge(d, "convergence on B")
    fps_b = _index_fingerprints(d.layout)
    assert fps_b[key] != fps_a[key] and {k: v for k, v in fps_b.items() if k != key} == \
        {k: v for k, v in fps_a.items() if k != key}

    last.write_bytes(state_a)  # back to A
    _converge(d, "convergence back on A")
    assert _index_fingerprints(d.layout) == fps_a
    assert verify(d.layout)["ok"]
    # The A state of that partition was asked for twice, under two run keys of one base key.
    runs = d.instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_TAG: f"{key}-{fps_a[key]}"}))
    assert len(runs) >= 2 and all(r.is_success for r in runs)
    assert len({r.tags["dagster/run_key"] for r in runs}) == len(runs)


def test_b_deleted_or_corrupt_shards_and_index_are_rebuilt(d):
    """(b) The state regressed after a successful run: same wanted state, work again."""
    _converge(d, "convergence before (b)")
    gone, corrupt = _keys(d)[:2]
    before = {k: read_manifest(d.layout, k) for k in (gone, corrupt)}
    index_before = json.loads(d.layout.index_manifest.read_text())
    d.layout.shard_pt(gone).unlink()
    pt = d.layout.shard_pt(corrupt)
    data = bytearray(pt.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
    pt.write_bytes(bytes(data))
    d.layout.index_file.unlink()

    _converge(d, "convergence after deleting and corrupting shards and the index")
    for k, m in before.items():
        now = read_manifest(d.layout, k)
        assert now.created_at > m.created_at and now.fingerprint == m.fingerprint
        assert verify_files(d.layout, now) == []
    index_after = json.loads(d.layout.index_manifest.read_text())
    assert index_after["created_at"] > index_before["created_at"] and d.layout.index_file.exists()
    assert index_after["shard_fingerprints"] == index_before["shard_fingerprints"]
    r = verify(d.layout)
    assert r["ok"] and r["index_consistent"], r


def test_c_a_partition_materializing_from_the_ui_is_not_requested_again(d):
    """(c) A UI run (`__ASSET_JOB`, here from `dagster asset materialize`) holds a partition; its inputs change
    meanwhile; the sensor processes the items but leaves that partition to the UI run."""
    _converge(d, "convergence before (c)")
    part1 = d.raw / "part-1.jsonl"
    edited = json.loads(part1.read_text().splitlines()[PARTITION_SIZE])["_id"]
    key, t0 = _partition_of(d, edited), time.time()
    gate = d.tmp / "gate_c"
    gate.touch()
    env = {**d.env, "EMBED_ASSETS_PAUSE_FILE": str(gate)}
    ui_log = d.tmp / "ui.log"
    with open(ui_log, "w") as out:
        ui = subprocess.Popen([str(BIN / "dagster"), "asset", "materialize", "-m", "embed_assets.definitions",
                               "--select", "item_embeddings", "--partition", key], cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    d.others.append(ui)
    try:
        def ui_run():
            runs = [r for r in _runs_for(d, key, t0) if r.job_name == "__ASSET_JOB"]
            return runs[0] if runs and runs[0].status == dg.DagsterRunStatus.STARTED else None

        _wait_for(d, ui_run, 180, "the UI run to start")
        run_id = ui_run().run_id
        _retitle(part1, edited, "Edited while a UI run waits")

        def only_key_left():  # processed_items done (its run finished too), only the held partition left
            active = {r.run_id for r in d.instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE))}
            p = _plan(d)
            return active == {run_id} and p.items is None and [w.partition for w in p.shards] == [key]

        _wait_for(d, only_key_left, 180, "processed_items on the edited raw file")
        mark = time.time()
        _wait_for(d, lambda: len(_ticks_after(d, mark)) >= 3, 120, "three sensor ticks")
        assert [r.run_id for r in _runs_for(d, key, t0)] == [run_id], "the sensor launched a duplicate run"
        reasons = [t.skip_reason or "" for t in _ticks_after(d, mark)]
        assert all(f"being materialized by run {run_id[:8]}" in r for r in reasons), reasons
    finally:
        gate.unlink(missing_ok=True)
    assert ui.wait(timeout=300) == 0, ui_log.read_text()[-3000:]
    _converge(d, "convergence after the UI run")
    runs = _runs_for(d, key, t0)
    assert [r.run_id for r in runs] == [run_id] and runs[0].is_success
    assert verify(d.layout)["ok"]


def test_d_a_cancelled_run_is_not_retried_until_the_inputs_change(d):
    """(d) The user cancels a sensor run: respected for that state; a new state (edited inputs) runs."""
    _converge(d, "convergence before (d)")
    last, item, key = _last_item(d)
    t0 = time.time()
    gate = Path(d.env["EMBED_ASSETS_PAUSE_FILE"])
    gate.touch()  # the daemon's runs of item_embeddings now wait at their start
    try:
        _retitle(last, item, "Edited, then the run is cancelled")

        def held():
            runs = [r for r in _runs_for(d, key, t0) if r.job_name == "embed_shards_job"]
            return runs[0] if runs and runs[0].status == dg.DagsterRunStatus.STARTED else None

        _wait_for(d, held, 180, "the sensor's run of the edited partition")
        run_id = held().run_id
        assert d.instance.run_launcher.terminate(run_id)
        _wait_for(d, lambda: d.instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.CANCELED, 120,
                  "the run to be cancelled")
        mark = time.time()
        _wait_for(d, lambda: len(_ticks_after(d, mark)) >= 3, 120, "three sensor ticks")
        assert [r.run_id for r in _runs_for(d, key, t0)] == [run_id], "the cancelled run was relaunched"
        reasons = [t.skip_reason or "" for t in _ticks_after(d, mark)]
        assert all("cancelled by a user" in r and key in r for r in reasons), reasons
    finally:
        gate.unlink(missing_ok=True)

    _retitle(last, item, "Edited again: a new state")  # the inputs change: the sensor runs it
    _converge(d, "convergence after the inputs changed")
    runs = _runs_for(d, key, t0)
    assert runs[0].run_id != run_id and runs[0].is_success and runs[-1].run_id == run_id
    assert verify(d.layout)["ok"]


def test_cli_backfill_runs_one_run_per_partition_and_keeps_current_shards(d):
    _converge(d, "convergence before the backfill")
    keys = sorted(d.instance.get_dynamic_partitions("item_partitions"))
    assert keys == _keys(d)
    manifests = {k: d.layout.shard_manifest(k).read_text() for k in keys}
    bf = subprocess.run([str(BIN / "dagster"), "job", "backfill", "-w", str(ROOT / "workspace.yaml"), "-j",
                         "embed_shards_job", "--partitions", ",".join(keys), "--noprompt"], cwd=ROOT, env=d.env,
                        capture_output=True, text=True, timeout=300)
    assert bf.returncode == 0, bf.stdout[-2000:] + bf.stderr[-2000:]

    def backfill_runs():
        backfills = d.instance.get_backfills()
        if not backfills:
            return []
        return d.instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfills[0].backfill_id}))

    _wait_for(d, lambda: len(backfill_runs()) == len(keys) and all(r.is_success for r in backfill_runs()), 300,
              "backfill runs")
    assert sorted(r.tags["dagster/partition"] for r in backfill_runs()) == keys
    assert {k: d.layout.shard_manifest(k).read_text() for k in keys} == manifests
    _converge(d, "convergence after the backfill")

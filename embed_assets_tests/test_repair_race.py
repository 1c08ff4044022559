"""Repair beside live writers (`embed-assets run` repairs on start, so a CLI run beside a backfill does this).

Repair must never remove or rewrite what a live writer holds: a first-time shard whose manifest is not written yet is
no orphan, and a shard rewritten between repair's first look and its lock is not corrupt. The writers pause at
`shard_write` (new .pt on disk, manifest not yet), which makes the race window real and wide.
"""

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from embed_assets.core import catalog
from embed_assets.core import verify as verify_mod
from embed_assets.core.items import load_partitions, process_items
from embed_assets.core.layout import Layout
from embed_assets.core.partitioning import id_hash, leaf_of_key
from embed_assets.core.shards import list_manifests, read_manifest, verify_files
from embed_assets.core.verify import verify
from embed_assets.definitions import build_definitions
from embed_assets_tests.conftest import sample_docs, write_jsonl

# One partition's run through Dagster's multiprocess executor (the step runs in a child process), as a backfill does.
RUN_PARTITION = """
import sys, dagster as dg
from embed_assets.definitions import get_embed_shards_job
result = dg.execute_job(dg.reconstructable(get_embed_shards_job), instance=dg.DagsterInstance.get(),
                        tags={"dagster/partition": sys.argv[1]})
sys.exit(0 if result.success else 1)
"""

# `verify --repair` in a loop until told to stop. Before each pass it notes, on its own, whether a writer was inside
# its window (a .pt with no manifest, or one its manifest does not vouch for): proof the loop really raced them.
REPAIR_LOOP = """
import hashlib, json, sys, time, traceback
from pathlib import Path
from embed_assets.core.layout import Layout
from embed_assets.core.verify import verify

layout, stop = Layout.at(sys.argv[1]), Path(sys.argv[2])

def in_window():
    for pt in layout.embeddings_dir.glob("shard_*.pt"):
        manifest = pt.with_name(pt.name[:-len(".pt")] + ".manifest.json")
        try:
            if not manifest.exists() or json.loads(manifest.read_text())["shard_sha256"] != \\
                    hashlib.sha256(pt.read_bytes()).hexdigest():
                return True
        except (OSError, ValueError, KeyError):
            return True
    return False

out = {"passes": 0, "in_window": 0, "fixed": [], "live": [], "errors": []}
while not stop.exists():
    window = in_window()
    try:
        r = verify(layout, repair=True, check_index=False)
        out["fixed"] += r["fixed"]
        out["live"] += r.get("live", [])
    except Exception:
        out["errors"].append(traceback.format_exc()[-1500:])
    out["passes"] += 1
    out["in_window"] += window
    time.sleep(0.2)
print(json.dumps(out))
"""

# One partition written by the core engine in its own process (the live writer of the deterministic tests).
WRITE_PARTITION = """
import json, sys
from embed_assets.core.embed import embed_partition
from embed_assets.core.encoder import Encoder
from embed_assets.core.layout import Layout
out = embed_partition(Layout.at(sys.argv[1]), sys.argv[2], Encoder())
print(json.dumps({"skipped": out.skipped, "n_encoded": out.n_encoded, "n_reused": out.n_reused}))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBED_ASSETS_PAUSE")
           and k != "EMBED_ASSETS_CRASH_AT"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"writer exited before {what}: {proc.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _trusted(layout: Layout) -> dict:
    return {m.partition: m for m in list_manifests(layout) if not verify_files(layout, m)}


def test_repair_loop_beside_a_real_backfill_removes_nothing_and_encodes_nothing_twice(
        settings, dagster_home, monkeypatch, tmp_path):
    env = {"EMBED_ASSETS_HOME": settings.home, "EMBED_ASSETS_ITEMS": settings.items[0],
           "EMBED_ASSETS_PARTITION_SIZE": str(settings.partition_size)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with dg.DagsterInstance.get() as instance:
        build_definitions(settings).resolve_job_def("process_items_job").execute_in_process(instance=instance)
        keys = sorted(instance.get_dynamic_partitions("item_partitions"))
    layout = Layout.at(settings.home)
    # 120 items at a target of 30: the four 2-bit hash prefixes, registered exactly as processed
    assert keys == [p["partition"] for p in load_partitions(layout)] == ["p00", "p01", "p10", "p11"]

    stop = tmp_path / "stop-repair"
    loop = subprocess.Popen([sys.executable, "-c", REPAIR_LOOP, str(layout.home), str(stop)], env=_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Each writer waits 1.5 s between its new .pt and its manifest: the loop passes every ~0.3 s.
        writer_env = _env(EMBED_ASSETS_PAUSE_AT="shard_write:1.5")
        writers = [subprocess.Popen([sys.executable, "-c", RUN_PARTITION, k], env=writer_env, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in keys]
        outputs = [p.communicate(timeout=900)[0] for p in writers]
    finally:
        stop.touch()
        loop_out = loop.communicate(timeout=300)[0]
    for k, p, out in zip(keys, writers, outputs):
        assert p.returncode == 0, f"{k}:\n{out[-4000:]}"
    assert loop.returncode == 0, loop_out[-3000:]
    repair = json.loads(loop_out.strip().splitlines()[-1])
    print(f"repair loop: {repair['passes']} passes, {repair['in_window']} inside a writer's window, "
          f"left to live writers: {sorted(set(repair['live']))}")
    assert not repair["errors"], repair["errors"]

    # Repair removed nothing at all: no shard, no "orphan", no temp file of a live writer.
    assert not [f for f in repair["fixed"] if "removed" in f], repair["fixed"]
    # Every shard is trusted, the catalog, the files and the readers' copy agree.
    final = verify(layout)
    assert final["ok"], final
    assert sorted(_trusted(layout)) == keys
    assert catalog.query(layout, "SELECT count(*), count(DISTINCT item_id) FROM items") == [(120, 120)]

    # Nothing encoded twice: each partition materialized once, 120 items encoded in all, none re-used or redone.
    with dg.DagsterInstance.get() as instance:
        runs = [r for r in instance.get_run_records() if r.dagster_run.tags.get("dagster/partition") in keys]
        assert len(runs) == len(keys) and all(r.dagster_run.is_success for r in runs)
        mats = instance.fetch_materializations(dg.AssetKey("item_embeddings"), limit=100).records
    parts = sorted(r.asset_materialization.partition for r in mats)
    assert parts == keys
    assert sum(r.asset_materialization.metadata["n_encoded"].value for r in mats) == 120
    assert sum(m.n_encoded for m in list_manifests(layout)) == 120

    # And the loop really raced the writers: it passed while a .pt had no manifest, and left such partitions alone.
    assert repair["passes"] >= 5 and repair["in_window"] >= 1, repair
    assert set(repair["live"]) <= set(keys) and repair["live"], repair


@contextmanager
def _paused_writer(layout: Layout, key: str, tmp_path: Path):
    """A real writer of `key` in its own process, held at shard_write (its new .pt on disk, its manifest not yet)
    until the gate file is removed."""
    gate = tmp_path / f"gate-{key}"
    gate.touch()
    before = read_manifest(layout, key)
    proc = subprocess.Popen([sys.executable, "-c", WRITE_PARTITION, str(layout.home), key], cwd=tmp_path,
                            env=_env(EMBED_ASSETS_PAUSE_AT="shard_write", EMBED_ASSETS_PAUSE_FILE=str(gate)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pt = layout.shard_pt(key)

        def new_pt_written():
            if not pt.exists():
                return False
            return before is None or verify_files(layout, before) != []

        _wait_for(new_pt_written, 300, "the writer's new .pt", proc)
        assert read_manifest(layout, key) == before  # inside the window: manifest not written yet
        yield proc, gate
    finally:
        gate.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.wait(timeout=300)


def _outcome(proc: subprocess.Popen) -> dict:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_first_write_of_a_partition_is_no_orphan(tmp_path):
    """The .pt of a partition written for the first time exists before its manifest: repair leaves it alone."""
    layout = Layout.at(tmp_path / "home")
    corpus = write_jsonl(tmp_path / "raw.jsonl", sample_docs(25))
    process_items(layout, [corpus], "_id", ["title", "text"], partition_size=25)
    part = load_partitions(layout)[0]  # (at least one hash bit: two partitions; only this one is written)
    key, n = part["partition"], part["n_rows"]
    with _paused_writer(layout, key, tmp_path) as (proc, gate):
        r = verify(layout, repair=True)
        assert layout.shard_pt(key).exists(), r["fixed"]
        assert r["live"] == [key] and not [f for f in r["fixed"] if "removed" in f], r
        gate.unlink()
        outcome = _outcome(proc)
    assert outcome == {"skipped": False, "n_encoded": n, "n_reused": 0}
    final = verify(layout, repair=True)
    assert final["ok"] and final["n_trusted_shards"] == 1 and not final["fixed"], final
    assert catalog.query(layout, "SELECT partition, count(*) FROM items GROUP BY 1") == [(key, n)]


def test_a_shard_rewritten_while_repair_waits_for_the_lock_is_kept(tmp_path, monkeypatch):
    """Repair sees a new .pt beside the old manifest (a writer mid-write); by the time it holds the partition's lock
    the writer has finished. It must judge the manifest on disk then, not the one it read before: the new shard is
    good and stays."""
    layout = Layout.at(tmp_path / "home")
    docs = sample_docs(25)
    corpus = write_jsonl(tmp_path / "raw.jsonl", docs)
    process_items(layout, [corpus], "_id", ["title", "text"], partition_size=25)
    part = next(p for p in load_partitions(layout) if leaf_of_key(p["partition"]).holds(id_hash(docs[3]["_id"])))
    key, n = part["partition"], part["n_rows"]  # the partition of the item edited below
    first = subprocess.run([sys.executable, "-c", WRITE_PARTITION, str(layout.home), key], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    docs[3]["title"] += " (revised)"
    write_jsonl(corpus, docs)
    process_items(layout, [corpus], "_id", ["title", "text"], partition_size=25)

    real_lock = verify_mod.partition_lock
    with _paused_writer(layout, key, tmp_path) as (proc, gate):
        @contextmanager
        def lock_after_the_writer_finished(layout_, key_, blocking=True):
            # The window between repair's first look and its lock, made certain: the writer completes in it.
            gate.unlink(missing_ok=True)
            _wait_for(lambda: proc.poll() is not None, 300, "the writer to finish")
            with real_lock(layout_, key_, blocking=blocking) as mine:
                yield mine

        monkeypatch.setattr(verify_mod, "partition_lock", lock_after_the_writer_finished)
        r = verify(layout, repair=True)
        monkeypatch.setattr(verify_mod, "partition_lock", real_lock)
        outcome = _outcome(proc)
    assert outcome == {"skipped": False, "n_encoded": 1, "n_reused": n - 1}
    assert not [f for f in r["fixed"] if "removed" in f], r["fixed"]
    m = read_manifest(layout, key)
    assert m is not None and verify_files(layout, m) == [] and m.n_encoded == 1
    final = verify(layout)
    assert final["ok"], final

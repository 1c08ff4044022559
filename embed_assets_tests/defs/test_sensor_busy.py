"""Which work an active run holds, by what it materializes (not by its job's name); no daemon needed."""

from types import SimpleNamespace

import dagster as dg

from embed_assets.defs.items.sensors import Busy


def _run(run_id, job_name, assets=None, **tags):
    return SimpleNamespace(run_id=run_id, job_name=job_name, tags=tags,
                           asset_selection=None if assets is None else frozenset(dg.AssetKey(a) for a in assets))


def test_runs_hold_what_they_materialize_whatever_launched_them():
    assert Busy.of([]) == Busy()
    # A UI / `dagster asset materialize` run is __ASSET_JOB with an asset selection and a partition tag.
    ui = Busy.of([_run("ui", "__ASSET_JOB", ["item_embeddings"], **{"dagster/partition": "p01"})])
    assert ui.shard("p01") == "ui" and ui.shard("p10") is None and ui.items is None and ui.index is None
    # The sensor's and a backfill's runs are whole jobs: no asset selection, the job's assets.
    sensor = Busy.of([_run("s", "embed_shards_job", **{"dagster/partition": "p10"}),
                      _run("i", "process_items_job"), _run("x", "index_and_report_job")])
    assert (sensor.shard("p10"), sensor.items, sensor.index) == ("s", "i", "x")
    # A run of item_embeddings over a range (or no partition) holds every partition; UI runs of the index hold it.
    ranged = Busy.of([_run("r", "__ASSET_JOB", ["item_embeddings"], **{
        "dagster/asset_partition_range_start": "p00", "dagster/asset_partition_range_end": "p011"})])
    assert ranged.shard("p1101") == "r"
    assert Busy.of([_run("f", "__ASSET_JOB", ["faiss_index"])]).index == "f"
    # A check-only run holds nothing; an unknown job launched whole might touch anything: it holds everything.
    assert Busy.of([_run("c", "__ASSET_JOB", [])]) == Busy()
    other = Busy.of([_run("o", "some_other_job")])
    assert other.items == "o" and other.shard("p00") == "o" and other.index == "o"

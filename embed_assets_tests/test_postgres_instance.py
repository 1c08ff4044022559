"""The production instance profile (`embed_assets/instance_profiles/postgres.yaml`) against a real PostgreSQL server.

A DAGSTER_HOME holding the shipped profile, pointed at a fresh database by the profile's environment variables; real
runs of the real jobs (processed_items, one item_embeddings partition) and one real tick of raw_items_sensor, which
the daemon's own tick code evaluates in a code server and which queues a run for the partition left to embed. Then a
second instance, and psycopg2 on its own connection, find all of it in PostgreSQL and nothing in SQLite.
"""

import json
import logging
import shutil
from pathlib import Path

import dagster as dg

import embed_assets
from embed_assets.definitions import build_definitions
from embed_assets.defs.items.sensors import REQUEST_TAG
from embed_assets.settings import Settings
from embed_assets_tests.conftest import sample_docs, write_jsonl
from embed_assets_tests.postgres_server import postgres_server  # noqa: F401  (the fixture)

PROFILE = Path(embed_assets.__file__).parent / "instance_profiles" / "postgres.yaml"
ROOT = Path(__file__).parents[1]


def _sensor_tick(instance: dg.DagsterInstance):
    """What `dagster-daemon`'s sensor loop does once: load the code location in a code server (from the environment,
    as `dagster dev` does), turn the sensor on as the UI does, and run one tick, which stores its tick and cursor and
    submits its runs to the run queue. Returns the sensor as the workspace sees it."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._daemon.sensor import execute_sensor_iteration

    target = ModuleTarget(module_name="embed_assets.definitions", attribute=None, working_directory=str(ROOT),
                          location_name="embed_assets")
    with WorkspaceProcessContext(instance, target) as ctx:
        [entry] = ctx.create_request_context().get_code_location_entries().values()
        assert entry.code_location, entry.load_error
        [repo] = entry.code_location.get_repositories().values()
        sensor = repo.get_sensor("raw_items_sensor")
        instance.start_sensor(sensor)
        list(execute_sensor_iteration(ctx, logging.getLogger("embed_assets.sensor"), threadpool_executor=None,
                                      submit_threadpool_executor=None))
    return sensor


def test_the_postgres_profile_keeps_runs_partitions_and_sensor_ticks_in_postgres(  # noqa: F811
        postgres_server, tmp_path, monkeypatch):
    from dagster._core.scheduler.instigation import InstigatorState, TickStatus
    from dagster._serdes import deserialize_value
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    db = postgres_server.create_database("embed_assets_profile")
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(PROFILE, dagster_home / "dagster.yaml")
    raw = write_jsonl(tmp_path / "raw" / "items.jsonl", sample_docs(24))
    env = {"DAGSTER_HOME": str(dagster_home),
           "EMBED_ASSETS_PG_HOST": postgres_server.host, "EMBED_ASSETS_PG_PORT": str(postgres_server.port),
           "EMBED_ASSETS_PG_USER": postgres_server.user, "EMBED_ASSETS_PG_PASSWORD": "", "EMBED_ASSETS_PG_DB": db,
           "EMBED_ASSETS_HOME": str(tmp_path / "home"), "EMBED_ASSETS_ITEMS": str(raw.parent),
           "EMBED_ASSETS_TEXT_FIELDS": "title", "EMBED_ASSETS_PARTITION_SIZE": "8",
           "EMBED_ASSETS_SEMANTIC_IDS": "0",  # 24 items: too few for a semantic-ID codebook
           "EMBED_ASSETS_PRECISION": "fp32", "OMP_NUM_THREADS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("EMBED_ASSETS_SENSOR", raising=False)  # off by default: the test turns it on

    defs = build_definitions(Settings.from_env())
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4

        assert defs.resolve_job_def("process_items_job").execute_in_process(instance=instance).success
        keys = instance.get_dynamic_partitions("item_partitions")
        assert len(keys) >= 2, keys
        first = defs.resolve_job_def("embed_shards_job").execute_in_process(instance=instance, partition_key=keys[0])
        assert first.success
        sensor = _sensor_tick(instance)

    # A second instance from the same profile: new connections, nothing cached from the first.
    with dg.DagsterInstance.from_config(str(dagster_home)) as fresh:
        runs = {r.run_id: r for r in fresh.get_runs()}
        done = sorted((r.job_name, r.status, r.tags.get("dagster/partition")) for r in runs.values()
                      if REQUEST_TAG not in r.tags)
        assert done == [("embed_shards_job", dg.DagsterRunStatus.SUCCESS, keys[0]),
                        ("process_items_job", dg.DagsterRunStatus.SUCCESS, None)]
        assert fresh.get_dynamic_partitions("item_partitions") == keys
        assert fresh.get_materialized_partitions(dg.AssetKey("item_embeddings")) == {keys[0]}
        records = fresh.fetch_materializations(dg.AssetKey("item_embeddings"), limit=10).records
        assert [r.partition_key for r in records] == [keys[0]]
        assert records[0].asset_materialization.metadata["rows"].value > 0

        # The tick: one sensor run per partition without a shard, queued (the daemon would launch them).
        [tick] = fresh.get_ticks(sensor.get_remote_origin_id(), sensor.selector_id)
        assert tick.status == TickStatus.SUCCESS, tick.error
        queued = {runs[i].tags["dagster/partition"]: runs[i] for i in tick.run_ids}
        assert sorted(queued) == keys[1:]
        assert all(r.status == dg.DagsterRunStatus.QUEUED and r.job_name == "embed_shards_job"
                   for r in queued.values())
        state = fresh.get_instigator_state(sensor.get_remote_origin_id(), sensor.selector_id)
        assert state.is_running
        assert list(json.loads(state.instigator_data.cursor)["files"]) == [str(raw)]

        # The `encoder` pool (item_embeddings' pool) got the profile's limit when the partition ran, held in
        # PostgreSQL: one slot, a second claim waits.
        assert fresh.event_log_storage.get_concurrency_info("encoder").slot_count == 1
        assert fresh.event_log_storage.claim_concurrency_slot("encoder", "run-a", "embed").is_claimed
        assert not fresh.event_log_storage.claim_concurrency_slot("encoder", "run-b", "embed").is_claimed
        fresh.event_log_storage.free_concurrency_slots_for_run("run-a")
        fresh.event_log_storage.free_concurrency_slots_for_run("run-b")

    # The same rows, read by psycopg2 on its own connection.
    conn = postgres_server.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_id, status FROM runs")
            assert dict(cur.fetchall()) == {i: r.status.value for i, r in runs.items()}
            cur.execute("SELECT partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                        "AND asset_key = %s", (json.dumps(["item_embeddings"]),))
            assert [row[0] for row in cur.fetchall()] == [keys[0]]
            cur.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'item_partitions' "
                        "ORDER BY id")
            assert [row[0] for row in cur.fetchall()] == keys
            cur.execute("SELECT status, type, tick_body FROM job_ticks WHERE selector_id = %s",
                        (sensor.selector_id,))
            [(status, kind, body)] = cur.fetchall()
            assert (status, kind) == ("SUCCESS", "SENSOR") and sorted(json.loads(body)["run_ids"]) == \
                sorted(tick.run_ids)
            cur.execute("SELECT job_body FROM jobs WHERE selector_id = %s", (sensor.selector_id,))
            [(body,)] = cur.fetchall()
            assert deserialize_value(body, InstigatorState).instigator_data.cursor == state.instigator_data.cursor
            cur.execute('SELECT "limit" FROM concurrency_limits WHERE concurrency_key = %s', ("encoder",))
            assert cur.fetchall() == [(1,)]
    finally:
        conn.close()
    # Nothing went to Dagster's default SQLite storage.
    assert not [p for p in dagster_home.rglob("*") if p.suffix in (".db", ".sqlite")]

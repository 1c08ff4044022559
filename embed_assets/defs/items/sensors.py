import json
import os

import dagster as dg

from embed_assets.core.changes import fingerprint_files, index_state, stale_partitions
from embed_assets.core.items import ItemsError
from embed_assets.defs.embeddings.partitions import row_group_partitions
from embed_assets.defs.jobs import embed_shards_job, index_and_report_job, process_items_job
from embed_assets.resources import EncoderResource, HomeResource, ItemSource

SENSOR_INTERVAL_S = int(os.environ.get("EMBED_ASSETS_SENSOR_INTERVAL_S", "30"))
SENSOR_DEFAULT = (dg.DefaultSensorStatus.RUNNING if os.environ.get("EMBED_ASSETS_SENSOR", "").lower() in ("1", "on", "true")
                  else dg.DefaultSensorStatus.STOPPED)


def _busy(context: dg.SensorEvaluationContext) -> bool:
    """A run of ours is queued or in progress: wait for it rather than act on half-updated state."""
    runs = context.instance.get_runs(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
                                        dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
                              job_name=process_items_job.name),
        limit=1,
    )
    return bool(runs)


@dg.sensor(
    jobs=[process_items_job, embed_shards_job, index_and_report_job],
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=SENSOR_DEFAULT,
)
def raw_items_sensor(context: dg.SensorEvaluationContext, home: HomeResource, items: ItemSource,
                     encoder: EncoderResource):
    """Watches the raw item files and brings everything downstream up to date.

    Each tick reconciles, in order: new or changed file contents (by checksum, not mtime) -> processed_items;
    partitions whose shard is missing or out of date -> one run each; all shards current but the index built over
    other shards -> index and report. Run keys carry content fingerprints, so a crash mid-tick or a restart
    neither loses nor repeats work; the cursor (file checksums) survives restarts.
    """
    cursor = json.loads(context.cursor) if context.cursor else {}
    try:
        files, fp = fingerprint_files(items.paths, cursor.get("files"))
    except ItemsError as e:
        return dg.SkipReason(str(e))
    layout = home.layout
    new_cursor = json.dumps({"files": files, "fingerprint": fp})

    if fp != cursor.get("fingerprint"):
        context.log.info(f"raw items changed ({len(files)} files, fingerprint {fp}); processing")
        context.update_cursor(new_cursor)
        return dg.RunRequest(run_key=f"items-{fp}", job_name=process_items_job.name)
    context.update_cursor(new_cursor)
    if _busy(context):
        return dg.SkipReason("processed_items is running; waiting for it")

    stale = stale_partitions(layout, encoder.encoder.version)
    registered = [(k, f) for k, f in stale if context.instance.has_dynamic_partition(row_group_partitions.name, k)]
    if registered:
        return [dg.RunRequest(run_key=f"{k}-{f}", job_name=embed_shards_job.name, partition_key=k)
                for k, f in registered]
    if stale:
        return dg.SkipReason(f"{len(stale)} partitions not registered yet: {[k for k, _ in stale][:5]}")

    current, shards_fp = index_state(layout)
    if not current and shards_fp:
        return dg.RunRequest(run_key=f"index-{shards_fp}", job_name=index_and_report_job.name)
    return dg.SkipReason("everything is up to date")

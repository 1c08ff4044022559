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


ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED]
FAILED = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
MAX_ATTEMPTS = 3
REQUEST_TAG = "embed_assets/request"


def _active(context: dg.SensorEvaluationContext, job_name: str, partition: str | None = None) -> bool:
    tags = {"dagster/partition": partition} if partition else None
    return bool(context.instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE, job_name=job_name, tags=tags),
                                          limit=1))


def _request(context: dg.SensorEvaluationContext, base_key: str, job_name: str,
             partition: str | None = None) -> dg.RunRequest | None:
    """A run request whose key is the content fingerprint, plus an attempt number after failures: a failed or
    killed run is retried (up to MAX_ATTEMPTS), a finished or running one is never repeated (Dagster drops a
    request whose run key was used)."""
    runs = context.instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_TAG: base_key}))
    failed = sum(r.status in FAILED for r in runs)
    if failed >= MAX_ATTEMPTS and all(r.status in FAILED for r in runs):
        context.log.warning(f"{base_key}: failed {failed} times; not retrying (fix the cause, then run it by hand)")
        return None
    key = base_key if not failed else f"{base_key}-attempt{failed + 1}"
    return dg.RunRequest(run_key=key, job_name=job_name, partition_key=partition, tags={REQUEST_TAG: base_key})


@dg.sensor(
    jobs=[process_items_job, embed_shards_job, index_and_report_job],
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=SENSOR_DEFAULT,
)
def raw_items_sensor(context: dg.SensorEvaluationContext, home: HomeResource, items: ItemSource,
                     encoder: EncoderResource):
    """Watches the raw item files and brings everything downstream up to date.

    Each tick reconciles, in order: new or changed file contents (by checksum, not mtime) -> processed_items;
    partitions whose shard is missing, out of date or corrupt -> one run each; all shards current but the index
    built over other shards -> index and report. Run keys carry content fingerprints (and a change counter), so a
    crash mid-tick or a restart neither loses nor repeats work, and failed runs are retried; the cursor (file
    checksums) survives restarts.
    """
    if _active(context, process_items_job.name):
        return dg.SkipReason("processed_items is running; waiting for it")
    cursor = json.loads(context.cursor) if context.cursor else {}
    try:
        files, fp = fingerprint_files(items.paths, cursor.get("files"))
    except ItemsError as e:
        return dg.SkipReason(str(e))
    layout = home.layout
    generation = cursor.get("generation", 0)

    if fp != cursor.get("fingerprint"):
        # The counter makes content that comes back to an earlier state (A -> B -> A) a new request.
        generation += 1
        context.update_cursor(json.dumps({"files": files, "fingerprint": fp, "generation": generation}))
        context.log.info(f"raw items changed ({len(files)} files, fingerprint {fp}); processing")
        req = _request(context, f"items-{fp}-g{generation}", process_items_job.name)
        return req or dg.SkipReason("processed_items keeps failing")
    context.update_cursor(json.dumps({"files": files, "fingerprint": fp, "generation": generation}))
    # processed_items never ran or failed for the current files: (re)request it; the attempt counter makes a new
    # key after a failure, and an identical key is dropped by Dagster if the run already exists.
    items_key = f"items-{fp}-g{generation}"
    last = context.instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_TAG: items_key}), limit=1)
    if not last or last[0].status in FAILED:
        req = _request(context, items_key, process_items_job.name)
        return req or dg.SkipReason("processed_items keeps failing for the current files")

    stale = stale_partitions(layout, encoder.encoder.version)
    ready = [(k, f) for k, f in stale if context.instance.has_dynamic_partition(row_group_partitions.name, k)
             and not _active(context, embed_shards_job.name, k)]
    requests = [r for r in (_request(context, f"{k}-{f}", embed_shards_job.name, k) for k, f in ready) if r]
    if requests:
        return requests
    if stale:
        return dg.SkipReason(f"{len(stale)} partitions not current yet (running, failing or not registered): "
                             f"{[k for k, _ in stale][:5]}")

    current, shards_fp = index_state(layout)
    if not current and shards_fp and not _active(context, index_and_report_job.name):
        req = _request(context, f"index-{shards_fp}", index_and_report_job.name)
        return req or dg.SkipReason("index_and_report_job keeps failing")
    return dg.SkipReason("everything is up to date")

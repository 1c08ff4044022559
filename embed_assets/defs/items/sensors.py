import json
import os
import time
from dataclasses import dataclass, field

import dagster as dg

from embed_assets.core.changes import PastRun, Work, fingerprint_files, next_attempt, plan
from embed_assets.core.items import ItemsError, items_config
from embed_assets.defs.embeddings.partitions import item_partitions
from embed_assets.defs.jobs import JOB_ASSETS, embed_shards_job, index_and_report_job, process_items_job
from embed_assets.resources import EncoderResource, HomeResource, ItemSource, SemanticIdSettings

SENSOR_INTERVAL_S = int(os.environ.get("EMBED_ASSETS_SENSOR_INTERVAL_S", "30"))
SENSOR_DEFAULT = (dg.DefaultSensorStatus.RUNNING if os.environ.get("EMBED_ASSETS_SENSOR", "").lower() in ("1", "on", "true")
                  else dg.DefaultSensorStatus.STOPPED)

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
REQUEST_TAG = "embed_assets/request"  # the wanted state a sensor run is for (its base key)
TARGET_TAG = "embed_assets/target"  # what it rewrites, whatever the state: items, shard:<partition>, index
REASON_TAG = "embed_assets/reason"
PARTITION_TAG = "dagster/partition"
RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")

ITEMS = dg.AssetKey("processed_items")
EMBEDDINGS = dg.AssetKey("item_embeddings")
INDEX_ASSETS = frozenset({dg.AssetKey("embedding_norms"), dg.AssetKey("faiss_index"), dg.AssetKey("retrieval_report")})
ALL_ASSETS = frozenset({ITEMS, EMBEDDINGS, *INDEX_ASSETS})
JOB_OF = {"items": process_items_job.name, "shard": embed_shards_job.name, "index": index_and_report_job.name}


@dataclass
class Busy:
    """What the active runs (any job: the sensor's, a backfill's, `__ASSET_JOB` from the UI or CLI) materialize."""

    items: str | None = None  # id of a run materializing processed_items
    all_shards: str | None = None  # a run materializing item_embeddings without one named partition
    shards: dict[str, str] = field(default_factory=dict)  # partition -> run id
    index: str | None = None  # a run materializing embedding_norms, faiss_index or retrieval_report

    @classmethod
    def of(cls, runs) -> "Busy":
        busy = cls()
        for run in runs:
            # A run launched whole (the sensor's, a backfill's) has no asset selection: its job's assets. An unknown
            # job without one could touch anything: it blocks everything while it runs.
            keys = run.asset_selection if run.asset_selection is not None else JOB_ASSETS.get(run.job_name, ALL_ASSETS)
            rid = run.run_id
            if ITEMS in keys:
                busy.items = busy.items or rid
            if EMBEDDINGS in keys:
                partition = run.tags.get(PARTITION_TAG)
                if partition and not any(t in run.tags for t in RANGE_TAGS):
                    busy.shards.setdefault(partition, rid)
                else:
                    busy.all_shards = busy.all_shards or rid
            if keys & INDEX_ASSETS:
                busy.index = busy.index or rid
        return busy

    def shard(self, partition: str) -> str | None:
        return self.shards.get(partition) or self.all_shards


def _history(context: dg.SensorEvaluationContext, keys: list[str]) -> dict[str, list[PastRun]]:
    """The sensor's earlier runs for each base key, newest first (a few queries per tick, not one per key)."""
    out: dict[str, list[PastRun]] = {k: [] for k in keys}
    for i in range(0, len(keys), 100):
        for rec in context.instance.get_run_records(filters=dg.RunsFilter(tags={REQUEST_TAG: keys[i:i + 100]})):
            base = rec.dagster_run.tags.get(REQUEST_TAG)
            if base in out:
                out[base].append(PastRun(rec.dagster_run.run_id, rec.dagster_run.status.value,
                                         rec.create_timestamp.timestamp(), rec.end_time))
    return out


def _superseded_at(context: dg.SensorEvaluationContext, work: Work, history: list[PastRun]):
    """When the work's target last ran for another state (a sensor run with another base key) or was materialized by
    a run that is not one of `history` (launched by hand, a backfill): what held the state back is over then."""
    asset = {"items": ITEMS, "shard": EMBEDDINGS, "index": dg.AssetKey("faiss_index")}[work.kind]
    mine = {r.run_id for r in history}

    def at() -> float | None:
        times = []
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset, asset_partitions=[work.partition] if work.partition else None),
            limit=1).records
        if records and records[0].run_id not in mine:
            times.append(records[0].timestamp)
        for rec in context.instance.get_run_records(filters=dg.RunsFilter(tags={TARGET_TAG: work.target}),
                                                    limit=len(mine) + 1):
            if rec.dagster_run.run_id not in mine:
                times.append(rec.create_timestamp.timestamp())
                break
        return max(times, default=None)

    return at


def _request(context: dg.SensorEvaluationContext, work: Work, history: list[PastRun],
             selection: list[dg.AssetKey] | None = None) -> tuple[dg.RunRequest | None, str]:
    attempt = next_attempt(history, time.time(), _superseded_at(context, work, history))
    if attempt.number is None:
        return None, attempt.reason
    why = work.reason + (f" ({attempt.reason})" if attempt.reason else "")
    context.log.info(f"requesting {JOB_OF[work.kind]}{f' {work.partition}' if work.partition else ''}: {why}")
    return dg.RunRequest(run_key=f"{work.key}:{attempt.number}", job_name=JOB_OF[work.kind],
                         partition_key=work.partition, asset_selection=selection,
                         tags={REQUEST_TAG: work.key, TARGET_TAG: work.target, REASON_TAG: why[:250]}), ""


@dg.sensor(
    jobs=[process_items_job, embed_shards_job, index_and_report_job],
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=SENSOR_DEFAULT,
)
def raw_items_sensor(context: dg.SensorEvaluationContext, home: HomeResource, items: ItemSource,
                     encoder: EncoderResource, sids: SemanticIdSettings):
    """Watches the raw item files and brings everything downstream to what is wanted, whatever the history.

    Each tick compares the state on disk with the wanted one (`core.changes.plan`), in order: the raw files'
    content fingerprint against the one processed_items recorded -> `process_items_job`; every row group whose
    shard is missing, out of date or fails its checksums -> one `embed_shards_job` run each; all shards current but
    the index built over other shards (or its files damaged) -> `index_and_report_job`.

    A piece of work is named by the state it wants (`items-<raw fp>`, `<partition>-<shard fp>`,
    `index-<shard-set fp>`, the run's `embed_assets/request` tag); its run key is that name plus the number of
    earlier sensor runs for it, so a state needed again (A -> B -> A, a deleted shard) gets a new key while a run in
    flight keeps its key. A run in progress is recognised by what it materializes, whatever launched it (a UI run is
    `__ASSET_JOB`). A cancelled run is not retried until its inputs change; a failing one up to 3 times. The cursor
    only caches the raw files' checksums by stat, so unchanged files are not hashed again.
    """
    # Active runs first, disk second: a run seen finished here wrote its files before it finished, so the disk read
    # below sees them; a run still active blocks its work. The other order could request a duplicate.
    busy = Busy.of(context.instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE)))
    if busy.items:
        return dg.SkipReason(f"processed_items is being materialized by run {busy.items[:8]}; waiting for it")
    cursor = json.loads(context.cursor) if context.cursor else {}
    config = items_config(items.id_field, items.text_fields, items.title_field, items.partition_size, items.limits)
    try:
        files, source_fp = fingerprint_files(items.paths, config, cursor.get("files"))
    except ItemsError as e:
        return dg.SkipReason(str(e))
    if files != cursor.get("files"):
        context.update_cursor(json.dumps({"files": files}))
    registered = set(context.instance.get_dynamic_partitions(item_partitions.name))
    p = plan(home.layout, source_fp, encoder.encoder.version, registered, semantic_ids=sids.enabled)
    notes: list[str] = []

    if p.items:
        req, why = _request(context, p.items, _history(context, [p.items.key])[p.items.key])
        if req:
            return [req]
        # Cannot run processed_items now (cancelled, failing): still repair shards and index of what is processed.
        notes.append(f"processed_items ({p.items.reason}): {why}")

    waiting = []
    for w in p.shards:
        run = busy.shard(w.partition)
        if run:
            waiting.append((w, f"being materialized by run {run[:8]}"))
        elif w.partition not in registered:
            waiting.append((w, "not a registered partition yet (processed_items registers it)"))
        else:
            waiting.append((w, None))
    todo = [w for w, why in waiting if why is None]
    history = _history(context, [w.key for w in todo])
    requests = []
    for w, why in waiting:
        if why is None:
            req, why = _request(context, w, history[w.key])
            if req:
                requests.append(req)
                continue
        notes.append(f"{w.partition} ({w.reason}): {why}")
    if requests:
        for n in notes:
            context.log.info(n)
        return requests
    if p.shards:
        return dg.SkipReason(f"{len(p.shards)} partitions not current: " + "; ".join(notes[:10]))

    if p.index:
        run = busy.index or busy.all_shards or next(iter(busy.shards.values()), None)
        if run:
            notes.append(f"index ({p.index.reason}): waiting for run {run[:8]} (index or shards in progress)")
        else:
            # semantic IDs switched off (a catalog too small for them): the index job without that asset
            selection = None if sids.enabled else sorted(
                JOB_ASSETS[index_and_report_job.name] - {dg.AssetKey("semantic_ids")}, key=str)
            req, why = _request(context, p.index, _history(context, [p.index.key])[p.index.key], selection)
            if req:
                return [req]
            notes.append(f"index ({p.index.reason}): {why}")
    if notes:
        return dg.SkipReason("; ".join(notes))
    return dg.SkipReason("everything is up to date")

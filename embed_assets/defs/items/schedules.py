import os

import dagster as dg

from embed_assets.defs.jobs import process_items_job

# Off by default: turn it on in the UI (Automation) or with EMBED_ASSETS_REFRESH=on; the cron comes from
# EMBED_ASSETS_REFRESH_CRON (default 02:00 every day, in the instance's timezone).
REFRESH_CRON = os.environ.get("EMBED_ASSETS_REFRESH_CRON", "0 2 * * *")
REFRESH_DEFAULT = (dg.DefaultScheduleStatus.RUNNING if os.environ.get("EMBED_ASSETS_REFRESH", "").lower()
                   in ("1", "on", "true") else dg.DefaultScheduleStatus.STOPPED)

refresh_schedule = dg.ScheduleDefinition(
    name="refresh_schedule",
    job=process_items_job,
    cron_schedule=REFRESH_CRON,
    default_status=REFRESH_DEFAULT,
    description="The seeds' cadence: re-reads the raw items on a schedule (processed_items re-writes only the "
                "partitions whose items changed); `raw_items_sensor` then brings the changed shards, the index, the "
                "report and the semantic IDs up to date. Off by default.",
)

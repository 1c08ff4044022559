"""Encode one partition of `item_embeddings` outside the orchestrator, through Dagster Pipes.

    python -m embed_assets.pipes.encode_partition     (started by PipesSubprocessClient or PipesK8sClient)

It reads its parameters from the Pipes context (the partition key; extras "home", "encoder", "reuse"), runs the
same `embed_partition` the in-process path runs (skip when current, re-use unchanged vectors, encode the rest, write
the shard, its items sidecar and its manifest atomically under the partition lock), streams progress through the
Pipes log, and reports what it did (`outcome_message`); the orchestrator turns that into the same metadata as the
in-process path.

What it does not do: write the catalog. The orchestrator records the shard after this process returns
(`embed_assets.defs.embeddings.pipes`), so a pod needs HOME's files (processed partitions, embeddings/) but never
writes HOME/catalog.duckdb; it only reads it, best effort, to re-use vectors of texts duplicated in other partitions
(a missing or busy catalog skips that: those texts are encoded instead). Bad input (ItemsError, ShardError) is sent
back as a custom message {"failure": "..."} so the orchestrator fails the step with the same message as in-process.

Cost at 10M items (50 partitions of 200,000): per partition, on top of the encoding itself, one process (or pod)
start, one model load and, with precision auto, one precision probe unless its verdict is cached on that machine (a
fresh pod has no cache: set EMBED_ASSETS_PRECISION_PROBE_CACHE to a path on a shared volume); the Pipes messages are
a progress line every 10 s and one materialization, nothing that grows with the items.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any

from embed_assets.core.embed import EmbedOutcome
from embed_assets.core.metering import Usage

ENCODER_FIELDS = ("model_path", "max_seq_length", "device", "precision", "probe_precision", "token_budget",
                  "num_threads", "chunking")


def outcome_message(out: EmbedOutcome, usage: Usage, precision_probe: dict | None) -> dict[str, Any]:
    """What this process tells the orchestrator about the partition (a Pipes custom message, plain JSON): the counts,
    the encode statistics, this process's seconds / CPU / peak RSS and the precision verdict. The orchestrator reads
    the manifest from HOME itself and builds the metadata with the same function as the in-process path
    (`defs.metadata.shard_metadata`), so the two paths cannot report different keys or types."""
    return {"outcome": {"skipped": out.skipped, "fetched": out.fetched, "n_encoded": out.n_encoded,
                        "n_reused": out.n_reused, "seconds": out.seconds, "stats": asdict(out.stats),
                        "usage": usage.as_metadata(), "precision_probe": precision_probe or {}}}


class _ToPipesLog(logging.Handler):
    """The package's own log records (the precision verdict, out-of-memory splits) go to the Dagster run's log."""

    def __init__(self, pipes_log: logging.Logger) -> None:
        super().__init__(level=logging.INFO)
        self._pipes_log = pipes_log

    def emit(self, record: logging.LogRecord) -> None:
        self._pipes_log.log(record.levelno, f"{record.name}: {record.getMessage()}")


def encode(pipes) -> None:
    """The body, given an open Pipes context."""
    from embed_assets.core.embed import embed_partition
    from embed_assets.core.encoder import Encoder
    from embed_assets.core.items import ItemsError
    from embed_assets.core.layout import Layout
    from embed_assets.core.metering import metered
    from embed_assets.core.shards import ShardError

    extras = pipes.extras
    missing = [k for k in ("home", "encoder") if k not in extras]
    if missing:
        raise ValueError(f"Pipes extras lack {missing}: start this module from item_embeddings (runner subprocess "
                         "or k8s), which passes HOME and the encoder settings")
    key = pipes.partition_key
    cfg = extras["encoder"]
    unknown = sorted(set(cfg) - set(ENCODER_FIELDS))
    if unknown:
        raise ValueError(f"encoder extras {unknown} are not encoder settings ({', '.join(ENCODER_FIELDS)})")
    layout = Layout.at(extras["home"])
    if not layout.home.is_dir():
        raise FileNotFoundError(f"HOME {layout.home} does not exist in this process's file system: mount the "
                                "orchestrator's HOME here (K8s: encode_compute.k8s.home_claim / home)")
    kwargs = {("probe" if k == "probe_precision" else k): v for k, v in cfg.items()}
    encoder = Encoder(**kwargs)
    pipes.log.info(f"{key}: encoding in an external process (pid {os.getpid()}, HOME {layout.home}, "
                   f"device {cfg.get('device')}, precision {cfg.get('precision')})")
    with metered() as usage:
        try:
            out = embed_partition(layout, key, encoder, say=pipes.log.info, reuse=bool(extras.get("reuse", True)),
                                  record=False)
        except (ItemsError, ShardError) as e:
            pipes.log.error(str(e))
            pipes.report_custom_message({"failure": str(e)})
            return
    m = out.manifest
    pipes.report_custom_message(outcome_message(out, usage, encoder.precision_probe))
    # the shard this process wrote: the orchestrator checks its own HOME holds exactly this one
    pipes.report_asset_materialization(metadata={"sha256": {"raw_value": m.shard_sha256, "type": "text"},
                                                 "fingerprint": {"raw_value": m.fingerprint, "type": "text"}},
                                       data_version=m.fingerprint)


def main() -> None:
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        handler = _ToPipesLog(pipes.log)
        package_log = logging.getLogger("embed_assets")
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
        try:
            encode(pipes)
        finally:
            package_log.removeHandler(handler)


if __name__ == "__main__":
    main()

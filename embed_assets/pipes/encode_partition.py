"""Encode one partition of `item_embeddings` outside the orchestrator, through Dagster Pipes.

    python -m embed_assets.pipes.encode_partition     (started by PipesSubprocessClient or PipesK8sClient)

It reads its parameters from the Pipes context (the partition key; extras "home", "encoder", "reuse"), runs the
same `embed_partition` the in-process path runs (skip when current, re-use unchanged vectors, encode the rest, write
the shard, its items sidecar and its manifest atomically under the partition lock), streams progress through the
Pipes log, and reports the materialization metadata the in-process path records (`materialization_metadata`).

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
from typing import Any

from embed_assets.core.embed import EmbedOutcome
from embed_assets.core.metering import Usage

ENCODER_FIELDS = ("model_path", "max_seq_length", "device", "precision", "probe_precision", "token_budget",
                  "num_threads", "chunking")


def materialization_metadata(out: EmbedOutcome, usage: Usage, precision_probe: dict | None) -> dict[str, dict]:
    """The `item_embeddings` metadata as Pipes typed values ({"raw_value", "type"}): the keys and types the
    in-process path records, except `cataloged` and `path`, which the orchestrator adds (it records the catalog row,
    and its HOME path is the one users open)."""
    m, s = out.manifest, out.stats

    def typed(kind: str, value: Any) -> dict:
        return {"raw_value": value, "type": kind}

    meta = {
        "rows": typed("int", m.n_rows),
        "n_encoded": typed("int", out.n_encoded),
        "n_reused": typed("int", out.n_reused),
        "skipped_unchanged": typed("bool", out.skipped),
        "n_unique_texts_encoded": typed("int", s.n_unique),
        "n_truncated_texts": typed("int", s.n_truncated),
        "n_chunked_texts": typed("int", s.n_chunked),
        "items_per_s": typed("float", round(s.items_per_s, 2)),
        "tokens_per_s": typed("float", round(s.tokens_per_s, 1)),
        "encode_seconds": typed("float", round(s.seconds, 3)),
        **{k: typed("float", float(v)) for k, v in usage.as_metadata().items()},
        "padding_overhead": typed("float", round(s.n_padded_tokens / s.n_tokens - 1, 4) if s.n_tokens else 0.0),
        "model_id": typed("text", m.model_id),
        "model_revision": typed("text", m.model_revision),
        "max_seq_length": typed("int", m.max_seq_length),
        "dim": typed("int", m.dim),
        "dtype": typed("text", m.dtype),
        "precision": typed("text", m.precision or "n/a (nothing encoded)"),
        "precision_probe": typed("json", (precision_probe or {}) if out.n_encoded else {}),
        "fingerprint": typed("text", m.fingerprint),
        "sha256": typed("text", m.shard_sha256),
        "bytes": typed("int", m.shard_bytes),
        **{f"norm_{k}": typed("float", float(v)) for k, v in m.norms.items()},
    }
    return meta


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
    pipes.report_asset_materialization(metadata=materialization_metadata(out, usage, encoder.precision_probe),
                                       data_version=out.manifest.fingerprint)


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

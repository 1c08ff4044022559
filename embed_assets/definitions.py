"""The one Definitions object: `dagster dev` (workspace.yaml) loads `defs`; the CLI and tests build their own."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from embed_assets.defs.embeddings.assets import embedding_norms, item_embeddings
from embed_assets.defs.embeddings.checks import all_norms_within_tolerance, shard_norm_check
from embed_assets.defs.evaluation.assets import retrieval_report
from embed_assets.defs.evaluation.checks import retrieval_quality_check
from embed_assets.defs.index.assets import faiss_index
from embed_assets.defs.items.assets import processed_items
from embed_assets.defs.items.schedules import refresh_schedule
from embed_assets.defs.items.sensors import raw_items_sensor
from embed_assets.defs.jobs import JOBS
from embed_assets.defs.semantic_ids.assets import semantic_ids
from embed_assets.defs.semantic_ids.checks import semantic_id_checks
from embed_assets.resources import (EncodeCompute, EncoderResource, EvalSettings, HomeResource, ItemSource,
                                    K8sEncodeConfig, QualityThresholds, SemanticIdSettings)
from embed_assets.settings import Settings

ASSETS = [processed_items, item_embeddings, embedding_norms, faiss_index, retrieval_report, semantic_ids]
CHECKS = [shard_norm_check, all_norms_within_tolerance, retrieval_quality_check, semantic_id_checks]


def build_resources(s: Settings) -> dict[str, dg.ConfigurableResource]:
    thresholds = {k: v for k, v in {
        "norm_tolerance": s.norm_tolerance, "min_ndcg_at_10": s.min_ndcg_at_10,
        "min_recall_at_100": s.min_recall_at_100, "min_ann_recall_at_10": s.min_ann_recall_at_10,
    }.items() if v is not None}
    return {
        "home": HomeResource(path=str(Path(s.home).resolve()), base_uri=s.base_uri),
        "items": ItemSource(paths=[str(Path(p).resolve()) for p in s.items], id_field=s.id_field,
                            text_fields=s.text_fields, partition_size=s.partition_size,
                            memory_budget_mb=s.memory_budget_mb),
        "encoder": EncoderResource(chunking=s.chunking, device=s.device, precision=s.precision),
        "encode_compute": EncodeCompute(runner=s.encode_runner, k8s=K8sEncodeConfig(**s.k8s)),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        "retrieval": EvalSettings(queries_path=s.queries, qrels_path=s.qrels, index_kind=s.index_kind),
        "thresholds": QualityThresholds(**thresholds),
        "sids": SemanticIdSettings(enabled=s.semantic_ids, quantizer=s.sid_quantizer, levels=s.sid_levels,
                                   codebook_size=s.sid_codebook_size),
    }


def build_executor(s: Settings) -> dg.ExecutorDefinition | None:
    """EMBED_ASSETS_EXECUTOR: "default" (None: Dagster's multiprocess executor) or "k8s_job" (every step its own
    Kubernetes Job, needs dagster-k8s and the K8sRunLauncher), configured from the same EMBED_ASSETS_K8S_* settings
    as the Pipes pod: HOME's volume on every step, the GPU pool for the item_embeddings step."""
    if s.executor in ("", "default", "multiprocess"):
        return None
    if s.executor != "k8s_job":
        raise ValueError(f"EMBED_ASSETS_EXECUTOR={s.executor!r}: use default or k8s_job")
    from embed_assets.defs.embeddings.pipes import import_dagster_k8s, k8s_executor_config

    executor = import_dagster_k8s("EMBED_ASSETS_EXECUTOR=k8s_job").k8s_job_executor
    config = k8s_executor_config(K8sEncodeConfig(**s.k8s), str(Path(s.home).resolve()))
    return executor.configured(config) if config else executor


def build_definitions(s: Settings, encoder_resource: dg.ConfigurableResource | None = None) -> dg.Definitions:
    resources = build_resources(s)
    if encoder_resource is not None:
        resources["encoder"] = encoder_resource
    return dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=JOBS, sensors=[raw_items_sensor],
                          schedules=[refresh_schedule], executor=build_executor(s),
                          resources=resources)


defs = build_definitions(Settings.from_env())


def get_embed_shards_job() -> dg.JobDefinition:
    """Out-of-process entry point (`dg.reconstructable`, multiprocess executor): the job built from the environment,
    so every step process rebuilds the same definitions."""
    return build_definitions(Settings.from_env()).resolve_job_def("embed_shards_job")

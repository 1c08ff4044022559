"""`item_embeddings` encoded outside the step's process, through Dagster Pipes: a subprocess (tests, one big machine)
or a Kubernetes pod on a GPU node pool (`EncodeCompute.runner`, env EMBED_ASSETS_ENCODE_RUNNER).

Who does what:
- the external process (`python -m embed_assets.pipes.encode_partition`) runs `embed_partition` as the in-process
  path does (shard, items sidecar and manifest written atomically under the partition lock) with `record=False`, and
  reports the materialization metadata;
- this process then checks that the manifest on *its* HOME is the shard the external step reported (a pod that wrote
  into another volume fails here, loudly), records it in the catalog with the same `record_outcome` the in-process path
  uses, and builds the metadata from the reported outcome with the in-process path's function (`shard_metadata`). The DuckDB file is written by the orchestrator
  only, as before; the shard check (`shard_norm_check`) runs here too, as a separate step.

Also here: the pod spec for `PipesK8sClient` and the `k8s_job_executor` config (`k8s_executor_config`), both built
from `K8sEncodeConfig`, and both needing the dagster-k8s package, imported only when asked for.
"""

from __future__ import annotations

import sys
from typing import Any

import dagster as dg

from embed_assets.core.embed import EmbedOutcome, record_outcome
from embed_assets.core.encoder import EncodeStats
from embed_assets.core.shards import ShardError, read_manifest
from embed_assets.defs.metadata import shard_metadata
from embed_assets.pipes.encode_partition import ENCODER_FIELDS
from embed_assets.resources import EncodeCompute, EncoderResource, HomeResource, K8sEncodeConfig

MODULE = "embed_assets.pipes.encode_partition"
# dagster-k8s releases pair with dagster's: 0.29.x with 1.13.x (as dagster-postgres 0.29.27 with dagster 1.13.27).
K8S_INSTALL = "pip install dagster-k8s==0.29.27"
HOME_VOLUME = "embed-assets-home"


def import_dagster_k8s(what: str):
    """dagster_k8s, or an error that says which setting needs it and how to install it."""
    try:
        import dagster_k8s
    except ImportError as e:
        raise ImportError(f"{what} needs the dagster-k8s package, which is not installed here: {K8S_INSTALL} (the "
                          "release that matches dagster 1.13.27) in the orchestrator's environment, or switch it "
                          "back") from e
    return dagster_k8s


def encoder_extras(encoder: EncoderResource) -> dict[str, Any]:
    """The encoder settings the external process builds its `Encoder` from (the resource's own fields)."""
    return {f: getattr(encoder, f) for f in ENCODER_FIELDS}


def encode_externally(context: dg.AssetExecutionContext, home: HomeResource, encoder: EncoderResource,
                      compute: EncodeCompute, subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """One partition through Dagster Pipes; returns what the in-process path returns (same metadata keys and types)."""
    from embed_assets.core.encoder import Encoder

    runner = compute.checked_runner()
    if not isinstance(encoder.encoder, Encoder):
        raise dg.Failure(description=f"encode_compute.runner {runner!r} builds the real encoder in the external "
                                     f"process from the encoder settings; the configured encoder is "
                                     f"{type(encoder.encoder).__name__}, which only runs in_process")
    extras = {"home": str(home.layout.home), "encoder": encoder_extras(encoder), "reuse": encoder.reuse}
    if runner == "subprocess":
        invocation = subprocess_client.run(context=context, extras=extras,
                                           command=compute.command or [sys.executable, "-m", MODULE])
    else:
        invocation = run_in_k8s(context, compute, {**extras, "home": compute.k8s.home or extras["home"]})
    return finish(context, home, invocation)


def finish(context: dg.AssetExecutionContext, home: HomeResource,
           invocation: dg.PipesClientCompletedInvocation) -> dg.MaterializeResult:
    """Fail as the in-process path fails on bad input; else check the shard is on this HOME, catalog it, merge."""
    failures = [m["failure"] for m in invocation.get_custom_messages() if isinstance(m, dict) and "failure" in m]
    if failures:
        raise dg.Failure(description=failures[0])
    result = invocation.get_materialize_result(implicit_materialization=False)
    reported = dict(result.metadata or {})
    key = context.partition_key
    layout = home.layout
    try:
        m = read_manifest(layout, key)
    except ShardError as e:
        raise dg.Failure(description=str(e)) from e
    sha, fp = reported["sha256"].value, reported["fingerprint"].value
    if m is None or (m.shard_sha256, m.fingerprint) != (sha, fp):
        on_disk = "no manifest" if m is None else f"sha256 {m.shard_sha256[:12]}…, fingerprint {m.fingerprint}"
        raise dg.Failure(description=(
            f"{key}: the external encode step reported shard sha256 {sha[:12]}…, fingerprint {fp}, but "
            f"{layout.shard_manifest(key)} here has {on_disk}. The external process wrote into another HOME (K8s: "
            "encode_compute.k8s.home / home_claim must mount this HOME), or another run rewrote the partition "
            "meanwhile; re-materialize the partition"))
    outcomes = [x["outcome"] for x in invocation.get_custom_messages() if isinstance(x, dict) and "outcome" in x]
    if not outcomes:
        raise dg.Failure(description=f"{key}: the external encode step reported no outcome (an older "
                         f"{MODULE} in the image?); rebuild the image from this version")
    o = outcomes[-1]
    out = EmbedOutcome(m, skipped=bool(o["skipped"]), n_encoded=int(o["n_encoded"]), n_reused=int(o["n_reused"]),
                       stats=EncodeStats(**o["stats"]), seconds=float(o["seconds"]), fetched=bool(o["fetched"]))
    out = record_outcome(layout, out, say=context.log.info)
    metadata = shard_metadata(layout, out, o["usage"], o["precision_probe"])
    return dg.MaterializeResult(metadata=metadata, data_version=result.data_version,
                                check_results=result.check_results, tags=result.tags)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`: nested dicts merge, anything else (lists included) is replaced."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resources(cfg: K8sEncodeConfig) -> dict[str, dict[str, str]]:
    limits = {cfg.gpu_resource: str(cfg.gpus)} if cfg.gpus else {}
    requests = {}
    if cfg.cpu:
        requests["cpu"] = cfg.cpu
    if cfg.memory:
        requests["memory"] = limits["memory"] = cfg.memory
    return {k: v for k, v in (("limits", limits), ("requests", requests)) if v}


def _home_volume(cfg: K8sEncodeConfig, home: str) -> tuple[list[dict], list[dict]]:
    if not cfg.home_claim:
        return [], []
    return ([{"name": HOME_VOLUME, "persistent_volume_claim": {"claim_name": cfg.home_claim}}],
            [{"name": HOME_VOLUME, "mount_path": cfg.home or home}])


def k8s_pod_spec(cfg: K8sEncodeConfig, home: str) -> dict[str, Any]:
    """The `base_pod_spec` for PipesK8sClient (snake_case k8s fields): one container with the GPU limit, the node
    selector and tolerations of the GPU pool, HOME mounted from its claim, then `cfg.pod_spec` merged over it."""
    container: dict[str, Any] = {"name": "encode"}
    resources = _resources(cfg)
    if resources:
        container["resources"] = resources
    volumes, mounts = _home_volume(cfg, home)
    if mounts:
        container["volume_mounts"] = mounts
    spec: dict[str, Any] = {"containers": [container], "restart_policy": "Never"}
    if volumes:
        spec["volumes"] = volumes
    if cfg.node_selector:
        spec["node_selector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        spec["tolerations"] = [dict(t) for t in cfg.tolerations]
    if cfg.service_account:
        spec["service_account_name"] = cfg.service_account
    return _merge(spec, dict(cfg.pod_spec))


def run_in_k8s(context: dg.AssetExecutionContext, compute: EncodeCompute,
               extras: dict[str, Any]) -> dg.PipesClientCompletedInvocation:
    cfg = compute.k8s
    try:
        dagster_k8s = import_dagster_k8s("encode_compute.runner 'k8s' (EMBED_ASSETS_ENCODE_RUNNER=k8s)")
    except ImportError as e:
        raise dg.Failure(description=str(e)) from e
    if not cfg.image:
        raise dg.Failure(description="encode_compute.runner is 'k8s' but encode_compute.k8s.image is not set "
                                     "(EMBED_ASSETS_K8S_IMAGE): the image with this project installed")
    client_args = {k: v for k, v in (("load_incluster_config", cfg.load_incluster_config),
                                     ("kubeconfig_file", cfg.kubeconfig_file)) if v is not None}
    client = dagster_k8s.PipesK8sClient(poll_interval=cfg.poll_interval, **client_args)
    context.log.info(f"{context.partition_key}: encoding in a pod of image {cfg.image} "
                     f"(namespace {cfg.namespace or 'current'}, {cfg.gpus} x {cfg.gpu_resource}, "
                     f"node selector {dict(cfg.node_selector) or 'none'})")
    return client.run(context=context, extras=extras, image=cfg.image,
                      command=compute.command or ["python", "-m", MODULE], namespace=cfg.namespace,
                      env=dict(cfg.env) or None, base_pod_spec=k8s_pod_spec(cfg, extras["home"]))


def k8s_executor_config(cfg: K8sEncodeConfig, home: str, step: str = "item_embeddings") -> dict[str, Any]:
    """Config for `dagster_k8s.k8s_job_executor` (every step its own Kubernetes Job; needs the K8sRunLauncher):
    every step pod mounts HOME from `home_claim`; the `item_embeddings` step gets the GPU pool (node selector,
    tolerations, GPU limit, requests). Image and namespace default to the run launcher's when unset."""
    config: dict[str, Any] = {}
    if cfg.image:
        config["job_image"] = cfg.image
    if cfg.namespace:
        config["job_namespace"] = cfg.namespace
    volumes, mounts = _home_volume(cfg, home)
    if volumes:
        config["volumes"], config["volume_mounts"] = volumes, mounts
    step_config: dict[str, Any] = {}
    resources = _resources(cfg)
    if resources:
        step_config["container_config"] = {"resources": resources}
    pod: dict[str, Any] = {}
    if cfg.node_selector:
        pod["node_selector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        pod["tolerations"] = [dict(t) for t in cfg.tolerations]
    if pod:
        step_config["pod_spec_config"] = pod
    if step_config:
        config["per_step_k8s_config"] = {step: step_config}
    return config

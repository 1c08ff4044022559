from typing import Any, Optional

import dagster as dg

RUNNERS = ("in_process", "subprocess", "k8s")


class K8sEncodeConfig(dg.Config):
    """The pod an `item_embeddings` partition is encoded in when `EncodeCompute.runner` is "k8s" (Dagster Pipes,
    `dagster_k8s.PipesK8sClient`), and the GPU the `k8s_job_executor` gives the `item_embeddings` step. Needs the
    dagster-k8s package in the orchestrator's environment; the image needs this project installed (no dagster
    webserver or daemon, only `python -m embed_assets.pipes.encode_partition` and its imports)."""

    image: Optional[str] = None  # the project's image (same code and model package as the orchestrator)
    namespace: Optional[str] = None  # default: the orchestrator's own namespace in-cluster, else "default"
    node_selector: dict[str, str] = {}  # the GPU node pool, e.g. {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    tolerations: list[dict[str, Any]] = []  # raw k8s tolerations, for a tainted GPU pool
    gpus: int = 1  # requested as `gpu_resource` limits; 0 runs the pod on CPU
    gpu_resource: str = "nvidia.com/gpu"
    cpu: Optional[str] = None  # container requests, e.g. "4" and "16Gi"
    memory: Optional[str] = None
    # HOME inside the pod: a ReadWriteMany volume shared with the orchestrator. `home_claim` mounts that
    # PersistentVolumeClaim at `home` (default: the orchestrator's HOME path, so both see the same paths).
    home: Optional[str] = None
    home_claim: Optional[str] = None
    service_account: Optional[str] = None
    env: dict[str, str] = {}  # extra environment variables for the encode container
    pod_spec: dict[str, Any] = {}  # raw PodSpec fields (snake_case or camelCase) merged over the ones built above
    load_incluster_config: Optional[bool] = None  # PipesK8sClient's: None detects it
    kubeconfig_file: Optional[str] = None
    poll_interval: float = 10.0  # seconds between k8s API polls while the pod starts and runs


class EncodeCompute(dg.ConfigurableResource):
    """Where an `item_embeddings` partition is encoded.

    - "in_process" (default): in the step's own process, as always.
    - "subprocess": a child process through Dagster Pipes (`dg.PipesSubprocessClient`, the
      `pipes_subprocess_client` resource) running `python -m embed_assets.pipes.encode_partition`; what tests use.
    - "k8s": a Kubernetes pod on a GPU node pool through Dagster Pipes (`dagster_k8s.PipesK8sClient`), shaped by `k8s`.

    The external step writes the shard (all three files, atomically, under the partition lock) with the same core
    function as in-process; the orchestrator then records it in the catalog (the external process never opens the
    DuckDB file for writing) and reports the same materialization metadata."""

    runner: str = "in_process"  # in_process | subprocess | k8s ($EMBED_ASSETS_ENCODE_RUNNER)
    # the external command; default: this interpreter (subprocess) or `python` (k8s) with -m embed_assets.pipes...
    command: Optional[list[str]] = None
    k8s: K8sEncodeConfig = K8sEncodeConfig()

    def checked_runner(self) -> str:
        if self.runner not in RUNNERS:
            raise dg.Failure(description=f"encode_compute.runner is {self.runner!r}; use one of {', '.join(RUNNERS)} "
                                         "(env EMBED_ASSETS_ENCODE_RUNNER)")
        return self.runner

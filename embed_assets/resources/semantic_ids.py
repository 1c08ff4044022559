import dagster as dg

from embed_assets.core.rqvae import RqVaeConfig
from embed_assets.core.semantic_ids import SidConfig


class SemanticIdSettings(dg.ConfigurableResource):
    """How semantic IDs are built (see embed_assets/core/semantic_ids.py): the quantizer, its size, the training
    sample, when to retrain, and whether low codebook utilization blocks (default: it warns)."""

    enabled: bool = True  # False: `embed-assets run` and the sensor leave semantic_ids out (a catalog too small
    # for them, under 2 x 39 distinct vectors); materializing it by hand still builds it
    quantizer: str = "rq_kmeans"  # rq_kmeans (faiss k-means per level) or rqvae (torch, the TIGER recipe)
    levels: int = 3
    codebook_size: int = 256
    train_sample: int = 65_536
    seed: int = 0
    small_catalog: str = "shrink"  # shrink: a smaller K, recorded; error: stop and say what to set
    drift_threshold: float = 1.25  # the catalog's reconstruction error over its error at training (drift_test)
    min_utilization: float = 0.8
    utilization_blocks: bool = False  # True: the utilization check fails the run (ERROR) instead of warning
    neighbour_queries: int = 500
    rqvae_steps: int = 3000
    rqvae_device: str = "auto"
    threads: int = 0
    keep_versions: int = 5

    def config(self) -> SidConfig:
        return SidConfig(quantizer=self.quantizer, levels=self.levels, codebook_size=self.codebook_size,
                         train_sample=self.train_sample, seed=self.seed, small_catalog=self.small_catalog,
                         drift_threshold=self.drift_threshold, min_utilization=self.min_utilization,
                         neighbour_queries=self.neighbour_queries, threads=self.threads,
                         keep_versions=self.keep_versions,
                         rqvae=RqVaeConfig(steps=self.rqvae_steps, device=self.rqvae_device))

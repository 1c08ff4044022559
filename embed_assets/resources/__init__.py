"""Small typed resources: where HOME is, what the raw items are, how to encode, how to evaluate, how to build
semantic IDs."""

from embed_assets.resources.compute import EncodeCompute, K8sEncodeConfig
from embed_assets.resources.encoder import EncoderResource
from embed_assets.resources.evaluation import EvalSettings, QualityThresholds
from embed_assets.resources.home import HomeResource
from embed_assets.resources.items import ItemSource
from embed_assets.resources.semantic_ids import SemanticIdSettings

__all__ = ["EncodeCompute", "EncoderResource", "EvalSettings", "HomeResource", "ItemSource", "K8sEncodeConfig",
           "QualityThresholds", "SemanticIdSettings"]

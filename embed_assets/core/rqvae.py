"""RQ-VAE quantizer (TIGER, Rajput et al. 2023), in torch, CPU or GPU.

An MLP encoder maps each item vector to a small latent (384 -> 512 -> 256 -> 128 -> 32 by default), `levels`
codebooks of `codebook_size` codes quantize the latent residually (level l quantizes what levels < l left), and a
mirrored MLP decoder reconstructs the item vector from the sum of the chosen codes. Training follows the paper:
codebooks initialised by k-means on the first batch's residuals, straight-through estimator through the
quantizer, loss = reconstruction + sum over levels of (||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2), beta = 0.25,
for a fixed step budget. Codes that no batch chose for `dead_code_window` steps are re-seeded from the current
batch's residuals (a common guard against codebook collapse; TIGER reports >= 80% codebook usage).

Pure torch + numpy (no faiss), so it runs wherever torch does. torch is imported inside functions only.
Used through `embed_assets.core.semantic_ids` (quantizer="rqvae"); nothing here writes outside a given folder.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embed_assets.core.threads import scoped_threads


@dataclass(frozen=True)
class RqVaeConfig:
    """RQ-VAE settings. The defaults are the paper's architecture; `steps` is the training budget."""

    hidden: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    beta: float = 0.25
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
    kmeans_iters: int = 20
    dead_code_window: int = 200  # steps; 0 turns re-seeding off
    cpu_threads: int = 1  # torch threads while training/encoding on CPU (0: torch's default). This MLP's ops are
    # small: on 2 busy cores 1 thread trained 5-10x faster than 2 (OpenMP threads spinning against other processes)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RqVaeConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"RQ-VAE device {requested!r} asked for, but torch sees no CUDA device; use device='cpu' "
                           "or 'auto'")
    return requested


@contextmanager
def _threads(device: str, n: int):
    import torch

    with scoped_threads(torch.get_num_threads, torch.set_num_threads, n if device.startswith("cpu") else 0):
        yield


def _mlp(sizes: list[int]):
    import torch.nn as nn

    layers: list = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _build_module(dim: int, levels: int, codebook_size: int, cfg: RqVaeConfig):
    import torch
    import torch.nn as nn

    class _RqVae(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = _mlp([dim, *cfg.hidden, cfg.latent_dim])
            self.decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden), dim])
            self.codebooks = nn.Parameter(torch.zeros(levels, codebook_size, cfg.latent_dim))

        def quantize(self, z):
            """Residual quantization of z: codes (n, L), per-level chosen codewords (L tensors), residuals (L)."""
            residual = z
            codes, chosen, residuals = [], [], []
            for level in range(self.codebooks.shape[0]):
                book = self.codebooks[level]
                dist = (residual.pow(2).sum(1, keepdim=True) - 2 * residual @ book.T + book.pow(2).sum(1)[None, :])
                idx = dist.argmin(dim=1)
                e = book[idx]
                codes.append(idx)
                chosen.append(e)
                residuals.append(residual)
                residual = residual - e.detach()
            return torch.stack(codes, dim=1), chosen, residuals

    return _RqVae()


def _kmeans_torch(x, k: int, iters: int, gen):
    """Plain Lloyd k-means in torch (init: k distinct random points); empty clusters take the farthest points."""
    import torch

    n = x.shape[0]
    perm = torch.randperm(n, generator=gen, device="cpu")[:k].to(x.device)
    c = x[perm].clone()
    if n < k:  # fewer points than codes: repeat points, jittered (the caller checked the sample size)
        c = x[torch.randint(0, n, (k,), generator=gen, device="cpu").to(x.device)].clone()
        c += 1e-4 * torch.randn(c.shape, generator=gen, device="cpu").to(x.device)
    for _ in range(iters):
        d = x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None, :]
        a = d.argmin(1)
        counts = torch.bincount(a, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, a, x)
        nonempty = counts > 0
        c[nonempty] = sums[nonempty] / counts[nonempty, None]
        empty = (~nonempty).nonzero().flatten()
        if len(empty):
            far = d.gather(1, a[:, None]).flatten().argsort(descending=True)[: len(empty)]
            c[empty] = x[far]
    return c


class RqVaeQuantizer:
    """A trained RQ-VAE: `encode` gives codes, reconstructions and per-level errors in the input space."""

    kind = "rqvae"

    def __init__(self, module, dim: int, levels: int, codebook_size: int, cfg: RqVaeConfig,
                 training: dict[str, Any] | None = None) -> None:
        self.module = module
        self.dim = dim
        self.levels = levels
        self.codebook_size = codebook_size
        self.cfg = cfg
        self.training = training or {}

    # -- training ---------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, x: np.ndarray, levels: int, codebook_size: int, cfg: RqVaeConfig = RqVaeConfig(), seed: int = 0,
              log: Callable[[str], None] | None = None) -> "RqVaeQuantizer":
        """Train on `x` (n x d, float) for `cfg.steps` steps of `cfg.batch_size` random rows."""
        device = resolve_device(cfg.device)
        with _threads(device, cfg.cpu_threads):
            return cls._train(x, levels, codebook_size, cfg, seed, log, device)

    @classmethod
    def _train(cls, x, levels, codebook_size, cfg, seed, log, device) -> "RqVaeQuantizer":
        import torch

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        n, dim = data.shape
        module = _build_module(dim, levels, codebook_size, cfg).to(device)
        batch = min(cfg.batch_size, n)

        def draw():
            return data[torch.randint(0, n, (batch,), generator=gen, device="cpu").to(device)]

        # k-means initialisation of each level's codebook on a larger first batch's latent residuals
        with torch.no_grad():
            init = data[torch.randperm(n, generator=gen, device="cpu")[: max(batch, min(n, 16 * codebook_size))]
                        .to(device)]
            residual = module.encoder(init)
            for level in range(levels):
                book = _kmeans_torch(residual, codebook_size, cfg.kmeans_iters, gen)
                module.codebooks.data[level] = book
                d = residual.pow(2).sum(1, keepdim=True) - 2 * residual @ book.T + book.pow(2).sum(1)[None, :]
                residual = residual - book[d.argmin(1)]

        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
        last_used = torch.zeros(levels, codebook_size, dtype=torch.long, device=device)
        n_reseeded = 0
        history: list[dict[str, float]] = []
        for step in range(1, cfg.steps + 1):
            xb = draw()
            z = module.encoder(xb)
            codes, chosen, residuals = module.quantize(z)
            q_loss = 0.0
            for e, r in zip(chosen, residuals):
                codebook_loss = (r.detach() - e).pow(2).sum(1).mean()  # moves the codewords
                commitment = (r - e.detach()).pow(2).sum(1).mean()  # keeps the encoder near its codewords
                q_loss = q_loss + codebook_loss + cfg.beta * commitment
            z_q_sum = torch.stack(chosen).sum(0)
            z_q = z + (z_q_sum - z).detach()  # straight-through estimator
            x_hat = module.decoder(z_q)
            rec_loss = (x_hat - xb).pow(2).sum(1).mean()
            loss = rec_loss + q_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for level in range(levels):
                    last_used[level, codes[:, level]] = step
                if cfg.dead_code_window and step % cfg.dead_code_window == 0 and step < cfg.steps:
                    for level in range(levels):
                        dead = (last_used[level] <= step - cfg.dead_code_window).nonzero().flatten()
                        if len(dead):
                            src = residuals[level].detach()
                            pick = torch.randint(0, len(src), (len(dead),), generator=gen, device="cpu").to(device)
                            module.codebooks.data[level, dead] = src[pick]
                            last_used[level, dead] = step
                            n_reseeded += len(dead)
            if step == 1 or step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
                h = {"step": step, "loss": loss.item(), "reconstruction": rec_loss.item(),
                     "quantization": q_loss.item()}
                history.append(h)
                if log:
                    log(f"rqvae step {step}/{cfg.steps}: loss {h['loss']:.5f} "
                        f"(reconstruction {h['reconstruction']:.5f}, quantization {h['quantization']:.5f})")
        module.eval()
        training = {"steps": cfg.steps, "device": device, "n_train": int(n), "seconds": time.perf_counter() - t0,
                    "n_dead_codes_reseeded": int(n_reseeded), "history": history}
        return cls(module, dim, levels, codebook_size, cfg, training)

    # -- use --------------------------------------------------------------------------------------------------
    def encode(self, x: np.ndarray, batch: int = 65_536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """codes (n x L int32), reconstruction (n x d float32), squared error after each level (n x L float32)."""
        device = next(self.module.parameters()).device
        with _threads(str(device), self.cfg.cpu_threads):
            return self._encode(x, batch, device)

    def _encode(self, x: np.ndarray, batch: int, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        n = len(x)
        codes = np.empty((n, self.levels), dtype=np.int32)
        recon = np.empty((n, self.dim), dtype=np.float32)
        level_sqerr = np.empty((n, self.levels), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, n, batch):
                xb = torch.from_numpy(np.ascontiguousarray(x[s:s + batch], dtype=np.float32)).to(device)
                c, chosen, _ = self.module.quantize(self.module.encoder(xb))
                partial = torch.zeros_like(chosen[0])
                for level, e in enumerate(chosen):
                    partial = partial + e
                    xh = self.module.decoder(partial)
                    level_sqerr[s:s + len(xb), level] = (xh - xb).pow(2).sum(1).cpu().numpy()
                codes[s:s + len(xb)] = c.cpu().numpy()
                recon[s:s + len(xb)] = xh.cpu().numpy()
        return codes, recon, level_sqerr

    def codebooks(self) -> np.ndarray:
        """The latent codebooks, levels x codebook_size x latent_dim (float32)."""
        return self.module.codebooks.detach().cpu().numpy().astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "levels": self.levels, "codebook_size": self.codebook_size, "dim": self.dim,
                "rqvae": self.cfg.as_dict(), "training": self.training}

    # -- files ------------------------------------------------------------------------------------------------
    FILES = ("rqvae.pt", "codebooks.npy")

    def save(self, folder: Path) -> list[str]:
        """Write rqvae.pt (state dict, torch.load(weights_only=True)) and codebooks.npy into `folder`."""
        import torch

        folder = Path(folder)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        torch.save(state, folder / "rqvae.pt")
        np.save(folder / "codebooks.npy", self.codebooks())
        (folder / "rqvae.json").write_text(json.dumps({"dim": self.dim, "levels": self.levels,
                                                       "codebook_size": self.codebook_size,
                                                       "config": self.cfg.as_dict()}, indent=2))
        return ["rqvae.pt", "codebooks.npy", "rqvae.json"]

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> "RqVaeQuantizer":
        import torch

        folder = Path(folder)
        meta = json.loads((folder / "rqvae.json").read_text())
        cfg = RqVaeConfig.from_dict(meta["config"])
        module = _build_module(meta["dim"], meta["levels"], meta["codebook_size"], cfg)
        module.load_state_dict(torch.load(folder / "rqvae.pt", weights_only=True, map_location="cpu"))
        module.to(resolve_device(device)).eval()
        return cls(module, meta["dim"], meta["levels"], meta["codebook_size"], cfg)

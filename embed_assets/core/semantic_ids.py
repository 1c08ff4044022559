"""Semantic IDs: stable, collision-free item tokens for generative recommenders (TIGER, Rajput et al. 2023).

Each item's unit vector is quantized residually into `levels` codes from codebooks of `codebook_size` codes
(default: RQ-KMeans through faiss, 3 x 256; or an RQ-VAE, `embed_assets.core.rqvae`), plus one extra digit that
tells apart items whose codes collide: `codes = [7, 1, 4, 0]`, `sid = "<a_7><b_1><c_4><d_0>"`.

Dagster-free. The Dagster layer calls, in order:

    shards = shards_from_layout(layout)                      # or shards_from_arrays([(partition, ids, vectors)])
    result = build_semantic_ids(sid_root(home), shards, SidConfig(...), retrain=False,
                                reports_dir=layout.reports_dir, titles=titles_from_parquet(...))
    result.metadata()                                        # flat dict for MaterializeResult metadata
    run_checks(load_version(sid_root(home)))                 # {check name: (passed, details)} for asset checks

On disk (under HOME/semantic_ids): `v00001/`, `v00002/`, ... each with `semantic_ids.parquet` (item_id, codes
list<int32> ending with the collision digit, sid, vector_hash), the quantizer's files (`codebooks.npy`; for the
RQ-VAE also `rqvae.pt` + `rqvae.json`), `retired.parquet` (IDs of deleted or moved items, never handed out again
while the codebooks live), `id_map.parquet` after a retrain (item_id, old_sid, new_sid), `report.json`, and
`manifest.json` last (quantizer, levels, K, training sample, seed, embedding version, input shard fingerprints,
sha256 of every file). A version is built in a dot-temp folder and renamed into place whole; `current` is a
symlink to the live version, swapped atomically. A version whose files do not match its manifest is never used.
The newest `keep_versions` (5) folders are kept. A new version becomes current even when a blocking check fails on
it (its IDs are still unique: digits past the extra digit's size are flagged, not dropped); the Dagster check is
what stops downstream assets. One build at a time (a file lock on HOME/semantic_ids/.lock).

With a store (`store=`, a core.store.Store for the base URI), each new version is published under
`<base URI>/semantic_ids/<version>/` (its files, then manifest.json) and then the store's `semantic_ids/current`
pointer; before a build, the store's current version is brought here (every file checked against its manifest, the
manifest against the pointer) when it is newer than HOME's, so a fresh HOME continues the same IDs with the same
frozen codebooks instead of training new ones.

Stability rules (codebooks are frozen once trained):
  - an item whose vector is byte-identical (fp16) to the previous version's keeps its full ID, digit included;
  - a changed item whose new codes equal its old ones keeps its full ID; otherwise it gets a new digit and its old
    ID is retired;
  - a new item takes the lowest collision digit of its code group that no live or retired item holds (a returning
    item gets its old ID back when its codes match); retired digits are re-used only once a group runs out;
  - retraining happens on request (`retrain=True`), when the embedding version or the quantizer configuration
    changed, or when the whole catalog now reconstructs `drift_threshold` x worse than it did at training
    (`drift_test`; the refresh must bring at least `drift_min_items` new or changed items). It writes a new version
    with an old -> new ID map; the report's `action` and `reason` say which happened.

Small catalogs: k-means wants `min_points_per_centroid` (39, faiss's own rule) distinct training vectors per code;
with fewer, `codebook_size` is lowered to the largest power of two that fits (recorded in the manifest and report as
codebook_size_requested / codebook_size / codebook_size_reason), or with small_catalog="error" the build stops and
says what to set.

Cost (benchmarks/semantic_ids.py, results in benchmarks/results/semantic_ids_cost.*; 2 cores shared with other
work, lscpu "AMD EPYC", load average 5 -> 10 during the run, faiss on 1 thread; defaults: RQ-KMeans 3 x 256 trained
on a 65,536-vector sample, 500 neighbour queries; fp16 shards of 200,000 synthetic clustered unit vectors on disk):
     1M items:  52 s (sample pass 1 s, train 24 s, encode pass 25 s, IDs + report + write 2 s), peak RSS 1.3 GB;
                a refresh after 1% of the items changed (frozen codebooks, IDs carried): 21 s
    10M items: 279 s (sample pass 4 s, train 16 s, encode pass 223 s, IDs + report + write 36 s), peak RSS 3.6 GB,
                semantic_ids.parquet 221 MB. (An earlier run of the same encode path at load 3-7: 164 s, 3.4 GB.)
Training does not grow with the catalog (bounded sample); the encode pass is linear, 13-22 s per million items on
these 2 busy cores (3 nearest-codeword searches over 256 codes + the exact-neighbour check of 500 sampled items),
one shard of vectors in memory at a time; the rest of the memory is ~230 bytes per item (id, codes, hash, errors,
the output table). A refresh searches the frozen codebooks only for new or changed vectors: an unchanged vector
(same item, same partition, same fp16 bytes) takes its stored codes, and only its residuals are recomputed,
bit-identically (`input_rows` in the manifest locates each partition's rows; `changes.n_codes_carried` counts
them). It keeps the stored ID of every item whose vector did not change. It still reads every shard once (hashes,
the neighbour check and the report's statistics are over the whole catalog).

torch and faiss are imported inside functions only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from embed_assets.core.atomic import _fsync_dir, abandoned_temp_file, file_lock, sha256_file
from embed_assets.core.rqvae import RqVaeConfig, RqVaeQuantizer
from embed_assets.core.threads import scoped_threads
from embed_assets.core import sid_report

log_ = logging.getLogger(__name__)

TOKEN_LETTERS = "abcdefghijklmnopqrstuvwxyz"
FORMAT_VERSION = 1
QUANTIZERS = ("rq_kmeans", "rqvae")
_VERSION_DIR = re.compile(r"^v(\d{5,})$")


class SemanticIdError(RuntimeError):
    """Semantic IDs cannot be built or read; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInput:
    """One shard of item vectors, read lazily (a build reads each shard twice: sample + encode, one at a time).

    load() returns (item_ids, vectors n x d, any float dtype; the platform's are fp16 unit vectors)."""

    partition: str
    n_rows: int
    fingerprint: str
    version: Mapping[str, Any]
    load: Callable[[], tuple[list[str], np.ndarray]]


def shards_from_layout(layout, manifests: Sequence[Any] | None = None) -> list[ShardInput]:
    """The platform's trusted shards (default: every manifest in embeddings/), each loaded checksum-verified."""
    from embed_assets.core.shards import list_manifests, load_verified

    ms = list(manifests) if manifests is not None else list_manifests(layout)
    return [ShardInput(m.partition, int(m.n_rows), m.fingerprint, dict(m.version),
                       functools.partial(load_verified, layout, m)) for m in ms]


def shards_from_arrays(shards: Iterable[tuple[str, Sequence[str], np.ndarray]],
                       version: Mapping[str, Any] | None = None) -> list[ShardInput]:
    """In-memory shards (tests, notebooks): (partition, ids, vectors); fingerprint = hash of ids and fp16 bytes."""
    out = []
    for partition, ids, vecs in shards:
        ids, vecs = list(map(str, ids)), np.asarray(vecs)
        h = hashlib.sha256(json.dumps(ids).encode())
        h.update(np.ascontiguousarray(vecs, dtype=np.float16).tobytes())
        ver = dict(version) if version is not None else {"dim": int(vecs.shape[1])}
        out.append(ShardInput(str(partition), len(ids), h.hexdigest()[:32], ver,
                              functools.partial(lambda i, v: (list(i), v), ids, vecs)))
    return out


def titles_from_parquet(path: str | os.PathLike, id_column: str = "item_id",
                        title_column: str = "title") -> Callable[[list[str]], dict[str, str]]:
    """A `titles` callable for the report's top duplicate groups, reading only the rows asked for."""

    def lookup(ids: list[str]) -> dict[str, str]:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if not ids or not Path(path).exists():
            return {}
        wanted, out = pa.array(list(ids), pa.string()), {}
        # batch by batch (bounded memory), and no dataset scanner: its background threads can abort the interpreter
        # at exit (apache/arrow#34314, #39862)
        for batch in pq.ParquetFile(path).iter_batches(columns=[id_column, title_column], batch_size=65_536):
            hit = batch.filter(pc.is_in(batch.column(0), value_set=wanted))
            out.update(zip(hit.column(0).to_pylist(), hit.column(1).to_pylist()))
        return out

    return lookup


def sid_root(home: str | os.PathLike) -> Path:
    """Where semantic ID versions live: HOME/semantic_ids."""
    return Path(home).resolve() / "semantic_ids"


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SidConfig:
    quantizer: str = "rq_kmeans"  # rq_kmeans (faiss k-means per level) | rqvae (torch)
    levels: int = 3
    codebook_size: int = 256
    extra_digit_size: int | None = None  # values the collision digit may take; default = codebook_size as
    # configured (a catalog too small for it trains a smaller codebook, but its items still get the full digit range)
    train_sample: int = 65_536  # at most this many vectors train the quantizer (uniform, seeded); 256 per code at
    # K=256, where faiss's k-means stops using more (its max_points_per_centroid)
    seed: int = 0
    kmeans_iters: int = 10  # k-means iterations per level (faiss ResidualQuantizer's default)
    min_points_per_centroid: int = 39  # faiss's rule of thumb; fewer distinct vectors per code -> smaller K
    small_catalog: str = "shrink"  # shrink: lower K and record why | error: stop and say what to set
    dedupe_training: bool = False  # keep identical vectors once in the training sample. Off: on Myntra descriptions
    # (25% of items in duplicate groups) de-duplicating grew the largest colliding group from 56-59 to 86-108 items
    # (3 seeds): with the duplicates in, k-means gives the big duplicate groups codes of their own
    drift_threshold: float = 1.25  # retrain when the catalog's mean squared reconstruction error > this x the
    # catalog's at training (drift_test: accumulated over refreshes; new items' own ratio is reported, not decisive).
    # Not lower: items like the training ones but not in its sample reconstruct ~1.15x worse (10,000 new items of
    # the same clusters on a 600-item catalog: 1.140x, benchmarks/scratch/sid_drift_ratios.py), so growth alone
    # must not retrain (test_small_catalog_...)
    drift_min_items: int = 50  # ... and at least this many items are new or changed in the refresh
    neighbour_queries: int = 500  # items whose exact 10 nearest neighbours the report checks (0: skip); costs
    # 2 x 384 x N flops per query (at 10M items, 500 queries = 3.8 TFLOP, about a minute on 2 cores)
    neighbour_k: int = 10
    min_utilization: float = 0.8  # the (warning) utilization check's threshold, per level
    compare: bool | None = None  # also train the other quantizer for the report; None: only when quantizer=rqvae
    keep_versions: int = 5  # older version folders are removed (current is always kept)
    chunk_rows: int = 65_536  # rows encoded at a time
    threads: int = 0  # faiss (OpenMP) threads during a build; 0 = faiss's default (all cores). On a machine
    # shared with other busy processes 1 thread can be faster than all (measured: 2.8x on 2 oversubscribed cores)
    rqvae: RqVaeConfig = field(default_factory=RqVaeConfig)

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise SemanticIdError(f"unknown quantizer {self.quantizer!r}; use one of {', '.join(QUANTIZERS)}")
        if not 1 <= self.levels < len(TOKEN_LETTERS):
            raise SemanticIdError(f"levels={self.levels}: use 1 to {len(TOKEN_LETTERS) - 1}")
        if self.codebook_size < 2:
            raise SemanticIdError(f"codebook_size={self.codebook_size}: use at least 2")
        if self.quantizer == "rq_kmeans" and self.codebook_size & (self.codebook_size - 1):
            raise SemanticIdError(f"codebook_size={self.codebook_size}: rq_kmeans needs a power of two (e.g. 64, "
                                  "128, 256); or use quantizer='rqvae'")
        if self.small_catalog not in ("shrink", "error"):
            raise SemanticIdError(f"small_catalog={self.small_catalog!r}: use 'shrink' or 'error'")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rqvae"] = self.rqvae.as_dict()
        return d

    def identity(self) -> dict[str, Any]:
        """What, when changed, makes the stored IDs meaningless (forces a retrain)."""
        ident = {"quantizer": self.quantizer, "levels": self.levels, "codebook_size": self.codebook_size,
                 "extra_digit_size": self.extra_digit_size}
        if self.quantizer == "rqvae":
            ident["rqvae"] = {"hidden": list(self.rqvae.hidden), "latent_dim": self.rqvae.latent_dim}
        return ident


def choose_codebook_size(n_distinct: int, requested: int, min_points_per_centroid: int,
                         policy: str = "shrink") -> tuple[int, str]:
    """(codebook size to train, reason it differs from `requested` or ""). Never a silently poor codebook."""
    need = requested * min_points_per_centroid
    if n_distinct >= need:
        return requested, ""
    fits = n_distinct // max(min_points_per_centroid, 1)
    k = 2 ** int(math.floor(math.log2(fits))) if fits >= 2 else 0
    what = (f"the training sample holds {n_distinct:,} distinct vectors; k-means needs about "
            f"{min_points_per_centroid} per code, so codebook_size={requested} needs {need:,}")
    if policy == "error" or k < 2:
        hint = (f"set codebook_size={k} (or lower min_points_per_centroid, or raise train_sample if the catalog is "
                "larger than the sample)") if k >= 2 else "the catalog is too small for semantic IDs; add items"
        raise SemanticIdError(f"catalog too small for the codebook: {what}; {hint}")
    return k, (f"Codebook size lowered from {requested} to {k}: {what}. Set codebook_size={k} to make it "
               "explicit, or retrain (a new ID version) once the catalog is larger.")


# ---------------------------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------------------------
class RqKMeansQuantizer:
    """Residual k-means (RQ-KMeans): level l clusters what levels < l left. Trained with faiss's ResidualQuantizer
    (progressive-dimension k-means per level, beam 1 = greedy residuals, as GRID's RQ-KMeans); encoding is greedy per
    level (exact nearest codeword, faiss IndexFlatL2). faiss's default beam of 5 costs 3-5x the time and, on all of
    a 1M catalog, ran out of memory (the issue's measurement); the bounded sample and beam 1 avoid both.

    Plain per-level faiss.Kmeans was tried first: on Myntra descriptions it left level-3 perplexity at 81 of 256 and
    123 items on one full ID, against 157 and 64 with the progressive-dimension training (SciFact: 12.6% vs 3.4% of
    items colliding), so the ResidualQuantizer's training is used."""

    kind = "rq_kmeans"

    def __init__(self, codebooks: np.ndarray, training: dict[str, Any] | None = None) -> None:
        self.books = np.ascontiguousarray(codebooks, dtype=np.float32)
        self.levels, self.codebook_size, self.dim = self.books.shape
        self.training = training or {}
        self._indexes: list[Any] | None = None

    @classmethod
    def train(cls, x: np.ndarray, levels: int, codebook_size: int, seed: int = 0, iters: int = 10,
              log: Callable[[str], None] | None = None) -> "RqKMeansQuantizer":
        import faiss

        nbits = int(codebook_size).bit_length() - 1
        if codebook_size != 1 << nbits:
            raise SemanticIdError(f"codebook_size={codebook_size}: rq_kmeans (faiss ResidualQuantizer) needs a power "
                                  "of two (e.g. 64, 128, 256); or use quantizer='rqvae'")
        t0 = time.perf_counter()
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, dim = x.shape
        rq = faiss.ResidualQuantizer(dim, levels, nbits)
        rq.max_beam_size = 1
        if n <= dim:  # progressive-dim training runs a PCA, which needs more points than dimensions
            rq.train_type = faiss.ResidualQuantizer.Train_default
        rq.cp.niter = iters
        rq.cp.seed = seed
        rq.cp.min_points_per_centroid = 1  # the caller chose K for the sample (choose_codebook_size)
        rq.cp.max_points_per_centroid = 1 << 30  # the sample is already bounded: use all of it
        rq.verbose = False
        rq.train(x)
        books = faiss.vector_to_array(rq.codebooks).reshape(levels, codebook_size, dim).astype(np.float32)
        q = cls(books)
        _, _, level_sqerr = q.encode(x)
        residual = [float(v) for v in level_sqerr.mean(axis=0)]
        if log:
            log(f"rq_kmeans: {levels} x {codebook_size} codes, training residual squared norm by level "
                f"{[round(r, 4) for r in residual]}")
        trainer = "faiss.ResidualQuantizer, beam 1, " + ("k-means per level (fewer points than dimensions)"
                                                         if n <= dim else "progressive-dim k-means per level")
        q.training = {"n_train": int(n), "iters": iters, "trainer": trainer, "seconds": time.perf_counter() - t0,
                      "train_residual_sqnorm_by_level": residual}
        return q

    def _index(self, level: int):
        import faiss

        if self._indexes is None:
            self._indexes = []
            for book in self.books:
                index = faiss.IndexFlatL2(self.dim)
                index.add(book)
                self._indexes.append(index)
        return self._indexes[level]

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """codes (n x L int32), reconstruction (n x d float32), squared error after each level (n x L float32)."""
        return self._residuals(x, None)

    def encode_known(self, x: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What `encode(x)` returns when `codes` are already known to be x's (an unchanged vector's stored codes):
        the same float32 operations in the same order, without the nearest-codeword searches, so bit-identical."""
        return self._residuals(x, np.asarray(codes, dtype=np.int32))

    def _residuals(self, x: np.ndarray, known: np.ndarray | None):
        x = np.ascontiguousarray(x, dtype=np.float32)
        r = x.copy()
        codes = np.empty((len(x), self.levels), dtype=np.int32) if known is None else known
        level_sqerr = np.empty((len(x), self.levels), dtype=np.float32)
        for level in range(self.levels):
            if known is None:
                _, idx = self._index(level).search(r, 1)
                codes[:, level] = idx[:, 0]
            r -= self.books[level][codes[:, level]]
            level_sqerr[:, level] = np.einsum("ij,ij->i", r, r)
        return codes, x - r, level_sqerr

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "levels": self.levels, "codebook_size": self.codebook_size, "dim": self.dim,
                "training": self.training}

    def save(self, folder: Path) -> list[str]:
        np.save(Path(folder) / "codebooks.npy", self.books)
        return ["codebooks.npy"]

    @classmethod
    def load(cls, folder: Path) -> "RqKMeansQuantizer":
        return cls(np.load(Path(folder) / "codebooks.npy"))


@contextmanager
def faiss_threads(n: int):
    """Run the block with faiss's OpenMP thread count set to `n` (0: leave it), restored afterwards."""
    if n <= 0:
        yield
        return
    import faiss

    with scoped_threads(faiss.omp_get_max_threads, faiss.omp_set_num_threads, n):
        yield


def train_quantizer(kind: str, x: np.ndarray, levels: int, codebook_size: int, config: SidConfig,
                    log: Callable[[str], None] | None = None):
    """Train one quantizer on the sample `x` (n x d float32)."""
    if kind == "rq_kmeans":
        return RqKMeansQuantizer.train(x, levels, codebook_size, config.seed, config.kmeans_iters, log)
    if kind == "rqvae":
        return RqVaeQuantizer.train(x, levels, codebook_size, config.rqvae, config.seed, log)
    raise SemanticIdError(f"unknown quantizer {kind!r}; use one of {', '.join(QUANTIZERS)}")


def load_quantizer(kind: str, folder: Path):
    if kind == "rq_kmeans":
        return RqKMeansQuantizer.load(folder)
    if kind == "rqvae":
        return RqVaeQuantizer.load(folder, device="cpu")
    raise SemanticIdError(f"{folder}: unknown quantizer {kind!r} in the manifest")


# ---------------------------------------------------------------------------------------------------------------
# Tokens, hashes, digits
# ---------------------------------------------------------------------------------------------------------------
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def vector_hashes(vectors: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's fp16 bytes (equal hash <=> identical vector as the platform stores it)."""
    h16 = np.ascontiguousarray(vectors, dtype=np.float16)
    n, d = h16.shape
    if d % 4:
        h16 = np.concatenate([h16, np.zeros((n, 4 - d % 4), np.float16)], axis=1)
    words = np.ascontiguousarray(h16).view(np.uint64)
    acc = np.full(n, d, dtype=np.uint64)
    for j in range(words.shape[1]):
        z = acc ^ words[:, j]
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
        acc = z + _GOLD
    return acc


def token(level: int, code: int) -> str:
    return f"<{TOKEN_LETTERS[level]}_{int(code)}>"


def sid_strings(codes: np.ndarray):
    """pyarrow string array of `<a_7><b_1><c_4><d_0>` tokens, one per row of full codes (digit included)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    codes = np.asarray(codes)
    if len(codes) == 0:
        return pa.array([], pa.string())
    parts = []
    for level in range(codes.shape[1]):
        top = int(codes[:, level].max()) + 1
        vocab = pa.array([token(level, c) for c in range(top)], pa.string())
        parts.append(pc.take(vocab, pa.array(codes[:, level].astype(np.int64))))
    return pc.binary_join_element_wise(*parts, "")


def parse_sid(sid: str) -> list[int]:
    """`<a_7><b_1><c_4><d_0>` -> [7, 1, 4, 0]."""
    return [int(m) for m in re.findall(r"<[a-z]_(\d+)>", sid)]


def assign_fresh_digits(item_ids, codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Collision digits for a freshly trained codebook: 0..g-1 inside each group of equal codes, by item id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n, levels = codes.shape
    if n == 0:
        return np.zeros(0, np.int32)
    keys = sid_report.prefix_keys(codes, levels, codebook_size)
    order = pc.sort_indices(pa.table({"k": keys, "id": item_ids}),
                            sort_keys=[("k", "ascending"), ("id", "ascending")]).to_numpy()
    sk = keys[order]
    pos = np.arange(n)
    start = np.maximum.accumulate(np.where(np.r_[True, sk[1:] != sk[:-1]], pos, 0))
    digits = np.empty(n, np.int32)
    digits[order] = pos - start
    return digits


# ---------------------------------------------------------------------------------------------------------------
# Passes over the shards
# ---------------------------------------------------------------------------------------------------------------
def check_inputs(shards: Sequence[ShardInput]) -> dict[str, Any]:
    """The one embedding version all shards share; refuses an empty input or a mix of versions."""
    if not shards or sum(s.n_rows for s in shards) == 0:
        raise SemanticIdError("no item vectors: materialize item_embeddings first (semantic IDs are built from its "
                              "shards)")
    versions = {json.dumps(dict(s.version), sort_keys=True, default=str) for s in shards}
    if len(versions) > 1:
        by = {}
        for s in shards:
            by.setdefault(json.dumps(dict(s.version), sort_keys=True, default=str), []).append(s.partition)
        detail = "; ".join(f"{v} in {', '.join(p[:3])}{'...' if len(p) > 3 else ''}" for v, p in by.items())
        raise SemanticIdError(f"shards of {len(versions)} embedding versions would mix ({detail}); re-materialize "
                              "every item_embeddings partition with one model before building semantic IDs")
    return dict(shards[0].version)


def _pick_rows(n: int, m: int, seed: int) -> np.ndarray:
    if m >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


def gather_rows(shards: Sequence[ShardInput], rows: np.ndarray) -> np.ndarray:
    """The vectors at global rows `rows` (sorted; shards in the given order), float32; loads only shards needed."""
    out: np.ndarray | None = None
    offset = 0
    for s in shards:
        lo, hi = np.searchsorted(rows, [offset, offset + s.n_rows])
        if hi > lo:
            ids, vecs = s.load()
            if len(ids) != s.n_rows:
                raise SemanticIdError(f"shard {s.partition} has {len(ids)} rows, its manifest says {s.n_rows}; "
                                      "re-materialize it")
            if out is None:
                out = np.empty((len(rows), vecs.shape[1]), dtype=np.float32)
            out[lo:hi] = vecs[rows[lo:hi] - offset]
        offset += s.n_rows
    return out if out is not None else np.zeros((0, 0), np.float32)


@dataclass
class _Encoded:
    """What one encoding pass collected (everything per item; no vectors kept)."""

    ids: Any  # pyarrow string array
    vector_hash: np.ndarray
    dim: int
    per_q: dict[str, dict[str, Any]]  # name -> codes, cos, sqerr, level_sqerr_sum, seconds
    query_rows: np.ndarray | None
    neighbours: np.ndarray | None


def encode_pass(shards: Sequence[ShardInput], quantizers: Mapping[str, Any], queries: np.ndarray | None = None,
                query_rows: np.ndarray | None = None, k: int = 10, chunk_rows: int = 65_536,
                log: Callable[[str], None] | None = None, carried=None) -> _Encoded:
    """One pass, shard by shard: hash, encode with every quantizer, and the exact k nearest neighbours (inner
    product) of `queries` among all rows. Memory: one shard plus per-item results.

    `carried(partition, ids, hashes)` -> (mask, codes) or None gives the stored codes of rows whose vector is
    unchanged (`_carried_codes`); a quantizer with `encode_known` then skips their nearest-codeword searches and
    only recomputes their residuals (bit-identical). `per_q[name]["n_carried"]` counts them."""
    import pyarrow as pa

    from embed_assets.core.metrics import ExactTopK

    ids_parts, hash_parts = [], []
    per_q = {name: {"codes": [], "cos": [], "sqerr": [], "level_sqerr_sum": np.zeros(q.levels), "seconds": 0.0,
                    "n_carried": 0} for name, q in quantizers.items()}
    use_nn = queries is not None and len(queries) > 0
    if use_nn:
        query_rows = np.asarray(query_rows, dtype=np.int64)
        nn = ExactTopK(queries, k, exclude=query_rows)  # an item is not its own neighbour
    offset, dim, t0 = 0, 0, time.perf_counter()
    for si, s in enumerate(shards):
        ids, vecs = s.load()
        if len(ids) != len(vecs) or len(ids) != s.n_rows:
            raise SemanticIdError(f"shard {s.partition}: {len(ids)} ids, {len(vecs)} vectors, manifest says "
                                  f"{s.n_rows} rows; it changed during the build or is corrupt: re-materialize it")
        if vecs.ndim != 2 or (dim and vecs.shape[1] != dim):
            raise SemanticIdError(f"shard {s.partition}: vectors of shape {vecs.shape}, expected (n, {dim})")
        dim = vecs.shape[1]
        ids_parts.append(pa.array(list(ids), pa.string()))
        hash_parts.append(vector_hashes(vecs))
        known = carried(s.partition, ids_parts[-1], hash_parts[-1]) if carried is not None else None
        for c0 in range(0, len(vecs), chunk_rows):
            x = np.ascontiguousarray(vecs[c0:c0 + chunk_rows], dtype=np.float32)
            if not np.isfinite(x).all():
                raise SemanticIdError(f"shard {s.partition} holds NaN or inf vectors; its norm check fails: "
                                      "re-materialize it")
            xn = np.sqrt(np.einsum("ij,ij->i", x, x))
            for name, q in quantizers.items():
                tq = time.perf_counter()
                acc = per_q[name]
                if known is not None and hasattr(q, "encode_known"):
                    mask, stored = known[0][c0:c0 + chunk_rows], known[1][c0:c0 + chunk_rows]
                    codes, recon, level_sqerr = _encode_some(q, x, mask, stored)
                    acc["n_carried"] += int(mask.sum())
                else:
                    codes, recon, level_sqerr = q.encode(x)
                rn = np.sqrt(np.einsum("ij,ij->i", recon, recon))
                acc["codes"].append(codes)
                acc["cos"].append((np.einsum("ij,ij->i", x, recon) / np.maximum(xn * rn, 1e-12)).astype(np.float32))
                acc["sqerr"].append(level_sqerr[:, -1].astype(np.float32))
                acc["level_sqerr_sum"] += level_sqerr.sum(axis=0, dtype=np.float64)
                acc["seconds"] += time.perf_counter() - tq
            if use_nn:
                nn.add(np.arange(offset + c0, offset + c0 + len(x), dtype=np.int64), x)
        offset += len(vecs)
        if log:
            log(f"encoded shard {si + 1}/{len(shards)} ({s.partition}): {offset:,} items, "
                f"{time.perf_counter() - t0:,.1f} s")
    out_q = {}
    for name, acc in per_q.items():
        out_q[name] = {"codes": np.concatenate(acc["codes"]), "cos": np.concatenate(acc["cos"]),
                       "sqerr": np.concatenate(acc["sqerr"]), "level_sqerr_sum": acc["level_sqerr_sum"],
                       "seconds": acc["seconds"], "n_carried": acc["n_carried"]}
    return _Encoded(pa.concat_arrays(ids_parts), np.concatenate(hash_parts), dim, out_q,
                    query_rows if use_nn else None, nn.result()[1] if use_nn else None)


def _encode_some(q, x: np.ndarray, mask: np.ndarray, stored: np.ndarray):
    """q.encode(x), with the rows under `mask` taking their `stored` codes (encode_known) instead of a search."""
    if mask.all():
        return q.encode_known(x, stored)
    if not mask.any():
        return q.encode(x)
    codes = np.empty((len(x), q.levels), dtype=np.int32)
    recon = np.empty_like(x)
    level_sqerr = np.empty((len(x), q.levels), dtype=np.float32)
    for rows, out in ((mask, q.encode_known(x[mask], stored[mask])), (~mask, q.encode(x[~mask]))):
        codes[rows], recon[rows], level_sqerr[rows] = out
    return codes, recon, level_sqerr


def _carried_codes(prev: "SidVersion", table, levels: int):
    """For encode_pass: per shard, which rows the previous version holds with the same vector (same item id in the
    same partition, same vector hash), and their stored codes. Looks only at that partition's rows of the previous
    table (`input_rows` in its manifest), so a shard costs O(its rows), not O(catalog). None when the previous
    version predates `input_rows` (then every row is encoded, as before)."""
    import pyarrow.compute as pc

    rows = prev.manifest.get("input_rows")
    if not isinstance(rows, dict) or table.num_rows != sum(int(c) for _, c in rows.values()):
        return None
    prev_ids = table.column("item_id").combine_chunks()
    prev_hash = table.column("vector_hash").to_numpy()
    prev_codes = _table_codes(table, levels + 1)[:, :levels]

    def lookup(partition: str, ids, hashes: np.ndarray):
        if partition not in rows:
            return None
        start, count = (int(v) for v in rows[partition])
        if count == 0:
            return None
        idx = pc.index_in(ids, value_set=prev_ids.slice(start, count)).fill_null(-1).to_numpy(
            zero_copy_only=False).astype(np.int64)
        at = start + np.maximum(idx, 0)
        ok = (idx >= 0) & (prev_hash[at] == hashes) if len(at) else np.zeros(0, bool)
        return ok, prev_codes[at]

    return lookup


def _check_unique_item_ids(ids) -> None:
    import pyarrow.compute as pc

    if pc.count_distinct(ids).as_py() != len(ids):
        vc = pc.value_counts(ids)
        dups = [v["values"] for v in vc.to_pylist() if v["counts"] > 1][:5]
        raise SemanticIdError(f"item ids occur in two shards (e.g. {dups}); re-materialize processed_items and the "
                              "shards so every item is in exactly one shard")


# ---------------------------------------------------------------------------------------------------------------
# Versions on disk
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SidVersion:
    """A stored, checksum-verified version: its folder and manifest; tables and quantizer read on demand."""

    root: Path
    name: str
    manifest: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / self.name

    def _read_parquet(self, file: str):
        import io

        import pyarrow.parquet as pq

        data = (self.path / file).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["files"][file]["sha256"]:
            raise SemanticIdError(f"{self.path / file} does not match its manifest (changed or corrupt); restore it "
                                  "or rebuild with retrain=True (IDs will change)")
        return pq.ParquetFile(io.BytesIO(data)).read()  # not read_table: see titles_from_parquet

    def table(self):
        """semantic_ids.parquet: item_id, codes, sid, vector_hash."""
        return self._read_parquet("semantic_ids.parquet")

    def retired(self):
        return self._read_parquet("retired.parquet")

    def id_map(self):
        """item_id, old_sid, new_sid (only in a version made by a retrain with a previous version)."""
        if "id_map.parquet" not in self.manifest["files"]:
            return None
        return self._read_parquet("id_map.parquet")

    def quantizer(self):
        return load_quantizer(self.manifest["quantizer"]["kind"], self.path)

    def report(self) -> dict[str, Any]:
        return json.loads((self.path / "report.json").read_text("utf-8"))


def read_current(root: str | os.PathLike) -> str | None:
    """The live version's name (the `current` symlink's target), or None before the first build."""
    link = Path(root) / "current"
    try:
        return Path(os.readlink(link)).name
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SemanticIdError(f"{link}: not a symlink to a version folder ({e}); remove it and rebuild") from e


def read_current_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    """The live version's manifest without reading its files (the sensor's cheap question: built over which
    shards?); None before the first build or when unreadable (the asset checks verify the files)."""
    try:
        name = read_current(root)
        return json.loads((Path(root) / name / "manifest.json").read_text("utf-8")) if name else None
    except (SemanticIdError, OSError, ValueError):
        return None


def list_versions(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    if not root.exists():
        return []
    return sorted((p.name for p in root.iterdir() if _VERSION_DIR.match(p.name) and p.is_dir()),
                  key=lambda n: int(n[1:]))


def load_version(root: str | os.PathLike, name: str | None = None, verify: bool = True) -> SidVersion | None:
    """The live version (or `name`), its files checked against its manifest; None if there is none yet."""
    root = Path(root)
    name = name or read_current(root)
    if name is None:
        return None
    mpath = root / name / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except FileNotFoundError:
        raise SemanticIdError(f"{mpath} is missing: semantic ID version {name} is incomplete; point "
                              f"{root / 'current'} at an intact version or rebuild with retrain=True") from None
    except ValueError as e:
        raise SemanticIdError(f"{mpath}: unreadable ({e}); rebuild with retrain=True") from e
    if verify:
        for file, meta in manifest["files"].items():
            p = root / name / file
            if not p.exists() or sha256_file(p) != meta["sha256"]:
                raise SemanticIdError(f"{p} is missing or does not match its manifest: semantic ID version {name} "
                                      "cannot be trusted; restore it, or rebuild with retrain=True (new IDs, with an "
                                      "old -> new map only where the old version is readable)")
    return SidVersion(root, name, manifest)


def _locked(root: Path):
    return file_lock(root / ".lock")


def _clean_temp(root: Path) -> None:
    for p in root.glob(".v*.tmp"):
        if abandoned_temp_file(p):
            shutil.rmtree(p, ignore_errors=True)


def _next_version_name(root: Path, store=None) -> str:
    nums = [int(n[1:]) for n in list_versions(root)]
    nums += [int(m.group(1)) for p in root.glob(".v*.tmp") if (m := re.match(r"^\.v(\d+)\.", p.name))]
    if store is not None:  # never re-use a name the store holds
        from embed_assets.core.store import remote_versions

        nums += [int(n[1:]) for n in remote_versions(store, SID_REL)]
    return f"v{(max(nums) + 1 if nums else 1):05d}"


SID_REL = "semantic_ids"  # versions and the `current` pointer under the base URI


def _sid_files(manifest: dict[str, Any]) -> dict[str, str]:
    return {f: meta["sha256"] for f, meta in manifest["files"].items()}


def publish_version(root: Path, store, name: str, keep: int | None = None, check: bool = True) -> dict[str, Any]:
    """Publish version `name` and point the store's `current` at it (idempotent); see core.store.publish_version."""
    from embed_assets.core.store import publish_version as publish

    manifest = json.loads((root / name / "manifest.json").read_text("utf-8"))
    return publish(store, SID_REL, root / name, _sid_files(manifest), keep, check=check)


def sync_with_store(root: Path, store, log: Callable[[str], None] = log_.info) -> str:
    """Before a build (under the build lock): the store's current version here when it is newer than HOME's (or HOME
    has none), HOME's published when it is newer (or the store has none), by the manifests' created_at
    (`core.store.sync_current`)."""
    from embed_assets.core.store import sync_current

    return sync_current(store, SID_REL, root, read_current(root), _sid_files,
                        publish=lambda name: publish_version(root, store, name),
                        point=lambda name: _point_current(root, name),
                        work_name=lambda version: f".{version}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp",
                        what="semantic IDs",
                        on_untrusted="semantic IDs continue from HOME's own state", say=log)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _point_current(root: Path, name: str) -> None:
    tmp = root / f".current.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    os.symlink(name, tmp)
    os.replace(tmp, root / "current")
    _fsync_dir(root)


def _prune(root: Path, keep: int) -> list[str]:
    current = read_current(root)
    names = list_versions(root)
    old = [n for n in names[:-keep] if n != current] if keep > 0 else []
    for n in old:
        shutil.rmtree(root / n, ignore_errors=True)
    return old


def _codes_table(item_ids, full_codes: np.ndarray, vector_hash: np.ndarray | None = None, extra: dict | None = None):
    import pyarrow as pa

    n, width = full_codes.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    cols = {"item_id": item_ids,
            "codes": pa.ListArray.from_arrays(offsets, pa.array(full_codes.reshape(-1).astype(np.int32))),
            "sid": sid_strings(full_codes)}
    if vector_hash is not None:
        cols["vector_hash"] = pa.array(vector_hash, pa.uint64())
    for k, v in (extra or {}).items():
        cols[k] = v
    return pa.table(cols)


def _table_codes(table, width: int) -> np.ndarray:
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return np.zeros((0, width), np.int32)
    flat = pc.list_flatten(table.column("codes")).to_numpy()
    return flat.reshape(-1, width).astype(np.int32)


def _write_version(root: Path, name: str, files: dict[str, Callable[[Path], Any]], quantizer,
                   manifest: dict[str, Any], report: dict[str, Any]) -> Path:
    """Build the version folder under a dot-temp name, manifest last, rename it into place, swap `current`."""
    import pyarrow.parquet as pq

    tmp = root / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        for fname, table in files.items():
            pq.write_table(table, tmp / fname, compression="zstd")
        quantizer.save(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=_json_default) + "\n",
                                         "utf-8")
        listing = {}
        for p in sorted(tmp.iterdir()):
            _fsync_file(p)
            listing[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = {**manifest, "files": listing}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_default)
                                           + "\n", "utf-8")
        _fsync_file(tmp / "manifest.json")
        _fsync_dir(tmp)
        os.rename(tmp, root / name)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _point_current(root, name)
    return root / name


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Checks (pure; the Dagster asset checks call run_checks on the stored version)
# ---------------------------------------------------------------------------------------------------------------
def check_unique_ids(item_ids, sids) -> tuple[bool, dict[str, Any]]:
    """Blocking: every item has exactly one ID and no two items share a full ID."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = item_ids if isinstance(item_ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(item_ids), pa.string())
    sids = sids if isinstance(sids, (pa.Array, pa.ChunkedArray)) else pa.array(list(sids), pa.string())
    n = len(ids)
    n_ids, n_sids = pc.count_distinct(ids).as_py(), pc.count_distinct(sids).as_py()
    n_null = sids.null_count
    passed = n_ids == n and n_sids == n and n_null == 0
    detail = {"n_items": n, "n_distinct_item_ids": n_ids, "n_distinct_sids": n_sids, "n_missing_sids": n_null}
    if not passed:
        vc = pc.value_counts(sids)
        detail["examples"] = [v["values"] for v in vc.to_pylist() if v["counts"] > 1][:5]
        detail["detail"] = (f"{n - n_sids:,} items share a full ID with another item: the collision digit was not "
                            "assigned; rebuild semantic IDs")
    else:
        detail["detail"] = f"all {n:,} items have a unique ID"
    return passed, detail


def check_extra_digit_capacity(max_collision_group: int, max_digit: int, extra_digit_size: int,
                               largest_duplicate_group: int | None = None) -> tuple[bool, dict[str, Any]]:
    """Blocking: the largest group of items sharing all codes fits the extra digit (and every digit is < its size)."""
    passed = max_collision_group <= extra_digit_size and max_digit < extra_digit_size
    d = {"max_collision_group": int(max_collision_group), "max_digit": int(max_digit),
         "extra_digit_size": int(extra_digit_size)}
    if passed:
        d["detail"] = f"largest group {max_collision_group:,} <= {extra_digit_size} digit values"
    else:
        dup = (f"; {largest_duplicate_group:,} items have one identical vector: de-duplicate them or add a "
               "distinguishing field to their text" if largest_duplicate_group and
               largest_duplicate_group > extra_digit_size else "")
        d["detail"] = (f"{max_collision_group:,} items share all their codes (highest digit {max_digit}) but the extra "
                       f"digit has {extra_digit_size} values{dup}; or add a level / raise codebook_size and retrain")
    return passed, d


def check_codebook_utilization(utilization: Sequence[float], min_utilization: float = 0.8) -> tuple[bool, dict]:
    """Warning by default: every level uses at least `min_utilization` of its codes."""
    low = [i + 1 for i, u in enumerate(utilization) if u < min_utilization]
    d = {"codebook_utilization": [float(u) for u in utilization], "min_utilization": min_utilization,
         "levels_below": low}
    d["detail"] = ("every level uses >= {:.0%} of its codes".format(min_utilization) if not low else
                   "level(s) {} use(s) less than {:.0%} of the codes; a smaller codebook_size wastes fewer tokens"
                   .format(", ".join(map(str, low)), min_utilization))
    return not low, d


def run_checks(version: SidVersion, min_utilization: float | None = None) -> dict[str, tuple[bool, dict[str, Any]]]:
    """The three asset checks on a stored version (reads its parquet; the stats come from its manifest).
    unique_semantic_ids and extra_digit_capacity are blocking; codebook_utilization warns by default."""
    t = version.table()
    st = version.manifest["stats"]
    digits = _table_codes(t, version.manifest["levels"] + 1)[:, -1]
    mu = st.get("min_utilization", 0.8) if min_utilization is None else min_utilization
    return {
        "unique_semantic_ids": check_unique_ids(t.column("item_id"), t.column("sid")),
        "extra_digit_capacity": check_extra_digit_capacity(st["max_collision_group"],
                                                           int(digits.max()) if len(digits) else 0,
                                                           version.manifest["extra_digit_size"],
                                                           st.get("largest_duplicate_group")),
        "codebook_utilization": check_codebook_utilization(st["codebook_utilization"], mu),
    }


# ---------------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SidResult:
    action: str  # created | updated | unchanged | retrained
    reason: str  # why a retrain happened ("" otherwise)
    version: str
    path: Path
    manifest: dict[str, Any]
    report: dict[str, Any]

    def metadata(self) -> dict[str, Any]:
        """A flat summary for the asset's MaterializeResult metadata."""
        r = self.report
        keep = ("n_items", "quantizer", "levels", "codebook_size", "codebook_size_requested", "extra_digit_size",
                "duplicate_vector_rate", "largest_duplicate_group", "collision_rate", "max_collision_group",
                "codebook_utilization", "perplexity", "reconstruction_cosine", "reconstruction_mse",
                "neighbour_share_first_code", "neighbour_share_first_two_codes", "unique_full_ids")
        md = {"action": self.action, "reason": self.reason, "version": self.version, "path": str(self.path)}
        md.update({k: r.get(k) for k in keep})
        ch = r.get("changes") or {}
        md.update({k: ch[k] for k in ("n_kept", "n_changed_same_id", "n_changed_new_id", "n_new", "n_deleted")
                   if k in ch})
        if (ch.get("drift") or {}).get("ratio") is not None:
            md["drift_ratio"] = ch["drift"]["ratio"]
        return md


def _training_pass(shards: Sequence[ShardInput], n_total: int, config: SidConfig, log) -> tuple[dict, np.ndarray,
                                                                                                 np.ndarray]:
    """Gather the training sample and the neighbour queries in one pass."""
    rows_t = _pick_rows(n_total, config.train_sample, config.seed)
    rows_q = _pick_rows(n_total, config.neighbour_queries, config.seed + 1) if config.neighbour_queries else \
        np.zeros(0, np.int64)
    union = np.union1d(rows_t, rows_q)
    x = gather_rows(shards, union)
    sample = x[np.searchsorted(union, rows_t)]
    n_sampled = len(sample)
    _, first = np.unique(vector_hashes(sample), return_index=True)
    n_distinct = len(first)
    if config.dedupe_training:
        sample = sample[np.sort(first)]
    info = {"n_requested": config.train_sample, "n_sampled": int(n_sampled), "n_distinct": int(n_distinct),
            "n_train": int(len(sample)), "seed": config.seed, "deduplicated": config.dedupe_training,
            "strategy": "uniform random rows without replacement (numpy default_rng(seed)) over the shards in order"
                        + ("; identical vectors kept once" if config.dedupe_training else "")}
    log(f"training sample: {n_sampled:,} of {n_total:,} rows, {n_distinct:,} distinct")
    return info, sample, (rows_q, x[np.searchsorted(union, rows_q)] if len(rows_q) else None)


def _queries_pass(shards, n_total: int, config: SidConfig):
    if not config.neighbour_queries:
        return np.zeros(0, np.int64), None
    rows_q = _pick_rows(n_total, config.neighbour_queries, config.seed + 1)
    return rows_q, gather_rows(shards, rows_q)


def _train_all(sample: np.ndarray, n_distinct: int, config: SidConfig,
               log) -> tuple[dict[str, Any], int, str, dict[str, float]]:
    """Train the configured quantizer (and the other one when comparing); K from the sample's distinct vectors."""
    k, k_reason = choose_codebook_size(n_distinct, config.codebook_size, config.min_points_per_centroid,
                                       config.small_catalog)
    if k_reason:
        log(k_reason)
    compare = config.compare if config.compare is not None else config.quantizer == "rqvae"
    kinds = [config.quantizer] + ([q for q in QUANTIZERS if q != config.quantizer] if compare else [])
    quantizers, seconds = {}, {}
    for kind in kinds:
        t0 = time.perf_counter()
        quantizers[kind] = train_quantizer(kind, sample, config.levels, k, config, log)
        seconds[kind] = time.perf_counter() - t0
        log(f"trained {kind} ({config.levels} x {k}) in {seconds[kind]:.1f} s")
    return quantizers, k, k_reason, seconds


def _metrics(enc: _Encoded, name: str, codes: np.ndarray, k: int) -> dict[str, Any]:
    q = enc.per_q[name]
    return sid_report.quantization_metrics(codes, k, q["cos"], q["sqerr"], q["level_sqerr_sum"], enc.dim,
                                           enc.query_rows, enc.neighbours)


def _assemble_report(*, version: str, action: str, reason: str, config: SidConfig, k: int, k_reason: str,
                     extra: int, enc: _Encoded, full_codes: np.ndarray, titles, changes: dict | None,
                     comparison: dict | None, training: dict, sids=None) -> dict[str, Any]:
    primary = config.quantizer
    metrics = _metrics(enc, primary, full_codes[:, :-1], k)
    dup = sid_report.duplicate_stats(enc.vector_hash, enc.ids, titles)
    sids = sid_strings(full_codes) if sids is None else sids
    checks = {
        "unique_semantic_ids": check_unique_ids(enc.ids, sids),
        "extra_digit_capacity": check_extra_digit_capacity(metrics["max_collision_group"],
                                                           int(full_codes[:, -1].max()), extra,
                                                           dup["largest_duplicate_group"]),
        "codebook_utilization": check_codebook_utilization(metrics["codebook_utilization"], config.min_utilization),
    }
    report: dict[str, Any] = {
        "version": version, "action": action, "reason": reason, "quantizer": primary, "levels": config.levels,
        "codebook_size": k, "codebook_size_requested": config.codebook_size, "codebook_size_reason": k_reason,
        "extra_digit_size": extra, "min_utilization": config.min_utilization,
        "min_points_per_centroid": config.min_points_per_centroid, "n_items": int(len(enc.ids)),
        **dup, **metrics, "unique_full_ids": checks["unique_semantic_ids"][0],
        "checks": {name: {"passed": ok, **d} for name, (ok, d) in checks.items()},
        "changes": changes or {}, "comparison": comparison or {}, "training": training,
        "encode_seconds": enc.per_q[primary]["seconds"],
    }
    report["recommendations"] = sid_report.recommendations(report)
    return report


def assess(shards: Sequence[ShardInput], config: SidConfig = SidConfig(),
           titles: Callable[[list[str]], Mapping[str, str]] | None = None,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The readiness report for these shards without writing anything: train on the sample, encode everything,
    measure. (What `build_semantic_ids` reports for a fresh training.)"""
    with faiss_threads(config.threads):
        return _assess(list(shards), config, titles, log or log_.info)


def _assess(shards, config: SidConfig, titles, log) -> dict[str, Any]:
    check_inputs(shards)
    n_total = sum(s.n_rows for s in shards)
    info, sample, (rows_q, queries) = _training_pass(shards, n_total, config, log)
    quantizers, k, k_reason, train_s = _train_all(sample, info["n_distinct"], config, log)
    enc = encode_pass(shards, quantizers, queries, rows_q, config.neighbour_k, config.chunk_rows, log)
    _check_unique_item_ids(enc.ids)
    codes = enc.per_q[config.quantizer]["codes"]
    digits = assign_fresh_digits(enc.ids, codes, k)
    full = np.concatenate([codes, digits[:, None]], axis=1)
    extra = config.extra_digit_size or config.codebook_size
    comparison = _comparison(enc, quantizers, k, train_s)
    training = {**info, "train_seconds": train_s[config.quantizer],
                "quantizer": quantizers[config.quantizer].describe()}
    return _assemble_report(version="", action="assessed", reason="", config=config, k=k, k_reason=k_reason,
                            extra=extra, enc=enc, full_codes=full, titles=titles, changes=None,
                            comparison=comparison, training=training)


def _comparison(enc: _Encoded, quantizers: Mapping[str, Any], k: int, train_s: Mapping[str, float]) -> dict:
    if len(quantizers) < 2:
        return {}
    out = {}
    for name in quantizers:
        m = _metrics(enc, name, enc.per_q[name]["codes"], k)
        m = {key: m[key] for key in ("collision_rate", "max_collision_group", "codebook_utilization", "perplexity",
                                     "reconstruction_cosine", "reconstruction_mse", "neighbour_share_first_code",
                                     "neighbour_share_first_two_codes")}
        m["train_seconds"] = train_s[name]
        m["encode_seconds"] = enc.per_q[name]["seconds"]
        out[name] = m
    return out


def drift_test(sqerr: np.ndarray, fresh: np.ndarray, baseline: float | None, config: SidConfig) -> dict[str, Any]:
    """Do the frozen codebooks still fit the catalog? The one place that decides a drift retrain.

    The measure is the whole current catalog's mean squared reconstruction error over the training catalog's
    (`baseline`, measured on every item when the codebooks were trained), so drift accumulates across refreshes: ten
    small changes that each fit a little worse add up, and a catalog whose items were all replaced is judged on what
    it holds now. A retrain changes every item's ID and so invalidates a generative model trained on them; one small
    batch of unusual items is not reason enough, so the new and changed items' own ratio is reported (and the report
    recommends a retrain when it is high) but does not decide. At least `drift_min_items` items must be new or
    changed in this refresh (an unchanged catalog is never retrained). Cost: O(catalog) additions over errors
    `encode_pass` computes anyway."""
    n_fresh = int(fresh.sum())
    ratio = float(sqerr.mean() / baseline) if len(sqerr) and baseline else None
    fresh_ratio = float(sqerr[fresh].mean() / baseline) if n_fresh and baseline else None
    drifted = ratio is not None and n_fresh >= config.drift_min_items and ratio > config.drift_threshold
    if ratio is None:
        detail = "no items, or no training baseline"
    else:
        detail = (f"the catalog reconstructs at {ratio:.3f}x the training catalog's squared error (retrain above "
                  f"{config.drift_threshold:.2f}x"
                  + (f" once at least {config.drift_min_items} items are new or changed" if n_fresh <
                     config.drift_min_items else "") + ")"
                  + (f"; its {n_fresh:,} new or changed items at {fresh_ratio:.2f}x" if fresh_ratio is not None
                     else "; no new or changed items")
                  + (": retrained" if drifted else ""))
    return {"measure": "catalog mean squared error / training catalog's", "ratio": ratio,
            "fresh_ratio": fresh_ratio, "n_new_or_changed": n_fresh, "baseline_sqerr": baseline,
            "threshold": config.drift_threshold, "min_items": config.drift_min_items, "retrained": drifted,
            "detail": detail}


def _assign_incremental(prev, enc: _Encoded, codes: np.ndarray, k: int, extra: int, levels: int, version: str,
                        table=None):
    """Carry IDs from the previous version (`table`: its semantic_ids table, when already read); returns (full
    codes, retired table, changes dict, new-vector mask)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pt = table if table is not None else prev.table()
    prev_full = _table_codes(pt, levels + 1)
    prev_hash = pt.column("vector_hash").to_numpy()
    prev_ids = pt.column("item_id").combine_chunks() if pt.num_rows else pa.array([], pa.string())
    ids = enc.ids
    n = len(ids)
    idx = pc.index_in(ids, value_set=prev_ids).fill_null(-1).to_numpy().astype(np.int64)
    matched = idx >= 0
    safe = np.where(matched, idx, 0)
    same_vec = matched & (prev_hash[safe] == enc.vector_hash) if len(prev_hash) else np.zeros(n, bool)
    full = np.full((n, levels + 1), -1, dtype=np.int32)
    full[same_vec] = prev_full[idx[same_vec]]
    changed = matched & ~same_vec
    same_prefix = changed & (prev_full[safe, :levels] == codes).all(axis=1) if len(prev_full) else changed
    full[same_prefix] = prev_full[idx[same_prefix]]
    moved = changed & ~same_prefix
    new = ~matched
    need = moved | new
    full[need, :levels] = codes[need]
    # kept items whose fresh codes differ from the stored ones (should be 0: encoding is deterministic)
    n_mismatch = int((same_vec & ~(prev_full[safe, :levels] == codes).all(axis=1)).sum()) if len(prev_full) else 0

    # retired IDs: the previous version's, plus deleted items' and moved items' old IDs
    old_retired = prev.retired()
    deleted = ~pc.is_in(prev_ids, value_set=ids).to_numpy(zero_copy_only=False) if len(prev_ids) else \
        np.zeros(0, bool)
    r_ids = pa.concat_arrays([old_retired.column("item_id").combine_chunks().cast(pa.string())
                              if old_retired.num_rows else pa.array([], pa.string()),
                              pc.take(prev_ids, pa.array(np.flatnonzero(deleted))),
                              pc.take(prev_ids, pa.array(idx[moved]))])
    r_codes = np.concatenate([_table_codes(old_retired, levels + 1), prev_full[deleted], prev_full[idx[moved]]])
    r_version = (old_retired.column("retired_in").to_pylist() if old_retired.num_rows else []) + \
        [version] * (int(deleted.sum()) + int(moved.sum()))
    r_keys = sid_report.prefix_keys(r_codes[:, :levels], levels, k) if len(r_codes) else np.zeros(0, np.int64)
    keep_retired = np.ones(len(r_codes), bool)

    need_rows = np.flatnonzero(need)
    n_resurrected = n_unretired = 0
    if len(need_rows):
        need_keys = sid_report.prefix_keys(full[need_rows, :levels], levels, k)
        fixed = ~need
        fixed_keys = sid_report.prefix_keys(full[fixed, :levels], levels, k)
        in_need = np.isin(fixed_keys, need_keys)
        taken: dict[int, set[int]] = {}
        for key, d in zip(fixed_keys[in_need].tolist(), full[fixed, -1][in_need].tolist()):
            taken.setdefault(key, set()).add(d)
        retired_by_key: dict[int, list[int]] = {}
        retired_row: dict[tuple[int, int], int] = {}
        r_in = np.flatnonzero(np.isin(r_keys, need_keys))
        for j in r_in.tolist():
            key, d = int(r_keys[j]), int(r_codes[j, -1])
            taken.setdefault(key, set()).add(d)
            retired_by_key.setdefault(key, []).append(d)
            retired_row[(key, d)] = j
        # a returning item gets its old ID back when its codes are unchanged
        r_id_list = r_ids.to_pylist() if len(r_in) else []
        by_item = {(r_id_list[j], int(r_keys[j])): int(r_codes[j, -1]) for j in r_in.tolist()}
        order = pc.sort_indices(pa.table({"k": need_keys, "id": pc.take(ids, pa.array(need_rows))}),
                                sort_keys=[("k", "ascending"), ("id", "ascending")]).to_numpy()
        need_ids = pc.take(ids, pa.array(need_rows[order])).to_pylist()
        cursor: dict[int, int] = {}
        for pos, item_id in zip(order.tolist(), need_ids):
            row, key = int(need_rows[pos]), int(need_keys[pos])
            t = taken.setdefault(key, set())
            back = by_item.get((item_id, key))
            if back is not None and keep_retired[retired_row[(key, back)]]:
                d = back
                keep_retired[retired_row[(key, back)]] = False
                n_resurrected += 1
            else:
                d = cursor.get(key, 0)
                while d in t:
                    d += 1
                cursor[key] = d + 1
                if d >= extra:  # group full: re-use the oldest retired digit rather than leave the vocabulary
                    free = [x for x in retired_by_key.get(key, []) if keep_retired[retired_row[(key, x)]]]
                    if free:
                        d = free[0]
                        keep_retired[retired_row[(key, d)]] = False
                        n_unretired += 1
                        cursor[key] = cursor[key] - 1
            t.add(d)
            full[row, -1] = d

    kept = np.flatnonzero(keep_retired)
    retired = _codes_table(pc.take(r_ids, pa.array(kept)) if len(kept) else pa.array([], pa.string()),
                           r_codes[kept] if len(kept) else np.zeros((0, levels + 1), np.int32),
                           extra={"retired_in": pa.array([r_version[i] for i in kept.tolist()], pa.string())})
    changes = {"n_kept": int(same_vec.sum()), "n_changed_same_id": int(same_prefix.sum()),
               "n_changed_new_id": int(moved.sum()), "n_new": int(new.sum()), "n_deleted": int(deleted.sum()),
               "n_resurrected": n_resurrected, "n_retired_digits_reused": n_unretired,
               "n_retired_total": int(len(kept)), "n_kept_code_mismatch": n_mismatch}
    return full, retired, changes, changed | new


def _empty_retired(levels: int):
    import pyarrow as pa

    return _codes_table(pa.array([], pa.string()), np.zeros((0, levels + 1), np.int32),
                        extra={"retired_in": pa.array([], pa.string())})


def _id_map(prev: SidVersion, ids, full: np.ndarray):
    import pyarrow as pa
    import pyarrow.compute as pc

    pt = prev.table()
    prev_ids = pt.column("item_id").combine_chunks()
    idx = pc.index_in(ids, value_set=prev_ids)
    old_sid = pc.take(pt.column("sid").combine_chunks(), idx)
    new_sid = sid_strings(full)
    gone = pc.invert(pc.is_in(prev_ids, value_set=ids))
    gone_ids = pc.filter(prev_ids, gone)
    return pa.table({"item_id": pa.concat_arrays([ids, gone_ids]),
                     "old_sid": pa.concat_arrays([old_sid, pc.filter(pt.column("sid").combine_chunks(), gone)]),
                     "new_sid": pa.concat_arrays([new_sid, pa.nulls(len(gone_ids), pa.string())])})


def build_semantic_ids(root: str | os.PathLike, shards: Sequence[ShardInput], config: SidConfig = SidConfig(), *,
                       retrain: bool = False, reports_dir: str | os.PathLike | None = None,
                       titles: Callable[[list[str]], Mapping[str, str]] | None = None,
                       log: Callable[[str], None] | None = None, store=None) -> SidResult:
    """Build or update the semantic IDs under `root` (HOME/semantic_ids) from `shards`; see the module docstring.

    Returns what happened (action: created | updated | unchanged | retrained, and the reason for a retrain), the
    version written (or the live one when unchanged), its manifest and the readiness report; with `reports_dir`
    the report is also written there as semantic_ids.json + .md. With `store` (core.store.Store: the base URI),
    versions and the report are published there and a newer version there is taken first (`sync_with_store`).
    Raises SemanticIdError with what to do."""
    with faiss_threads(config.threads):
        return _build(Path(root), list(shards), config, retrain, reports_dir, titles, log or log_.info, store)


def _write_sid_report(reports_dir, report: dict[str, Any], store) -> None:
    md, js = sid_report.write_report(Path(reports_dir), report)
    if store is not None:
        from embed_assets.core.store import publish_reports

        publish_reports(store, Path(reports_dir), [js.name, md.name])


def _build(root: Path, shards: list[ShardInput], config: SidConfig, retrain: bool, reports_dir, titles,
           log, store=None) -> SidResult:
    emb_version = check_inputs(shards)
    n_total = sum(s.n_rows for s in shards)
    fingerprints = {s.partition: s.fingerprint for s in shards}
    starts = np.cumsum([0] + [s.n_rows for s in shards])
    input_rows = {s.partition: [int(starts[i]), int(s.n_rows)] for i, s in enumerate(shards)}  # rows in the table
    with _locked(root):
        _clean_temp(root)
        if store is not None:
            sync_with_store(root, store, log)
        prev = load_version(root)
        reason = ""
        if prev is not None:
            if retrain:
                reason = "requested"
            elif prev.manifest["embedding_version"] != json.loads(json.dumps(emb_version, default=str)):
                reason = "embedding version changed"
            elif prev.manifest["config_identity"] != config.identity():
                reason = (f"configuration changed ({prev.manifest['config_identity']} -> {config.identity()})")
            elif prev.manifest["input_shards"] == fingerprints:
                report = {**prev.report(), "action": "unchanged", "reason": ""}
                if reports_dir is not None:
                    _write_sid_report(reports_dir, report, store)
                log(f"semantic IDs unchanged: {prev.name} was built from these shards")
                return SidResult("unchanged", "", prev.name, prev.path, prev.manifest, report)
        name = _next_version_name(root, store)
        changes: dict[str, Any] = {}
        comparison: dict[str, Any] = {}
        retired = None
        if prev is not None and not reason:
            # frozen codebooks: encode with the live quantizer, carry IDs over
            quantizer = prev.quantizer()
            k = prev.manifest["codebook_size"]
            extra = prev.manifest["extra_digit_size"]
            k_reason = prev.manifest["codebook_size_reason"]
            rows_q, queries = _queries_pass(shards, n_total, config)
            prev_table = prev.table()
            enc = encode_pass(shards, {config.quantizer: quantizer}, queries, rows_q, config.neighbour_k,
                              config.chunk_rows, log, carried=_carried_codes(prev, prev_table, config.levels))
            _check_unique_item_ids(enc.ids)
            codes = enc.per_q[config.quantizer]["codes"]
            full, retired, changes, fresh = _assign_incremental(prev, enc, codes, k, extra, config.levels, name,
                                                                prev_table)
            del prev_table
            # rows whose stored codes were re-used (unchanged vectors): no nearest-codeword search for them
            changes["n_codes_carried"] = int(enc.per_q[config.quantizer]["n_carried"])
            changes["drift"] = drift_test(enc.per_q[config.quantizer]["sqerr"], fresh,
                                          prev.manifest["training_sample"]["baseline_sqerr"], config)
            drifted = changes["drift"]["retrained"]
            log(f"drift: {changes['drift']['detail']}")
            if drifted:
                reason = "drift"
            else:
                action = "updated"
                training = prev.manifest["training_sample"]
                comparison = prev.report().get("comparison") or {}
                q_meta = prev.manifest["quantizer"]
        if prev is None or reason:
            info, sample, (rows_q, queries) = _training_pass(shards, n_total, config, log)
            quantizers, k, k_reason, train_s = _train_all(sample, info["n_distinct"], config, log)
            enc = encode_pass(shards, quantizers, queries, rows_q, config.neighbour_k, config.chunk_rows, log)
            _check_unique_item_ids(enc.ids)
            quantizer = quantizers[config.quantizer]
            codes = enc.per_q[config.quantizer]["codes"]
            digits = assign_fresh_digits(enc.ids, codes, k)
            full = np.concatenate([codes, digits[:, None]], axis=1)
            extra = config.extra_digit_size or config.codebook_size
            action = "retrained" if prev is not None else "created"
            drift = changes.get("drift")
            changes = {"previous_version": prev.name} if prev is not None else {}
            if drift:
                changes["drift"] = drift
            comparison = _comparison(enc, quantizers, k, train_s)
            training = {**info, "train_seconds": train_s[config.quantizer],
                        "baseline_sqerr": float(enc.per_q[config.quantizer]["sqerr"].mean()), "trained_in": name}
            q_meta = {**quantizer.describe(), "trained_in": name}
        table = _codes_table(enc.ids, full, enc.vector_hash)
        files = {"semantic_ids.parquet": table,
                 "retired.parquet": retired if retired is not None else _empty_retired(config.levels)}
        if action == "retrained" and prev is not None:
            files["id_map.parquet"] = _id_map(prev, enc.ids, full)
            import pyarrow.compute as pc

            m = files["id_map.parquet"]
            same = pc.sum(pc.fill_null(pc.equal(m.column("old_sid"), m.column("new_sid")), False)).as_py() or 0
            changes["n_ids_changed"] = int(m.num_rows - same)
        report = _assemble_report(version=name, action=action, reason=reason, config=config, k=k, k_reason=k_reason,
                                  extra=extra, enc=enc, full_codes=full, titles=titles, changes=changes,
                                  comparison=comparison, training=training, sids=table.column("sid"))
        stats_keys = ("n_items", "n_distinct_vectors", "duplicate_vector_rate", "largest_duplicate_group",
                      "collision_rate", "max_collision_group", "codebook_utilization", "perplexity",
                      "reconstruction_cosine", "reconstruction_mse", "neighbour_share_first_code",
                      "neighbour_share_first_two_codes", "min_utilization")
        manifest = {
            "format": FORMAT_VERSION, "version": name, "parent_version": prev.name if prev else None,
            "created_at": time.time(), "action": action, "reason": reason,
            "quantizer": q_meta, "levels": config.levels, "codebook_size": k,
            "codebook_size_requested": config.codebook_size, "codebook_size_reason": k_reason,
            "extra_digit_size": extra, "token_format": "<{letter}_{code}>, letters a.. per level, the last one the "
                                                      "collision digit",
            "training_sample": training, "seed": config.seed, "config": config.as_dict(),
            "config_identity": config.identity(),
            "embedding_version": json.loads(json.dumps(emb_version, default=str)),
            "input_shards": fingerprints, "input_rows": input_rows, "n_items": int(len(enc.ids)),
            "stats": {key: report.get(key) for key in stats_keys}, "changes": changes,
        }
        path = _write_version(root, name, files, quantizer, manifest, report)
        removed = _prune(root, config.keep_versions)
        if removed:
            log(f"removed old semantic ID versions {', '.join(removed)}")
        if store is not None:
            pub = publish_version(root, store, name, config.keep_versions, check=False)  # hashed as written
            log(f"semantic IDs {name} published to {store.uri(SID_REL)}: {pub['uploaded']} objects, "
                f"{pub['bytes']:,} bytes")
        manifest = json.loads((path / "manifest.json").read_text("utf-8"))
    if reports_dir is not None:
        _write_sid_report(reports_dir, report, store)
    log(f"semantic IDs {action}{f' ({reason})' if reason else ''}: {name}, {len(enc.ids):,} items")
    return SidResult(action, reason, name, path, manifest, report)

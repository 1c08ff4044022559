"""Embedding shards on disk, in the seed notebook's format, plus the manifest that makes a shard trusted.

A shard is three files, written in this order, each atomically:
  shard_<partition>.pt       {"item_id": list[str], "embeddings": float16 tensor n x dim}  (torch.load(weights_only=True))
  shard_<partition>.items.parquet item_id, row, text_hash      (what the catalog ingests, and item-level re-use reads)
  shard_<partition>.manifest.json partition, fingerprint, version, rows, norm stats, sha256 of both files above
The manifest comes last: a shard without a manifest, or whose checksums disagree with it, is never trusted.

With a base URI (`Layout.base_uri`, core/store.py) the same three files are published under
`<base URI>/embeddings/` right after they are written here (data objects first, the manifest last; skipped when the
store's manifest is already these bytes), and `fetch_shard` brings a partition's shard from there into HOME, each
file checked against the store's manifest before it is used.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from embed_assets.core.atomic import (atomic_write_bytes, atomic_write_hashed, atomic_write_json, sha256_file,
                                     temp_path_for)
from embed_assets.core.faults import crash_point
from embed_assets.core.layout import Layout

NORM_TOLERANCE = 5e-3  # the seed notebook's sanity cell


class ShardError(RuntimeError):
    """A shard that is missing, corrupt or disagrees with its manifest: rebuild its partition."""


@dataclass
class ShardManifest:
    partition: str
    fingerprint: str  # partition content + embedding version: equal fingerprint => identical shard
    rows_fingerprint: str  # partition content only
    n_rows: int
    dim: int
    dtype: str
    model_id: str
    model_revision: str
    max_seq_length: int
    chunking: bool
    shard_file: str
    shard_sha256: str
    shard_bytes: int
    items_file: str
    items_sha256: str
    norms: dict[str, float]
    n_encoded: int = 0
    n_reused: int = 0
    precision: str = ""  # how the encoded rows were computed (fp32, bf16 autocast, fp16); not part of the version
    norm_hist: dict[str, Any] = field(default_factory=dict)  # norm_error_histogram of the shard's vectors ({} in
    # manifests written before it existed); summed over shards by summarize_norms, never part of the fingerprint
    created_at: float = field(default_factory=time.time)

    @property
    def version(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_revision": self.model_revision,
                "max_seq_length": self.max_seq_length, "dim": self.dim, "chunking": self.chunking}

    @classmethod
    def read(cls, path: Path) -> "ShardManifest":
        data = json.loads(path.read_text("utf-8"))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def write(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))


def embedding_fingerprint(rows_fingerprint: str, version: dict[str, Any]) -> str:
    import hashlib

    blob = json.dumps({"rows": rows_fingerprint, **version}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _stats_of_norms(norms: np.ndarray, tol: float) -> dict[str, float]:
    if len(norms) == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "frac_outside_tol": 0.0}
    finite = np.isfinite(norms)
    return {
        "mean": float(norms[finite].mean()) if finite.any() else float("nan"),
        "std": float(norms[finite].std()) if finite.any() else float("nan"),
        "min": float(norms.min()),
        "max": float(norms.max()),
        "frac_outside_tol": float(np.mean(~finite | (np.abs(norms - 1.0) > tol))),
    }


# The norm-error histogram: counts of |norm - 1| on fixed bins, so the histograms of shards add up to the
# catalog's without reading a shard again (embedding_norms sums them from the manifests; the report draws it). Bin 0 is
# [0, 1e-7) (float32 cannot resolve less near 1), then quarter decades up to 1, and the last bin is >= 1; NaN/inf
# norms are counted apart. 30 integers per shard whatever its size; computing it is one pass over the norms the
# norm statistics already computed (77 ms for a 200,000-row shard measured on a busy 2-core machine; ~4 s over the
# 50 shards of 10M items, against hours of encoding).
NORM_HIST_EDGES: tuple[float, ...] = (0.0, *(float(f"{x:.6g}") for x in 10.0 ** np.arange(-7.0, 0.01, 0.25)))
NORM_HIST_SCHEME = "abs_norm_error_log10_q4_1e-7_to_1"


def norm_error_histogram(norms: np.ndarray) -> dict[str, Any]:
    """{"scheme", "counts" (one per NORM_HIST_EDGES entry: counts[i] holds edges[i] <= |norm - 1| < edges[i + 1],
    the last one >= edges[-1]), "nonfinite"} of these vector norms. Bounded: len(NORM_HIST_EDGES) integers."""
    err = np.abs(np.asarray(norms, dtype=np.float64) - 1.0)
    finite = np.isfinite(err)
    idx = np.searchsorted(np.asarray(NORM_HIST_EDGES), err[finite], side="right") - 1
    counts = np.bincount(idx, minlength=len(NORM_HIST_EDGES))
    return {"scheme": NORM_HIST_SCHEME, "counts": [int(c) for c in counts], "nonfinite": int((~finite).sum())}


def add_histograms(hists: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sum of norm_error_histogram results of this scheme (others, and {} from older manifests, are skipped:
    `n_vectors` says how many vectors the sum covers)."""
    counts = np.zeros(len(NORM_HIST_EDGES), dtype=np.int64)
    nonfinite = 0
    for h in hists:
        if h and h.get("scheme") == NORM_HIST_SCHEME and len(h.get("counts") or ()) == len(NORM_HIST_EDGES):
            counts += np.asarray(h["counts"], dtype=np.int64)
            nonfinite += int(h.get("nonfinite", 0))
    return {"scheme": NORM_HIST_SCHEME, "edges": list(NORM_HIST_EDGES), "counts": [int(c) for c in counts],
            "nonfinite": nonfinite, "n_vectors": int(counts.sum()) + nonfinite}


def norm_error_quantile(hist: dict[str, Any], q: float) -> float:
    """An upper bound of the q-quantile of |norm - 1| from a histogram: the upper edge of the bin that holds it
    (within a factor 10**0.25 = 1.78 above the true value; inf when it lies in the last bin or among non-finite
    norms). NaN for an empty histogram."""
    counts = np.asarray(hist.get("counts") or [], dtype=np.int64)
    total = int(counts.sum()) + int(hist.get("nonfinite", 0))
    if not total:
        return float("nan")
    i = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    return float(NORM_HIST_EDGES[i + 1]) if i + 1 < len(NORM_HIST_EDGES) else float("inf")


def norm_error_max(norms: dict[str, float], n_vectors: int | None = None) -> float:
    """max |norm - 1| over the vectors the stats describe (from their min and max; 0.0 with no vectors, inf when
    any norm is not finite)."""
    if n_vectors == 0:
        return 0.0
    lo, hi = float(norms["min"]), float(norms["max"])
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return float("inf")
    return max(abs(hi - 1.0), abs(1.0 - lo))


def norm_stats(emb: np.ndarray, tol: float = NORM_TOLERANCE) -> dict[str, float]:
    """mean/std/min/max of the vectors' L2 norms and the fraction outside 1 ± tol (NaN/inf count as outside)."""
    return _stats_of_norms(row_norms(emb), tol)


def norm_summary(emb: np.ndarray, tol: float = NORM_TOLERANCE) -> tuple[dict[str, float], dict[str, Any]]:
    """norm_stats and norm_error_histogram of these vectors, from one pass computing their norms (a shard's
    manifest records both)."""
    norms = row_norms(emb)
    return _stats_of_norms(norms, tol), norm_error_histogram(norms)


def row_norms(emb: np.ndarray) -> np.ndarray:
    """L2 norm of each row, computed in fp32 (fp16 squares would overflow for non-unit inputs)."""
    emb = np.asarray(emb)
    out = np.empty(len(emb), dtype=np.float32)
    for c in range(0, len(emb), 8_192):  # a 12 MB fp32 block at a time, not a copy of the whole shard
        x = emb[c:c + 8_192].astype(np.float32)
        out[c:c + 8_192] = np.einsum("ij,ij->i", x, x)
    return np.sqrt(out)


def norms_within(norms: dict[str, float], tol: float) -> bool:
    """The norm rule on recorded stats: every vector finite with norm in 1 ± tol."""
    return norms["frac_outside_tol"] == 0 and 1 - tol <= norms["min"] and norms["max"] <= 1 + tol


def write_shard_pt(path: Path, item_ids: Sequence[str], emb: np.ndarray) -> str:
    """Write the seed-format shard (torch.save straight into the file, hashed as it goes); returns its sha256."""
    import torch

    obj = {"item_id": list(item_ids), "embeddings": torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float16))}
    return write_vouched(path, lambda fh: torch.save(obj, fh))


def _load_pt(data: bytes) -> tuple[list[str], np.ndarray]:
    """A shard file's (ids, vectors): core/shard_pt.py's restricted C unpickler for the plain layout this module
    writes (10x faster), torch.load(weights_only=True) for anything else."""
    import io

    from embed_assets.core.shard_pt import NotASimpleShard, read_shard_pt

    try:
        return read_shard_pt(data)
    except NotASimpleShard:
        import torch

        loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        return list(loaded["item_id"]), loaded["embeddings"].numpy()


def write_shard_items(path: Path, item_ids: Sequence[str], text_hashes: Sequence[str]) -> str:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"item_id": pa.array(list(item_ids), pa.string()),
                      "row": pa.array(np.arange(len(item_ids)), pa.int64()),
                      "text_hash": pa.array(list(text_hashes), pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return write_vouched(path, lambda fh: fh.write(buf.getbuffer()))


def keep_previous(layout: Layout, key: str) -> None:
    """Hard-link the partition's current shard files into previous/ before they are replaced (manifest last, so a
    crash in between leaves an untrusted, ignored previous shard, never a wrong one)."""
    try:
        current = read_manifest(layout, key)
    except ShardError:
        return
    if current is None or verify_files(layout, current, cached_sha256):
        return  # only a trusted shard is worth keeping; never overwrite a good previous copy with a broken one
    layout.previous_dir.mkdir(parents=True, exist_ok=True)
    (layout.previous_dir / layout.shard_manifest(key).name).unlink(missing_ok=True)
    for src in (layout.shard_pt(key), layout.shard_items(key), layout.shard_manifest(key)):
        tmp = temp_path_for(layout.previous_dir / src.name)
        os.link(src, tmp)
        os.replace(tmp, layout.previous_dir / src.name)


def clear_previous(layout: Layout, indexed: dict[str, str] | None = None) -> int:
    """Drop the previous generation of shards once an index over current shards exists; returns files removed.

    Each partition's previous files are handled under its lock (taken without waiting): a partition being written
    right now is left alone, since its writer may be moving its shard into previous/ this very moment. With `indexed`
    ({partition: fingerprint} the index was built over), a previous shard *with* that fingerprint is kept when the
    current shard differs: it is the indexed generation, replaced after the index read it, and a writer running now
    may still re-use its vectors."""
    if not layout.previous_dir.exists():
        return 0
    n = 0
    for key in sorted({k for p in layout.previous_dir.glob("shard_*") if (k := shard_key_of(p.name))}):
        with partition_lock(layout, key, blocking=False) as mine:
            if not mine:
                continue  # a live writer of this partition: the next index build clears it
            try:
                prev = read_manifest(layout, key, layout.previous_dir)
                current = read_manifest(layout, key)
            except ShardError:
                prev = current = None
            if (prev is not None and indexed is not None and indexed.get(key) == prev.fingerprint
                    and (current is None or current.fingerprint != prev.fingerprint)):
                continue  # the indexed generation, replaced since by another one
            for path in (layout.previous_dir / layout.shard_manifest(key).name,  # manifest first
                         layout.previous_dir / layout.shard_pt(key).name,
                         layout.previous_dir / layout.shard_items(key).name):
                try:
                    path.unlink()
                    n += 1
                except FileNotFoundError:
                    pass
    if not any(layout.previous_dir.glob("shard_*")):  # nothing left for its checksum cache to speak for
        (layout.previous_dir / HASH_CACHE_NAME).unlink(missing_ok=True)
    return n


def write_shard(layout: Layout, manifest: ShardManifest, item_ids: Sequence[str], text_hashes: Sequence[str],
                emb_fp16: np.ndarray) -> ShardManifest:
    """Write .pt, items sidecar, then the manifest that vouches for both."""
    key = manifest.partition
    pt, items = layout.shard_pt(key), layout.shard_items(key)
    keep_previous(layout, key)
    # Checksums of the bytes we wrote, not of what is on disk afterwards: a manifest vouches only for its own data.
    manifest.shard_sha256 = write_shard_pt(pt, item_ids, emb_fp16)
    crash_point("shard_write")  # new .pt in place, manifest still the old one
    manifest.items_sha256 = write_shard_items(items, item_ids, text_hashes)
    manifest.shard_file = pt.name
    manifest.shard_bytes = pt.stat().st_size
    manifest.items_file = items.name
    manifest.write(layout.shard_manifest(key))
    publish_shard(layout, manifest)
    return manifest


EMBEDDINGS_REL = "embeddings"  # the shards' folder under the base URI, as under HOME


def publish_shard(layout: Layout, m: ShardManifest) -> dict[str, int] | None:
    """Publish a trusted shard under `<base URI>/embeddings/`: the .pt and the items sidecar (one PUT each), then
    the manifest (the same bytes as here). Nothing is uploaded when the store's manifest already is these bytes and
    its data objects have the local sizes (1 GET + 2 HEADs). None without a base URI. The caller holds the
    partition's lock (or is its writer)."""
    store = layout.store
    if store is None:
        return None
    from embed_assets.core.store import publish_set

    key = m.partition
    problems = verify_files(layout, m, cached_sha256)
    if problems:
        raise ShardError(f"shard {key} not published to {store.uri(EMBEDDINGS_REL)}: {'; '.join(problems)}; "
                         f"re-materialize partition {key}")
    mpath = layout.shard_manifest(key)
    mbytes = mpath.read_bytes()
    if ShardManifest(**{k: v for k, v in json.loads(mbytes).items() if k in ShardManifest.__dataclass_fields__}) \
            != m:
        raise ShardError(f"shard {key}: {mpath} changed while it was being published; re-materialize {key}")
    return publish_set(store, EMBEDDINGS_REL, {m.shard_file: layout.embeddings_dir / m.shard_file,
                                               m.items_file: layout.embeddings_dir / m.items_file},
                       mpath.name, mbytes)


def fetch_shard(layout: Layout, key: str, accept: Callable[[ShardManifest], bool] = lambda m: True
                ) -> ShardManifest | None:
    """The partition's shard from `<base URI>/embeddings/` into HOME, if the store's manifest is one `accept`
    takes: the .pt and the items sidecar are downloaded and checked against that manifest's sha256 (each renamed
    into place only when it matches), the manifest is written last. The shard it replaces is kept in previous/, as
    a rewrite here would. Returns the manifest, or None when the store has no manifest for it (or one `accept`
    refuses). Raises store.Untrusted, naming the URI, when the data objects do not match their manifest (a
    half-finished upload, a concurrent writer: the manifest is read again once). The caller holds the lock."""
    store = layout.store
    if store is None:
        return None
    from embed_assets.core.store import Untrusted

    mname = layout.shard_manifest(key).name
    mrel = f"{EMBEDDINGS_REL}/{mname}"
    raw = store.get_bytes(mrel)
    for attempt in range(2):
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            m = ShardManifest(**{k: v for k, v in data.items() if k in ShardManifest.__dataclass_fields__})
            if (m.partition, m.shard_file, m.items_file) != (key, layout.shard_pt(key).name,
                                                              layout.shard_items(key).name):
                raise ValueError(f"it names partition {m.partition!r}, files {m.shard_file!r}, {m.items_file!r}")
        except (ValueError, TypeError) as e:
            raise Untrusted(f"{store.uri(mrel)}: not a manifest of shard {key} ({e}); not used. Re-materialize "
                            f"partition {key}: it is encoded here and published again") from e
        if not accept(m):
            return None
        try:
            if attempt == 0:
                keep_previous(layout, key)
            store.get_file(f"{EMBEDDINGS_REL}/{m.shard_file}", layout.shard_pt(key), m.shard_sha256)
            store.get_file(f"{EMBEDDINGS_REL}/{m.items_file}", layout.shard_items(key), m.items_sha256)
        except Untrusted as e:
            again = store.get_bytes(mrel)
            if attempt == 0 and again != raw:
                raw = again  # republished while we read it: once more, with the new manifest
                continue
            raise Untrusted(f"{e}. Shard {key} is not taken from the store; re-materialize partition {key} (it is "
                            "encoded here and published again)") from None
        atomic_write_bytes(layout.shard_manifest(key), raw)
        return m
    return None


def read_manifest(layout: Layout, key: str, folder: Path | None = None) -> ShardManifest | None:
    path = layout.shard_manifest(key)
    if folder is not None:
        path = folder / path.name
    if not path.exists():
        return None
    try:
        return ShardManifest.read(path)
    except Exception as e:
        raise ShardError(f"{path}: unreadable manifest ({e}); re-materialize partition {key}") from e


def list_manifests(layout: Layout, folder: Path | None = None) -> list[ShardManifest]:
    folder = folder or layout.embeddings_dir
    out = []
    for p in sorted(folder.glob("shard_*.manifest.json")):
        try:
            out.append(ShardManifest.read(p))
        except (OSError, ValueError, TypeError):
            continue  # unreadable manifest: its shard is untrusted, as if absent
    return out


_SHARD_NAME = re.compile(r"^shard_(p[01]*)\.")


def shard_key_of(name: str) -> str | None:
    """The partition a shard file belongs to (`shard_p0110.pt` -> `p0110`); None for any other name."""
    match = _SHARD_NAME.match(name)
    return match.group(1) if match else None


# sha256 by path, remembered with the file's (size, mtime_ns, ctime_ns, inode). A file whose mtime is within
# _RACY_S of the moment it was hashed is not remembered (it may still change within one mtime tick: git's "racy
# clean" problem), nor one that changed while it was hashed. ctime cannot be set back by a user, unlike mtime.
#
# Two layers: this process's memory, and a small JSON file per folder (HASH_CACHE_NAME), so that a restarted daemon
# or a new run does not hash every shard again: its first sensor tick costs a stat per file. The file is only a
# cache: a lost or stale entry costs a re-hash, never trust (an entry answers only for the exact same stat).
# `embed-assets verify` hashes everything anyway (`refresh=True`).
HASH_CACHE_NAME = ".sha256-cache.json"
_HASHES: dict[str, tuple[tuple[int, int, int, int], str]] = {}
_DISK: dict[str, tuple[int, dict[str, list]]] = {}
_RACY_S = 2.0


def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _disk_cache(folder: str) -> dict[str, list]:
    f = os.path.join(folder, HASH_CACHE_NAME)
    try:
        mtime = os.stat(f).st_mtime_ns
    except OSError:
        return {}
    hit = _DISK.get(folder)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    _DISK[folder] = (mtime, data)
    return data


def _remember_on_disk(path: str, key: tuple[int, int, int, int], digest: str) -> None:
    folder, name = os.path.split(path)
    data = {n: v for n, v in _disk_cache(folder).items() if n != name and os.path.exists(os.path.join(folder, n))}
    data[name] = [*key, digest]
    try:
        atomic_write_json(Path(folder) / HASH_CACHE_NAME, data)
    except OSError:
        pass  # a read-only folder: the memory layer still serves this process


def remembered_sha256(path: str, key: tuple[int, int, int, int]) -> str | None:
    """The digest remembered for this exact stat of `path` (this process, then the folder's cache file), or None."""
    hit = _HASHES.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    folder, name = os.path.split(path)
    disk = _disk_cache(folder).get(name)
    if isinstance(disk, list) and len(disk) == 5 and tuple(disk[:4]) == key:
        _HASHES[path] = (key, disk[4])
        return disk[4]
    return None


def remember_sha256(path: str, st: os.stat_result, key_after: tuple[int, int, int, int], digest: str) -> None:
    """Remember a digest taken between two stats of the file, unless it moved meanwhile or is racy-new."""
    key = stat_key(st)
    if key_after == key and time.time() - st.st_mtime > _RACY_S:
        _HASHES[path] = (key, digest)
        _remember_on_disk(path, key, digest)
    else:
        _HASHES.pop(path, None)


def backdated_mtime_ns() -> int:
    """An mtime for a file this process writes and hashes as it goes (`write_vouched`): _RACY_S + 1 s in the past.
    Any later write to the file sets its mtime to the present, which cannot equal this one, so its remembered digest
    is never racy and is remembered at once; without it, a file is re-hashed by everything that checks it within
    _RACY_S of its writing (the catalog record, the norm check: about 3 reads of every new shard)."""
    return time.time_ns() - int((_RACY_S + 1) * 1e9)


def remember_written(path: str | os.PathLike, digest: str, mtime_ns: int) -> None:
    """Remember the digest of a file this process wrote (hashed as it was written) and gave `mtime_ns`
    (`backdated_mtime_ns`). Not when its mtime is no longer that one: written again since, by someone else."""
    st = os.stat(path)
    if st.st_mtime_ns == mtime_ns:
        remember_sha256(str(path), st, stat_key(st), digest)


def write_vouched(path: Path, write: Callable[[Any], Any]) -> str:
    """Write a file atomically through `write(fh)`, hashed as it goes; returns the sha256 of exactly the bytes written
    and remembers it for the file's stat (`backdated_mtime_ns`), so the readers that check the file next do not hash
    it again."""
    mtime = backdated_mtime_ns()
    digest = atomic_write_hashed(path, write, mtime)
    remember_written(path, digest, mtime)
    return digest


def unchanged_since_hashed(path: str, st: os.stat_result, key_after: tuple[int, int, int, int], sha256: str) -> bool:
    """The one rule for trusting a file's bytes without hashing them: the open descriptor's stat (size, mtime, ctime,
    inode) is the same before and after the read, and that stat was remembered with this digest (`cached_sha256`'s
    memory: this process, or the folder's cache file). Shards and index versions are only replaced by rename, never
    edited in place, and an edit in place moves ctime, which no user can set back. `embed-assets verify` re-hashes
    anyway (bit rot under an unchanged stat is its job)."""
    return key_after == stat_key(st) and remembered_sha256(path, key_after) == sha256


def cached_sha256(path: str | os.PathLike, refresh: bool = False) -> str:
    """sha256 of a file, re-hashed only when its size, mtime, ctime or inode moved ("" when the file is missing).

    An unchanged shard is hashed once, not once per process: the catalog sync, the index build and the sensor call
    this over every shard, and the expensive part (the hash) grows with what was written since, not with the
    catalog. `refresh` hashes anyway (verify's full check) and remembers the result for the others."""
    path = str(path)
    try:
        st = os.stat(path)
        if not refresh:
            hit = remembered_sha256(path, stat_key(st))
            if hit is not None:
                return hit
        digest = sha256_file(path)
        after = os.stat(path)
    except FileNotFoundError:
        _HASHES.pop(path, None)
        return ""
    remember_sha256(path, st, stat_key(after), digest)
    return digest


def verify_files(layout: Layout, m: ShardManifest,
                 hasher: Callable[[Path], str] = sha256_file) -> list[str]:
    """Problems with a shard's files against its manifest (empty list: the files are what the manifest says)."""
    problems = []
    for name, expected in ((m.shard_file, m.shard_sha256), (m.items_file, m.items_sha256)):
        path = layout.embeddings_dir / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif hasher(path) != expected:
            problems.append(f"{name} checksum mismatch (file changed or corrupt)")
    return problems


def _judge(layout: Layout, rg: dict[str, Any], tol: float) -> tuple[ShardManifest | None, str, bool]:
    """(the trusted current manifest, or the problem and whether the store could fix it) for one partition."""
    key = rg["partition"]
    try:
        m = read_manifest(layout, key)
    except ShardError as e:
        return None, f"{key}: {e}", True
    if m is None:
        return None, f"{key}: no shard (materialize item_embeddings for it)", True
    if m.rows_fingerprint != rg["fingerprint"]:
        return None, f"{key}: shard is stale, its partition changed (re-materialize it)", True
    if verify_files(layout, m, cached_sha256):
        return None, f"{key}: shard files do not match the manifest (re-materialize it)", True
    if not norms_within(m.norms, tol):
        return None, (f"{key}: norms outside 1 ± {tol:g} (min {m.norms['min']:.5f}, "
                      f"max {m.norms['max']:.5f}); the norm check fails for it"), False
    return m, "", False


def _fetch_current(layout: Layout, rg: dict[str, Any]) -> str:
    """Bring a partition's shard for its current rows from the store (when there is one); '' or why not."""
    from embed_assets.core.store import StoreError

    key = rg["partition"]
    with partition_lock(layout, key, blocking=False) as mine:
        if not mine:
            return "it is being written here right now"
        try:
            got = fetch_shard(layout, key, accept=lambda m: m.rows_fingerprint == rg["fingerprint"])
        except StoreError as e:
            return str(e)
    return "" if got is not None else f"the store {layout.store.uri(EMBEDDINGS_REL)} has no current shard for it"


def current_shards(layout: Layout, row_groups: Sequence[dict[str, Any]], tol: float = NORM_TOLERANCE
                   ) -> tuple[list[ShardManifest], list[str]]:
    """The one answer to "is this partition's shard current and trusted?", for everything that reads all shards (the
    index, the semantic IDs): (the manifests of the partitions whose shard is, in row-group order; one problem line,
    with what to do, per partition whose shard is not). Current: built from the partition's rows as processed now.
    Trusted: its files match the manifest's checksums (stat-cached, see cached_sha256) and its norms are within
    `tol`. Mixed embedding versions are a problem too. With a base URI, a partition whose shard is missing, stale or
    untrusted here is first fetched from the store (checksums verified; a GET of its manifest, only for those)."""
    problems, manifests = [], []
    for rg in row_groups:
        m, problem, fetchable = _judge(layout, rg, tol)
        if problem and fetchable and layout.store is not None:
            why = _fetch_current(layout, rg)
            m, problem, _ = _judge(layout, rg, tol)
            if problem and why:
                problem = f"{problem}; {why}"
        if problem:
            problems.append(problem)
        else:
            manifests.append(m)
    versions = {json.dumps(m.version, sort_keys=True) for m in manifests}
    if len(versions) > 1:
        problems.append(f"shards of {len(versions)} embedding versions would mix: {sorted(versions)}; "
                        "re-materialize all partitions with one model")
    return manifests, problems


def _stat_vouches(path: Path, sha256: str) -> bool:
    """The file's stat now is one remembered with this digest (the rule of `unchanged_since_hashed`, for a caller
    that needs no bytes)."""
    try:
        return remembered_sha256(str(path), stat_key(os.stat(path))) == sha256
    except FileNotFoundError:
        return False


def read_verified_bytes(path: Path, sha256: str, partition: str) -> bytes:
    """Read a file once and check its bytes: what is parsed is exactly what was checked (no race with a rewrite).

    The bytes are hashed unless this very file was hashed before to this digest (`unchanged_since_hashed`), so a load
    costs a read, not a read and a hash, and a pipeline run that loads each shard several times (norm check, re-use,
    index, semantic IDs) hashes it once."""
    import hashlib

    name = str(path)
    try:
        with open(name, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
            key_after = stat_key(os.fstat(fh.fileno()))
    except FileNotFoundError:
        raise ShardError(f"shard {partition}: {path.name} is missing; re-materialize partition {partition}") from None
    if unchanged_since_hashed(name, st, key_after, sha256):
        return data
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ShardError(f"shard {partition}: {path.name} checksum mismatch (changed or corrupt); "
                         f"re-materialize partition {partition}")
    remember_sha256(name, st, key_after, digest)
    return data


# Parsed shards by checksum of their verified bytes: in one process (CLI, in-process runs) the check, the norm summary,
# re-use and the index build read the same shard; parsing is the slow part, the hash is not.
_PARSED: "OrderedDict[str, tuple[list[str], np.ndarray]]" = OrderedDict()
_PARSED_MAX = 2


def load_verified(layout: Layout, m: ShardManifest, folder: Path | None = None) -> tuple[list[str], np.ndarray]:
    """A shard's ids and fp16 vectors, only if the file is byte for byte what its manifest vouches for. A shard parsed
    already (`_PARSED`) whose file's stat is still the one remembered with this digest is not read at all: the read
    would only feed a stat check (`read_verified_bytes`), since its bytes are not parsed again."""
    path, sha = (folder or layout.embeddings_dir) / m.shard_file, m.shard_sha256
    if not (sha in _PARSED and _stat_vouches(path, sha)):
        data = read_verified_bytes(path, sha, m.partition)  # raises unless the bytes are what the manifest says
        if sha not in _PARSED:
            try:
                _PARSED[sha] = _load_pt(data)
            except Exception as e:
                raise ShardError(f"shard {m.partition}: unreadable ({e}); re-materialize partition "
                                 f"{m.partition}") from e
            while len(_PARSED) > _PARSED_MAX:
                _PARSED.popitem(last=False)
    _PARSED.move_to_end(sha)
    ids, emb = _PARSED[sha]
    return list(ids), emb.copy()


def load_verified_items(layout: Layout, m: ShardManifest, folder: Path | None = None):
    """The shard's items sidecar (item_id, row, text_hash) as a pyarrow table, checksum verified."""
    import io

    import pyarrow.parquet as pq

    data = read_verified_bytes((folder or layout.embeddings_dir) / m.items_file, m.items_sha256, m.partition)
    return pq.read_table(io.BytesIO(data))


def validate_shard(ids: Sequence[str], emb: np.ndarray, expected_rows: int, dim: int,
                   tol: float = NORM_TOLERANCE) -> tuple[list[str], dict[str, float]]:
    """The norm check's rules, pure: unit norm within tol, dim, finite, unique ids, row count."""
    problems = []
    stats = norm_stats(emb, tol)
    if emb.ndim != 2 or emb.shape[1] != dim:
        problems.append(f"shape {tuple(emb.shape)}, expected (n, {dim})")
    if len(ids) != len(emb):
        problems.append(f"{len(ids)} ids but {len(emb)} vectors")
    if len(ids) != expected_rows:
        problems.append(f"{len(ids)} rows, expected {expected_rows} (the row group's non-empty texts)")
    n_nonfinite = int((~np.isfinite(emb)).any(axis=1).sum()) if emb.size else 0
    if n_nonfinite:
        problems.append(f"{n_nonfinite} vectors hold NaN or inf")
    n_dup = len(ids) - len(set(ids))
    if n_dup:
        problems.append(f"{n_dup} duplicated item ids")
    if stats["frac_outside_tol"] > 0:
        problems.append(f"{stats['frac_outside_tol']:.2%} of norms are outside 1 ± {tol:g} "
                        f"(min {stats['min']:.5f}, max {stats['max']:.5f})")
    return problems, stats


def items_mismatch(group_ids: list[str], group_hashes: list[str], shard_ids: list[str], sidecar_ids: list[str],
                   sidecar_hashes: list[str]) -> list[str]:
    """The shard is exactly its partition: same ids, same order, same text hashes."""
    problems = []
    if shard_ids != sidecar_ids:
        problems.append("the shard's .pt and its items sidecar list different item ids; re-materialize it")
    if len(shard_ids) == len(group_ids) and shard_ids != group_ids:
        problems.append("the shard's item ids are not its partition's items (in order); re-materialize it")
    elif sidecar_ids == group_ids and sidecar_hashes != group_hashes:
        changed = [i for i, a, b in zip(group_ids, group_hashes, sidecar_hashes) if a != b]
        problems.append(f"{len(changed)} items were encoded from other text than processed_items now holds "
                        f"(e.g. {changed[:3]}); re-materialize it")
    return problems


@contextmanager
def partition_lock(layout: Layout, key: str, blocking: bool = True):
    """An exclusive per-partition lock (flock): two writers of one partition never interleave their files, and
    repair never touches a partition that is being written. Yields False when non-blocking and already held."""
    lock_dir = layout.embeddings_dir / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_shard(layout: Layout, key: str, keep: bool = True) -> bool:
    """Delete a partition's shard files; the manifest goes first so nothing trusts a half-deleted shard. With
    `keep`, the shard stays in previous/ so items that moved elsewhere can still re-use their vectors."""
    if keep:
        keep_previous(layout, key)
    removed = False
    for path in (layout.shard_manifest(key), layout.shard_pt(key), layout.shard_items(key)):
        try:
            path.unlink()
            removed = True
        except FileNotFoundError:
            pass
    return removed


def summarize_norms(layout: Layout, partitions: Sequence[str], tol: float = NORM_TOLERANCE) -> dict[str, Any]:
    """Norm statistics over all shards, as the seed's sanity cell printed them, plus one row per shard.

    Built from the manifests' per-shard stats (written with each shard, over its fp16 vectors): O(partitions), no
    shard is read. Only a shard whose recorded range straddles a tolerance other than the one it was recorded with
    is read again, to count its vectors outside it. The per-partition check reads every shard's real vectors.

    `histogram` is the catalog's norm-error histogram: the sum of the shards' recorded histograms (add_histograms;
    30 integers per manifest, O(partitions)). A shard recorded before manifests held one is not read for it: its
    vectors are missing from the histogram (`histogram.n_vectors` < `overall.n_vectors`) until it is re-encoded."""
    per_shard, hists = [], []
    for key in partitions:
        m = read_manifest(layout, key)
        if m is None:
            raise ShardError(f"partition {key} has no shard yet; materialize item_embeddings for it")
        st = {k: float(m.norms[k]) for k in ("mean", "std", "min", "max", "frac_outside_tol")}
        inside = 1 - tol <= st["min"] and st["max"] <= 1 + tol
        if inside:
            st["frac_outside_tol"] = 0.0
        elif tol != NORM_TOLERANCE or not all(np.isfinite(list(st.values()))):
            _, emb = load_verified(layout, m)
            st, hist = norm_summary(emb, tol)
            hists.append(hist)
            per_shard.append({"partition": key, "rows": m.n_rows, **st})
            continue
        hists.append(m.norm_hist)
        per_shard.append({"partition": key, "rows": m.n_rows, **st})
    n = sum(s["rows"] for s in per_shard)
    if n:
        w = np.array([s["rows"] for s in per_shard], dtype=np.float64) / n
        means = np.array([s["mean"] for s in per_shard])
        stds = np.array([s["std"] for s in per_shard])
        mean = float(w @ means)
        overall_stats = {"mean": mean, "std": float(np.sqrt(max(w @ (stds**2 + means**2) - mean**2, 0.0))),
                         "min": min(s["min"] for s in per_shard), "max": max(s["max"] for s in per_shard),
                         "frac_outside_tol": float(w @ np.array([s["frac_outside_tol"] for s in per_shard]))}
    else:
        overall_stats = _stats_of_norms(np.zeros(0, np.float32), tol)
    overall = {"n_vectors": n, **overall_stats, "tolerance": tol}
    return {"overall": overall, "shards": per_shard, "histogram": add_histograms(hists)}

"""Exports of the item vectors and their Semantic IDs in the formats generative-recommender projects read.

  grid     embeddings.pt (torch float32 N x d, row = item index; `torch.load`), semantic_ids.pt (int64 N x (L+1)),
           item_ids.json (row -> item_id)                                         [snap-research/GRID style]
  lcrec    NAME.emb-MODEL.npy (float32 N x d; `np.load`), NAME.index.json ({"row": ["<a_7>", "<b_1>", ...]};
           `json.load`), NAME.item2id (item_id TAB row)                             [LC-Rec / MiniOneRec style]
  parquet  NAME.parquet: item_id, sid, codes list<int32>, embedding list<float32>  [semantic-ids-llm style]

Rows follow the shards' order. One pass, one shard in memory at a time (the N x d arrays are written through a
memory map); every file is written under a temp name and renamed into place at the end, with export_manifest.json
last. The export refuses shards that disagree with the semantic ID version (an item without an ID, or whose vector
changed since): materialize semantic_ids first.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from embed_assets.core.atomic import _fsync_dir, atomic_write_json, temp_path_for

FORMATS = ("grid", "lcrec", "parquet")


class ExportError(RuntimeError):
    pass


def _model_slug(version: dict[str, Any]) -> str:
    model = str(version.get("model_id", "embeddings")).rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in model) or "embeddings"


def _how_to_read(fmt: str, names: list[str]) -> str:
    if fmt == "grid":
        return "torch.load('embeddings.pt') -> float32 N x d; row i is json.load(open('item_ids.json'))[i]"
    if fmt == "lcrec":
        return f"np.load('{names[0]}'); json.load(open('{names[1]}'))[str(i)] -> the tokens of row i"
    return f"pyarrow.parquet.read_table('{names[0]}')"


def export(sid_version, shards: Sequence[Any], fmt: str, out_dir: str | os.PathLike, *, name: str = "items",
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write `fmt` (grid | lcrec | parquet) for `sid_version` (a semantic_ids.SidVersion) into `out_dir`.

    `shards` are the semantic_ids.ShardInput the version was built from. Returns the export manifest (files,
    n_items, format, version)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from embed_assets.core.semantic_ids import _table_codes, sid_strings, vector_hashes

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = sid_version.table()
    levels = sid_version.manifest["levels"]
    all_codes = _table_codes(table, levels + 1)
    sid_ids = table.column("item_id").combine_chunks()
    sid_hash = table.column("vector_hash").to_numpy()
    n = sum(s.n_rows for s in shards)
    if n != table.num_rows:
        raise ExportError(f"the shards hold {n:,} items but semantic ID version {sid_version.name} has "
                          f"{table.num_rows:,}: materialize semantic_ids first, then export")
    dim = int(sid_version.manifest.get("embedding_version", {}).get("dim") or 0)
    slug = _model_slug(sid_version.manifest.get("embedding_version", {}))
    names = {"grid": ["embeddings.pt", "semantic_ids.pt", "item_ids.json"],
             "lcrec": [f"{name}.emb-{slug}.npy", f"{name}.index.json", f"{name}.item2id"],
             "parquet": [f"{name}.parquet"]}[fmt]
    tmps = {f: temp_path_for(out / f) for f in names}
    handles: dict[str, Any] = {}
    mm = None
    t0 = time.perf_counter()
    try:
        writer = None
        offset = 0
        first = True
        for s in shards:
            ids, vecs = s.load()
            if len(ids) == 0:
                continue
            if dim == 0:
                dim = vecs.shape[1]
            ids_arr = pa.array(list(ids), pa.string())
            idx = pc.index_in(ids_arr, value_set=sid_ids)
            if idx.null_count:
                missing = pc.filter(ids_arr, pc.is_null(idx)).to_pylist()[:3]
                raise ExportError(f"items {missing} (shard {s.partition}) have no semantic ID in version "
                                  f"{sid_version.name}: materialize semantic_ids first, then export")
            rows = idx.to_numpy().astype(np.int64)
            if (sid_hash[rows] != vector_hashes(vecs)).any():
                raise ExportError(f"shard {s.partition} holds vectors that changed since semantic ID version "
                                  f"{sid_version.name}: materialize semantic_ids first, then export")
            codes = all_codes[rows]
            x = np.asarray(vecs, dtype=np.float32)
            if fmt in ("grid", "lcrec") and mm is None:
                npy = tmps["embeddings.pt"].with_suffix(".npy.tmp") if fmt == "grid" else tmps[names[0]]
                mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, dim))
            if mm is not None:
                mm[offset:offset + len(x)] = x
            if fmt == "grid":
                if first:
                    handles["ids"] = open(tmps["item_ids.json"], "w", encoding="utf-8")
                    handles["ids"].write("[")
                    handles["codes"] = np.empty((n, levels + 1), dtype=np.int64)
                handles["ids"].write(("" if first else ",") + ",".join(json.dumps(i) for i in ids))
                handles["codes"][offset:offset + len(x)] = codes
            elif fmt == "lcrec":
                if first:
                    handles["index"] = open(tmps[names[1]], "w", encoding="utf-8")
                    handles["index"].write("{")
                    handles["item2id"] = open(tmps[names[2]], "w", encoding="utf-8")
                toks = [[f"<{chr(97 + lv)}_{int(c)}>" for lv, c in enumerate(row)] for row in codes.tolist()]
                handles["index"].write(("" if first else ",") + ",".join(
                    f"\n{json.dumps(str(offset + j))}: {json.dumps(t)}" for j, t in enumerate(toks)))
                handles["item2id"].write("".join(f"{i}\t{offset + j}\n" for j, i in enumerate(ids)))
            else:
                flat = pa.array(x.reshape(-1))
                emb = pa.ListArray.from_arrays(pa.array(np.arange(0, len(x) * dim + 1, dim, dtype=np.int32)), flat)
                cflat = pa.array(codes.reshape(-1).astype(np.int32))
                clist = pa.ListArray.from_arrays(
                    pa.array(np.arange(0, len(x) * (levels + 1) + 1, levels + 1, dtype=np.int32)), cflat)
                batch = pa.table({"item_id": ids_arr, "sid": sid_strings(codes), "codes": clist, "embedding": emb})
                if writer is None:
                    writer = pq.ParquetWriter(tmps[names[0]], batch.schema, compression="zstd")
                writer.write_table(batch)
            offset += len(x)
            first = False
            if log:
                log(f"export {fmt}: {offset:,}/{n:,} items")
        if writer is not None:
            writer.close()
        if fmt == "grid":
            import torch

            handles["ids"].write("]")
            handles.pop("ids").close()
            mm.flush()
            torch.save(torch.from_numpy(mm), tmps["embeddings.pt"])
            del mm
            mm = None
            tmps["embeddings.pt"].with_suffix(".npy.tmp").unlink()
            torch.save(torch.from_numpy(handles.pop("codes")), tmps["semantic_ids.pt"])
        elif fmt == "lcrec":
            mm.flush()
            del mm
            mm = None
            handles["index"].write("\n}\n")
            handles.pop("index").close()
            handles.pop("item2id").close()
        for f in names:
            with open(tmps[f], "rb+") as fh:
                os.fsync(fh.fileno())
        for f in names:
            os.replace(tmps[f], out / f)
        _fsync_dir(out)
    finally:
        for h in handles.values():
            if hasattr(h, "close"):
                h.close()
        mm = None
        for p in list(tmps.values()) + [tmps.get("embeddings.pt", out / "_").with_suffix(".npy.tmp")]:
            if p.exists():
                p.unlink()
    manifest = {"format": fmt, "semantic_id_version": sid_version.name, "n_items": n, "dim": dim,
                "levels": levels, "files": names, "embedding_version": sid_version.manifest.get("embedding_version"),
                "seconds": time.perf_counter() - t0, "created_at": time.time(),
                "how_to_read": _how_to_read(fmt, names)}
    atomic_write_json(out / "export_manifest.json", manifest)
    return manifest

"""Streaming ingest: raw item files -> one Parquet file per stable partition, in memory bounded by a budget.

Two passes, neither holding the catalog in memory:

1. **Read** each file in blocks (a block is at most `block_bytes` of input). A block is parsed by Arrow's vectorized
   readers (JSONL, CSV, Parquet). Only a JSONL block that Arrow cannot take whole (a bad line, mixed types, a blank
   line) goes through the exact row-by-row reader, so every bad row is still reported with file, row and reason and
   never poisons its neighbours. Text cleaning, joining, truncation, hashing and the id's partition hash then run as one
   DuckDB statement over the Arrow block (the same rules as `core.text`, byte for byte; tested against it). The clean
   rows are spilled to a Parquet file sorted by id-hash, the rejects are appended to the rejects file.
2. **Partition**: for each partition (a hash prefix, `core.partitioning`), DuckDB reads only the spill row groups of
   its hash range, keeps the last row of each duplicated id, orders rows by item id and fingerprints them. Only a
   partition whose fingerprint changed is written; an unchanged one keeps its file, so nothing downstream re-runs.

Memory: one block in pass 1 and one partition in pass 2, plus DuckDB's `memory_limit` (the budget's share); never the
catalog. Cost at 10M items: one read of the raw bytes, one write and one read of the spill (about the size of the clean
text), and a write of the partitions that changed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from embed_assets.core.atomic import abandoned_work_dir, atomic_write, atomic_write_json, sha256_file
from embed_assets.core.faults import crash_point
from embed_assets.core.partitioning import (ID_HASH_SQL, Leaf, check_cover, full_level, initial_depth, leaf_of_key,
                                            split_overfull)
from embed_assets.core.text import field_text, normalize_id

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES

# core.text.clean_text for DuckDB's RE2, in one pass: control characters (C0/C1 but tab, newline, CR) become spaces and
# whitespace runs (Python's str.isspace() set) collapse to one space; that is, every run of characters from the union
# becomes one space. Runs of one plain space are left alone (no match), so clean text costs almost nothing.
# In RE2's escapes (no raw control characters in SQL text). Python's whitespace set is \t\n\x0b\x0c\r\x1c-\x1f, space,
# \x85, \xa0 and the Unicode spaces below; the control set is \x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f.
_UNICODE_SPACES = r"\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_DIRTY_RE = rf"[\x00-\x20\x7f-\xa0{_UNICODE_SPACES}]{{2,}}|[\x00-\x1f\x7f-\xa0{_UNICODE_SPACES}]"
# str.strip() for ids: whitespace only, at both ends.
_WS = rf"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0{_UNICODE_SPACES}"
_ID_EDGE_RE = rf"^[{_WS}]+|[{_WS}]+$"

PARTITION_COLUMNS = ("item_id", "text", "title", "text_hash", "source_file", "source_row")


class ItemsError(ValueError):
    """Input that cannot be processed at all (missing file, wrong fields, empty catalog)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on input; defaults comfortably handle catalogs of tens of millions of items."""

    max_file_bytes: int = 20 * 1024**3
    max_rows_per_file: int = 50_000_000
    max_id_chars: int = 512
    # Characters kept per text; the tokenizer only sees the first 256 tokens (~1-2k chars) anyway.
    max_text_chars: int = 100_000


@dataclass(frozen=True)
class Reject:
    file: str
    row: int  # 1-based: line number (JSONL), data row + 1 with the header as line 1 (CSV), row index + 1 (Parquet)
    item_id: str | None
    reason: str
    detail: str = ""


def suffix_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)


def discover_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly, plus supported files inside named folders (sorted, hidden files skipped)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(
                sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and suffix_of(f))
            )
        elif p.is_file():
            if not suffix_of(p):
                raise ItemsError(f"{p}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
            files.append(p)
        else:
            raise ItemsError(f"{p}: no such file or folder; check the items path (--items / ItemSource.paths)")
    if not files:
        raise ItemsError(f"no item files found in {', '.join(map(str, paths))} (looked for {', '.join(SUPPORTED_SUFFIXES)})")
    return files


# -- pass 1: blocks ---------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """Rows of one file, normalized to strings but not yet cleaned: `row`, `raw_id` (str or null), `id_error`
    (an invalid_id detail or null), `f0..fN` (the text fields as `field_text` renders them), `title_raw`."""

    table: Any  # pyarrow.Table
    rejects: list[Reject]
    n_rows: int  # rows read, rejected ones included
    fields_seen: set[str]


class _HashingReader(io.RawIOBase):
    """Passes a file's bytes on and hashes each one as it goes: the checksum is of exactly the bytes parsed, even
    when the file is rewritten while it is read."""

    def __init__(self, fh, hasher):
        self._fh, self._hasher = fh, hasher

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._fh.readinto(b)
        if n:
            self._hasher.update(memoryview(b)[:n])
        return n

    def drain(self) -> None:
        """Hash what the parser left unread (gzip padding, a last partial block), so the checksum is the file's."""
        while block := self._fh.read(1 << 20):
            self._hasher.update(block)


@contextmanager
def _open_binary(path: Path, hasher=None):
    """The file's (decompressed) bytes; with `hasher`, every raw byte read is hashed, and the rest of the file
    too once the caller is done (only on a normal exit: a parse that failed records nothing)."""
    with open(path, "rb") as raw:
        reader = _HashingReader(raw, hasher) if hasher is not None else None
        src = io.BufferedReader(reader, buffer_size=1 << 20) if reader is not None else raw
        if path.name.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=src, mode="rb") as gz:
                yield gz
        else:
            yield src
        if reader is not None:
            reader.drain()


def _byte_blocks(fh, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(first line number, bytes) blocks cut at line ends."""
    lineno, rest = 1, b""
    while True:
        chunk = fh.read(block_bytes)
        if not chunk:
            if rest:
                yield lineno, rest
            return
        data = rest + chunk
        chunk = b""
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        block, rest = data[: cut + 1], data[cut + 1 :]
        data = b""
        n_lines = block.count(b"\n")
        yield lineno, block
        block = b""  # dropped before the next read: one block's bytes alive at a time, not three
        lineno += n_lines


def _string_array(values: list):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _python_block(rows: Iterator[tuple[int, Any, str, str]], path: Path, id_field: str, text_fields: Sequence[str],
                  title_field: str) -> Block:
    """The exact row-by-row reader, for blocks Arrow cannot take whole."""
    import pyarrow as pa

    out_row, out_id, out_err, out_title = [], [], [], []
    out_f: list[list[str]] = [[] for _ in text_fields]
    rejects, n, seen = [], 0, set()
    for rowno, rec, reason, detail in rows:
        n += 1
        if rec is None:
            rejects.append(Reject(str(path), rowno, None, reason, detail))
            continue
        seen.update(k for k in (id_field, *text_fields) if k in rec)
        raw = rec.get(id_field)
        item_id = normalize_id(raw)
        out_row.append(rowno)
        out_id.append(item_id)
        out_err.append(f"{id_field!r} is a {type(raw).__name__}, not a string or number"
                       if item_id is None and raw is not None else None)
        for j, f in enumerate(text_fields):
            out_f[j].append(field_text(rec.get(f)))
        out_title.append(field_text(rec.get(title_field)))
    table = pa.table({"row": pa.array(out_row, pa.int64()), "raw_id": _string_array(out_id),
                      "id_error": _string_array(out_err),
                      **{f"f{j}": _string_array(v) for j, v in enumerate(out_f)},
                      "title_raw": _string_array(out_title)})
    return Block(table, rejects, n, seen)


def _jsonl_lines(block: bytes, first: int) -> Iterator[tuple[int, Any, str, str]]:
    for k, raw in enumerate(block.split(b"\n")):
        if not raw.strip():
            continue
        lineno = first + k
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, None, "not_utf8", f"byte {e.start}: {e.reason}"
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, None, "invalid_json", e.msg + f" (column {e.colno})"
            continue
        if not isinstance(rec, dict):
            yield lineno, None, "not_an_object", f"a JSON {type(rec).__name__}, not an object"
            continue
        yield lineno, rec, "", ""


_PY_TYPE = {"bool": "bool", "struct": "dict", "list": "list", "large_list": "list", "map": "dict"}


def _arrow_block(t, rows, path: Path, id_field: str, text_fields: Sequence[str], title_field: str) -> Block | None:
    """Normalize an Arrow table of raw records with vector operations; None if a column needs the exact reader."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = t.num_rows
    names = set(t.column_names)

    def as_text(name: str):
        """field_text() of a column, or None when its type needs the row-by-row rules."""
        if name not in names:
            return pa.array([""] * n, pa.string())
        col = t.column(name).combine_chunks() if t.num_rows else pa.array([], t.schema.field(name).type)
        typ = col.type
        if pa.types.is_string(typ) or pa.types.is_large_string(typ):
            return pc.fill_null(col.cast(pa.string()), "")
        if pa.types.is_integer(typ):
            return pc.fill_null(col.cast(pa.string()), "")
        if pa.types.is_null(typ) or pa.types.is_boolean(typ) or pa.types.is_struct(typ):
            return pa.array([""] * n, pa.string())
        if (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and (
                pa.types.is_string(typ.value_type) or pa.types.is_integer(typ.value_type)
                or pa.types.is_null(typ.value_type)):
            if not pa.types.is_string(typ.value_type):
                col = col.cast(pa.list_(pa.string()))
            return pc.fill_null(pc.binary_join(col, " "), "")
        return None  # floats (repr rules), nested lists, anything else: exact reader

    fields = [as_text(f) for f in text_fields]
    title = as_text(title_field)
    if any(f is None for f in fields) or title is None:
        return None
    if id_field in names:
        col = t.column(id_field).combine_chunks()
        typ = col.type
        if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ):
            raw_id, id_error = col.cast(pa.string()), pa.nulls(n, pa.string())
        elif pa.types.is_null(typ):
            raw_id, id_error = pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
        elif typ.id in (pa.bool_().id,) or pa.types.is_struct(typ) or pa.types.is_list(typ):
            kind = "bool" if pa.types.is_boolean(typ) else ("dict" if pa.types.is_struct(typ) else "list")
            err = pa.array([f"{id_field!r} is a {kind}, not a string or number"] * n, pa.string())
            raw_id = pa.nulls(n, pa.string())
            id_error = pc.if_else(pc.is_valid(col), err, pa.nulls(n, pa.string()))
        else:
            return None  # floats: "12.0" -> "12" rules of normalize_id
    else:
        raw_id, id_error = pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
    table = pa.table({"row": rows, "raw_id": raw_id, "id_error": id_error,
                      **{f"f{j}": f for j, f in enumerate(fields)}, "title_raw": title})
    seen = {k for k in (id_field, *text_fields) if k in names}
    return Block(table, [], n, seen)


def iter_blocks(path: Path, id_field: str, text_fields: Sequence[str], title_field: str,
                block_bytes: int, hasher=None) -> Iterator[Block]:
    """Blocks of one file. With `hasher`, the file's bytes are hashed as they are read: once the blocks are
    exhausted it holds the checksum of exactly what was parsed."""
    kind = suffix_of(path)
    if kind in JSONL_SUFFIXES:
        yield from _jsonl_blocks(path, id_field, text_fields, title_field, block_bytes, hasher)
    elif kind in CSV_SUFFIXES:
        yield from _csv_blocks(path, id_field, text_fields, title_field, block_bytes, hasher)
    elif kind in PARQUET_SUFFIXES:
        yield from _parquet_blocks(path, id_field, text_fields, title_field, block_bytes, hasher)
    else:
        raise ItemsError(f"{path}: unsupported file type")


def _jsonl_blocks(path, id_field, text_fields, title_field, block_bytes, hasher=None) -> Iterator[Block]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.json as pj

    with _open_binary(path, hasher) as fh:
        for first, data in _byte_blocks(fh, block_bytes):
            block = None
            n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            try:
                t = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=len(data) + 1))
                if t.num_rows == n_lines:  # no blank line: row k is line first + k
                    rows = pa.array(np.arange(first, first + n_lines, dtype=np.int64))
                    block = _arrow_block(t, rows, path, id_field, text_fields, title_field)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                block = None
            yield block or _python_block(_jsonl_lines(data, first), path, id_field, text_fields, title_field)
            t = rows = block = data = None  # released before the next block is read and parsed


def _csv_python_rows(path: Path, hasher=None) -> Iterator[tuple[int, Any, str, str]]:
    import csv

    csv.field_size_limit(2**31 - 1)  # long descriptions are data, not errors (the default limit is 128 KiB)
    with _open_binary(path, hasher) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        for k, rec in enumerate(reader, start=2):
            bad = next((c for c, v in rec.items() if isinstance(v, str) and _has_surrogates(v)), None)
            if bad is not None:
                yield k, None, "not_utf8", f"column {bad!r} holds bytes that are not UTF-8"
                continue
            rec.pop(None, None)  # extra cells beyond the header
            yield k, rec, "", ""


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _chunked(rows: Iterator, n: int) -> Iterator[list]:
    buf = []
    for r in rows:
        buf.append(r)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def _csv_blocks(path, id_field, text_fields, title_field, block_bytes, hasher=None) -> Iterator[Block]:
    """Arrow's streaming CSV reader (every column as text). A file it cannot read whole (bytes that are not UTF-8,
    a ragged row) raises _RestartExact: the caller drops what this file spilled and reads it row by row instead."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    try:
        with _open_binary(path) as fh:
            header = pa_csv.open_csv(fh, read_options=pa_csv.ReadOptions(block_size=1 << 20)).schema.names
        with _open_binary(path, hasher) as fh:
            reader = pa_csv.open_csv(
                fh, read_options=pa_csv.ReadOptions(block_size=max(block_bytes, 1 << 16)),
                parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                      strings_can_be_null=False))
            row = 2  # the header is line 1
            for batch in reader:
                t = pa.Table.from_batches([batch])
                rows = pa.array(np.arange(row, row + t.num_rows, dtype=np.int64))
                row += t.num_rows
                yield _arrow_block(t, rows, path, id_field, text_fields, title_field)
                t = rows = batch = None  # released before the next batch is parsed
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, UnicodeDecodeError) as e:
        raise _RestartExact(str(e)) from e


class _RestartExact(Exception):
    """Arrow could not read a file whole: read it again with the exact reader (its spills so far are dropped)."""


def _csv_exact_blocks(path, id_field, text_fields, title_field, rows_per_block, hasher=None) -> Iterator[Block]:
    for chunk in _chunked(_csv_python_rows(path, hasher), rows_per_block):
        yield _python_block(iter(chunk), path, id_field, text_fields, title_field)


def _parquet_blocks(path, id_field, text_fields, title_field, block_bytes, hasher=None) -> Iterator[Block]:
    # Parquet is read out of order, so it is hashed first, through the same open file that is then parsed (a rename
    # over the path does not touch it); an in-place rewrite meanwhile spoils the checksum on purpose, so the recorded
    # source never matches a later state of the file and the sensor processes it again.
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        if hasher is not None:
            while chunk := fh.read(1 << 20):
                hasher.update(chunk)
            fh.seek(0)
        yield from _parquet_file_blocks(fh, path, id_field, text_fields, title_field, block_bytes)
        after = os.fstat(fh.fileno())
        if hasher is not None and (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            hasher.update(b"\0changed while being read")


def _parquet_file_blocks(fh, path, id_field, text_fields, title_field, block_bytes) -> Iterator[Block]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fh)
    wanted = [c for c in dict.fromkeys((id_field, *text_fields, title_field)) if c in pf.schema_arrow.names]
    row = 1
    avg = max(1, pf.metadata.serialized_size // max(pf.metadata.num_rows, 1)) if pf.metadata.num_rows else 1
    batch_rows = max(1024, min(1_000_000, block_bytes // max(avg * 8, 64)))
    for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted):
        t = pa.Table.from_batches([batch])
        rows = pa.array(np.arange(row, row + t.num_rows, dtype=np.int64))
        row += t.num_rows
        block = _arrow_block(t, rows, path, id_field, text_fields, title_field)
        if block is None:
            recs = ((r, rec, "", "") for r, rec in zip(range(row - t.num_rows, row), t.to_pylist()))
            block = _python_block(recs, path, id_field, text_fields, title_field)
        yield block
        t = rows = batch = block = None  # released before the next batch is read


# -- pass 1: clean, hash, reject, spill --------------------------------------------------------------------------------
def _clean_sql(expr: str) -> str:
    return f"trim(regexp_replace({expr}, $dirty, ' ', 'g'), ' ')"


def _spill_block(con, block: Block, path: Path, file_index: int, id_field: str, text_fields: Sequence[str],
                 limits: Limits, spill_path: Path) -> tuple[list[Reject], int, int]:
    """Clean, hash and check one block in DuckDB; write its good rows (sorted by id-hash) to `spill_path`.
    Returns the rejects, the good rows written and the texts truncated."""
    con.register("blk", block.table)
    joined = " || ' ' || ".join(f"f{j}" for j in range(len(text_fields)))
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cleaned AS
        SELECT row,
               id_error,
               regexp_replace(raw_id, $edge, '', 'g') AS item_id,
               {_clean_sql(joined)} AS full_text,
               {_clean_sql('title_raw')} AS title_clean
        FROM blk""", {"dirty": _DIRTY_RE, "edge": _ID_EDGE_RE})
    con.unregister("blk")
    params = {"max_id": limits.max_id_chars, "max_text": limits.max_text_chars, "file": str(path),
              "seq0": file_index << 40}
    status = """CASE WHEN id_error IS NOT NULL THEN 'invalid_id'
                     WHEN item_id IS NULL OR item_id = '' THEN 'missing_id'
                     WHEN length(item_id) > $max_id THEN 'id_too_long'
                     WHEN full_text = '' THEN 'empty_text' END"""
    bad = con.execute(f"""
        SELECT row, {status} AS reason, id_error, item_id, length(item_id) AS id_len FROM cleaned
        WHERE {status} IS NOT NULL ORDER BY row""", {k: params[k] for k in ("max_id",)}).fetchall()
    rejects = []
    for row, reason, id_error, item_id, id_len in bad:
        if reason == "invalid_id":
            rejects.append(Reject(str(path), row, None, reason, id_error))
        elif reason == "missing_id":
            rejects.append(Reject(str(path), row, None, reason, f"{id_field!r} is missing or empty"))
        elif reason == "id_too_long":
            rejects.append(Reject(str(path), row, item_id[:80] + "…", reason,
                                  f"{id_len} characters > {limits.max_id_chars}"))
        else:
            rejects.append(Reject(str(path), row, item_id, reason,
                                  f"no text in {', '.join(text_fields)} after cleaning"))
    counts = con.execute(f"""
        COPY (
            SELECT {ID_HASH_SQL.format(col='item_id')} AS bucket,
                   $seq0 + row AS seq,
                   item_id,
                   text,
                   CASE WHEN title_clean = '' THEN substr(text, 1, 200) ELSE substr(title_clean, 1, 200) END AS title,
                   substr(sha256(text), 1, 32) AS text_hash,
                   $file AS source_file,
                   row AS source_row
            FROM (SELECT *, substr(full_text, 1, $max_text) AS text FROM cleaned WHERE {status} IS NULL)
            ORDER BY bucket
        ) TO '{spill_path}' (FORMAT parquet, ROW_GROUP_SIZE 16384, COMPRESSION lz4_raw)""", params).fetchone()
    # (COPY returns the number of rows written)
    n_good = int(counts[0]) if counts else 0
    n_trunc = con.execute(f"SELECT count(*) FROM cleaned WHERE {status} IS NULL AND length(full_text) > $max_text",
                          {k: params[k] for k in ("max_id", "max_text")}).fetchone()[0]
    con.execute("DROP TABLE cleaned")
    return rejects, n_good, int(n_trunc)


# -- results ------------------------------------------------------------------------------------------------------------
@dataclass
class IngestResult:
    partitions: list[dict[str, Any]]  # {partition, depth, prefix, n_rows, fingerprint, file, sha256, written}
    leaves: list[str]  # every leaf of the partition tree, empty ones included (they tile the hash space)
    n_items: int
    n_rows_read: int
    n_rejected: int
    reject_counts: dict[str, int]
    n_duplicates: int
    n_truncated: int
    files: list[str]
    file_sha256: dict[str, str] = field(default_factory=dict)  # of the very bytes parsed, per file
    splits: list[tuple[str, list[str]]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    seconds_read: float = 0.0
    seconds_partition: float = 0.0

    @property
    def n_partitions_written(self) -> int:
        return len(self.written)

    @property
    def n_partitions_skipped(self) -> int:
        return len(self.partitions) - len(self.written)


def _connect_duckdb(memory_mb: int, threads: int | None, tmp: Path):
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{max(64, int(memory_mb))}MB'")
    con.execute(f"SET temp_directory = '{tmp}'")
    con.execute("SET preserve_insertion_order = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def ingest(
    paths: Sequence[str | os.PathLike],
    id_field: str,
    text_fields: Sequence[str],
    out_dir: Path,
    previous: dict[str, Any] | None,
    target_rows: int,
    limits: Limits = Limits(),
    title_field: str | None = None,
    memory_budget_mb: int = 1024,
    work_dir: Path | None = None,
    rejects_path: Path | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> IngestResult:
    """Raw files -> `out_dir/<partition>.parquet` for every non-empty partition whose content changed.

    `previous` is the last run's partition state (`leaves` and `partitions`), or None for a first run. Nothing is
    renamed into place until both passes succeeded for a partition; the caller writes the state file last.
    """
    if not text_fields:
        raise ItemsError("no text fields configured; set --text-fields (e.g. title,text)")
    if target_rows < 1:
        raise ItemsError(f"target partition size must be positive, got {target_rows}")
    title_field = title_field or text_fields[0]
    files = discover_files(paths)
    scratch = Path(work_dir or out_dir.parent)
    for old in scratch.glob(".ingest-*") if scratch.exists() else []:
        if old.is_dir() and abandoned_work_dir(old):  # a killed run's spill: its process is gone
            shutil.rmtree(old, ignore_errors=True)
    work = scratch / f".ingest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    spill_dir = work / "spill"
    spill_dir.mkdir(parents=True)
    # The budget: DuckDB's share, and raw bytes per block (Arrow's parsed copy is a few times the input).
    block_bytes = max(1 << 20, min(256 << 20, memory_budget_mb * (1 << 20) // 8))
    con = _connect_duckdb(memory_budget_mb // 2, None, work)
    t0 = time.perf_counter()
    rejects_tmp = work / "rejects.jsonl"
    counts: Counter = Counter()
    digests: dict[str, str] = {}
    n_read = n_good = n_trunc = 0
    try:
        with open(rejects_tmp, "w", encoding="utf-8") as rej_out:
            for fi, path in enumerate(files):
                try:
                    size = path.stat().st_size
                except OSError as e:
                    raise ItemsError(f"{path}: cannot read ({e.strerror}); check the file's permissions") from e
                if size > limits.max_file_bytes:
                    raise ItemsError(f"{path}: {size:,} bytes is over the limit of {limits.max_file_bytes:,}; "
                                     "split the file or raise Limits.max_file_bytes")
                r, g, tr, c, digest = _read_file(con, path, fi, id_field, text_fields, title_field, limits,
                                                 block_bytes, spill_dir, rej_out, log)
                digests[str(path)] = digest
                n_read, n_good, n_trunc = n_read + r, n_good + g, n_trunc + tr
                counts.update(c)
        if not n_good:
            raise ItemsError(
                f"empty catalog: {n_read:,} rows read from {len(files)} file(s), none usable "
                f"({', '.join(f'{k}: {v}' for k, v in counts.items()) or 'no rows'}); see reports/rejects.jsonl")
        t1 = time.perf_counter()
        log(f"read {n_read:,} rows from {len(files)} file(s) in {t1 - t0:.1f} s "
            f"({n_read / max(t1 - t0, 1e-9):,.0f} rows/s); {sum(counts.values()):,} rejected")
        crash_point("ingest_spilled")  # every row spilled, no partition written yet
        result = _partition(con, spill_dir, out_dir, previous, target_rows, work, log)
        result.n_rows_read, result.n_rejected, result.reject_counts = n_read, sum(counts.values()), dict(counts)
        result.n_truncated, result.files, result.file_sha256 = n_trunc, [str(f) for f in files], digests
        result.seconds_read, result.seconds_partition = t1 - t0, time.perf_counter() - t1
        if rejects_path is not None:
            rejects_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(rejects_path, lambda tmp: shutil.copyfile(rejects_tmp, tmp))
        return result
    finally:
        con.close()
        shutil.rmtree(work, ignore_errors=True)


def _read_file(con, path, fi, id_field, text_fields, title_field, limits, block_bytes, spill_dir, rej_out, log):
    """One file, in blocks; returns (rows read, good rows, truncated, reject counts, sha256 of the bytes read)."""
    def attempt(blocks: Iterator[Block]):
        spills, n_read, n_good, n_trunc, counts, seen = [], 0, 0, 0, Counter(), set()
        rejects_lines = []
        for b, block in enumerate(blocks):
            n_read += block.n_rows
            if n_read > limits.max_rows_per_file:
                raise ItemsError(f"{path}: more than {limits.max_rows_per_file:,} rows; split the file "
                                 "or raise Limits.max_rows_per_file")
            seen |= block.fields_seen
            rejects = list(block.rejects)
            if block.table.num_rows:
                sp = spill_dir / f"f{fi:05d}_b{b:06d}.parquet"
                more, g, tr = _spill_block(con, block, path, fi, id_field, text_fields, limits, sp)
                rejects += more
                n_good, n_trunc = n_good + g, n_trunc + tr
                spills.append(sp)
            rejects.sort(key=lambda r: r.row)
            counts.update(r.reason for r in rejects)
            rejects_lines.extend(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejects)
            block = None  # else it stays alive while the next block is parsed: two blocks' memory instead of one
            if len(rejects_lines) > 10_000:
                rej_out.writelines(rejects_lines)
                rejects_lines = []
        rej_out.writelines(rejects_lines)
        return spills, n_read, n_good, n_trunc, counts, seen

    pos = rej_out.tell()
    hasher = hashlib.sha256()
    try:
        try:
            spills, n_read, n_good, n_trunc, counts, seen = attempt(
                iter_blocks(path, id_field, text_fields, title_field, block_bytes, hasher))
        except _RestartExact:
            for sp in spill_dir.glob(f"f{fi:05d}_b*.parquet"):
                sp.unlink()
            rej_out.seek(pos)
            rej_out.truncate()
            log(f"{path}: Arrow's reader could not take it whole; reading it row by row")
            hasher = hashlib.sha256()
            spills, n_read, n_good, n_trunc, counts, seen = attempt(
                _csv_exact_blocks(path, id_field, text_fields, title_field, 100_000, hasher))
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ItemsError(f"{path}: unreadable ({e}); the file may be truncated or not what its name says") from e
    except ItemsError:
        raise
    except Exception as e:  # pyarrow / csv errors: name the file, keep the cause
        raise ItemsError(f"{path}: cannot be parsed as {suffix_of(path)} ({type(e).__name__}: {e})") from e
    if n_read and not (seen & {id_field, *text_fields}):
        raise ItemsError(
            f"{path}: none of the configured fields ({id_field!r}, {', '.join(map(repr, text_fields))}) occur; "
            f"the file has fields: {', '.join(_fields_of(path))}. Set --id-field / --text-fields.")
    if n_read and id_field not in seen:
        raise ItemsError(f"{path}: id field {id_field!r} occurs in no row; the file has fields: "
                         f"{', '.join(_fields_of(path))}. Set --id-field.")
    return n_read, n_good, n_trunc, counts, hasher.hexdigest()


def _fields_of(path: Path) -> list[str]:
    """The field names a file has, for error messages."""
    kind = suffix_of(path)
    try:
        if kind in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        names: list[str] = []
        rows = _csv_python_rows(path) if kind in CSV_SUFFIXES else None
        if rows is None:
            with _open_binary(path) as fh:
                head = fh.read(1 << 20)
            rows = _jsonl_lines(head[: head.rfind(b"\n") + 1] or head, 1)
        for i, (_, rec, _, _) in enumerate(rows):
            if rec:
                names.extend(k for k in rec if k not in names)
            if i >= 100:
                break
        return names
    except Exception as e:  # the message is only for the user; never mask the original error
        return [f"<unreadable: {e}>"]


# -- pass 2: partitions --------------------------------------------------------------------------------------------------
def _partition(con, spill_dir: Path, out_dir: Path, previous: dict[str, Any] | None, target_rows: int, work: Path,
               log) -> IngestResult:
    spills = sorted(spill_dir.glob("*.parquet"))
    src = "read_parquet($files)"
    files_param = {"files": [str(p) for p in spills]}

    # Rows per fine bucket (top 16 bits), from the spill's row-group statistics pass: one aggregate, no ids held.
    fine = dict(con.execute(f"SELECT bucket >> 16, count(*) FROM {src} GROUP BY 1", files_param).fetchall())

    def count_rows(leaf: Leaf) -> int:
        if leaf.depth <= 16:
            lo, hi = leaf.lo >> 16, leaf.hi >> 16
            return sum(v for k, v in fine.items() if lo <= k <= hi)
        return con.execute(f"SELECT count(*) FROM {src} WHERE bucket BETWEEN $lo AND $hi",
                           {**files_param, "lo": leaf.lo, "hi": leaf.hi}).fetchone()[0]

    prev_parts = {p["partition"]: p for p in (previous or {}).get("partitions", [])}
    if previous and previous.get("leaves"):
        leaves = [leaf_of_key(k) for k in previous["leaves"]]
        check_cover(leaves)
    else:
        leaves = full_level(initial_depth(sum(fine.values()), target_rows))
    leaves, splits = split_overfull(leaves, count_rows, target_rows)
    for parent, kids in splits:
        log(f"partition {parent} outgrew {target_rows:,} rows: split into {', '.join(kids)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    partitions, written = [], []
    n_items = n_dups = 0
    for leaf in leaves:
        params = {**files_param, "lo": leaf.lo, "hi": leaf.hi}
        rows = count_rows(leaf)
        if not rows:
            continue
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE part AS
            SELECT item_id, text, title, text_hash, source_file, source_row FROM (
                SELECT *, row_number() OVER (PARTITION BY item_id ORDER BY seq DESC) AS rn
                FROM {src} WHERE bucket BETWEEN $lo AND $hi)
            WHERE rn = 1 ORDER BY item_id""", params)
        n, fp = con.execute(r"""
            SELECT count(*), substr(sha256(coalesce(string_agg(item_id || chr(31) || text_hash || chr(30), ''
                                                                ORDER BY item_id), '')), 1, 32) FROM part""").fetchone()
        n_items += n
        n_dups += rows - n
        key = leaf.key
        dest = out_dir / f"{key}.parquet"
        old = prev_parts.get(key)
        if old and old.get("fingerprint") == fp and dest.exists() and file_stamp(dest) == old.get("stamp"):
            partitions.append({**old, "n_rows": n})
            con.execute("DROP TABLE part")
            continue
        tmp = out_dir / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            con.execute(f"COPY (SELECT * FROM part ORDER BY item_id) TO '{tmp}' "
                        "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 100000)")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        con.execute("DROP TABLE part")
        written.append(key)
        partitions.append({"partition": key, "depth": leaf.depth, "prefix": leaf.prefix, "n_rows": n,
                           "fingerprint": fp, "file": dest.name, "stamp": file_stamp(dest)})
    keys = {p["partition"] for p in partitions}
    removed = sorted(set(prev_parts) - keys)
    return IngestResult(partitions=partitions, leaves=[lf.key for lf in leaves], n_items=n_items, n_rows_read=0,
                        n_rejected=0, reject_counts={}, n_duplicates=n_dups, n_truncated=0, files=[],
                        splits=splits, written=written, removed=removed)


def file_stamp(path: Path) -> dict[str, int]:
    """What identifies a written partition file: a rewrite or a replacement changes it."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}

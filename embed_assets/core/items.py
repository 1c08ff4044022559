"""Raw item files -> one clean, de-duplicated table, with every rejected row accounted for.

Reads JSONL (BEIR `corpus.jsonl`, Amazon-metadata style rows), CSV and Parquet, optionally gzip-compressed JSONL/CSV.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from embed_assets.core.atomic import atomic_write, atomic_write_json, atomic_write_text
from embed_assets.core.layout import partition_key
from embed_assets.core.text import clean_text, field_text, join_fields, normalize_id, text_hash

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES

ITEM_COLUMNS = ("item_id", "text", "title", "text_hash", "source_file", "source_row")


class ItemsError(ValueError):
    """Input that cannot be processed at all (missing file, wrong fields, empty catalog)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on input; defaults comfortably handle 200,000-row batches of product or book descriptions."""

    max_file_bytes: int = 20 * 1024**3
    max_rows_per_file: int = 50_000_000
    max_id_chars: int = 512
    # Characters kept per text; the tokenizer only sees the first 256 tokens (~1-2k chars) anyway.
    max_text_chars: int = 100_000


@dataclass(frozen=True)
class Reject:
    file: str
    row: int  # 1-based line number (JSONL, CSV data row) or row index + 1 (Parquet)
    item_id: str | None
    reason: str
    detail: str = ""


@dataclass
class ItemsResult:
    items: list[dict[str, Any]]
    rejects: list[Reject]
    n_rows_read: int
    n_duplicates: int
    n_truncated: int
    files: list[str] = field(default_factory=list)
    # sha256 of the very bytes parsed, per file: what processed_items records as its source (see source_fingerprint)
    file_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def reject_counts(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejects))


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
        """Hash what the parser left unread (a trailing blank line, gzip padding), so the checksum is the file's."""
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


def _iter_jsonl(path: Path, hasher=None) -> Iterator[tuple[int, dict | None, str, str]]:
    with _open_binary(path, hasher) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
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


def _iter_csv(path: Path, hasher=None) -> Iterator[tuple[int, dict | None, str, str]]:
    csv.field_size_limit(2**31 - 1)  # long descriptions are data, not errors (the default limit is 128 KiB)
    with _open_binary(path, hasher) as raw:
        # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        for rec in reader:
            rowno = reader.line_num  # physical line where the row ends; good enough to find it
            bad = next((k for k, v in rec.items() if isinstance(v, str) and _has_surrogates(v)), None)
            if bad is not None:
                yield rowno, None, "not_utf8", f"column {bad!r} holds bytes that are not UTF-8"
                continue
            rec.pop(None, None)  # extra cells beyond the header
            yield rowno, rec, "", ""


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _iter_parquet(path: Path, hasher=None) -> Iterator[tuple[int, dict | None, str, str]]:
    import pyarrow.parquet as pq

    # Parquet is read out of order, so it is hashed first, through the same open file that is then parsed (a
    # rename over the path does not touch it); an in-place rewrite meanwhile spoils the checksum on purpose, so the
    # recorded source never matches a later state of the file and the sensor processes it again.
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        if hasher is not None:
            while block := fh.read(1 << 20):
                hasher.update(block)
            fh.seek(0)
        pf = pq.ParquetFile(fh)
        row = 0
        for batch in pf.iter_batches(batch_size=65_536):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec, "", ""
        after = os.fstat(fh.fileno())
        if hasher is not None and (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            hasher.update(b"\0changed while being read")


def _fields_of(path: Path) -> list[str]:
    """The field names a file has, for error messages."""
    kind = suffix_of(path)
    try:
        if kind in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        iterator = _iter_csv(path) if kind in CSV_SUFFIXES else _iter_jsonl(path)
        names: list[str] = []
        for i, (_, rec, _, _) in enumerate(iterator):
            if rec:
                names.extend(k for k in rec if k not in names)
            if i >= 100:
                break
        return names
    except Exception as e:  # the message is only for the user; never mask the original error
        return [f"<unreadable: {e}>"]


def iter_records(path: Path, hasher=None) -> Iterator[tuple[int, dict | None, str, str]]:
    """Yield (row number, record or None, reject reason, detail) for every row of one file. With `hasher` (a
    hashlib object), the file's bytes are hashed as they are read: once the rows are exhausted it holds the
    checksum of exactly what was parsed."""
    kind = suffix_of(path)
    if kind in JSONL_SUFFIXES:
        return _iter_jsonl(path, hasher)
    if kind in CSV_SUFFIXES:
        return _iter_csv(path, hasher)
    if kind in PARQUET_SUFFIXES:
        return _iter_parquet(path, hasher)
    raise ItemsError(f"{path}: unsupported file type")


def read_items(
    paths: Sequence[str | os.PathLike],
    id_field: str,
    text_fields: Sequence[str],
    limits: Limits = Limits(),
    title_field: str | None = None,
) -> ItemsResult:
    """Read, clean and de-duplicate items. A duplicated id keeps its last row, at its first row's position."""
    if not text_fields:
        raise ItemsError("no text fields configured; set --text-fields (e.g. title,text)")
    title_field = title_field or text_fields[0]
    files = discover_files(paths)
    by_id: dict[str, dict[str, Any]] = {}  # insertion order = first appearance
    rejects: list[Reject] = []
    digests: dict[str, str] = {}
    n_read = n_dup = n_trunc = 0
    for path in files:
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ItemsError(f"{path}: cannot read ({e.strerror}); check the file's permissions") from e
        if size > limits.max_file_bytes:
            raise ItemsError(
                f"{path}: {size:,} bytes is over the limit of {limits.max_file_bytes:,}; split the file "
                "or raise Limits.max_file_bytes"
            )
        seen_id_field = seen_text_field = False
        rows_in_file = 0
        hasher = hashlib.sha256()
        try:
            for rowno, rec, reason, detail in iter_records(path, hasher):
                rows_in_file += 1
                n_read += 1
                if rows_in_file > limits.max_rows_per_file:
                    raise ItemsError(
                        f"{path}: more than {limits.max_rows_per_file:,} rows; split the file "
                        "or raise Limits.max_rows_per_file"
                    )
                if rec is None:
                    rejects.append(Reject(str(path), rowno, None, reason, detail))
                    continue
                seen_id_field = seen_id_field or id_field in rec
                seen_text_field = seen_text_field or any(f in rec for f in text_fields)
                raw_id = rec.get(id_field)
                item_id = normalize_id(raw_id)
                if item_id is None and raw_id is not None:
                    rejects.append(Reject(str(path), rowno, None, "invalid_id",
                                          f"{id_field!r} is a {type(raw_id).__name__}, not a string or number"))
                    continue
                if not item_id:
                    rejects.append(Reject(str(path), rowno, None, "missing_id", f"{id_field!r} is missing or empty"))
                    continue
                if len(item_id) > limits.max_id_chars:
                    rejects.append(Reject(str(path), rowno, item_id[:80] + "…", "id_too_long",
                                          f"{len(item_id)} characters > {limits.max_id_chars}"))
                    continue
                text = join_fields(rec, text_fields)
                if not text:
                    rejects.append(Reject(str(path), rowno, item_id, "empty_text",
                                          f"no text in {', '.join(text_fields)} after cleaning"))
                    continue
                if len(text) > limits.max_text_chars:
                    text = text[: limits.max_text_chars]
                    n_trunc += 1
                title = clean_text(field_text(rec.get(title_field)))[:200] or text[:200]
                if item_id in by_id:
                    n_dup += 1
                by_id[item_id] = {
                    "item_id": item_id,
                    "text": text,
                    "title": title,
                    "text_hash": text_hash(text),
                    "source_file": str(path),
                    "source_row": rowno,
                }
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ItemsError(f"{path}: unreadable ({e}); the file may be truncated or not what its name says") from e
        except ItemsError:
            raise
        except Exception as e:  # pyarrow / csv errors: name the file, keep the cause
            raise ItemsError(f"{path}: cannot be parsed as {suffix_of(path)} ({type(e).__name__}: {e})") from e
        digests[str(path)] = hasher.hexdigest()
        if rows_in_file and not (seen_id_field or seen_text_field):
            raise ItemsError(
                f"{path}: none of the configured fields ({id_field!r}, {', '.join(map(repr, text_fields))}) occur; "
                f"the file has fields: {', '.join(_fields_of(path))}. Set --id-field / --text-fields."
            )
        if rows_in_file and not seen_id_field:
            raise ItemsError(
                f"{path}: id field {id_field!r} occurs in no row; the file has fields: "
                f"{', '.join(_fields_of(path))}. Set --id-field."
            )
    if not by_id:
        raise ItemsError(
            f"empty catalog: {n_read:,} rows read from {len(files)} file(s), none usable "
            f"({', '.join(f'{k}: {v}' for k, v in Counter(r.reason for r in rejects).items()) or 'no rows'}); "
            "see reports/rejects.jsonl"
        )
    # A superseded duplicate moves the item's content but keeps its first position (stable row groups).
    return ItemsResult(list(by_id.values()), rejects, n_read, n_dup, n_trunc, [str(f) for f in files], digests)


def write_items_parquet(items: list[dict[str, Any]], path: Path, row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if row_group_size < 1:
        raise ItemsError(f"row_group_size must be positive, got {row_group_size}")
    schema = pa.schema(
        [("item_id", pa.string()), ("text", pa.string()), ("title", pa.string()), ("text_hash", pa.string()),
         ("source_file", pa.string()), ("source_row", pa.int64())]
    )
    table = pa.Table.from_pylist(items, schema=schema)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for start in range(0, max(table.num_rows, 1), row_group_size):
                w.write_table(table.slice(start, row_group_size), row_group_size=row_group_size)

    atomic_write(path, write)


def row_group_fingerprint(item_ids: Sequence[str], hashes: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i, t in zip(item_ids, hashes):
        h.update(i.encode("utf-8"))
        h.update(b"\x1f")
        h.update(t.encode("ascii"))
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def describe_row_groups(items_parquet: Path) -> list[dict[str, Any]]:
    """Per row group of items.parquet: partition key, rows and a fingerprint of its (id, text hash) pairs."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(items_parquet)
    out = []
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg, columns=["item_id", "text_hash"])
        out.append(
            {
                "partition": partition_key(rg),
                "row_group": rg,
                "n_rows": t.num_rows,
                "fingerprint": row_group_fingerprint(t.column("item_id").to_pylist(), t.column("text_hash").to_pylist()),
            }
        )
    return out


def read_row_group(items_parquet: Path, row_group: int, columns: Sequence[str] = ("item_id", "text", "text_hash")):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(items_parquet)
    if row_group >= pf.num_row_groups:
        raise ItemsError(
            f"{items_parquet}: row group {row_group} does not exist (the file has {pf.num_row_groups}); "
            "re-materialize processed_items, whose run also removes stale partitions"
        )
    return pf.read_row_group(row_group, columns=list(columns))


def write_rejects(rejects: list[Reject], path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejects))


def _parquet_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def items_config(id_field: str, text_fields: Sequence[str], title_field: str | None, row_group_size: int,
                 limits: Limits = Limits()) -> dict[str, Any]:
    """Every setting that shapes processed_items' output besides the raw bytes: part of the source fingerprint."""
    return {"id_field": id_field, "text_fields": list(text_fields),
            "title_field": title_field or (text_fields[0] if text_fields else None),
            "row_group_size": int(row_group_size), "limits": asdict(limits)}


def source_fingerprint(file_sha256: Mapping[str, str], config: Mapping[str, Any]) -> str:
    """One fingerprint of the raw inputs: each file's path and content checksum, plus the processing settings.

    processed_items records it from the bytes it parsed; the sensor computes it from the files as they are now.
    Equal fingerprints: processing the files again would give the same items.parquet."""
    blob = json.dumps({"files": sorted(file_sha256.items()), "config": dict(config)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def write_row_groups(row_groups: list[dict[str, Any]], path: Path, items_parquet: Path,
                     source: dict[str, Any] | None = None) -> None:
    # Stamped with the items.parquet it describes: a crash between the two writes is detected, not trusted.
    # `source` records what was processed (the raw files' checksums, the settings, their fingerprint).
    atomic_write_json(path, {"items_parquet": _parquet_stamp(items_parquet), "row_groups": row_groups,
                             "source": source})

def process_items(
    layout,
    paths: Sequence[str | os.PathLike],
    id_field: str,
    text_fields: Sequence[str],
    row_group_size: int,
    limits: Limits = Limits(),
    title_field: str | None = None,
) -> tuple[ItemsResult, list[dict[str, Any]]]:
    """Raw files -> items.parquet + row_groups.json + reports/rejects.jsonl, each written atomically.

    row_groups.json also records the source: the checksum of the bytes read from each file and the settings, so
    "is processed_items current?" is a comparison with the files as they are now (core/changes.py)."""
    result = read_items(paths, id_field, text_fields, limits, title_field)
    write_rejects(result.rejects, layout.rejects_jsonl)
    write_items_parquet(result.items, layout.items_parquet, row_group_size)
    row_groups = describe_row_groups(layout.items_parquet)
    config = items_config(id_field, text_fields, title_field, row_group_size, limits)
    source = {"fingerprint": source_fingerprint(result.file_sha256, config), "files": result.file_sha256,
              "config": config}
    write_row_groups(row_groups, layout.row_groups_json, layout.items_parquet, source)
    return result, row_groups


def load_processed(layout) -> dict[str, Any]:
    """row_groups.json (row groups and recorded source), checked to describe the very items.parquet on disk."""
    try:
        data = json.loads(layout.row_groups_json.read_text("utf-8"))
        stamp = _parquet_stamp(layout.items_parquet)
    except FileNotFoundError:
        raise ItemsError(f"{layout.row_groups_json}: not found; materialize processed_items first") from None
    except ValueError as e:
        raise ItemsError(f"{layout.row_groups_json}: unreadable ({e}); re-materialize processed_items") from e
    if not isinstance(data, dict) or data.get("items_parquet") != stamp or not isinstance(data.get("row_groups"), list):
        raise ItemsError(f"{layout.row_groups_json} does not describe the current {layout.items_parquet.name} "
                         "(an interrupted processed_items run?); re-materialize processed_items")
    return data


def load_row_groups(layout) -> list[dict[str, Any]]:
    """The row groups of items.parquet, as processed_items described them (checked to be that very file)."""
    return load_processed(layout)["row_groups"]

"""BEIR-style labelled queries: `queries.jsonl` ({"_id", "text"}) and `qrels/*.tsv` (query-id, corpus-id, score)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: qrels file not found (expected BEIR qrels/*.tsv)")
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter="\t")
        for i, row in enumerate(reader, start=1):
            if not row or (i == 1 and not row[-1].strip().lstrip("-").isdigit()):
                continue  # header
            if len(row) < 3:
                raise ValueError(f"{path}:{i}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r}")
            qrels.setdefault(row[0].strip(), {})[row[1].strip()] = int(row[2])
    return qrels


def load_queries(path: str | Path, only: set[str] | None = None) -> dict[str, str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: queries file not found (expected BEIR queries.jsonl)")
    out: dict[str, str] = {}
    with _open_text(path) as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from e
            qid = str(rec.get("_id", rec.get("id", ""))).strip()
            if qid and (only is None or qid in only):
                out[qid] = str(rec.get("text", ""))
    return out

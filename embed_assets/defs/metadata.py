"""Helpers that turn core results into Dagster metadata (markdown tables, rounded numbers)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import dagster as dg


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> dg.MarkdownMetadataValue:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.5g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def norms_metadata(norms: Mapping[str, float], prefix: str = "norm") -> dict[str, dg.MetadataValue]:
    return {f"{prefix}_{k}": dg.MetadataValue.float(float(v)) for k, v in norms.items()}

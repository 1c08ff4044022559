"""Helpers that turn core results into Dagster metadata (markdown tables, rounded numbers, charts).

What people look at, and the rules that keep Dagster's plots (the asset's *Plots* tab) meaningful:

- Every materialization carries plottable numbers (`dg.MetadataValue.int` / `.float`): items, items/s, recall, nDCG,
  norm error, index bytes, seconds, peak RSS, where they apply; and one Markdown table, `summary`, of the same.
- A key keeps one type on every run. A number that may not exist on a given run is still written, as a float:
  - `items_per_s`, `tokens_per_s` (item_embeddings) are 0.0 when nothing was encoded (`n_encoded` = 0: a skipped or
    fully re-used partition);
  - a comparison with an earlier state that does not exist yet (the first index build has no live version to
    shadow, the first report no earlier vectors to measure drift against) is NaN: Dagster shows it as `nan` and
    leaves a gap in the plot;
  - a number that needs configuration (labelled queries for nDCG/recall, a tuned index for `tuned_*`) is present
    exactly when that configuration is, on every run.
  `embed_assets_tests/defs/test_metadata.py` materializes the graph twice and checks this on the instance's events.
- Charts are PNGs embedded in Markdown as data URIs (`core/charts.py`), a few tens of KB each.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import dagster as dg

NAN = float("nan")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> dg.MarkdownMetadataValue:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "—" if math.isnan(v) else f"{v:.5g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return dg.MarkdownMetadataValue("\n".join(lines))


def summary_table(pairs: Mapping[str, Any]) -> dg.MarkdownMetadataValue:
    """The `summary` key: one Markdown table of what a materialization did (`what | value`); NaN/None read `—`."""
    return md_table(["", "value"], [(k, NAN if v is None else v) for k, v in pairs.items()])


def as_float(v: Any) -> dg.FloatMetadataValue:
    """A float that may not exist on this run: NaN then (see the module docstring), so its key keeps its type."""
    return dg.MetadataValue.float(NAN if v is None else float(v))


def norms_metadata(norms: Mapping[str, float], prefix: str = "norm") -> dict[str, dg.MetadataValue]:
    return {f"{prefix}_{k}": dg.MetadataValue.float(float(v)) for k, v in norms.items()}


def charts_markdown(pngs: Mapping[str, bytes], titles: Mapping[str, str], missing: str = "") -> dg.MarkdownMetadataValue:
    """The charts as Markdown images with base64 data URIs (Dagster's Markdown renders them inline)."""
    from embed_assets.core.charts import markdown_image

    parts = [f"**{titles.get(name, name)}**\n\n{markdown_image(titles.get(name, name), png)}"
             for name, png in pngs.items()]
    if missing:
        parts.append(missing)
    return dg.MarkdownMetadataValue("\n\n".join(parts) or "no charts")


def shard_metadata(layout, out, usage: Mapping[str, float], precision_probe: dict | None) -> dict[str, Any]:
    """`item_embeddings`' metadata for one partition's outcome (core.embed.EmbedOutcome), built here only: the
    in-process path and the Pipes path (defs/embeddings/pipes.py, from what the external process reported) both call
    it, so their keys and types cannot drift apart. `usage`: the step's seconds / cpu_seconds / peak_rss_mb (of the
    process that encoded)."""
    from embed_assets.core.shards import norm_error_max

    m, s, key = out.manifest, out.stats, out.manifest.partition
    err_max = float(norm_error_max(m.norms, m.n_rows))
    return {
        "rows": m.n_rows,
        "n_encoded": out.n_encoded,
        "n_reused": out.n_reused,
        "skipped_unchanged": out.skipped,
        "fetched_from_store": out.fetched,  # taken, verified, from the base URI's store instead of encoded
        "n_unique_texts_encoded": s.n_unique,
        "n_truncated_texts": s.n_truncated,
        "n_chunked_texts": s.n_chunked,
        # 0.0 when nothing was encoded (n_encoded = 0): see the module docstring
        "items_per_s": round(float(s.items_per_s), 2),
        "tokens_per_s": round(float(s.tokens_per_s), 1),
        "encode_seconds": round(float(s.seconds), 3),
        **{k: float(v) for k, v in usage.items()},
        "padding_overhead": round(s.n_padded_tokens / s.n_tokens - 1, 4) if s.n_tokens else 0.0,
        "model_id": m.model_id,
        "model_revision": m.model_revision,
        "max_seq_length": m.max_seq_length,
        "dim": m.dim,
        "dtype": m.dtype,
        "precision": m.precision or "n/a (nothing encoded)",
        # how auto chose it on the machine that encoded (the faithfulness probe); {} when nothing was encoded
        "precision_probe": dg.MetadataValue.json((precision_probe or {}) if out.n_encoded else {}),
        "fingerprint": m.fingerprint,
        "cataloged": out.cataloged,
        "path": dg.MetadataValue.path(str(layout.shard_pt(key))),
        "sha256": m.shard_sha256,
        "bytes": m.shard_bytes,
        **norms_metadata(dict(sorted(m.norms.items()))),  # one order, whether the manifest was just built or read
        "norm_error_max": err_max,  # max |norm - 1| in this shard
        "summary": summary_table({
            "partition": key, "items": m.n_rows, "encoded": out.n_encoded, "re-used": out.n_reused,
            "skipped (unchanged)": out.skipped, "items/s": s.items_per_s, "encode seconds": s.seconds,
            "max norm error": err_max, "precision": m.precision or "—", "shard bytes": m.shard_bytes}),
    }

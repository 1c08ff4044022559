"""The Semantic ID readiness report: how well the codes separate, cover and preserve the catalog.

Pure numpy over arrays the encoding pass collected (codes, vector hashes, reconstruction errors, exact nearest
neighbours of a sample of items); `embed_assets.core.semantic_ids` assembles the report and writes it with
`write_report` as `reports/semantic_ids.json` + `.md`. The JSON's top-level keys (stable names, read by the asset's
metadata and checks):

  n_items, n_distinct_vectors, duplicate_vector_rate, largest_duplicate_group, top_duplicate_groups,
  collision_rate [per level: share of items whose first l codes are shared with another item],
  max_collision_group (items sharing all L codes; must fit the extra digit), max_collision_group_by_depth,
  codebook_utilization [per level], perplexity [per level], reconstruction_cosine, reconstruction_mse,
  reconstruction_mse_by_level, neighbour_share_first_code, neighbour_share_first_two_codes, neighbour_preservation,
  unique_full_ids, checks, recommendations, and (with a second quantizer) comparison.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from embed_assets.core.atomic import atomic_write_json, atomic_write_text


# New items fit the codebooks worse than the sample they were trained on, by nature (the sample's own fit is
# optimistic): edits and near-copies of existing items measure 1.26x in the 500k benchmark
# (benchmarks/results/incremental_500k_quiet_26e152b.txt). Below this floor their ratio earns no recommendation.
FRESH_RATIO_FLOOR = 1.25


def prefix_keys(codes: np.ndarray, depth: int, codebook_size: int) -> np.ndarray:
    """One integer per row identifying its first `depth` codes (equal keys <=> equal prefixes)."""
    codes = np.asarray(codes)
    if depth == 0 or len(codes) == 0:
        return np.zeros(len(codes), dtype=np.int64)
    base = max(int(codebook_size), int(codes[:, :depth].max()) + 1)
    if base ** depth < 2 ** 62:
        key = np.zeros(len(codes), dtype=np.int64)
        for level in range(depth):
            key = key * base + codes[:, level].astype(np.int64)
        return key
    _, inverse = np.unique(codes[:, :depth], axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def _group_sizes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row size of its group, and the sizes of all groups."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)], counts


def duplicate_stats(vector_hash: np.ndarray, item_ids: Sequence[str] | None = None,
                    titles: Callable[[list[str]], Mapping[str, str]] | None = None, top: int = 5) -> dict[str, Any]:
    """The collision floor: items whose vector is identical to another item's collide under any quantizer."""
    n = len(vector_hash)
    if n == 0:
        return {"n_distinct_vectors": 0, "duplicate_vector_rate": 0.0, "n_items_in_duplicate_groups": 0,
                "largest_duplicate_group": 0, "n_duplicate_groups": 0, "top_duplicate_groups": []}
    uniq, inverse, counts = np.unique(vector_hash, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    in_dup = counts[inverse] > 1
    groups: list[dict[str, Any]] = []
    if item_ids is not None and (counts > 1).any():
        order = np.argsort(-counts, kind="stable")[:top]
        order = [g for g in order if counts[g] > 1]
        members = {g: np.flatnonzero(inverse == g)[:3] for g in order}
        wanted = [str(item_ids[int(i)]) for g in order for i in members[g]]
        names = dict(titles(wanted)) if titles else {}
        for g in order:
            ids = [str(item_ids[int(i)]) for i in members[g]]
            groups.append({"size": int(counts[g]), "item_ids": ids, "title": names.get(ids[0], "")})
    return {"n_distinct_vectors": int(len(uniq)), "duplicate_vector_rate": float(in_dup.mean()),
            "n_items_in_duplicate_groups": int(in_dup.sum()), "largest_duplicate_group": int(counts.max()),
            "n_duplicate_groups": int((counts > 1).sum()), "top_duplicate_groups": groups}


def quantization_metrics(codes: np.ndarray, codebook_size: int, recon_cos: np.ndarray, sqerr: np.ndarray,
                         level_sqerr_sum: np.ndarray, dim: int, query_rows: np.ndarray | None = None,
                         neighbours: np.ndarray | None = None) -> dict[str, Any]:
    """Collisions, coverage, reconstruction and neighbour preservation of one quantizer's codes (n x L, no digit).

    reconstruction_mse is per element (mean over items and dimensions, torch's F.mse_loss); the per-vector squared
    error is reconstruction_mse * dim. neighbours: for each query row, the global rows of its k exact nearest
    neighbours (itself excluded)."""
    n, levels = codes.shape
    out: dict[str, Any] = {"collision_rate": [], "max_collision_group_by_depth": [], "codebook_utilization": [],
                           "perplexity": [], "codes_used": []}
    keys_by_depth = []
    for depth in range(1, levels + 1):
        keys = prefix_keys(codes, depth, codebook_size)
        keys_by_depth.append(keys)
        per_row, sizes = _group_sizes(keys)
        out["collision_rate"].append(float((per_row > 1).mean()) if n else 0.0)
        out["max_collision_group_by_depth"].append(int(sizes.max()) if n else 0)
        level_counts = np.bincount(codes[:, depth - 1], minlength=codebook_size) if n else np.zeros(codebook_size)
        p = level_counts[level_counts > 0] / max(n, 1)
        out["codes_used"].append(int((level_counts > 0).sum()))
        out["codebook_utilization"].append(float((level_counts > 0).sum() / codebook_size))
        out["perplexity"].append(float(math.exp(-(p * np.log(p)).sum())) if n else 0.0)
    out["max_collision_group"] = out["max_collision_group_by_depth"][-1] if levels else 0
    out["reconstruction_cosine"] = float(np.mean(recon_cos)) if n else 0.0
    out["reconstruction_cosine_p05"] = float(np.quantile(recon_cos, 0.05)) if n else 0.0
    out["reconstruction_mse"] = float(np.mean(sqerr) / dim) if n else 0.0
    out["reconstruction_mse_by_level"] = [float(s / max(n, 1) / dim) for s in level_sqerr_sum]
    out.update(neighbour_preservation(keys_by_depth, query_rows, neighbours))
    return out


def neighbour_preservation(keys_by_depth: list[np.ndarray], query_rows: np.ndarray | None,
                           neighbours: np.ndarray | None) -> dict[str, Any]:
    """Share of each sampled item's exact nearest neighbours that share its first l codes, l = 1..L, beside the
    share expected by chance (two random items sharing the prefix)."""
    if query_rows is None or neighbours is None or len(query_rows) == 0:
        return {"neighbour_share_first_code": None, "neighbour_share_first_two_codes": None,
                "neighbour_preservation": {"k": 0, "n_queries": 0, "share_by_depth": [], "chance_by_depth": []}}
    by_depth, chance = [], []
    valid = neighbours >= 0
    for keys in keys_by_depth:
        same = keys[neighbours.clip(0)] == keys[query_rows][:, None]
        by_depth.append(float(same[valid].mean()) if valid.any() else 0.0)
        _, counts = np.unique(keys, return_counts=True)
        p = counts / counts.sum()
        chance.append(float((p * p).sum()))
    return {"neighbour_share_first_code": by_depth[0],
            "neighbour_share_first_two_codes": by_depth[1] if len(by_depth) > 1 else None,
            "neighbour_preservation": {"k": int(neighbours.shape[1]), "n_queries": int(len(query_rows)),
                                       "share_by_depth": by_depth, "chance_by_depth": chance}}


def recommendations(report: dict[str, Any]) -> list[str]:
    """Plain-language advice from the report's numbers, most important first."""
    recs: list[str] = []
    n = report.get("n_items", 0)
    levels, k = report.get("levels", 0), report.get("codebook_size", 0)
    extra = report.get("extra_digit_size", k)
    dup_items = report.get("n_items_in_duplicate_groups", 0)
    if dup_items:
        recs.append(f"{dup_items:,} items ({report['duplicate_vector_rate']:.1%}) repeat another item's vector "
                    f"(identical text; largest group {report['largest_duplicate_group']:,}): merge duplicates or add "
                    "a distinguishing field (brand, colour, size) to the text before training; today only the extra "
                    "digit tells them apart.")
    mcg = report.get("max_collision_group", 0)
    if mcg > extra:
        cause = (" It is made of identical vectors, so no quantizer can split it: de-duplicate first."
                 if report.get("largest_duplicate_group", 0) > extra else
                 f" Add a level (levels={levels + 1}) or a larger codebook.")
        recs.append(f"BLOCKING: {mcg:,} items share all {levels} codes but the extra digit has only {extra} values, "
                    f"so they cannot all get a unique ID within the vocabulary.{cause}")
    requested, ppc = report.get("codebook_size_requested", k), report.get("min_points_per_centroid", 39)
    if k < requested and report.get("n_distinct_vectors", 0) >= requested * ppc:
        recs.append(f"The catalog now has {report['n_distinct_vectors']:,} distinct vectors, enough for "
                    f"codebook_size={requested} (the live codebooks have {k} codes, chosen when it was smaller): "
                    "retrain (a new ID version with an old -> new map) to use the full codebook.")
    elif report.get("codebook_size_reason"):
        recs.append(report["codebook_size_reason"])
    utils = report.get("codebook_utilization", [])
    low = [i for i, u in enumerate(utils) if u < report.get("min_utilization", 0.8)]
    if low:
        recs.append("Codebook utilization below {:.0%} at level(s) {}: ({}) of the {} codes are used; a smaller "
                    "codebook_size (or a larger training sample) wastes fewer tokens."
                    .format(report.get("min_utilization", 0.8), ", ".join(str(i + 1) for i in low),
                            ", ".join(f"{utils[i]:.0%}" for i in low), k))
    coll = report.get("collision_rate", [])
    dup_rate = report.get("duplicate_vector_rate", 0)
    if coll and coll[-1] > 0.2 and dup_rate < coll[-1] / 2:
        recs.append(f"{coll[-1]:.1%} of items share all {levels} codes with another item, far more than the "
                    f"{dup_rate:.1%} whose vector has an identical twin: the codes are too coarse for this catalog; "
                    f"add a level (levels={levels + 1}) or compare the quantizers.")
    cos = report.get("reconstruction_cosine")
    if cos is not None and cos < 0.75:
        recs.append(f"Mean reconstruction cosine is {cos:.3f}: the codes keep a coarse picture of each vector "
                    "(normal for 3 codes of 384-d text embeddings); compare quantizers in `comparison` before "
                    "training a recommender on them.")
    share = report.get("neighbour_share_first_code")
    chance = (report.get("neighbour_preservation") or {}).get("chance_by_depth") or [None]
    if share is not None and chance[0] is not None and share < 2 * chance[0]:
        recs.append(f"Only {share:.1%} of items' nearest neighbours share their first code (chance: {chance[0]:.1%}):"
                    " the first level does not capture similarity; check the embeddings before training.")
    ch = report.get("changes") or {}
    drift = ch.get("drift") or {}
    if drift.get("ratio") is not None and not drift.get("retrained"):
        fresh = drift.get("fresh_ratio")
        if fresh is not None and fresh > max(drift["threshold"], FRESH_RATIO_FLOOR):
            recs.append(f"The {drift.get('n_new_or_changed', 0):,} new or changed items reconstruct {fresh:.2f}x worse "
                        f"than the training catalog (the whole catalog: {drift['ratio']:.3f}x, retrain above "
                        f"{drift['threshold']:.2f}x). Their IDs are valid but coarser; if items like them will keep "
                        "coming, retrain (launch semantic_ids with retrain: true; every ID changes).")
        elif drift["ratio"] > 1 + (drift["threshold"] - 1) / 2:
            recs.append(f"The catalog reconstructs {drift['ratio']:.3f}x worse than at training (retrain threshold "
                        f"{drift['threshold']:.2f}x): a retrain (a new ID version) comes once it passes the threshold.")
    if n and not recs:
        used = "all" if utils and min(utils) >= 1 else f"at least {min(utils) if utils else 0:.0%} of"
        recs.append(f"Ready: {n:,} items have unique {levels + 1}-token IDs, every level uses {used} its codes, "
                    "and nothing needs attention.")
    return recs


def _fmt_list(xs: Sequence[Any], fmt: str) -> str:
    return ", ".join(format(x, fmt) for x in xs)


def render_markdown(report: dict[str, Any]) -> str:
    r = report
    lines = ["# Semantic IDs: readiness report", ""]
    lines += [f"Version `{r.get('version', '')}` ({r.get('action', '')}"
              + (f": {r['reason']}" if r.get("reason") else "") + f"), quantizer `{r.get('quantizer', '')}`, "
              f"{r.get('levels')} levels x {r.get('codebook_size')} codes + an extra digit of "
              f"{r.get('extra_digit_size')} values (requested codebook size {r.get('codebook_size_requested')}).", ""]
    lines += ["## Recommendations", ""] + [f"- {x}" for x in r.get("recommendations", [])] + [""]
    lines += ["## Checks", "", "| check | passed | detail |", "|---|---|---|"]
    for name, c in (r.get("checks") or {}).items():
        lines.append(f"| {name} | {'yes' if c.get('passed') else '**no**'} | {c.get('detail', '')} |")
    lines += ["", "## Numbers", "", "| metric | value |", "|---|---|"]
    rows = [("n_items", f"{r.get('n_items', 0):,}"),
            ("n_distinct_vectors", f"{r.get('n_distinct_vectors', 0):,}"),
            ("duplicate_vector_rate", f"{r.get('duplicate_vector_rate', 0):.2%}"),
            ("largest_duplicate_group", f"{r.get('largest_duplicate_group', 0):,}"),
            ("collision_rate (by depth)", _fmt_list(r.get("collision_rate", []), ".2%")),
            ("max_collision_group (all codes)", f"{r.get('max_collision_group', 0):,}"),
            ("max_collision_group_by_depth", _fmt_list(r.get("max_collision_group_by_depth", []), ",")),
            ("codebook_utilization", _fmt_list(r.get("codebook_utilization", []), ".1%")),
            ("perplexity", _fmt_list(r.get("perplexity", []), ".1f")),
            ("reconstruction_cosine (mean)", f"{r.get('reconstruction_cosine', 0):.4f}"),
            ("reconstruction_mse (per element)", f"{r.get('reconstruction_mse', 0):.3g}"),
            ("reconstruction_mse_by_level", _fmt_list(r.get("reconstruction_mse_by_level", []), ".3g"))]
    npres = r.get("neighbour_preservation") or {}
    if npres.get("n_queries"):
        rows.append((f"neighbours sharing 1st code ({npres['k']}-NN, {npres['n_queries']:,} items)",
                     f"{r['neighbour_share_first_code']:.1%} (chance {npres['chance_by_depth'][0]:.1%})"))
        if r.get("neighbour_share_first_two_codes") is not None:
            rows.append(("neighbours sharing 1st two codes",
                         f"{r['neighbour_share_first_two_codes']:.1%} (chance {npres['chance_by_depth'][1]:.2%})"))
    lines += [f"| {a} | {b} |" for a, b in rows]
    groups = r.get("top_duplicate_groups") or []
    if groups:
        lines += ["", "## Largest groups of identical vectors", "", "| items | example ids | title |", "|---|---|---|"]
        lines += [f"| {g['size']:,} | {', '.join(g['item_ids'])} | {g.get('title', '')[:80]} |" for g in groups]
    ch = r.get("changes") or {}
    if ch:
        lines += ["", "## What changed since the previous version", ""]
        lines.append(", ".join(f"{k.replace('n_', '')}: {ch[k]:,}" for k in
                               ("n_kept", "n_changed_same_id", "n_changed_new_id", "n_new", "n_deleted") if k in ch))
        if ch.get("drift"):
            d = ch["drift"]
            lines.append("")
            lines.append(f"Drift: {d.get('detail', '')}")
    comp = r.get("comparison") or {}
    if comp:
        names = list(comp)
        lines += ["", "## Quantizers compared on the same vectors", "",
                  "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key, fmt in (("collision_rate", ".2%"), ("max_collision_group", ","), ("codebook_utilization", ".1%"),
                         ("perplexity", ".1f"), ("reconstruction_cosine", ".4f"), ("reconstruction_mse", ".3g"),
                         ("neighbour_share_first_code", ".1%"), ("neighbour_share_first_two_codes", ".1%"),
                         ("train_seconds", ".1f")):
            vals = []
            for name in names:
                v = comp[name].get(key)
                vals.append("" if v is None else _fmt_list(v, fmt) if isinstance(v, list) else format(v, fmt))
            lines.append(f"| {key} | " + " | ".join(vals) + " |")
    tr = r.get("training") or {}
    if tr:
        lines += ["", "## Training", "", "```", *(f"{k}: {v}" for k, v in tr.items() if k != "history"), "```"]
    return "\n".join(lines) + "\n"


def write_report(reports_dir: Path, report: dict[str, Any], stem: str = "semantic_ids") -> tuple[Path, Path]:
    """Write `<reports_dir>/semantic_ids.json` and `.md` atomically; returns (md, json) paths."""
    reports_dir = Path(reports_dir)
    md, js = reports_dir / f"{stem}.md", reports_dir / f"{stem}.json"
    atomic_write_json(js, report)
    atomic_write_text(md, render_markdown(report))
    return md, js

"""`embed-assets`: run the whole asset graph headless, or encode a JSONL file with the platform's encoder.

    embed-assets run --home DIR [--items PATH ...] [--id-field F] [--text-fields A,B] [--queries P --qrels P]
    embed-assets encode --input FILE.jsonl --text-field F --output OUT.npy
    embed-assets verify --home DIR [--repair]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from embed_assets.core.layout import home_from_env
from embed_assets.settings import Settings, split_fields


def _instance():
    import dagster as dg

    # With DAGSTER_HOME set, CLI runs land in the same instance the UI shows; otherwise an in-memory one.
    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


# Dagster's console logger at INFO: the per-batch progress lines, without the engine's DEBUG chatter.
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _failures(result) -> list[str]:
    msgs = []
    for ev in result.all_events:
        if ev.is_step_failure:
            err = ev.step_failure_data.error
            if err and err.cls_name == "DagsterAssetCheckFailedError":
                continue  # already reported as a failed check
            msgs.append(f"{ev.step_key}: {err.message.strip() if err else 'failed'}")
    return msgs


def _md(metadata, key: str) -> Any:
    v = metadata.get(key)
    return getattr(v, "value", v) if v is not None else None


def _checks(result) -> list[dict[str, Any]]:
    return [{"check": ev.check_name, "asset": ev.asset_key.to_user_string(), "passed": ev.passed,
             "partition": getattr(ev, "partition", None),
             "detail": _md(ev.metadata, "problems") or _md(ev.metadata, "failures") or ""}
            for ev in result.get_asset_check_evaluations()]


def _meta(result, node: str) -> list[dict[str, Any]]:
    return [{k: getattr(v, "value", v) for k, v in m.metadata.items()}
            for m in result.asset_materializations_for_node(node)]


def run_pipeline(settings: Settings, log=print) -> tuple[int, dict[str, Any]]:
    """Materialize items, every row-group partition (with its check), then norms, index and report."""
    from embed_assets.core.items import load_row_groups
    from embed_assets.core.layout import Layout
    from embed_assets.definitions import build_definitions
    from embed_assets.defs.embeddings.partitions import row_group_partitions

    t0 = time.perf_counter()
    layout = Layout.at(settings.home)
    defs = build_definitions(settings)
    instance = _instance()
    summary: dict[str, Any] = {"home": str(layout.home), "items": settings.items, "failures": [], "checks": []}
    if layout.home.exists():
        from embed_assets.core.verify import verify

        # leftovers of an interrupted run; the index is rebuilt below, so its check is skipped here
        for line in verify(layout, repair=True, check_index=False)["fixed"]:
            log(f"repaired: {line}")

    log(f"[1/3] processed_items from {', '.join(settings.items)}")
    res = defs.resolve_job_def("process_items_job").execute_in_process(
        instance=instance, raise_on_error=False, run_config=RUN_CONFIG)
    summary["failures"] += _failures(res)
    if not res.success:
        return _finish(layout, summary, t0, log)
    items_meta = _meta(res, "processed_items")[0]
    summary.update({k: items_meta[k] for k in ("n_items", "n_rows_read", "n_rejected", "n_duplicates")})

    keys = [rg["partition"] for rg in load_row_groups(layout)]
    # Dynamic partitions live in the instance; a fresh instance needs them registered.
    missing = [k for k in keys if not instance.has_dynamic_partition(row_group_partitions.name, k)]
    if missing:
        instance.add_dynamic_partitions(row_group_partitions.name, missing)
    log(f"[2/3] item_embeddings: {len(keys)} partition(s), {summary['n_items']:,} items")
    n_encoded = n_reused = 0
    embed_job = defs.resolve_job_def("embed_shards_job")
    for i, key in enumerate(keys, 1):
        res = embed_job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False,
                                           run_config=RUN_CONFIG)
        summary["failures"] += _failures(res)
        summary["checks"] += _checks(res)
        for m in _meta(res, "item_embeddings"):
            n_encoded += m["n_encoded"]
            n_reused += m["n_reused"]
            log(f"      {key} ({i}/{len(keys)}): {m['rows']:,} rows, encoded {m['n_encoded']:,}, "
                f"re-used {m['n_reused']:,}{' (unchanged, skipped)' if m['skipped_unchanged'] else ''}, "
                f"{m['items_per_s']:.1f} items/s")
    summary.update(n_encoded=n_encoded, n_reused=n_reused, n_partitions=len(keys))
    if summary["failures"] or not all(c["passed"] for c in summary["checks"]):
        return _finish(layout, summary, t0, log)

    log("[3/3] embedding_norms, faiss_index, retrieval_report")
    res = defs.resolve_job_def("index_and_report_job").execute_in_process(
        instance=instance, raise_on_error=False, run_config=RUN_CONFIG)
    summary["failures"] += _failures(res)
    summary["checks"] += _checks(res)
    report = _meta(res, "retrieval_report")
    if report:
        summary["report"] = {k: report[0][k] for k in ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10",
                                                       "ann_recall_at_10", "n_queries", "n_items") if k in report[0]}
    return _finish(layout, summary, t0, log)


def _finish(layout, summary: dict[str, Any], t0: float, log) -> tuple[int, dict[str, Any]]:
    from embed_assets.core.atomic import atomic_write_json

    summary["seconds"] = round(time.perf_counter() - t0, 2)
    failed_checks = [c for c in summary["checks"] if not c["passed"]]
    summary["ok"] = not summary["failures"] and not failed_checks
    atomic_write_json(layout.run_summary_json, summary)
    log("")
    for k in ("n_items", "n_rejected", "n_duplicates", "n_partitions", "n_encoded", "n_reused"):
        if k in summary:
            log(f"  {k:<18} {summary[k]:,}")
    for k, v in summary.get("report", {}).items():
        if k not in summary:
            log(f"  {k:<18} {v:.5f}" if isinstance(v, float) else f"  {k:<18} {v:,}")
    for c in failed_checks:
        log(f"  CHECK FAILED  {c['check']} {c.get('partition') or ''}: {c['detail']}")
    for f in summary["failures"]:
        log(f"  STEP FAILED   {f}")
    log(f"  {'ok' if summary['ok'] else 'FAILED'} in {summary['seconds']:.1f} s; summary in {layout.run_summary_json}")
    return (0 if summary["ok"] else 1), summary


def cmd_run(a: argparse.Namespace) -> int:
    if a.items:
        s = Settings(home=a.home, items=a.items, queries=a.queries, qrels=a.qrels)
    else:
        s = Settings.sample(a.home)
        print("no --items: running the bundled SciFact sample (CC BY-NC 2.0; Wadden et al., 2020, via BEIR)")
    if a.queries or a.qrels:
        s.queries, s.qrels = a.queries, a.qrels
    if a.id_field:
        s.id_field = a.id_field
    if a.text_fields:
        s.text_fields = split_fields(a.text_fields)
    if a.row_group_size:
        s.row_group_size = a.row_group_size
    for k in ("min_ndcg_at_10", "min_recall_at_100", "min_ann_recall_at_10", "norm_tolerance"):
        if getattr(a, k) is not None:
            setattr(s, k, getattr(a, k))
    s.chunking, s.device, s.index_kind, s.precision = a.chunking, a.device, a.index_kind, a.precision
    if bool(s.queries) != bool(s.qrels):
        print("error: --queries and --qrels go together", file=sys.stderr)
        return 2
    code, _ = run_pipeline(s)
    return code


def cmd_encode(a: argparse.Namespace) -> int:
    import numpy as np

    from embed_assets.core.atomic import atomic_write
    from embed_assets.core.encoder import Encoder
    from embed_assets.core.text import clean_text, field_text

    texts = []
    with open(a.input, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                texts.append(clean_text(field_text(rec.get(a.text_field))))
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                print(f"error: {a.input}:{n}: not a JSON object ({e}); fix or remove the line", file=sys.stderr)
                return 2
    if not all(texts):
        print(f"warning: {texts.count('')} rows have no {a.text_field!r} text; they get the empty text's vector",
              file=sys.stderr)
    enc = Encoder(max_seq_length=a.max_seq_length, device=a.device, precision=a.precision, chunking=a.chunking)
    vecs, stats = enc.encode(texts, progress=lambda m: print(m, file=sys.stderr))
    atomic_write(Path(a.output), lambda tmp: np.save(open(tmp, "wb"), vecs.astype(np.float16)))
    print(json.dumps({"output": a.output, "rows": len(texts), **stats.as_dict()}))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from embed_assets.core.layout import Layout
    from embed_assets.core.verify import format_report, verify

    r = verify(Layout.at(a.home), repair=a.repair)
    print(format_report(r))
    return 0 if r["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="embed-assets", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="materialize the whole graph headless")
    r.add_argument("--home", default=home_from_env(),
                   help="platform HOME (default: $EMBED_ASSETS_HOME or ./data)")
    r.add_argument("--items", action="append", help="raw item file or folder (repeatable); default: bundled SciFact")
    r.add_argument("--id-field", help="id field (default _id)")
    r.add_argument("--text-fields", help="comma-separated text fields, joined with a space (default title,text)")
    r.add_argument("--row-group-size", type=int, help="rows per row group = per partition (default 200000)")
    r.add_argument("--queries", help="BEIR queries.jsonl for the retrieval report")
    r.add_argument("--qrels", help="BEIR qrels .tsv for the retrieval report")
    r.add_argument("--min-ndcg-at-10", type=float)
    r.add_argument("--min-recall-at-100", type=float)
    r.add_argument("--min-ann-recall-at-10", type=float)
    r.add_argument("--norm-tolerance", type=float)
    r.add_argument("--index-kind", default="flat", choices=["flat", "hnsw"])
    r.add_argument("--device", default="auto")
    r.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: fp16 on CUDA, bf16 autocast on CPUs with native bf16, else fp32")
    r.add_argument("--chunking", action="store_true", help="encode long texts in overlapping windows")
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("encode", help="encode a JSONL file to a float16 .npy (rows in input order)")
    e.add_argument("--input", required=True)
    e.add_argument("--text-field", required=True)
    e.add_argument("--output", required=True)
    e.add_argument("--max-seq-length", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    e.add_argument("--chunking", action="store_true")
    e.set_defaults(fn=cmd_encode)
    v = sub.add_parser("verify", help="check shards, catalog and index against each other (and --repair)")
    v.add_argument("--home", default=home_from_env())
    v.add_argument("--repair", action="store_true",
                   help="remove temp files, orphans and untrusted shards; resync the catalog")
    v.set_defaults(fn=cmd_verify)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

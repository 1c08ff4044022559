"""`embed-assets`: run the whole asset graph headless, or encode a JSONL file with the platform's encoder.

    embed-assets run --home DIR [--items PATH ...] [--id-field F] [--text-fields A,B] [--queries P --qrels P]
    embed-assets encode --input FILE.jsonl --text-field F --output OUT.npy
    embed-assets verify --home DIR [--repair]
    embed-assets export --format grid|lcrec|parquet --out DIR [--home DIR]
    embed-assets search "TEXT" [-k 10] [--home DIR] [--json]
    embed-assets serve [--home DIR] [--host 127.0.0.1] [--port 8000] [--cache-ttl-s 300]
    embed-assets ui [--home DIR] [--host 127.0.0.1] [--port 3000] [--print-env]

`run` records its runs in HOME's Dagster instance (HOME/dagster, or $DAGSTER_HOME when set) and saves its settings
in HOME/settings.json; `ui` starts `dg dev` on that instance with those settings, so the UI shows what `run` did.
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
from embed_assets.settings import (SAMPLE_CORPUS, SAMPLE_PUBLISHED, SAMPLE_PUBLISHED_SOURCE, SAMPLE_QRELS,
                                   SAMPLE_QUERIES, Settings, split_fields)


def _instance(home: str, log=print):
    """HOME's Dagster instance, the one `embed-assets ui` shows: $DAGSTER_HOME when set, else HOME/dagster (created
    with the shipped profile on first use). See embed_assets/instance."""
    from embed_assets.instance import open_instance

    return open_instance(home, log)


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


def run_pipeline(settings: Settings, log=print, encoder_resource=None) -> tuple[int, dict[str, Any]]:
    """Materialize items, every partition (with its check), then norms, index and report, as runs in HOME's Dagster
    instance (the one `embed-assets ui` shows), after saving the settings in HOME/settings.json (what the UI loads).
    `encoder_resource` replaces the encoder (benchmarks of pipeline overhead use `embed_assets.testing`'s stand-in)."""
    from embed_assets.core.layout import Layout
    from embed_assets.definitions import build_definitions

    t0 = time.perf_counter()
    layout = Layout.at(settings.home, settings.base_uri)
    existed = layout.home.exists()
    defs = build_definitions(settings, encoder_resource)
    with _instance(settings.home, log) as instance:
        return _run_pipeline(settings, defs, instance, layout, existed, t0, log)


def _run_pipeline(settings: Settings, defs, instance, layout, existed: bool, t0: float,
                  log) -> tuple[int, dict[str, Any]]:
    from embed_assets.core.items import load_partitions
    from embed_assets.defs.embeddings.partitions import item_partitions
    from embed_assets.instance import cli_run_tags, release_dead_cli_runs

    summary: dict[str, Any] = {"home": str(layout.home), "items": settings.items, "failures": [], "checks": [],
                               "cpu0": time.process_time()}
    if settings.base_uri:
        from embed_assets.core.store import STATS

        summary["base_uri"] = settings.base_uri
        summary["store0"] = STATS.as_dict()
    # the UI (`embed-assets ui`, i.e. Settings.from_env()) loads what this run ran
    settings.save()
    # runs of an earlier `embed-assets run` that was killed: marked failed, their encoder slot freed
    release_dead_cli_runs(instance, log)
    tags = cli_run_tags()
    if existed:
        from embed_assets.core.verify import verify

        # leftovers of an interrupted run; the index is rebuilt below, so its check is skipped here. Not the full
        # check: an unchanged shard is not hashed again (O(change), not O(catalog bytes), per run)
        for line in verify(layout, repair=True, check_index=False, full=False)["fixed"]:
            log(f"repaired: {line}")

    log(f"[1/3] processed_items from {', '.join(settings.items)}")
    res = defs.resolve_job_def("process_items_job").execute_in_process(
        instance=instance, raise_on_error=False, run_config=RUN_CONFIG, tags=tags)
    summary["failures"] += _failures(res)
    if not res.success:
        return _finish(layout, summary, t0, log)
    items_meta = _meta(res, "processed_items")[0]
    summary.update({k: items_meta[k] for k in ("n_items", "n_rows_read", "n_rejected", "n_duplicates")})
    summary["steps"] = {"processed_items": {k: items_meta[k] for k in (
        "seconds", "cpu_seconds", "peak_rss_mb", "n_partitions_written", "n_partitions_skipped", "rows_per_s")
        if k in items_meta}}

    keys = [p["partition"] for p in load_partitions(layout)]
    # Dynamic partitions live in the instance; a fresh instance needs them registered.
    missing = [k for k in keys if not instance.has_dynamic_partition(item_partitions.name, k)]
    if missing:
        instance.add_dynamic_partitions(item_partitions.name, missing)
    log(f"[2/3] item_embeddings: {len(keys)} partition(s), {summary['n_items']:,} items")
    n_encoded = n_reused = n_written = 0
    embed_s, embed_cpu, embed_peak = 0.0, 0.0, 0.0
    precisions: list[str] = []  # what ran, over the partitions that encoded something
    probes: list[dict] = []
    embed_job = defs.resolve_job_def("embed_shards_job")
    for i, key in enumerate(keys, 1):
        res = embed_job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False,
                                           run_config=RUN_CONFIG, tags=tags)
        summary["failures"] += _failures(res)
        summary["checks"] += _checks(res)
        for m in _meta(res, "item_embeddings"):
            n_encoded += m["n_encoded"]
            n_reused += m["n_reused"]
            n_written += not m["skipped_unchanged"]
            embed_s += m["seconds"]
            embed_cpu += m.get("cpu_seconds", 0.0)
            embed_peak = max(embed_peak, m.get("peak_rss_mb", 0.0))
            if m["n_encoded"] and m.get("precision") and m["precision"] not in precisions:
                precisions.append(m["precision"])
            probe = m.get("precision_probe")
            # One verdict per distinct probe: partitions encoded after the first one find it cached ("cached" says
            # where from), which is the same verdict, not another one.
            if m["n_encoded"] and isinstance(probe, dict) and probe and not any(_same_verdict(probe, p) for p in probes):
                probes.append(probe)
            log(f"      {key} ({i}/{len(keys)}): {m['rows']:,} rows, encoded {m['n_encoded']:,}, "
                f"re-used {m['n_reused']:,}{' (unchanged, skipped)' if m['skipped_unchanged'] else ''}, "
                f"{m['items_per_s']:.1f} items/s")
    summary.update(n_encoded=n_encoded, n_reused=n_reused, n_partitions=len(keys), n_partitions_written=n_written,
                   n_partitions_skipped=len(keys) - n_written)
    summary["steps"]["item_embeddings"] = {"seconds": round(embed_s, 3), "cpu_seconds": round(embed_cpu, 3),
                                           "peak_rss_mb": round(embed_peak, 1),
                                           "n_partitions_written": n_written,
                                           "n_partitions_skipped": len(keys) - n_written}
    summary.update(_precision_summary(precisions, probes, settings))
    if summary["failures"] or not all(c["passed"] for c in summary["checks"]):
        return _finish(layout, summary, t0, log)

    nodes = ["embedding_norms", "faiss_index", "retrieval_report"] + (["semantic_ids"] if settings.semantic_ids else [])
    log(f"[3/3] {', '.join(nodes)}")
    import dagster as dg

    res = defs.resolve_job_def("index_and_report_job").execute_in_process(
        instance=instance, raise_on_error=False, run_config=RUN_CONFIG, tags=tags,
        asset_selection=[dg.AssetKey(n) for n in nodes])
    summary["failures"] += _failures(res)
    summary["checks"] += _checks(res)
    sid = _meta(res, "semantic_ids")
    if sid:
        summary["semantic_ids"] = {k: sid[0][k] for k in (
            "action", "reason", "version", "n_items", "codebook_size", "max_collision_group", "unique_full_ids",
            "duplicate_vector_rate", "reconstruction_cosine") if k in sid[0]}
    for node in nodes:
        for m in _meta(res, node):
            # the index's own size beside its step's memory: the index step's peak is the index plus an overhead
            summary["steps"][node] = {k: m[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb", "bytes", "update_mode")
                                      if k in m}
    report = _meta(res, "retrieval_report")
    if report:
        summary["report"] = {k: report[0][k] for k in ("ndcg_at_1", "ndcg_at_10", "ndcg_at_100", "recall_at_1",
                                                       "recall_at_10", "recall_at_100", "mrr_at_10",
                                                       "ann_recall_at_10", "n_queries", "n_items") if k in report[0]}
        if _is_bundled_sample(settings):
            summary["vs_published"] = vs_published(summary["report"])
    return _finish(layout, summary, t0, log)


def vs_published(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """This run's numbers beside the published ones (settings.SAMPLE_PUBLISHED), for the metrics the report has."""
    return {k: {"this_run": report[k], "published": pub, "delta": round(report[k] - pub, 5)}
            for k, pub in SAMPLE_PUBLISHED.items() if isinstance(report.get(k), float)}


def _same_path(a, b) -> bool:
    try:
        return a is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _is_bundled_sample(settings: Settings) -> bool:
    """The run is the bundled SciFact sample with its test queries: its numbers compare with the published ones."""
    return (len(settings.items) == 1 and _same_path(settings.items[0], SAMPLE_CORPUS)
            and _same_path(settings.queries, SAMPLE_QUERIES) and _same_path(settings.qrels, SAMPLE_QRELS))


def _same_verdict(a: dict, b: dict) -> bool:
    """Two precision probe results are the same verdict when they differ only in where it was read from."""
    return {k: v for k, v in a.items() if k != "cached"} == {k: v for k, v in b.items() if k != "cached"}


def _precision_summary(precisions: list[str], probes: list[dict], settings: Settings) -> dict[str, Any]:
    """What precision encoded this run's vectors (from the item_embeddings metadata: one value, or a list if the
    partitions differed; None if nothing was encoded) and the auto probe's verdict behind it."""
    from embed_assets.core.encoder import cpu_info, last_auto_precision

    out: dict[str, Any] = {"precision": (precisions[0] if len(precisions) == 1 else sorted(precisions) or None),
                           "precision_requested": settings.precision, "cpu": cpu_info()}
    # one verdict per machine: partitions after the first find it cached (in memory), which is no other verdict
    verdicts: list[dict] = []
    for p in probes:
        if all({k: v for k, v in p.items() if k != "cached"} != {k: v for k, v in q.items() if k != "cached"}
               for q in verdicts):
            verdicts.append(p)
    probe = verdicts[0] if len(verdicts) == 1 else (verdicts or None)
    if probe is None and settings.precision == "auto" and precisions:
        last = last_auto_precision()  # the in-process runs' encoder decided it; same process, same verdict
        probe = last["probe"] if last else None
    if probe is not None:
        keep = ("candidate", "passed", "mean_cos", "min_cos", "n_texts", "bound_mean_cos", "bound_min_cos", "cached",
                "reason", "cpu", "cpu_bf16_flags", "gpu", "torch", "device")
        probe = ([{k: p.get(k) for k in keep if k in p} for p in probe] if isinstance(probe, list)
                 else {k: probe.get(k) for k in keep if k in probe})
    out["precision_probe"] = probe
    return out


def _precision_line(summary: dict[str, Any]) -> str:
    ran = summary.get("precision")
    ran = ", ".join(ran) if isinstance(ran, list) else (ran or "n/a (nothing encoded)")
    probe = summary.get("precision_probe")
    if isinstance(probe, list):
        probe = probe[0]
    if not probe:
        why = " (asked for)" if summary.get("precision_requested") not in (None, "auto") else ""
        return f"precision: {ran}{why}"
    if probe.get("mean_cos") is not None:
        detail = (f"probe: {probe.get('candidate')} {'passed' if probe.get('passed') else 'FAILED'}, mean cos "
                  f"{probe['mean_cos']:.6f}, min {probe['min_cos']:.6f} over {probe.get('n_texts')} texts"
                  f"{', cached' if probe.get('cached') else ''}")
    else:
        detail = probe.get("reason") or "no probe"
    return f"precision: {ran} ({detail})"


def _finish(layout, summary: dict[str, Any], t0: float, log) -> tuple[int, dict[str, Any]]:
    from embed_assets.core.atomic import atomic_write_json

    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if "cpu0" in summary:  # the whole run's CPU (this process: every step and Dagster's own work)
        summary["cpu_seconds"] = round(time.process_time() - summary.pop("cpu0"), 2)
    failed_checks = [c for c in summary["checks"] if not c["passed"]]
    summary["ok"] = not summary["failures"] and not failed_checks
    if "store0" in summary:  # this run's requests to the base URI and bytes moved (core/store.py)
        from embed_assets.core.store import STATS

        before = summary.pop("store0")
        summary["store"] = {k: v - before.get(k, 0) for k, v in STATS.as_dict().items()}
    atomic_write_json(layout.run_summary_json, summary)
    if layout.store is not None:
        from embed_assets.core.store import StoreError, publish_reports

        try:
            publish_reports(layout.store, layout.reports_dir, [layout.run_summary_json.name])
        except StoreError as e:
            log(f"  run summary not published: {e}")
    log("")
    for k in ("n_items", "n_rejected", "n_duplicates", "n_partitions", "n_encoded", "n_reused"):
        if k in summary:
            log(f"  {k:<18} {summary[k]:,}")
    for k, v in summary.get("report", {}).items():
        if k not in summary:
            log(f"  {k:<18} {v:.5f}" if isinstance(v, float) else f"  {k:<18} {v:,}")
    if "precision" in summary:
        cpu = summary.get("cpu") or {}
        log(f"  {_precision_line(summary)}")
        log(f"  cpu: {cpu.get('model', '?')} (bf16 flags: {', '.join(cpu.get('bf16_flags') or []) or 'none'})")
    if summary.get("semantic_ids"):
        sid = summary["semantic_ids"]
        log(f"  semantic IDs       {sid.get('version')} ({sid.get('action')}): {sid.get('n_items', 0):,} items, "
            f"K={sid.get('codebook_size')}, largest colliding group {sid.get('max_collision_group')}, "
            f"unique {sid.get('unique_full_ids')}; report in {layout.reports_dir / 'semantic_ids.md'}")
    if summary.get("vs_published"):
        log("")
        log(f"  SciFact test vs the published table ({SAMPLE_PUBLISHED_SOURCE}):")
        log(f"  {'metric':<14} {'this run':>9} {'published':>10} {'delta':>9}")
        for k, row in summary["vs_published"].items():
            log(f"  {k:<14} {row['this_run']:>9.5f} {row['published']:>10.5f} {row['delta']:>+9.5f}")
    for c in failed_checks:
        log(f"  CHECK FAILED  {c['check']} {c.get('partition') or ''}: {c['detail']}")
    for f in summary["failures"]:
        log(f"  STEP FAILED   {f}")
    if summary.get("store"):
        st = summary["store"]
        log(f"  store {summary.get('base_uri')}: {st['puts']:,} PUTs ({st['bytes_up']:,} bytes), {st['gets']:,} GETs "
            f"({st['bytes_down']:,} bytes), {st['heads']:,} HEADs, {st['lists']:,} LISTs")
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
    if a.partition_size:
        s.partition_size = a.partition_size
    if a.memory_budget_mb:
        s.memory_budget_mb = a.memory_budget_mb
    for k in ("min_ndcg_at_10", "min_recall_at_100", "min_ann_recall_at_10", "norm_tolerance"):
        if getattr(a, k) is not None:
            setattr(s, k, getattr(a, k))
    s.chunking, s.device, s.index_kind, s.precision = a.chunking, a.device, a.index_kind, a.precision
    s.base_uri = a.base_uri or None
    if a.no_semantic_ids:
        s.semantic_ids = False
    if bool(s.queries) != bool(s.qrels):
        print("error: --queries and --qrels go together", file=sys.stderr)
        return 2
    code, _ = run_pipeline(s)
    print(f"  the Dagster UI on these runs: embed-assets ui --home {a.home}")
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
    print(json.dumps({"output": a.output, "rows": len(texts), "precision": enc.precision,
                      "precision_probe": enc.precision_probe, **stats.as_dict()}))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from embed_assets.core.layout import Layout
    from embed_assets.core.verify import format_report, verify

    r = verify(Layout.at(a.home), repair=a.repair)
    print(format_report(r))
    return 0 if r["ok"] else 1


def cmd_export(a: argparse.Namespace) -> int:
    """The live semantic IDs with their vectors, in a trainer's format (core/sid_export.py)."""
    from embed_assets.core.layout import Layout
    from embed_assets.core.semantic_ids import SemanticIdError, load_version, shards_from_layout, sid_root
    from embed_assets.core.shards import ShardError, read_manifest
    from embed_assets.core.sid_export import ExportError, export

    layout = Layout.at(a.home)
    try:
        version = load_version(sid_root(layout.home))
        if version is None:
            print(f"error: no semantic IDs under {sid_root(layout.home)}; run `embed-assets run --home {a.home}` "
                  "(or materialize semantic_ids) first", file=sys.stderr)
            return 2
        manifests = [read_manifest(layout, key) for key in sorted(version.manifest["input_shards"])]
        missing = [key for key, m in zip(sorted(version.manifest["input_shards"]), manifests)
                   if m is None or m.fingerprint != version.manifest["input_shards"][key]]
        if missing:
            print(f"error: the shards of partition(s) {', '.join(missing[:5])} changed since semantic IDs "
                  f"{version.name} were built; materialize semantic_ids again, then export", file=sys.stderr)
            return 2
        out = export(version, shards_from_layout(layout, manifests), a.format, a.out, name=a.name,
                     log=lambda m: print(m, file=sys.stderr))
    except (SemanticIdError, ShardError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_search(a: argparse.Namespace) -> int:
    """The k items nearest to a text, from HOME's current index (core/search.py)."""
    from embed_assets.core.search import NoIndex, QueryError, Searcher

    try:
        result = Searcher(a.home, cache_ttl_s=0).search_result(a.text, a.k)
    except (QueryError, NoIndex) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps([h.as_dict() for h in result.hits], ensure_ascii=False, indent=2))
        return 0
    idx = result.index
    print(f"index {idx.sha256[:12]} ({idx.n_items:,} items), {result.seconds * 1e3:.1f} ms encode + search")
    for rank, h in enumerate(result.hits, 1):
        print(f"{rank:>4}  {h.score:.4f}  {h.item_id}  {h.title}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    """The search API over HTTP (embed_assets/serve.py)."""
    from embed_assets.serve import serve

    return serve(a.home, host=a.host, port=a.port, cache_ttl_s=a.cache_ttl_s, cache_size=a.cache_size,
                 reload_check_s=a.reload_check_s, threads=a.threads, log_level=a.log_level, access_log=a.access_log)


def ui_command(host: str, port: int, workspace: str) -> list[str]:
    """`dg dev` (Dagster 1.13's CLI) on `workspace`, from this environment; `dagster dev` where dagster-dg-cli is
    not installed (it is the `dg` extra)."""
    import shutil

    args = ["dev", "-w", workspace, "-h", host, "-p", str(port)]
    dg_bin = Path(sys.executable).with_name("dg")
    dg_bin = str(dg_bin) if dg_bin.exists() else shutil.which("dg")
    return [dg_bin, *args] if dg_bin else [sys.executable, "-m", "dagster", *args]


def cmd_ui(a: argparse.Namespace) -> int:
    """The Dagster UI on HOME's instance (HOME/dagster, or $DAGSTER_HOME) with the settings of HOME's last run."""
    import shlex

    from embed_assets.instance import WORKSPACE, ensure_instance
    from embed_assets.settings import settings_path

    home = a.home if "://" in a.home else str(Path(a.home).resolve())
    try:
        dagster_home = ensure_instance(home, log=lambda m: print(m, file=sys.stderr))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = {"DAGSTER_HOME": str(dagster_home), "EMBED_ASSETS_HOME": home}
    if a.print_env:
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))
        return 0
    os.environ.update(env)
    try:  # what the code location will load: fail here, with the reason, rather than in the UI
        Settings.from_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("EMBED_ASSETS_ITEMS"):
        source = "the environment ($EMBED_ASSETS_ITEMS and the other EMBED_ASSETS_* variables)"
    elif settings_path(home).exists():
        source = f"{settings_path(home)} (its last `embed-assets run`), then any EMBED_ASSETS_* variables"
    else:
        source = "the bundled SciFact sample (no `embed-assets run` into this HOME yet)"
    cmd = ui_command(a.host, a.port, a.workspace or str(WORKSPACE))
    print(f"Dagster UI: http://{a.host}:{a.port}\n  HOME      {home}\n  instance  {dagster_home}\n"
          f"  settings  {source}\n  $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    # Started in the background by a shell, SIGINT is ignored, and dagster maps SIGTERM onto SIGINT's handler: then
    # `kill` would not stop the UI. Default SIGINT, so dg dev turns both into a clean shutdown.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _add_ui_parser(sub) -> None:
    u = sub.add_parser("ui", help="the Dagster UI (dg dev) on HOME's instance, with the settings of its last run")
    u.add_argument("--home", default=home_from_env(), help="platform HOME (default: $EMBED_ASSETS_HOME or ./data)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=3000)
    u.add_argument("--workspace", help="a workspace file (default: the module embed_assets.definitions, as "
                                       "workspace.yaml loads it)")
    u.add_argument("--print-env", action="store_true",
                   help="print the DAGSTER_HOME and EMBED_ASSETS_HOME to export for your own `dg dev`, and exit")
    u.set_defaults(fn=cmd_ui)


def _add_search_parsers(sub) -> None:
    """`search` and `serve`."""
    from embed_assets.core.search import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_TTL_S, MAX_K, MAX_QUERY_CHARS

    q = sub.add_parser("search", help="the items nearest to a text, from the current index")
    q.add_argument("text", help=f"what to search for (1 to {MAX_QUERY_CHARS:,} characters)")
    q.add_argument("-k", "--k", type=int, default=10, help=f"how many items (1 to {MAX_K:,}; default 10)")
    q.add_argument("--home", default=home_from_env())
    q.add_argument("--json", action="store_true", help='print a JSON list of {"item_id", "score", "title"}')
    q.set_defaults(fn=cmd_search)
    w = sub.add_parser("serve", help="serve /search, /items/{id}/similar, /healthz and /metrics over HTTP")
    w.add_argument("--home", default=home_from_env())
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=8000)
    w.add_argument("--cache-ttl-s", type=float, default=DEFAULT_CACHE_TTL_S,
                   help="seconds a query's vector is cached (default 300; 0 turns the cache off)")
    w.add_argument("--cache-size", type=int, default=DEFAULT_CACHE_SIZE,
                   help="most query vectors cached (default 10000)")
    w.add_argument("--reload-check-s", type=float, default=1.0,
                   help="how often to look for a newer index and swap to it (default 1 s; 0: never)")
    w.add_argument("--threads", type=int, default=1,
                   help="torch and FAISS threads (default 1: one query is too small to split; requests run in "
                        "parallel instead)")
    w.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    w.add_argument("--access-log", action="store_true", help="log every request (off: /metrics counts them)")
    w.set_defaults(fn=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="embed-assets", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="materialize the whole graph headless")
    r.add_argument("--home", default=home_from_env(),
                   help="platform HOME (default: $EMBED_ASSETS_HOME or ./data)")
    r.add_argument("--items", action="append", help="raw item file or folder (repeatable); default: bundled SciFact")
    r.add_argument("--base-uri", default=os.environ.get("EMBED_ASSETS_BASE_URI"),
                   help="also publish shards, index, semantic IDs and reports there, and take them from there when "
                        "HOME lacks them (s3://bucket/prefix, file:///path; default $EMBED_ASSETS_BASE_URI: none)")
    r.add_argument("--id-field", help="id field (default _id)")
    r.add_argument("--text-fields", help="comma-separated text fields, joined with a space (default title,text)")
    r.add_argument("--partition-size", type=int,
                   help="target items per partition (default 200000); a partition splits in two past 1.25x")
    r.add_argument("--memory-budget-mb", type=int, help="peak memory of processed_items (default 2048)")
    r.add_argument("--queries", help="BEIR queries.jsonl for the retrieval report")
    r.add_argument("--qrels", help="BEIR qrels .tsv for the retrieval report")
    r.add_argument("--min-ndcg-at-10", type=float)
    r.add_argument("--min-recall-at-100", type=float)
    r.add_argument("--min-ann-recall-at-10", type=float)
    r.add_argument("--norm-tolerance", type=float)
    r.add_argument("--index-kind", default="auto", choices=["auto", "flat", "hnsw"],
                   help="auto: exact up to 250,000 items, else IVF tuned to --min-ann-recall-at-10 on held-out queries")
    r.add_argument("--device", default="auto")
    r.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: the fastest precision that is faithful on this machine: fp16 on CUDA or bf16 autocast "
                        "on a CPU with native bf16 if a probe finds its vectors within cosine 0.9999 (mean) / 0.999 "
                        "(min) of fp32, else fp32 ($EMBED_ASSETS_PRECISION_PROBE=off skips the probe)")
    r.add_argument("--chunking", action="store_true", help="encode long texts in overlapping windows")
    r.add_argument("--no-semantic-ids", action="store_true",
                   help="leave the semantic_ids asset out (e.g. a catalog under ~80 distinct items, too small to "
                        "train a codebook); also $EMBED_ASSETS_SEMANTIC_IDS=0")
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("encode", help="encode a JSONL file to a float16 .npy (rows in input order)")
    e.add_argument("--input", required=True)
    e.add_argument("--text-field", required=True)
    e.add_argument("--output", required=True)
    e.add_argument("--max-seq-length", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="as for run: auto = the fastest precision the faithfulness probe accepts here")
    e.add_argument("--chunking", action="store_true")
    e.set_defaults(fn=cmd_encode)
    v = sub.add_parser("verify", help="check shards, catalog and index against each other (and --repair)")
    v.add_argument("--home", default=home_from_env())
    v.add_argument("--repair", action="store_true",
                   help="remove temp files, orphans and untrusted shards; resync the catalog")
    v.set_defaults(fn=cmd_verify)
    x = sub.add_parser("export", help="the live semantic IDs and their vectors for a generative-recommender trainer")
    x.add_argument("--home", default=home_from_env())
    x.add_argument("--format", required=True, choices=["grid", "lcrec", "parquet"],
                   help="grid: torch .pt tensors + id map (snap-research/GRID); lcrec: .npy + .index.json "
                        "(LC-Rec, MiniOneRec); parquet: item_id, sid, codes, embedding")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--name", default="items", help="file name stem (lcrec, parquet)")
    x.set_defaults(fn=cmd_export)
    _add_search_parsers(sub)
    _add_ui_parser(sub)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

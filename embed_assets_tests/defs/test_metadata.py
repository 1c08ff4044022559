"""Metadata people look at: every materialization's numbers keep their type from run to run (so Dagster can plot
them), each has a Markdown summary, the report embeds its charts, and long encodes log progress live.

Real Dagster runs of the whole graph, with the real model, three times: a first run, a re-run after one item's title
changed (one partition encodes one item, the other encodes nothing, the index is updated in place and shadowed, the
report has an earlier one to measure drift against), and a re-run where nothing changed. Everything is read back
from the instance's event log, as the UI reads it."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from embed_assets.core.layout import Layout
from embed_assets.definitions import build_definitions
from embed_assets.settings import Settings
from embed_assets_tests.conftest import sample_docs, write_jsonl

ASSET_NAMES = ("processed_items", "item_embeddings", "embedding_norms", "faiss_index", "retrieval_report",
               "semantic_ids")
INT, FLOAT = dg.IntMetadataValue, dg.FloatMetadataValue
# The numbers the issue names (items, items/s, recall, nDCG, norm error, index bytes) and the step's cost, per asset.
PLOTTABLE = {
    "processed_items": {"n_items": INT, "rows_per_s": FLOAT, "n_partitions_written": INT, "seconds": FLOAT,
                        "peak_rss_mb": FLOAT},
    "item_embeddings": {"rows": INT, "n_encoded": INT, "n_reused": INT, "items_per_s": FLOAT, "tokens_per_s": FLOAT,
                        "norm_error_max": FLOAT, "bytes": INT, "seconds": FLOAT},
    "embedding_norms": {"n_vectors": INT, "norm_error_max": FLOAT, "norm_error_p99": FLOAT,
                        "norm_frac_outside_tol": FLOAT, "histogram_n_vectors": INT},
    "faiss_index": {"n_items": INT, "bytes": INT, "build_seconds": FLOAT, "n_vectors_added": INT,
                    "shadow_overlap_at_10": FLOAT, "shadow_recall_delta": FLOAT},
    "retrieval_report": {"n_items": INT, "n_queries": INT, "ndcg_at_10": FLOAT, "recall_at_10": FLOAT,
                         "recall_at_100": FLOAT, "ann_recall_at_10": FLOAT, "ann_recall_at_100": FLOAT,
                         "latency_p50_ms": FLOAT, "drift_mean_cosine": FLOAT, "vector_coverage": FLOAT},
    "semantic_ids": {"n_items": INT, "max_collision_group": INT, "codebook_utilization_level_1": FLOAT,
                     "collision_rate_level_1": FLOAT, "seconds": FLOAT},
}
PROGRESS = re.compile(r"^(?P<key>p\w+): batch (?P<b>\d+)/(?P<n>\d+): (?P<done>[\d,]+)/(?P<total>[\d,]+) items "
                      r"\([\d.]+% of tokens\), [\d,.]+ items/s, [\d,]+ tokens/s, ETA [\d,]+ s$")


def _labelled(tmp: Path, docs: list[dict]) -> tuple[Path, Path]:
    """40 queries, each an item's abstract opening, judged relevant to that item and to the next one: a small
    labelled set the 120 titles can be searched with, whose recall@k rises with k (at most 0.5 at k = 1)."""
    picked = range(0, 120, 3)
    queries = write_jsonl(tmp / "queries.jsonl", [{"_id": f"q{i}", "text": " ".join(docs[i]["text"].split()[:12])}
                                                  for i in picked])
    qrels = tmp / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{docs[j]['_id']}\t1\n"
                                                              for i in picked for j in (i, i + 1)))
    return queries, qrels


def _metadata(instance, name: str) -> list[dict]:
    records = instance.fetch_materializations(dg.AssetKey(name), limit=1000).records
    return [r.asset_materialization.metadata for r in sorted(records, key=lambda r: r.storage_id)]


def _pngs(markdown: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)",
                                                   markdown)]


@pytest.fixture(scope="module")
def graph_runs(tmp_path_factory):
    """The graph materialized three times into a persistent instance (the UI test below serves the same one)."""
    tmp_path = tmp_path_factory.mktemp("metadata")
    docs = sample_docs(120)
    corpus = write_jsonl(tmp_path / "raw" / "corpus.jsonl", docs)
    queries, qrels = _labelled(tmp_path, docs)
    settings = Settings(home=str(tmp_path / "home"), items=[str(corpus)], text_fields=["title"], partition_size=60,
                        queries=str(queries), qrels=str(qrels), min_recall_at_100=0.0,
                        precision="fp32")  # no precision probe: this test is about metadata, not bf16
    defs = build_definitions(settings)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    instance = dg.DagsterInstance.local_temp(tempdir=str(dagster_home))
    embed_runs = []

    def run_graph():
        assert defs.resolve_job_def("process_items_job").execute_in_process(instance=instance).success
        for key in instance.get_dynamic_partitions("item_partitions"):
            res = defs.resolve_job_def("embed_shards_job").execute_in_process(instance=instance, partition_key=key)
            embed_runs.append(res.run_id)
        assert defs.resolve_job_def("index_and_report_job").execute_in_process(instance=instance).success

    run_graph()
    docs[7]["title"] = "A new title for one item: " + docs[7]["title"]
    write_jsonl(corpus, docs)
    run_graph()
    run_graph()  # nothing changed
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "EMBED_ASSETS_HOME": settings.home,
           "EMBED_ASSETS_ITEMS": str(corpus), "EMBED_ASSETS_TEXT_FIELDS": "title", "EMBED_ASSETS_PARTITION_SIZE": "60",
           "EMBED_ASSETS_QUERIES": str(queries), "EMBED_ASSETS_QRELS": str(qrels)}
    yield instance, Layout.at(settings.home), embed_runs, env
    instance.dispose()


def test_every_metadata_key_keeps_its_type_and_the_report_embeds_its_charts(graph_runs):
    instance, layout, embed_runs, _ = graph_runs
    meta = {name: _metadata(instance, name) for name in ASSET_NAMES}
    assert [len(meta[n]) for n in ASSET_NAMES] == [3, 6, 3, 3, 3, 3]  # item_embeddings: 2 partitions x 3 runs

    for name, events in meta.items():
        # one key set (this configuration) and one value type per key, over every run and partition
        assert all(set(m) == set(events[0]) for m in events), (name, [sorted(set(m) ^ set(events[0])) for m in events])
        for key in events[0]:
            types = {type(m[key]).__name__ for m in events}
            assert len(types) == 1, f"{name}.{key} changed type across runs: {types}"
        for key, kind in PLOTTABLE[name].items():
            assert all(isinstance(m[key], kind) for m in events), (name, key, [type(m.get(key)) for m in events])
        # and a Markdown table summing it up
        assert all(isinstance(m["summary"], dg.MarkdownMetadataValue) and m["summary"].value.startswith("| ")
                   for m in events), name

    # The re-run reached the values that used to change type: a partition that encoded nothing, a shadowed index,
    # a drift against the first report, and a first run with nothing to compare with (NaN, still a float).
    emb = meta["item_embeddings"]
    idle = [m for m in emb if m["n_encoded"].value == 0]
    assert idle and all(m["items_per_s"].value == 0.0 and m["skipped_unchanged"].value for m in idle)
    assert [m["n_encoded"].value for m in emb[2:]] in ([1, 0, 0, 0], [0, 1, 0, 0]) and emb[0]["items_per_s"].value > 0
    first, second, third = meta["faiss_index"]
    assert first["shadow_overlap_at_10"].value != first["shadow_overlap_at_10"].value  # NaN: nothing to shadow yet
    assert 0.9 <= second["shadow_overlap_at_10"].value <= 1.0 and second["update_mode"].value == "in_place"
    assert third["update_mode"].value == "unchanged" and meta["semantic_ids"][2]["action"].value == "unchanged"
    assert second["bytes"].value == first["bytes"].value >= 120 * 384 * 4  # index bytes: 120 fp32 vectors
    r1, r2, r3 = meta["retrieval_report"]
    assert r1["drift_mean_cosine"].value != r1["drift_mean_cosine"].value and 0.9 < r2["drift_mean_cosine"].value <= 1
    assert 0 < r2["recall_at_10"].value < 1 and r2["ann_recall_at_10"].value == 1.0  # flat index: exact search
    norms = meta["embedding_norms"][-1]
    assert norms["n_vectors"].value == norms["histogram_n_vectors"].value == 120
    assert 0 < norms["norm_error_max"].value < 5e-3 and 0 < norms["norm_error_p99"].value < 5e-3

    # The report's charts: inline PNGs in the `charts` Markdown, the same bytes as the files beside the report.
    report = json.loads(layout.report_json.read_text())
    pngs = _pngs(r3["charts"].value)  # the latest: its files are the ones on disk
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") and 2_000 < len(p) < 60_000 for p in pngs)
    assert pngs[0] == (layout.reports_dir / "recall_at_k.png").read_bytes()
    assert pngs[1] == (layout.reports_dir / "norm_histogram.png").read_bytes()
    import matplotlib.image

    assert matplotlib.image.imread(io.BytesIO(pngs[1]), format="png").shape[:2] == (224, 384)
    assert report["charts"] == {"recall_at_k": "recall_at_k.png", "norm_histogram": "norm_histogram.png"}
    assert "![recall@k](recall_at_k.png)" in layout.report_md.read_text()
    curve = report["recall_at_k"]
    assert curve["k"] == [1, 5, 10, 20, 50, 100] and curve["ann"] == [1.0] * 6
    assert [curve["labelled"][i] for i in (0, 2, 5)] == [report["recall_at_1"], report["recall_at_10"],
                                                         report["recall_at_100"]]
    assert curve["labelled"] == sorted(curve["labelled"]) and curve["labelled"][0] < curve["labelled"][-1]
    hist = report["norm_histogram"]
    assert sum(hist["counts"]) == hist["n_vectors"] == 120

    # Progress of the encodes, live through context.log: the first and the last batch at least, with items
    # done/total, items/s and ETA; the last line's total is what the partition encoded.
    for run_id, m in zip(embed_runs, emb):
        lines = [e.user_message for e in instance.all_logs(run_id) if e.dagster_event is None]
        progress = [g.groupdict() for line in lines if (g := PROGRESS.match(line))]
        if not m["n_encoded"].value:
            assert not progress
            continue
        assert progress[0]["b"] == "1" and progress[-1]["b"] == progress[-1]["n"]
        assert int(progress[-1]["done"].replace(",", "")) == int(progress[-1]["total"].replace(",", "")) == \
            m["n_encoded"].value


def test_the_dagster_ui_renders_the_report_charts(graph_runs):
    """What a person sees: the webserver serves the instance, the retrieval_report's `charts` Markdown opens and
    both images decode in a real browser (Dagster's Markdown sanitizer keeps data: image URIs)."""
    from playwright.sync_api import sync_playwright

    _, _, _, env = graph_runs
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).parents[2]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("dagster-webserver")), "-m", "embed_assets.definitions",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the webserver did not start"
                time.sleep(1)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/assets/retrieval_report?view=events", timeout=60_000)
                row = page.locator("tr").filter(has=page.locator("td", has_text=re.compile(r"^\s*charts\s*$")))
                row.get_by_text("[Show Markdown]").first.click(timeout=60_000)
                images = page.locator("img[src^='data:image/png;base64,']")
                images.nth(1).wait_for(timeout=30_000)
                sizes = [page.evaluate("(e) => e.complete && [e.naturalWidth, e.naturalHeight, e.alt]",
                                       images.nth(i).element_handle()) for i in range(images.count())]
            finally:
                browser.close()
        assert sizes == [[384, 224, "recall@k"], [384, 224, "norm error histogram"]]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

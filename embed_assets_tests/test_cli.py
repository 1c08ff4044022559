"""The console script, as a user runs it."""

import json
import subprocess
import sys

import numpy as np

from embed_assets.core.items import load_partitions
from embed_assets.core.layout import Layout
from embed_assets.settings import SAMPLE_PUBLISHED, SAMPLE_QRELS, SAMPLE_QUERIES, Settings
from embed_assets_tests.conftest import run_cli, sample_docs, write_jsonl

CLI = [sys.executable, "-m", "embed_assets.cli"]


def test_run_twice_then_fail_a_threshold(tmp_path):
    corpus = write_jsonl(tmp_path / "raw" / "c.jsonl", sample_docs(80))
    home = tmp_path / "home"
    args = ["run", "--home", str(home), "--items", str(corpus), "--partition-size", "40",
            "--queries", str(SAMPLE_QUERIES), "--qrels", str(SAMPLE_QRELS), "--min-recall-at-100", "0"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((home / "reports" / "run_summary.json").read_text())
    assert summary["ok"] and summary["n_items"] == 80 and summary["n_partitions"] == 2
    assert summary["n_encoded"] == 80 and summary["n_reused"] == 0
    assert "ndcg_at_10" in first.stdout and "ok in" in first.stdout
    # the precision that encoded the vectors, and why (auto: the probe's verdict), with the CPU
    assert summary["precision"] in ("fp32", "bf16", "fp16") and summary["precision_requested"] == "auto"
    probe = summary["precision_probe"]
    assert probe["candidate"] in ("fp32", "bf16", "fp16")
    assert summary["precision"] == (probe["candidate"] if probe["passed"] is not False else "fp32")
    assert f"precision: {summary['precision']} (" in first.stdout
    assert f"cpu: {summary['cpu']['model']}" in first.stdout
    assert "published" not in first.stdout  # 80 items are not the bundled sample: no comparison with the table
    # 80 items at a target of 40: the two 1-bit hash prefixes (neither over 1.25 x 40, so no split)
    parts = load_partitions(Layout.at(home))
    assert [p["partition"] for p in parts] == ["p0", "p1"] and sum(p["n_rows"] for p in parts) == 80
    assert sorted(p.name for p in (home / "embeddings").glob("shard_*.pt")) == ["shard_p0.pt", "shard_p1.pt"]

    second = run_cli(args, tmp_path)
    assert second.returncode == 0
    summary = json.loads((home / "reports" / "run_summary.json").read_text())
    assert summary["n_encoded"] == 0 and "unchanged, skipped" in second.stdout
    assert summary["precision"] is None and "precision: n/a (nothing encoded)" in second.stdout

    failing = run_cli(args[:-2] + ["--min-ann-recall-at-10", "1.01"], tmp_path)
    assert failing.returncode == 1
    assert "CHECK FAILED  retrieval_quality_check" in failing.stdout
    assert not json.loads((home / "reports" / "run_summary.json").read_text())["ok"]


def test_run_reports_a_bad_items_path_clearly(tmp_path):
    out = run_cli(["run", "--home", str(tmp_path / "h"), "--items", str(tmp_path / "missing.jsonl")], tmp_path)
    assert out.returncode == 1
    assert "missing.jsonl: no such file or folder" in out.stdout


def test_encode_command_writes_fp16_rows_in_input_order(tmp_path, encoder):
    docs = sample_docs(12)
    src = write_jsonl(tmp_path / "in.jsonl", [{"t": d["title"]} for d in docs])
    out = subprocess.run(CLI + ["encode", "--input", str(src), "--text-field", "t", "--output",
                                str(tmp_path / "v.npy")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    vecs = np.load(tmp_path / "v.npy")
    assert vecs.dtype == np.float16 and vecs.shape == (12, 384)
    ref, _ = encoder.encode([d["title"] for d in docs])
    assert np.min(np.sum(vecs.astype(np.float32) * ref, axis=1)) > 0.999


def test_the_bundled_sample_prints_its_numbers_beside_the_published_table(tmp_path):
    """The demo's table, from a made-up report (a real run of the sample is the slow acceptance test's job)."""
    from embed_assets.cli import _finish, _is_bundled_sample, vs_published

    sample = Settings.sample(str(tmp_path / "home"))
    assert _is_bundled_sample(sample)
    other = write_jsonl(tmp_path / "c.jsonl", sample_docs(3))
    assert not _is_bundled_sample(Settings(home=str(tmp_path / "h2"), items=[str(other)],
                                           queries=str(SAMPLE_QUERIES), qrels=str(SAMPLE_QRELS)))

    report = {"ndcg_at_10": 0.64560, "recall_at_10": 0.78333, "recall_at_100": 0.925, "mrr_at_10": 0.60545,
              "n_queries": 300}
    table = vs_published(report)
    assert set(table) == {"ndcg_at_10", "recall_at_10", "recall_at_100"}  # what the report has and MTEB publishes
    assert table["ndcg_at_10"] == {"this_run": 0.64560, "published": SAMPLE_PUBLISHED["ndcg_at_10"],
                                   "delta": 0.00052}
    summary = {"failures": [], "checks": [], "n_items": 5183, "report": report, "vs_published": table,
               "precision": "bf16", "precision_requested": "auto", "cpu": {"model": "AMD EPYC",
                                                                           "bf16_flags": ["avx512_bf16"]},
               "precision_probe": {"candidate": "bf16", "passed": True, "mean_cos": 0.9999828, "min_cos": 0.9999717,
                                   "n_texts": 86, "cached": None}}
    lines = []
    code, _ = _finish(Layout.at(tmp_path / "home"), summary, 0.0, lines.append)
    out = "\n".join(lines)
    assert code == 0
    assert "precision: bf16 (probe: bf16 passed, mean cos 0.999983, min 0.999972 over 86 texts)" in out
    assert "cpu: AMD EPYC (bf16 flags: avx512_bf16)" in out
    assert "published" in out and "this run" in out
    assert any(ln.split() == ["ndcg_at_10", "0.64560", "0.64508", "+0.00052"] for ln in lines), out
    saved = json.loads((tmp_path / "home" / "reports" / "run_summary.json").read_text())
    assert saved["precision"] == "bf16" and saved["vs_published"]["ndcg_at_10"]["delta"] == 0.00052

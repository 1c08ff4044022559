"""The console script, as a user runs it."""

import json
import subprocess
import sys

import numpy as np

from embed_assets.settings import SAMPLE_QRELS, SAMPLE_QUERIES
from embed_assets_tests.conftest import run_cli, sample_docs, write_jsonl

CLI = [sys.executable, "-m", "embed_assets.cli"]


def test_run_twice_then_fail_a_threshold(tmp_path):
    corpus = write_jsonl(tmp_path / "raw" / "c.jsonl", sample_docs(80))
    home = tmp_path / "home"
    args = ["run", "--home", str(home), "--items", str(corpus), "--row-group-size", "40",
            "--queries", str(SAMPLE_QUERIES), "--qrels", str(SAMPLE_QRELS), "--min-recall-at-100", "0"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((home / "reports" / "run_summary.json").read_text())
    assert summary["ok"] and summary["n_items"] == 80 and summary["n_partitions"] == 2
    assert summary["n_encoded"] == 80 and summary["n_reused"] == 0
    assert "ndcg_at_10" in first.stdout and "ok in" in first.stdout
    assert sorted(p.name for p in (home / "embeddings").glob("shard_*.pt")) == ["shard_00000.pt", "shard_00001.pt"]

    second = run_cli(args, tmp_path)
    assert second.returncode == 0
    summary = json.loads((home / "reports" / "run_summary.json").read_text())
    assert summary["n_encoded"] == 0 and "unchanged, skipped" in second.stdout

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

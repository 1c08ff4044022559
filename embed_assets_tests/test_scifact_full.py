"""Acceptance: the full bundled SciFact corpus reproduces the published all-MiniLM-L6-v2 numbers (MTEB)."""

import json

import pytest

from embed_assets.cli import run_pipeline
from embed_assets.settings import Settings


@pytest.mark.slow
@pytest.mark.parametrize("precision,tol", [("auto", 0.001), ("fp32", 0.0002)])
def test_full_scifact_matches_the_published_table(tmp_path, precision, tol):
    """auto is what users get (bf16 autocast on a CPU with native bf16); fp32 reproduces the fourth decimal."""
    settings = Settings.sample(str(tmp_path / "home"))
    settings.precision = precision
    code, summary = run_pipeline(settings)
    assert code == 0, summary
    report = json.loads((tmp_path / "home" / "reports" / "retrieval_eval.json").read_text())
    assert report["n_items"] == 5183 and report["n_queries"] == 300
    assert abs(report["ndcg_at_10"] - 0.64508) <= tol
    assert abs(report["recall_at_100"] - 0.92500) <= 0.002
    assert abs(report["recall_at_10"] - 0.78333) <= 0.002
    assert report["ann_recall_at_10"] == 1.0
    assert summary["n_partitions"] == 6 and summary["n_encoded"] == 5183

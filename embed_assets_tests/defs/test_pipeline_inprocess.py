"""Real in-process Dagster materializations of the whole graph on real SciFact text."""

import json
from pathlib import Path

import dagster as dg
import torch

from embed_assets.core import catalog
from embed_assets.core.items import load_partitions
from embed_assets.core.layout import Layout
from embed_assets.core.partitioning import id_hash, leaf_of_key
from embed_assets.core.shards import HASH_CACHE_NAME
from embed_assets.definitions import ASSETS, CHECKS, build_definitions, build_resources
from embed_assets.defs.embeddings.assets import embedding_norms, item_embeddings
from embed_assets.defs.index.assets import faiss_index
from embed_assets.defs.items.assets import processed_items
from embed_assets_tests.conftest import expected_partitions, sample_docs


def _run_all(defs, instance, keys):
    results = [defs.resolve_job_def("embed_shards_job").execute_in_process(instance=instance, partition_key=k)
               for k in keys]
    results.append(defs.resolve_job_def("index_and_report_job").execute_in_process(instance=instance))
    return results


def test_graph_end_to_end_with_a_dagster_partition_per_item_partition(settings):
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    res = defs.resolve_job_def("process_items_job").execute_in_process(instance=instance)
    keys = instance.get_dynamic_partitions("item_partitions")
    layout = Layout.at(settings.home)
    parts = load_partitions(layout)
    expected = expected_partitions([d["_id"] for d in sample_docs(120)], settings.partition_size)
    assert keys == [p["partition"] for p in parts] == sorted(expected) and len(keys) == 4
    assert [p["n_rows"] for p in parts] == [len(expected[k]) for k in keys]
    meta = res.asset_materializations_for_node("processed_items")[0].metadata
    assert meta["n_items"].value == 120 and meta["n_partitions"].value == 4
    assert meta["n_partitions_written"].value == 4 and meta["n_partitions_skipped"].value == 0
    assert meta["partition_size"].value == 30

    results = _run_all(defs, instance, keys)
    evals = [e for r in results for e in r.get_asset_check_evaluations()]
    assert sorted((e.check_name, e.passed) for e in evals if e.check_name == "shard_norm_check") == \
        [("shard_norm_check", True)] * 4
    assert all(e.passed for e in evals)
    emb_meta = results[0].asset_materializations_for_node("item_embeddings")[0].metadata
    assert emb_meta["rows"].value == emb_meta["n_encoded"].value == parts[0]["n_rows"]
    import hashlib

    from embed_assets.core.encoder import bundled_model_path

    weights = hashlib.sha256((bundled_model_path() / "model.safetensors").read_bytes()).hexdigest()
    assert emb_meta["items_per_s"].value > 0 and emb_meta["model_revision"].value.endswith("+" + weights[:12])

    # the seed's next notebook reads every shard unchanged
    shards = sorted(layout.embeddings_dir.glob("shard_*.pt"))
    assert shards == [layout.shard_pt(k) for k in keys]
    ids = [i for p in shards for i in torch.load(p, weights_only=True)["item_id"]]
    assert len(ids) == len(set(ids)) == 120
    assert ids == [i for k in keys for i in expected[k]]  # each shard: exactly its partition's items, sorted
    report = json.loads(layout.report_json.read_text())
    for k in ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10", "ann_recall_at_10", "n_items",
              "n_queries", "latency_ms"):
        assert k in report
    assert report["n_items"] == 120 and report["ann_recall_at_10"] == 1.0  # a flat index is exact search
    assert report["ann_query_source"] == "labelled queries (held out)"
    assert set(report["latency_ms"]) >= {"p50", "p95", "p99"}
    assert len(report["smoke_test"]) == 5 and all(len(s["neighbours"]) == 5 for s in report["smoke_test"])
    assert layout.report_md.read_text().startswith("# Retrieval evaluation")
    # the monitoring keys, and the evaluation kept in the index version's own folder (its bundle)
    for k in ("coverage", "drift", "shadow", "tfidf_ndcg_at_10", "index", "field_to_item", "query_latency_ms"):
        assert k in report, k
    assert report["coverage"]["items_with_vectors"] == report["coverage"]["items_with_text"] == 120
    assert report["tfidf_ndcg_at_10"] is not None and report["index"]["type"] == "IndexFlatIP"
    assert json.loads((layout.index_dir / "eval.json").read_text())["index_version"] == report["index_version"]
    assert catalog.query(layout, "SELECT count(*) FROM shards") == [(4,)]

    # A re-run of a finished partition changes nothing (the checksum cache may learn a digest; it holds no data).
    files = lambda: {p.name: (p.stat().st_mtime_ns, p.read_bytes())  # noqa: E731
                     for p in layout.embeddings_dir.rglob("*") if p.is_file() and p.name != HASH_CACHE_NAME}
    before = files()
    again = defs.resolve_job_def("embed_shards_job").execute_in_process(instance=instance, partition_key=keys[2])
    m = again.asset_materializations_for_node("item_embeddings")[0].metadata
    assert m["skipped_unchanged"].value is True and m["n_encoded"].value == 0
    assert files() == before


def test_failing_norm_check_blocks_the_index(settings):
    settings.norm_tolerance = 1e-9  # fp16 storage alone moves norms by ~1e-4: every shard fails
    resources = build_resources(settings)
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([processed_items], resources=resources, instance=instance)
    key = load_partitions(Layout.at(settings.home))[0]["partition"]
    result = dg.materialize(
        [*ASSETS, *CHECKS],
        selection=[item_embeddings, embedding_norms, faiss_index],
        partition_key=key,
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    evals = result.get_asset_check_evaluations()
    assert [(e.check_name, e.passed, e.partition) for e in evals] == [("shard_norm_check", False, key)]
    assert "outside 1 ± 1e-09" in evals[0].metadata["problems"].value
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"item_embeddings"}
    assert not Layout.at(settings.home).index_file.exists()


def test_norm_summary_check_blocks_the_index_in_the_unpartitioned_run(settings):
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    defs.resolve_job_def("process_items_job").execute_in_process(instance=instance)
    for k in instance.get_dynamic_partitions("item_partitions"):
        defs.resolve_job_def("embed_shards_job").execute_in_process(instance=instance, partition_key=k)
    settings.norm_tolerance = 1e-9
    strict = build_definitions(settings)
    res = strict.resolve_job_def("index_and_report_job").execute_in_process(instance=instance, raise_on_error=False)
    assert not res.success
    assert [(e.check_name, e.passed) for e in res.get_asset_check_evaluations()] == \
        [("all_norms_within_tolerance", False)]
    assert {e.asset_key.to_user_string() for e in res.get_asset_materialization_events()} == {"embedding_norms"}
    assert not Layout.at(settings.home).index_file.exists()


def test_norm_check_fails_a_shard_encoded_from_other_text(settings, monkeypatch):
    """Same ids, same order, but one item's text changed in processed_items and its shard was not rewritten: the
    check compares text hashes, not only ids, and names the item."""
    from embed_assets.defs.embeddings.checks import shard_norm_check
    from embed_assets_tests.conftest import write_jsonl

    resources = build_resources(settings)
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([processed_items], resources=resources, instance=instance)
    rows = [json.loads(line) for line in open(settings.items[0], encoding="utf-8")]
    edited = rows[31]["_id"]
    key = next(p["partition"] for p in load_partitions(Layout.at(settings.home))
               if leaf_of_key(p["partition"]).holds(id_hash(edited)))  # the edited item's partition
    dg.materialize([*ASSETS, *CHECKS], selection=[item_embeddings], partition_key=key,
                   resources=resources, instance=instance)
    rows[31]["title"] = "An entirely different title " + rows[31]["title"]
    write_jsonl(Path(settings.items[0]), rows)
    dg.materialize([processed_items], resources=resources, instance=instance)
    # The shard is not rewritten (as if its writer had skipped it): the asset step returns the old shard as is.
    from embed_assets.core.embed import EmbedOutcome
    from embed_assets.core.shards import read_manifest

    monkeypatch.setattr("embed_assets.defs.embeddings.assets.embed_partition",
                        lambda layout, key, *a, **kw: EmbedOutcome(read_manifest(layout, key), skipped=True))
    result = dg.materialize([*ASSETS, *CHECKS], selection=[item_embeddings], partition_key=key,
                            resources=resources, instance=instance, raise_on_error=False)
    [ev] = result.get_asset_check_evaluations()
    assert not ev.passed
    assert "1 items were encoded from other text" in ev.metadata["problems"].value
    assert edited in ev.metadata["problems"].value

"""core/monitoring.py on a real catalog: the label-free title -> item evaluation."""

from embed_assets.core.embed import embed_partition
from embed_assets.core.index import build_from_shards, load_index
from embed_assets.core.items import load_partitions, process_items
from embed_assets.core.layout import Layout
from embed_assets.core.monitoring import field_to_item
from embed_assets_tests.conftest import CountingEncoder, sample_docs, write_jsonl


def _catalog(layout, corpus, encoder):
    process_items(layout, [corpus], "_id", ["title", "text"], partition_size=60)
    for p in load_partitions(layout):
        embed_partition(layout, p["partition"], encoder)
    build_from_shards(layout, load_partitions(layout))
    return load_index(layout)


def test_field_to_item_keeps_its_pool_and_queries_and_re_uses_their_vectors(tmp_path, encoder):
    """The pool and the queries are chosen by a seeded hash of the item id, not by index positions: the same items
    from one report to the next, so a second report encodes no title and gives the same numbers, and after one
    queried item's title is edited only that title is encoded again. Every queried item is found among its pool
    (recall@10 above 0.5), by TF-IDF as well."""
    docs = sample_docs(200)
    corpus = write_jsonl(tmp_path / "raw" / "corpus.jsonl", docs)
    layout = Layout.at(tmp_path / "home")
    index, ids, _ = _catalog(layout, corpus, encoder)
    enc = CountingEncoder(encoder)
    first = field_to_item(layout, index, ids, enc, pool=150, n_queries=80)
    assert first["pool"] == 150 and first["n_queries"] == 80 and len(enc.texts) == 80
    assert first["recall_at_10"] > 0.5 and first["tfidf_recall_at_10"] > 0.5
    enc.texts.clear()
    assert field_to_item(layout, index, ids, enc, pool=150, n_queries=80) == first and enc.texts == []

    edited = min(_queried_ids(layout))
    at = next(i for i, d in enumerate(docs) if d["_id"] == edited)
    docs[at] = {**docs[at], "title": "An edited title about protein folding"}
    write_jsonl(corpus, docs)
    index, ids, _ = _catalog(layout, corpus, encoder)
    field_to_item(layout, index, ids, enc, pool=150, n_queries=80)
    assert enc.texts == ["An edited title about protein folding"]


def _queried_ids(layout) -> set[str]:
    """The ids whose titles field_to_item queried last (its vector cache holds exactly those titles)."""
    import duckdb
    import pyarrow.parquet as pq

    titles = set(pq.read_table(layout.reports_dir / "field_to_item_queries.parquet").column("text").to_pylist())
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT item_id, title FROM read_parquet('{layout.partitions_dir}/*.parquet')").fetchall()
    return {i for i, t in rows if t in titles}

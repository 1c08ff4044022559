"""processed_items: streaming, vectorized reading with every bad row reported, and stable partitions on disk."""

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embed_assets.core import ingest
from embed_assets.core.items import ItemsError, Limits, load_partitions, process_items, read_partition
from embed_assets.core.layout import Layout
from embed_assets.core.partitioning import id_hash, leaf_of_key


def _lines(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def _run(tmp_path, files, id_field, fields, size=1000, limits=Limits(), home="home"):
    layout = Layout.at(tmp_path / home)
    res = process_items(layout, files, id_field, fields, size, limits)
    items = {}
    for p in load_partitions(layout):
        for r in read_partition(layout, p["partition"], ("item_id", "text", "title", "text_hash", "source_file",
                                                          "source_row")).to_pylist():
            items[r["item_id"]] = r
    rejects = [json.loads(line) for line in layout.rejects_jsonl.read_text().splitlines()]
    return layout, res, items, rejects


HOSTILE = [
    json.dumps({"_id": "a", "title": "Alpha", "text": "first"}),
    "{not json",
    b'{"_id": "bad-bytes", "text": "\xff\xfe"}',
    json.dumps(["a", "list"]),
    json.dumps({"title": "no id", "text": "x"}),
    json.dumps({"_id": None, "text": "null id"}),
    json.dumps({"_id": "   ", "text": "blank id"}),
    json.dumps({"_id": {"nested": 1}, "text": "dict id"}),
    json.dumps({"_id": "x" * 600, "text": "long id"}),
    json.dumps({"_id": "empty", "title": " \x00 ", "text": "\t"}),
    json.dumps({"_id": 42, "title": "Numeric id", "text": "kept"}),
    json.dumps({"_id": "../../etc/passwd", "title": "Path-like id", "text": "<p>HTML &amp; emoji \U0001F600</p>"}),
    json.dumps({"_id": "a", "title": "Alpha v2", "text": "last one wins"}),
    "",
]


def test_hostile_jsonl_rows_are_rejected_with_reasons_and_good_rows_kept(tmp_path):
    f = _lines(tmp_path / "items.jsonl", HOSTILE)
    _, res, items, rejects = _run(tmp_path, [f], "_id", ["title", "text"])
    assert sorted(items) == sorted(["a", "42", "../../etc/passwd"])
    assert items["a"]["text"] == "Alpha v2 last one wins" and items["a"]["source_row"] == 13
    assert items["../../etc/passwd"]["text"] == "Path-like id <p>HTML &amp; emoji \U0001F600</p>"
    assert res.n_duplicates == 1 and res.n_rows_read == 13
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (2, "invalid_json"), (3, "not_utf8"), (4, "not_an_object"), (5, "missing_id"), (6, "missing_id"),
        (7, "missing_id"), (8, "invalid_id"), (9, "id_too_long"), (10, "empty_text"),
    ]
    assert all(r["file"] == str(f) for r in rejects)
    assert rejects[-1]["item_id"] == "empty"
    assert res.reject_counts == {"invalid_json": 1, "not_utf8": 1, "not_an_object": 1, "missing_id": 3,
                                 "invalid_id": 1, "id_too_long": 1, "empty_text": 1}


@pytest.fixture
def exact_only(monkeypatch):
    """Force the exact row-by-row reader everywhere (the reference the vectorized path must equal)."""
    monkeypatch.setattr(ingest, "_arrow_block", lambda *a, **k: None)

    def no_arrow_csv(*a, **k):
        raise ingest._RestartExact("forced")
        yield  # pragma: no cover

    monkeypatch.setattr(ingest, "_csv_blocks", no_arrow_csv)


def _mixed_files(tmp_path):
    g = _lines(tmp_path / "g.jsonl", [json.dumps({"_id": i, "title": ["x\u3000y", "", " z "],
                                                  "text": "a\u00a0\u2003b\x1fc \x85 d" + " " * i, "n": 1.5})
                                      for i in range(50)]
               + [json.dumps({"_id": 1000 + i, "title": True, "text": 12.5 if i % 2 else 7}) for i in range(5)]
               + [json.dumps({"_id": 7.0, "title": "float id", "text": "t"})])
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["_id", "title", "text"])
        w.writerows([["B1", "Shirt", "Cotton, soft"], ["B2", "", ""], [" B3 ", "multi\nline", "x"]])
    pq.write_table(pa.table({"_id": ["B4", None, "B5"], "title": ["Mug", "x", None],
                             "text": pa.array([["Ceramic.", "Dishwasher safe."], None, ["a"]])}), tmp_path / "b.parquet")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"_id": "B6", "title": "Book", "text": ["Vol 1", "Vol 2"]}) + "\n")
    (tmp_path / "bad.csv").write_bytes(b"_id,title,text\nC1,ok,x\nC2,\xff\xfe bad,y\nC3,fine,z\n")
    return [g, tmp_path / "a.csv", tmp_path / "b.parquet", tmp_path / "c.jsonl.gz", tmp_path / "bad.csv",
            _lines(tmp_path / "h.jsonl", HOSTILE)]


def test_the_vectorized_reader_equals_the_exact_row_reader(tmp_path, request):
    """Arrow + DuckDB cleaning, hashing and rejecting give byte-identical items and the same rejects as the exact
    Python rules (core.text), on every format and on hostile rows."""
    raw = tmp_path / "raw"
    raw.mkdir()
    files = _mixed_files(raw)
    _, res, fast, fast_rej = _run(tmp_path, files, "_id", ["title", "text"], home="fast")
    request.getfixturevalue("exact_only")
    _, res2, exact, exact_rej = _run(tmp_path, files, "_id", ["title", "text"], home="exact")
    assert fast == exact
    assert fast_rej == exact_rej
    assert res.file_sha256 == res2.file_sha256
    assert fast["B1"]["text"] == "Shirt Cotton, soft" and fast["B4"]["text"] == "Mug Ceramic. Dishwasher safe."
    assert fast["7"]["text"] == "float id t" and fast["1001"]["text"] == "12.5"
    assert fast["0"]["text"] == "x y z a b c d"
    assert [(r["file"].rsplit("/", 1)[1], r["row"], r["reason"]) for r in fast_rej][:3] == [
        ("a.csv", 3, "empty_text"), ("b.parquet", 2, "missing_id"), ("bad.csv", 3, "not_utf8")]


def test_missing_file_wrong_fields_and_empty_catalog_are_clear_errors(tmp_path):
    layout = Layout.at(tmp_path / "home")
    with pytest.raises(ItemsError, match="no such file"):
        process_items(layout, [tmp_path / "nope.jsonl"], "_id", ["text"])
    f = _lines(tmp_path / "x.jsonl", [json.dumps({"sku": "1", "name": "n"})])
    with pytest.raises(ItemsError, match=r"none of the configured fields.*the file has fields: sku, name"):
        process_items(layout, [f], "_id", ["text"])
    f2 = _lines(tmp_path / "y.jsonl", [json.dumps({"sku": "1", "text": "t"})])
    with pytest.raises(ItemsError, match=r"id field '_id' occurs in no row"):
        process_items(layout, [f2], "_id", ["text"])
    f3 = _lines(tmp_path / "z.jsonl", ["{broken", json.dumps({"_id": "1", "text": ""})])
    with pytest.raises(ItemsError, match="empty catalog"):
        process_items(layout, [f3], "_id", ["text"])


def test_limits_truncate_long_texts_and_bound_files(tmp_path):
    f = _lines(tmp_path / "x.jsonl", [json.dumps({"_id": "1", "text": "word " * 100}),
                                      json.dumps({"_id": "2", "text": "short"})])
    _, res, items, _ = _run(tmp_path, [f], "_id", ["text"], limits=Limits(max_text_chars=50))
    assert len(items["1"]["text"]) == 50 and res.n_truncated == 1
    layout = Layout.at(tmp_path / "h2")
    with pytest.raises(ItemsError, match="over the limit"):
        process_items(layout, [f], "_id", ["text"], limits=Limits(max_file_bytes=10))
    with pytest.raises(ItemsError, match="more than 1 rows"):
        process_items(layout, [f], "_id", ["text"], limits=Limits(max_rows_per_file=1))


def test_partitions_are_stable_a_change_touches_only_its_partition(tmp_path):
    rows = [{"_id": str(i), "text": f"item {i}"} for i in range(400)]
    f = tmp_path / "x.jsonl"
    _lines(f, [json.dumps(r) for r in rows] + ["oops"])
    layout, res, items, rejects = _run(tmp_path, [f], "_id", ["text"], size=100)
    parts = {p["partition"]: p for p in load_partitions(layout)}
    assert len(parts) == 4 and res.n_partitions_written == 4
    assert rejects == [{"file": str(f), "row": 401, "item_id": None, "reason": "invalid_json",
                        "detail": rejects[0]["detail"]}]
    for key in parts:  # every item sits where its id's hash says, sorted by id
        ids = read_partition(layout, key, ("item_id",)).column("item_id").to_pylist()
        assert ids == sorted(ids) and all(leaf_of_key(key).holds(id_hash(i)) for i in ids)

    def home_of(item_id):
        return next(k for k in parts if leaf_of_key(k).holds(id_hash(item_id)))

    for change, touched in (
        (lambda rs: rs.__setitem__(12, {"_id": "12", "text": "changed"}), {home_of("12")}),  # edit
        (lambda rs: rs.pop(0), {home_of("0")}),  # delete
        (lambda rs: rs.append({"_id": "new-1", "text": "a new item"}), {home_of("new-1")}),  # insert
    ):
        change(rows)
        _lines(f, [json.dumps(r) for r in rows])
        before = {k: (p["fingerprint"], layout.partition_file(k).stat().st_mtime_ns)
                  for k, p in ((p["partition"], p) for p in load_partitions(layout))}
        res = process_items(layout, [f], "_id", ["text"], 100)
        after = {p["partition"]: (p["fingerprint"], layout.partition_file(p["partition"]).stat().st_mtime_ns)
                 for p in load_partitions(layout)}
        assert {k for k in after if after[k] != before.get(k)} == touched
        assert set(res.written) == touched and res.n_partitions_skipped == len(after) - 1
    assert not list(layout.processed_dir.rglob(".*tmp")) and not list(layout.processed_dir.glob(".ingest-*"))


def test_a_partition_that_outgrows_the_target_splits_and_keys_keep_their_meaning(tmp_path):
    f = tmp_path / "x.jsonl"
    _lines(f, [json.dumps({"_id": str(i), "text": f"item {i}"}) for i in range(300)])
    layout, res, _, _ = _run(tmp_path, [f], "_id", ["text"], size=100)
    first = {p["partition"] for p in load_partitions(layout)}
    _lines(f, [json.dumps({"_id": str(i), "text": f"item {i}"}) for i in range(700)])
    res = process_items(layout, [f], "_id", ["text"], 100)
    now = {p["partition"] for p in load_partitions(layout)}
    assert res.splits and all(parent in first and set(kids) <= now | {parent} for parent, kids in res.splits)
    assert all(p["n_rows"] <= 125 for p in load_partitions(layout))
    # every key that did not split still names the same hash range
    assert first - {p for p, _ in res.splits} <= now


def test_memory_is_bounded_by_the_budget_not_the_catalog(tmp_path):
    """Blocks are cut from the budget: a 1 MB budget floor reads a file of many blocks, with the same result."""
    f = tmp_path / "x.jsonl"
    _lines(f, [json.dumps({"_id": f"id-{i}", "text": f"text number {i} " + "pad " * 40}) for i in range(12_000)])
    layout = Layout.at(tmp_path / "small")
    res = process_items(layout, [f], "_id", ["text"], 5_000, memory_budget_mb=8)
    big = process_items(Layout.at(tmp_path / "big"), [f], "_id", ["text"], 5_000, memory_budget_mb=2048)
    assert res.n_items == big.n_items == 12_000
    assert [p["fingerprint"] for p in res.partitions] == [p["fingerprint"] for p in big.partitions]

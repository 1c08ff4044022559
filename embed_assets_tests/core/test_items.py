import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embed_assets.core.items import ItemsError, Limits, describe_row_groups, process_items, read_items
from embed_assets.core.layout import Layout


def _lines(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def test_hostile_jsonl_rows_are_rejected_with_reasons_and_good_rows_kept(tmp_path):
    f = _lines(tmp_path / "items.jsonl", [
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
    ])
    res = read_items([f], "_id", ["title", "text"])
    assert [i["item_id"] for i in res.items] == ["a", "42", "../../etc/passwd"]
    assert res.items[0]["text"] == "Alpha v2 last one wins"
    assert res.items[2]["text"] == "Path-like id <p>HTML &amp; emoji \U0001F600</p>"
    assert res.n_duplicates == 1
    assert [(r.row, r.reason) for r in res.rejects] == [
        (2, "invalid_json"), (3, "not_utf8"), (4, "not_an_object"), (5, "missing_id"), (6, "missing_id"),
        (7, "missing_id"), (8, "invalid_id"), (9, "id_too_long"), (10, "empty_text"),
    ]
    assert all(r.file == str(f) for r in res.rejects)
    assert res.rejects[-1].item_id == "empty"


def test_csv_parquet_and_gzip_with_amazon_style_lists(tmp_path):
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["asin", "title", "description"])
        w.writerow(["B1", "Shirt", "Cotton, soft"])
        w.writerow(["B2", "", ""])
    pq.write_table(pa.table({"asin": ["B3"], "title": ["Mug"],
                             "description": pa.array([["Ceramic.", "Dishwasher safe."]])}), tmp_path / "b.parquet")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"asin": 7, "title": "Book", "description": ["Vol 1", "Vol 2"]}) + "\n")
    res = read_items([tmp_path], "asin", ["title", "description"])
    assert {i["item_id"]: i["text"] for i in res.items} == {
        "B1": "Shirt Cotton, soft", "B3": "Mug Ceramic. Dishwasher safe.", "7": "Book Vol 1 Vol 2"}
    assert [(r.row, r.reason) for r in res.rejects] == [(3, "empty_text")]


def test_missing_file_wrong_fields_and_empty_catalog_are_clear_errors(tmp_path):
    with pytest.raises(ItemsError, match="no such file"):
        read_items([tmp_path / "nope.jsonl"], "_id", ["text"])
    f = _lines(tmp_path / "x.jsonl", [json.dumps({"sku": "1", "name": "n"})])
    with pytest.raises(ItemsError, match=r"none of the configured fields.*the file has fields: sku, name"):
        read_items([f], "_id", ["text"])
    f2 = _lines(tmp_path / "y.jsonl", [json.dumps({"sku": "1", "text": "t"})])
    with pytest.raises(ItemsError, match=r"id field '_id' occurs in no row"):
        read_items([f2], "_id", ["text"])
    f3 = _lines(tmp_path / "z.jsonl", ["{broken", json.dumps({"_id": "1", "text": ""})])
    with pytest.raises(ItemsError, match="empty catalog"):
        read_items([f3], "_id", ["text"])


def test_limits_truncate_long_texts_and_bound_files(tmp_path):
    f = _lines(tmp_path / "x.jsonl", [json.dumps({"_id": "1", "text": "word " * 100}),
                                      json.dumps({"_id": "2", "text": "short"})])
    res = read_items([f], "_id", ["text"], Limits(max_text_chars=50))
    assert len(res.items[0]["text"]) == 50 and res.n_truncated == 1
    with pytest.raises(ItemsError, match="over the limit"):
        read_items([f], "_id", ["text"], Limits(max_file_bytes=10))
    with pytest.raises(ItemsError, match="more than 1 rows"):
        read_items([f], "_id", ["text"], Limits(max_rows_per_file=1))


def test_process_items_writes_fixed_row_groups_rejects_and_fingerprints(tmp_path):
    rows = [json.dumps({"_id": str(i), "text": f"item {i}"}) for i in range(25)] + ["oops"]
    f = _lines(tmp_path / "x.jsonl", rows)
    layout = Layout.at(tmp_path / "home")
    res, groups = process_items(layout, [f], "_id", ["text"], row_group_size=10)
    pf = pq.ParquetFile(layout.items_parquet)
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [10, 10, 5]
    assert [g["partition"] for g in groups] == ["rg_00000", "rg_00001", "rg_00002"]
    assert describe_row_groups(layout.items_parquet) == groups
    rejects = [json.loads(l) for l in layout.rejects_jsonl.read_text().splitlines()]
    assert rejects == [{"file": str(f), "row": 26, "item_id": None, "reason": "invalid_json",
                        "detail": rejects[0]["detail"]}]
    # Changing one text changes exactly its row group's fingerprint.
    rows[12] = json.dumps({"_id": "12", "text": "changed"})
    _, groups2 = process_items(layout, [_lines(f, rows)], "_id", ["text"], row_group_size=10)
    assert [a["fingerprint"] == b["fingerprint"] for a, b in zip(groups, groups2)] == [True, False, True]
    assert not list(layout.processed_dir.glob(".*tmp")), "no temp files left behind"

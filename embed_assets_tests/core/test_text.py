from embed_assets.core.text import clean_text, field_text, join_fields, normalize_id, text_hash


def test_clean_text_removes_control_characters_and_collapses_whitespace():
    assert clean_text("  a\x00b\x07c\t\n d\r\n\x1b[0m  ") == "a b c d [0m"
    assert clean_text("caf\u00e9 \u2603 \U0001F600 <b>bold</b> 日本語") == "caf\u00e9 \u2603 \U0001F600 <b>bold</b> 日本語"


def test_field_text_joins_amazon_style_lists_and_skips_nulls():
    assert field_text(["Soft cotton.", "", None, "Machine wash."]) == "Soft cotton. Machine wash."
    assert field_text(None) == "" and field_text(float("nan")) == "" and field_text(12) == "12"


def test_join_fields_matches_title_space_text():
    rec = {"title": "A title", "text": "Body  text.", "other": "x"}
    assert join_fields(rec, ["title", "text"]) == "A title Body text."
    assert join_fields({"title": "", "text": "only"}, ["title", "text"]) == "only"


def test_normalize_id():
    assert normalize_id(12) == "12" and normalize_id(12.0) == "12" and normalize_id(" x/../y ") == "x/../y"
    assert normalize_id(None) is None and normalize_id(True) is None and normalize_id({"a": 1}) is None
    assert normalize_id("") == ""


def test_text_hash_is_stable_and_content_sensitive():
    assert text_hash("abc") == text_hash("abc") != text_hash("abd")
    assert len(text_hash("abc")) == 32

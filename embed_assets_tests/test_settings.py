"""Settings saved by a run in HOME/settings.json and loaded by the UI (`Settings.from_env()`), with the environment
overriding them."""

from __future__ import annotations

import json

import pytest

from embed_assets.settings import SAMPLE_CORPUS, Settings, settings_path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for k in [k for k in os.environ if k.startswith("EMBED_ASSETS_") and k != "EMBED_ASSETS_PRECISION_PROBE_CACHE"]:
        monkeypatch.delenv(k)


def _ran(tmp_path, monkeypatch) -> Settings:
    """What `embed-assets run --home data --items raw/books.jsonl ...` saved, run from tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "books.jsonl").write_text('{"asin": "1", "title": "t"}\n')
    s = Settings(home="data", items=["raw/books.jsonl"], id_field="asin", text_fields=["title", "description"],
                 partition_size=30, chunking=True, semantic_ids=False, min_recall_at_100=0.0, index_kind="flat")
    s.save()
    return s


def test_the_ui_loads_what_the_run_saved_from_any_directory(tmp_path, monkeypatch):
    _ran(tmp_path, monkeypatch)
    home = tmp_path / "data"
    saved = json.loads(settings_path(home).read_text())["settings"]
    assert saved["items"] == [str(tmp_path / "raw" / "books.jsonl")]  # absolute: the UI may start elsewhere
    monkeypatch.chdir("/")
    monkeypatch.setenv("EMBED_ASSETS_HOME", str(home))
    s = Settings.from_env()
    assert s.home == str(home) and s.items == [str(tmp_path / "raw" / "books.jsonl")]
    assert (s.id_field, s.text_fields, s.partition_size, s.chunking, s.semantic_ids, s.min_recall_at_100,
            s.index_kind) == ("asin", ["title", "description"], 30, True, False, 0.0, "flat")
    assert s.queries is None  # the run had no queries: the UI gets none either (not the sample's)


def test_the_environment_overrides_saved_settings_field_by_field(tmp_path, monkeypatch):
    _ran(tmp_path, monkeypatch)
    monkeypatch.setenv("EMBED_ASSETS_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("EMBED_ASSETS_PARTITION_SIZE", "50")
    monkeypatch.setenv("EMBED_ASSETS_CHUNKING", "0")
    monkeypatch.setenv("EMBED_ASSETS_SEMANTIC_IDS", "on")
    s = Settings.from_env()
    assert (s.partition_size, s.chunking, s.semantic_ids, s.id_field) == (50, False, True, "asin")
    # other items: another catalog, so nothing of the saved settings applies
    monkeypatch.setenv("EMBED_ASSETS_ITEMS", str(tmp_path / "other.jsonl"))
    s = Settings.from_env()
    assert (s.items, s.id_field, s.text_fields, s.chunking) == ([str(tmp_path / "other.jsonl")], "_id",
                                                                ["title", "text"], False)


def test_no_saved_settings_is_the_bundled_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBED_ASSETS_HOME", str(tmp_path / "fresh"))
    s = Settings.from_env()
    assert s.items == [str(SAMPLE_CORPUS)] and s.partition_size == 1_000 and s.semantic_ids and not s.chunking


def test_a_damaged_settings_file_is_named_in_the_error(tmp_path, monkeypatch):
    _ran(tmp_path, monkeypatch)
    path = settings_path(tmp_path / "data")
    monkeypatch.setenv("EMBED_ASSETS_HOME", str(tmp_path / "data"))
    path.write_text('{"version": 1, "settings": {"items": "raw/books.jsonl"')
    with pytest.raises(ValueError, match="settings.json: not a settings file written by `embed-assets run`"):
        Settings.from_env()
    path.write_text('{"version": 1, "settings": {"items": "raw/books.jsonl"}}')
    with pytest.raises(ValueError, match="settings.json: `items` must be a list of paths"):
        Settings.from_env()
    # a field a newer version added is ignored, not an error
    path.write_text('{"version": 2, "settings": {"items": ["a.jsonl"], "from_the_future": 1}}')
    assert Settings.from_env().items == ["a.jsonl"]

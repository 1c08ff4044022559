"""Text cleaning and hashing: what an item's text is, byte for byte, before it meets the tokenizer."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Iterable, Mapping

# C0 and C1 control characters except tab, newline and carriage return (those become plain spaces below).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Remove control characters and collapse whitespace. Keeps HTML, emoji and any script as they are."""
    return _WHITESPACE.sub(" ", _CONTROL.sub(" ", text)).strip()


def field_text(value: Any) -> str:
    """One field's text: strings as is, numbers as written, lists (Amazon `description`/`features`) joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return " ".join(t for t in (field_text(v) for v in value) if t.strip())
    return ""


def join_fields(record: Mapping[str, Any], fields: Iterable[str]) -> str:
    """The item's text: the configured fields, cleaned, joined with one space (SciFact: title + " " + text)."""
    return " ".join(t for t in (clean_text(field_text(record.get(f))) for f in fields) if t)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def normalize_id(value: Any) -> str | None:
    """Ids are strings: numbers as written ("12", not "12.0"), surrounding whitespace removed. None if unusable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return None

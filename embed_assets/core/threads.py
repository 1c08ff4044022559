"""A library's thread count set for the length of a block and put back afterwards (torch, faiss's OpenMP)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable


@contextmanager
def scoped_threads(get: Callable[[], int], set_: Callable[[int], None], n: int):
    """`set_(n)` for the block, then the value `get()` had; n <= 0 leaves the count alone."""
    if n <= 0:
        yield
        return
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)

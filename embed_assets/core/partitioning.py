"""Stable partitions: an item's partition is a function of its id alone, so adding, editing or deleting an item
changes only the partition that holds it.

Each item id is hashed (first 32 bits of its sha256, the same in Python and in DuckDB SQL). A partition is a *prefix*
of that hash in binary, written as its key: `p101` holds every item whose id-hash starts with the bits 101. The
partitions in use are the leaves of a binary tree and always cover the whole hash space exactly once. A key never
changes meaning: when a partition outgrows the target size it splits into its two children (`p101` -> `p1010` and
`p1011`), whose items are re-used from the parent's shard, never re-encoded. Partitions do not merge back.

Cost at 10M items: hashing is done by DuckDB inside the ingest query (~0.1 s per million ids); the tree has at most
2 x (catalog / target) leaves (100 at the 200,000-row default for 10M items).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

HASH_BITS = 32
MAX_DEPTH = 24  # 16M partitions: far beyond any catalog this runs on
# A leaf splits when it holds more than this many times the target rows (before de-duplication). Above 1 so that a
# leaf a little over target from hash variance does not split at once; a split halves it to ~0.6 x target.
SPLIT_FACTOR = 1.25

# The SQL expression that equals `id_hash(item_id)` (DuckDB: sha256 of the UTF-8 bytes, hex; first 8 hex digits).
ID_HASH_SQL = "CAST(('0x' || substr(sha256({col}), 1, 8)) AS UBIGINT)"


def id_hash(item_id: str) -> int:
    """The first 32 bits of sha256(item id), as an unsigned int: where the item lives, for ever."""
    return int(hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:8], 16)


@dataclass(frozen=True, order=True)
class Leaf:
    """A hash prefix: `depth` leading bits equal to `prefix`."""

    depth: int
    prefix: int

    @property
    def key(self) -> str:
        return "p" + (format(self.prefix, f"0{self.depth}b") if self.depth else "")

    @property
    def lo(self) -> int:
        """Smallest hash in this partition (inclusive)."""
        return self.prefix << (HASH_BITS - self.depth)

    @property
    def hi(self) -> int:
        """Largest hash in this partition (inclusive)."""
        return ((self.prefix + 1) << (HASH_BITS - self.depth)) - 1

    def holds(self, h: int) -> bool:
        return self.lo <= h <= self.hi

    def children(self) -> tuple["Leaf", "Leaf"]:
        if self.depth >= MAX_DEPTH:
            raise ValueError(f"partition {self.key} cannot split further (depth {MAX_DEPTH})")
        return Leaf(self.depth + 1, self.prefix * 2), Leaf(self.depth + 1, self.prefix * 2 + 1)

    def ancestors(self) -> list["Leaf"]:
        """Parent first, root last: where this partition's items lived before splits."""
        return [Leaf(d, self.prefix >> (self.depth - d)) for d in range(self.depth - 1, -1, -1)]


def is_partition_key(key: str) -> bool:
    return key.startswith("p") and all(c in "01" for c in key[1:]) and len(key) - 1 <= MAX_DEPTH


def leaf_of_key(key: str) -> Leaf:
    if not is_partition_key(key):
        raise ValueError(f"not a partition key: {key!r} (expected 'p' followed by the bits of a hash prefix, "
                         "e.g. p0110)")
    bits = key[1:]
    return Leaf(len(bits), int(bits, 2) if bits else 0)


def initial_depth(n_rows: int, target_rows: int) -> int:
    """Fewest prefix bits such that an even spread puts at most `target_rows` in a partition (at least 1 bit)."""
    if target_rows < 1:
        raise ValueError(f"target partition size must be positive, got {target_rows}")
    return max(1, min(MAX_DEPTH, math.ceil(math.log2(max(n_rows, 1) / target_rows)) if n_rows > target_rows else 1))


def full_level(depth: int) -> list[Leaf]:
    return [Leaf(depth, p) for p in range(2**depth)]


def check_cover(leaves: Sequence[Leaf]) -> None:
    """The leaves tile the hash space: sorted, no gap, no overlap."""
    nxt = 0
    for leaf in sorted(leaves, key=lambda x: x.lo):
        if leaf.lo != nxt:
            raise ValueError(f"partitions do not tile the hash space at {leaf.key} (expected a partition from "
                             f"hash {nxt:#010x}); re-materialize processed_items from scratch")
        nxt = leaf.hi + 1
    if nxt != 2**HASH_BITS:
        raise ValueError("partitions do not cover the whole hash space; re-materialize processed_items from scratch")


def split_overfull(leaves: Iterable[Leaf], count_rows, target_rows: int) -> tuple[list[Leaf], list[tuple[str, list[str]]]]:
    """Split every leaf holding more than SPLIT_FACTOR x target rows, recursively. `count_rows(leaf)` counts the rows
    whose id-hash falls in a leaf. Returns the new leaves (sorted) and the splits made: (parent key, child keys)."""
    out, splits = [], []
    stack = sorted(leaves, reverse=True)
    limit = SPLIT_FACTOR * target_rows
    while stack:
        leaf = stack.pop()
        if leaf.depth < MAX_DEPTH and count_rows(leaf) > limit:
            kids = leaf.children()
            splits.append((leaf.key, [k.key for k in kids]))
            stack.extend(reversed(kids))
        else:
            out.append(leaf)
    return sorted(out, key=lambda x: x.lo), splits

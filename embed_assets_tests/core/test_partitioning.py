"""Stable partitions: an item's place depends on its id alone, keys keep their meaning, splits tile the space."""

import duckdb
import pytest

from embed_assets.core.partitioning import (HASH_BITS, ID_HASH_SQL, Leaf, check_cover, full_level, id_hash,
                                            initial_depth, is_partition_key, leaf_of_key, split_overfull)


def test_the_id_hash_is_the_same_in_python_and_in_duckdb():
    ids = ["a", "B00012345", "../../etc/passwd", "ünïcödé 😀", "x" * 512, "12"]
    con = duckdb.connect()
    got = [con.execute(f"SELECT {ID_HASH_SQL.format(col='$i')}", {"i": i}).fetchone()[0] for i in ids]
    assert got == [id_hash(i) for i in ids]
    assert all(0 <= h < 2**HASH_BITS for h in got)


def test_keys_name_hash_prefixes_and_round_trip():
    leaf = Leaf(3, 0b101)
    assert leaf.key == "p101" and leaf_of_key("p101") == leaf
    assert leaf.lo == 0b101 << 29 and leaf.hi == (0b110 << 29) - 1
    assert [c.key for c in leaf.children()] == ["p1010", "p1011"]
    assert [a.key for a in leaf.ancestors()] == ["p10", "p1", "p"]
    assert is_partition_key("p0110") and not is_partition_key("rg_00001") and not is_partition_key("p012")
    with pytest.raises(ValueError, match="not a partition key"):
        leaf_of_key("rg_00001")


def test_initial_depth_and_splits_keep_every_item_in_exactly_one_partition():
    assert initial_depth(5_183, 1_000) == 3 and initial_depth(10, 1_000) == 1
    assert initial_depth(10_000_000, 200_000) == 6
    hashes = [id_hash(f"item-{i}") for i in range(5_000)]
    hashes += [h for h in hashes if h < 2**28][:400]  # a crowded corner of the hash space

    def count(leaf):
        return sum(leaf.lo <= h <= leaf.hi for h in hashes)

    leaves, splits = split_overfull(full_level(2), count, 500)
    check_cover(leaves)
    assert all(count(leaf) <= 1.25 * 500 for leaf in leaves)
    assert splits and all(p.startswith("p") for p, _ in splits)
    assert sum(count(leaf) for leaf in leaves) == len(hashes)
    # A split leaves every other key where it was.
    untouched = {leaf.key for leaf in full_level(2)} - {p for p, _ in splits}
    assert untouched <= {leaf.key for leaf in leaves}
    with pytest.raises(ValueError, match="do not cover"):
        check_cover([Leaf(1, 0)])
    with pytest.raises(ValueError, match="do not tile"):
        check_cover([Leaf(1, 0), Leaf(2, 1), Leaf(1, 1)])

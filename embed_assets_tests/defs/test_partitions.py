import hashlib

import pytest

from embed_assets.core.partitioning import full_level, id_hash
from embed_assets.defs.embeddings.partitions import partition_label
from embed_assets_tests.conftest import sample_docs


@pytest.mark.parametrize("depth", [1, 3, 4, 7])
def test_partition_label_names_the_sha256_range_of_the_ids_the_partition_holds(depth):
    """The label's hex range is checked against sha256 itself: every id of a partition has a digest whose first 8 hex
    digits fall in its partition's printed range, and in no other partition's."""
    leaves = full_level(depth)
    labels = {leaf.key: partition_label(leaf.key) for leaf in leaves}
    ranges = {}
    for key, label in labels.items():
        lo, hi = label.split(" (hex)")[0].removeprefix("sha256(item id) ").split("–")
        ranges[key] = (lo, hi)
        assert label.endswith(f"1/{2 ** depth:,} of the id-hash space")
    for doc in sample_docs(300):
        prefix = hashlib.sha256(doc["_id"].encode("utf-8")).hexdigest()[:8]
        holder = next(leaf.key for leaf in leaves if leaf.holds(id_hash(doc["_id"])))
        assert [k for k, (lo, hi) in ranges.items() if lo <= prefix <= hi] == [holder]


def test_partition_label_of_the_root_and_of_a_bad_key():
    assert partition_label("p") == "every item id (the whole hash space)"
    assert partition_label("p0110").startswith("sha256(item id) 60000000–6fffffff (hex)")
    with pytest.raises(ValueError, match="not a partition key"):
        partition_label("rg_00001")

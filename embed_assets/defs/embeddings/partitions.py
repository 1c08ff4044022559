import dagster as dg

from embed_assets.core.partitioning import HASH_BITS, leaf_of_key

# One partition per stable partition of processed_items: a hash prefix of the item id, keyed `p` + its bits (p0110).
# processed_items adds new keys (a new range, or the children of a split) and deletes keys that no longer hold items.
item_partitions = dg.DynamicPartitionsDefinition(name="item_partitions")

# What a partition key means, for people reading it in the UI (definition metadata of processed_items and
# item_embeddings). Keys are not renamed into something "friendlier": a key names the same hash range for ever, shard
# files and run keys are named after it, and the UI sorts keys so that a partition and its split children sit together.
PARTITION_KEYS_HELP = """\
A partition key is `p` followed by the first bits of the item id's SHA-256: `p0110` holds every item whose id hashes
to `0110…` (hex `60000000`–`6fffffff`), about 1/16 of all ids. More bits, smaller slice: a partition that outgrows the
target size splits into its two children (`p0110` -> `p01100`, `p01101`), and a key never changes meaning.

The partitions come from processed_items: materialize it first (on a fresh instance item_embeddings has none, and
*Materialize all* offers 0 partitions), then item_embeddings (*Materialize…* -> *All*: one run per partition).

Which partition holds an item? `SELECT partition FROM items WHERE item_id = '…'` in `HOME/catalog/read.duckdb`, or
the first hex digits of `sha256(item_id)`."""


def partition_label(key: str) -> str:
    """What a key covers, in words: `p0110` -> "sha256(item id) 60000000–6fffffff (hex): 1/16 of the id-hash space".
    For materialization metadata and logs, beside the key."""
    leaf = leaf_of_key(key)
    if leaf.depth == 0:
        return "every item id (the whole hash space)"
    width = HASH_BITS // 4
    return f"sha256(item id) {leaf.lo:0{width}x}–{leaf.hi:0{width}x} (hex): 1/{2 ** leaf.depth:,} of the id-hash space"

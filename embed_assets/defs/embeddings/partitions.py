import dagster as dg

# One partition per stable partition of processed_items: a hash prefix of the item id, keyed `p` + its bits (p0110).
# processed_items adds new keys (a new range, or the children of a split) and deletes keys that no longer hold items.
item_partitions = dg.DynamicPartitionsDefinition(name="item_partitions")

import dagster as dg

# One partition per row group of processed_items (rg_00000, rg_00001, ...). processed_items adds new keys and
# deletes keys whose row group no longer exists.
row_group_partitions = dg.DynamicPartitionsDefinition(name="row_groups")

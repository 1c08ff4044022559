"""The Dagster layer: one folder per concern (assets, checks, partitions, sensors), thin over embed_assets.core."""

# Who answers for every asset here: shown on each asset in the UI, where the catalog can be filtered by owner.
# A team (`team:<name>`) or a person's e-mail; change it to yours.
OWNERS = ["team:ml-platform"]

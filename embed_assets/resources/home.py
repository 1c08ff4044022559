from typing import Optional

import dagster as dg

from embed_assets.core.layout import Layout


class HomeResource(dg.ConfigurableResource):
    """The platform's HOME folder: items, shards, catalog, index and reports live under it. With `base_uri`
    (s3://bucket/prefix, file:///path) shards, index versions, semantic IDs and reports are also published there
    and fetched from there (checksums verified) when HOME lacks them; HOME stays the local working folder."""

    path: str
    base_uri: Optional[str] = None

    @property
    def layout(self) -> Layout:
        return Layout.at(self.path, self.base_uri)

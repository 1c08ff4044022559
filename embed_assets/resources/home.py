import dagster as dg

from embed_assets.core.layout import Layout


class HomeResource(dg.ConfigurableResource):
    """The platform's HOME folder: items, shards, catalog, index and reports live under it."""

    path: str

    @property
    def layout(self) -> Layout:
        return Layout.at(self.path)

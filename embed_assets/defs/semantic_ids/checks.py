import dagster as dg

from embed_assets.core.semantic_ids import load_version, run_checks, sid_root
from embed_assets.defs.semantic_ids.assets import semantic_ids
from embed_assets.resources import HomeResource, SemanticIdSettings

CHECK_SPECS = [
    dg.AssetCheckSpec("unique_semantic_ids", asset=semantic_ids, blocking=True,
                      description="Every item has exactly one full ID (codes + collision digit), and no two items "
                                  "share one."),
    dg.AssetCheckSpec("extra_digit_capacity", asset=semantic_ids, blocking=True,
                      description="The largest group of items sharing their codes fits the extra digit (at most K "
                                  "items per code tuple)."),
    dg.AssetCheckSpec("codebook_utilization", asset=semantic_ids, blocking=True,
                      description="Each level uses at least `min_utilization` (0.8, the TIGER paper's aim) of its "
                                  "codes. Warns by default; `utilization_blocks: true` makes a miss fail the run."),
]


def _result(name: str, passed: bool, details: dict, severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    """Check metadata with stable types: scalars as they are, a per-level list of numbers as one key per level,
    any other list as text."""
    md: dict = {}
    for k, v in details.items():
        if isinstance(v, (bool, int, float, str)):
            md[k] = v
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, float) for x in v):
            md.update({f"{k}_level_{i + 1}": float(x) for i, x in enumerate(v)})
        elif isinstance(v, (list, tuple)):
            md[k] = ", ".join(map(str, v)) or "none"
    return dg.AssetCheckResult(asset_key=semantic_ids.key, check_name=name, passed=passed, severity=severity,
                               metadata=md)


@dg.multi_asset_check(specs=CHECK_SPECS, name="semantic_id_checks")
def semantic_id_checks(home: HomeResource, sids: SemanticIdSettings):
    """The three checks of the current semantic-ID version, from one read of its table (`core.semantic_ids.run_checks`):
    unique_semantic_ids and extra_digit_capacity block; codebook_utilization warns unless `utilization_blocks`."""
    version = load_version(sid_root(home.layout.home))
    if version is None:
        raise dg.Failure(description="no semantic IDs yet (or the current version fails its checksums); "
                                     "materialize semantic_ids")
    checks = run_checks(version, sids.min_utilization)
    yield _result("unique_semantic_ids", *checks["unique_semantic_ids"])
    yield _result("extra_digit_capacity", *checks["extra_digit_capacity"])
    severity = dg.AssetCheckSeverity.ERROR if sids.utilization_blocks else dg.AssetCheckSeverity.WARN
    yield _result("codebook_utilization", *checks["codebook_utilization"], severity=severity)

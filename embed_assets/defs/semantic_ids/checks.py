import dagster as dg

from embed_assets.core.semantic_ids import load_version, run_checks, sid_root
from embed_assets.defs.semantic_ids.assets import semantic_ids
from embed_assets.resources import HomeResource, SemanticIdSettings


def _checks(home: HomeResource, sids: SemanticIdSettings) -> dict:
    version = load_version(sid_root(home.layout.home))
    if version is None:
        raise dg.Failure(description="no semantic IDs yet (or the current version fails its checksums); "
                                     "materialize semantic_ids")
    return run_checks(version, sids.min_utilization)


def _result(passed: bool, details: dict, severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
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
    return dg.AssetCheckResult(passed=passed, severity=severity, metadata=md)


@dg.asset_check(asset=semantic_ids, blocking=True)
def unique_semantic_ids(home: HomeResource, sids: SemanticIdSettings) -> dg.AssetCheckResult:
    """Every item has exactly one full ID (codes + collision digit), and no two items share one."""
    return _result(*_checks(home, sids)["unique_semantic_ids"])


@dg.asset_check(asset=semantic_ids, blocking=True)
def extra_digit_capacity(home: HomeResource, sids: SemanticIdSettings) -> dg.AssetCheckResult:
    """The largest group of items sharing their codes fits the extra digit (at most K items per code tuple)."""
    return _result(*_checks(home, sids)["extra_digit_capacity"])


@dg.asset_check(asset=semantic_ids, blocking=True)
def codebook_utilization(home: HomeResource, sids: SemanticIdSettings) -> dg.AssetCheckResult:
    """Each level uses at least `min_utilization` (0.8, the TIGER paper's aim) of its codes. Warns by default;
    `utilization_blocks: true` makes a miss fail the run."""
    passed, details = _checks(home, sids)["codebook_utilization"]
    severity = dg.AssetCheckSeverity.ERROR if sids.utilization_blocks else dg.AssetCheckSeverity.WARN
    return _result(passed, details, severity)

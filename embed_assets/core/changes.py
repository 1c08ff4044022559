"""What the state on disk needs, and whether one more attempt at it is due: the sensor's whole decision, without Dagster.

`plan()` compares what is on disk with what is wanted, in one place:
  1. processed items: the source fingerprint that processed_items recorded (from the very bytes it parsed) against
     the raw files as they are now, and the row groups against the registered dynamic partitions;
  2. per row group: its shard missing, out of date (another row-group content or embedding version) or failing its
     manifest's checksums;
  3. the index: built over other shards than the current ones, or its files missing or corrupt.
Each piece of work carries a key naming the *wanted* state (`items-<source fp>`, `<partition>-<shard fp>`,
`index-<shard-set fp>`): equal key, same work. `next_attempt()` decides from the earlier runs for that key whether to
request it again (never run, its result lost since, failed fewer than MAX_ATTEMPTS times) or not (a run in progress,
a cancel, too many failures, redone too often). Pure functions over HOME; usable from a notebook.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from embed_assets.core.atomic import sha256_file
from embed_assets.core.index import IndexBuildError, read_index_manifest
from embed_assets.core.items import ItemsError, discover_files, load_processed, source_fingerprint
from embed_assets.core.layout import Layout
from embed_assets.core.shards import ShardError, cached_sha256, embedding_fingerprint, read_manifest, verify_files

MAX_ATTEMPTS = 3  # consecutive failures of one wanted state, then the sensor stops asking for it
MAX_REDO = 3  # successful runs of one wanted state within REDO_WINDOW_S that did not leave it current, then stop
REDO_WINDOW_S = 3600.0
RACY_S = 2.0  # a file written this recently is hashed again next time (a same-size rewrite may keep its stat)
ACTIVE_STATUSES = frozenset({"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"})


# --------------------------------------------------------------------------------------------------- raw files

def fingerprint_files(paths: Sequence[str], config: Mapping[str, Any],
                      known: dict[str, list] | None = None) -> tuple[dict[str, list], str]:
    """{path: [size, mtime_ns, ctime_ns, inode, sha256]} and the source fingerprint of the files as they are now
    (`items.source_fingerprint`, the same function processed_items records with).

    A file is re-hashed only when its stat moved (`known` is the previous answer, e.g. from the sensor's cursor);
    the fingerprint is over content, so touching a file without changing it triggers nothing.
    """
    known = known or {}
    files: dict[str, list] = {}
    for f in discover_files(paths):
        stamp = _stamp(f)
        prev = known.get(str(f))
        if prev and len(prev) == len(stamp) + 1 and prev[:-1] == stamp:
            files[str(f)] = prev
            continue
        sha = sha256_file(f)
        # Written while being hashed, or so recently that a second write could keep the same stat (timestamps are
        # coarse): the hash holds for this tick, but is no cache hit for the next one.
        cacheable = _stamp(f) == stamp and time.time() - stamp[1] / 1e9 > RACY_S
        files[str(f)] = [*(stamp if cacheable else [-1] * len(stamp)), sha]
    return files, source_fingerprint({p: v[-1] for p, v in files.items()}, config)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


# --------------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Work:
    """One piece of work the state on disk needs. `key` names the wanted state: equal key, same work."""

    kind: str  # "items" | "shard" | "index"
    key: str
    reason: str
    partition: str | None = None

    @property
    def target(self) -> str:
        """What the work rewrites, whatever the state: `items`, `shard:<partition>`, `index`."""
        return f"{self.kind}:{self.partition}" if self.partition else self.kind


@dataclass
class Plan:
    source_fingerprint: str
    items: Work | None = None  # processed_items must run
    shards: list[Work] = field(default_factory=list)  # against the row groups processed now
    index: Work | None = None  # only when every shard is current
    partitions: list[str] = field(default_factory=list)  # the row groups processed now

    @property
    def current(self) -> bool:
        return self.items is None and not self.shards and self.index is None


def plan(layout: Layout, source_fp: str, version: dict[str, Any], registered: set[str] | None = None,
         semantic_ids: bool = True) -> Plan:
    """Everything that is not current, given the raw files' source fingerprint (`fingerprint_files`), the
    encoder's embedding version and the registered dynamic partitions (None: not checked).

    Shards and index are judged against the row groups processed now even when processed items themselves need
    work, so a caller that cannot run processed_items (cancelled, failing) can still repair what exists."""
    p = Plan(source_fp)
    try:
        processed = load_processed(layout)
    except ItemsError as e:
        p.items = Work("items", f"items-{source_fp}", f"no usable processed items ({e})")
        return p
    groups = processed["partitions"]
    p.partitions = [rg["partition"] for rg in groups]
    recorded = (processed.get("source") or {}).get("fingerprint")
    reason = None
    if recorded is None:
        reason = "processed items record no source fingerprint (written by an earlier version)"
    elif recorded != source_fp:
        reason = "the raw items changed since processed_items last read them"
    elif registered is not None and set(p.partitions) != registered:
        missing, extra = sorted(set(p.partitions) - registered), sorted(registered - set(p.partitions))
        reason = f"dynamic partitions differ from the row groups (unregistered: {missing[:5]}, extra: {extra[:5]})"
    if reason:
        p.items = Work("items", f"items-{source_fp}", reason)
    p.shards = shard_work(layout, groups, version)
    if not p.shards:
        p.index = index_work(layout, groups, semantic_ids)
    return p


def shard_work(layout: Layout, groups: Sequence[dict[str, Any]], version: dict[str, Any]) -> list[Work]:
    """One Work per row group whose shard is missing, out of date or not what its manifest vouches for."""
    out = []
    for rg in groups:
        key = rg["partition"]
        want = embedding_fingerprint(rg["fingerprint"], version)
        try:
            m = read_manifest(layout, key)
        except ShardError:
            m, why = None, "its manifest is unreadable"
        else:
            why = "no shard yet" if m is None else ""
        if m is not None:
            if m.fingerprint != want:
                why = "out of date (other rows or another embedding version)"
            else:
                why = "; ".join(verify_files(layout, m, cached_sha256))
        if why:
            out.append(Work("shard", f"{key}-{want}", why, key))
    return out


def shard_set_fingerprints(layout: Layout, groups: Sequence[dict[str, Any]]) -> dict[str, str | None]:
    current: dict[str, str | None] = {}
    for rg in groups:
        try:
            m = read_manifest(layout, rg["partition"])
        except ShardError:
            m = None
        current[rg["partition"]] = m.fingerprint if m else None
    return current


def index_work(layout: Layout, groups: Sequence[dict[str, Any]], semantic_ids: bool = True) -> Work | None:
    """The index's Work when it is not built over exactly the current shards, or its files are not intact; with
    `semantic_ids`, also when the live semantic IDs are not built over exactly the current shards."""
    current = shard_set_fingerprints(layout, groups)
    key = "index-" + hashlib.sha256(json.dumps(sorted(current.items())).encode()).hexdigest()[:32]
    try:
        built = read_index_manifest(layout)
    except IndexBuildError:
        return Work("index", key, "no index yet (or its manifest is unreadable)")
    if built.get("shard_fingerprints") != current:
        return Work("index", key, "the index is built over other shards")
    problems = [f"{path.name} is missing or does not match the index manifest"
                for path, sha in ((layout.index_file, built.get("index_sha256")),
                                  (layout.index_ids, built.get("ids_sha256")))
                if cached_sha256(path) != sha]
    if not problems and semantic_ids:
        # the semantic IDs are refreshed by the same job: they too must be built over exactly the current shards
        from embed_assets.core.semantic_ids import read_current_manifest, sid_root

        sid = read_current_manifest(sid_root(layout.home))
        if sid is None:
            problems.append("no semantic IDs yet")
        elif sid.get("input_shards") != {k: v for k, v in current.items() if v is not None}:
            problems.append("the semantic IDs are built over other shards")
    return Work("index", key, "; ".join(problems)) if problems else None


# --------------------------------------------------------------------------------------------------- attempts

@dataclass(frozen=True)
class PastRun:
    """An earlier run for one wanted state: its id, Dagster run status name, creation and end time (None while it
    runs)."""

    run_id: str
    status: str
    created: float
    ended: float | None = None


@dataclass(frozen=True)
class Attempt:
    number: int | None  # the attempt to request now (run key `<key>:<number>`); None: request nothing
    reason: str


def _blocked(runs: Sequence[PastRun], now: float) -> str | None:
    if runs and runs[0].status == "CANCELED":
        return (f"run {runs[0].run_id[:8]} for this very state was cancelled by a user; waiting for the inputs to "
                "change (or launch it by hand)")
    fails = _leading_failures(runs)
    if fails >= MAX_ATTEMPTS:
        return (f"failed {fails} times in a row (last run {runs[0].run_id[:8]}); not retrying until the inputs "
                "change (fix the cause, then launch it by hand)")
    redone = sum(r.status == "SUCCESS" and r.ended is not None and r.ended >= now - REDO_WINDOW_S for r in runs)
    if redone >= MAX_REDO:
        return (f"{redone} runs for this very state succeeded within {REDO_WINDOW_S / 3600:g} h and it is still not "
                "current: something keeps undoing it; not requesting it again for now (launch it by hand)")
    return None


def _leading_failures(runs: Sequence[PastRun]) -> int:
    n = 0
    for r in runs:
        if r.status != "FAILURE":
            break
        n += 1
    return n


def next_attempt(history: Sequence[PastRun], now: float,
                 superseded_at: Callable[[], float | None] = lambda: None) -> Attempt:
    """Whether to request one more run for a wanted state that is not current, from the earlier runs for that very
    state (`history`, newest first), and under which attempt number: the run key `<key>:<number>` is new exactly
    when a new run is due, and stays the same while one exists.

    - a run for it in progress: wait;
    - its newest run was cancelled: respect that (inputs that change are another state, with another key);
    - MAX_ATTEMPTS failures in a row: stop;
    - MAX_REDO successes within REDO_WINDOW_S and still not current: something keeps undoing it; stop for a while;
    - else (never run, or its result is gone since: a shard deleted, contents A -> B -> A): one more attempt.
    Runs created before `superseded_at()` no longer hold it back: the time when the target last ran for another
    state or was materialized by a run not in `history` (the user launched it by hand). It is only called when a
    run would be held back.
    """
    running = next((r for r in history if r.status in ACTIVE_STATUSES), None)
    if running:
        return Attempt(None, f"run {running.run_id[:8]} for it is in progress")
    relevant = list(history)
    why = _blocked(relevant, now)
    if why:
        t = superseded_at()
        if t is not None:
            relevant = [r for r in relevant if r.created > t]
            why = _blocked(relevant, now)
    if why:
        return Attempt(None, why)
    fails = _leading_failures(relevant)
    if fails:
        return Attempt(len(history), f"retry {fails + 1} of {MAX_ATTEMPTS} after a failure")
    return Attempt(len(history), "redo: an earlier run's result is gone" if relevant else "")

"""The UI in a real browser: `dagster-webserver` and `dagster-daemon` on a loopback port with a temporary instance,
driven by headless Chromium (Debian's `chromium`, through Playwright; no browser is downloaded).

What a user does on a fresh checkout, and what they must see:
- the global asset lineage, groups expanded, shows every asset of `embed_assets.definitions`, and each asset's
  Checks tab lists every check on it (both lists come from the Definitions object, cross-checked with GraphQL);
- *Materialize* on processed_items runs (the daemon dequeues the run) and creates the dynamic partitions;
- *Materialize…* on item_embeddings offers exactly those partitions; one is picked and launched; the run succeeds;
- the Partitions tab then shows that partition materialized (and the others missing), its check passed;
- the asset page shows item_embeddings' group, owners, kinds, code version and pool as the Definitions set them.

Screenshots (also on failure) go to `<repo>/test-output/ui/`, printed at the start; server logs too.
The items: 20 SciFact titles, partition size 10 (two partitions, p0 and p1), fp32 (no precision probe), semantic
IDs off (too few items). About 45 s (setup 8 s, browser and runs 36 s) on 2 cores at load 6; most of it the runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from embed_assets.core.layout import Layout
from embed_assets.instance import create_storage
from embed_assets_tests.conftest import expected_partitions, sample_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "test-output" / "ui"
BIN = Path(sys.executable).parent
N_ITEMS, PARTITION_SIZE = 20, 10
# A wide window: the graph fits at a zoom where nodes are drawn in full (name, checks, partitions, kinds).
VIEWPORT = {"width": 2400, "height": 1300}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (the server, its code server and any run workers), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
    try:  # children left behind in the group (e.g. a run worker mid-step)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """Webserver + daemon on a fresh DAGSTER_HOME and embed_assets HOME; yields what the test needs."""
    tmp = tmp_path_factory.mktemp("ui").resolve()
    dagster_home, raw, home = tmp / "dagster_home", tmp / "raw", tmp / "home"
    dagster_home.mkdir()
    # A minimal instance: no telemetry, no "join the community" dialog (it would cover the page), runs dequeued
    # every second instead of 5 (the daemon's queued run coordinator is otherwise the default).
    (dagster_home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nnux:\n  enabled: false\nrun_queue:\n  dequeue_interval_seconds: 1\n")
    docs = sample_docs(N_ITEMS)
    write_jsonl(raw / "items.jsonl", docs)
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*"):
        if old.is_file():
            old.unlink()
    print(f"\nUI test output (screenshots, server logs): {OUT}")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "EMBED_ASSETS_HOME": str(home),
           "EMBED_ASSETS_ITEMS": str(raw), "EMBED_ASSETS_TEXT_FIELDS": "title",
           "EMBED_ASSETS_PARTITION_SIZE": str(PARTITION_SIZE), "EMBED_ASSETS_SEMANTIC_IDS": "0",
           "EMBED_ASSETS_PRECISION": "fp32", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for k in ("EMBED_ASSETS_CRASH_AT", "EMBED_ASSETS_PAUSE_AT", "EMBED_ASSETS_SENSOR", "EMBED_ASSETS_REFRESH"):
        env.pop(k, None)
    port = _free_port()
    procs: list[subprocess.Popen] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        # Create the SQLite storage before two processes open it at once (both could stamp its schema version).
        instance = dg.DagsterInstance.get()
        create_storage(instance)
        logs = {"webserver": OUT / "webserver.log", "daemon": OUT / "daemon.log"}
        try:
            for name, cmd in (
                ("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                               "-w", str(ROOT / "workspace.yaml")]),
                ("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")]),
            ):
                with open(logs[name], "w") as out:
                    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            ns = SimpleNamespace(url=f"http://127.0.0.1:{port}", tmp=tmp, layout=Layout.at(home), logs=logs,
                                 procs=procs, instance=instance,
                                 partitions=expected_partitions([d["_id"] for d in docs], PARTITION_SIZE))
            _wait_until_loaded(ns, timeout_s=180)
            yield ns
        finally:
            for p in procs:
                _stop(p)
            instance.dispose()


def _logs_tail(ui, n: int = 3000) -> str:
    return "\n".join(f"--- {k} ---\n{p.read_text(errors='replace')[-n:]}" for k, p in ui.logs.items() if p.exists())


def gql(ui, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(f"{ui.url}/graphql", data=json.dumps({"query": query,
                                                                       "variables": variables or {}}).encode(),
                                 headers={"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=30).read())
    assert not out.get("errors"), out["errors"]
    return out["data"]


def _wait_until_loaded(ui, timeout_s: float) -> None:
    """The webserver answers and its code location is loaded; the daemon is up (its heartbeat is recorded)."""
    q = ("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
         "locationOrLoadError { __typename ... on PythonError { message } } } } } }")
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        for p in ui.procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[0]} exited with {p.returncode}\n{_logs_tail(ui)}")
        try:
            entries = gql(ui, q)["workspaceOrError"]["locationEntries"]
            last = entries
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                errors = [e for e in entries if e["locationOrLoadError"]["__typename"] == "PythonError"]
                assert not errors, errors
                if ui.instance.get_daemon_heartbeats():
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"webserver/daemon not ready in {timeout_s} s (last: {last})\n{_logs_tail(ui)}")


RUNS = "{ runsOrError { ... on Runs { results { runId status assetSelection { path } tags { key value } } } } }"


def _wait_for_run(ui, description: str, select, timeout_s: float = 240) -> dict:
    """Poll GraphQL until the one run `select(runs)` picks has finished; return it (it must have succeeded)."""
    deadline = time.monotonic() + timeout_s
    run = None
    while time.monotonic() < deadline:
        run = select(gql(ui, RUNS)["runsOrError"]["results"])
        if run and run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"{description}: no finished run in {timeout_s} s (last: {run})\n{_logs_tail(ui)}")
    assert run["status"] == "SUCCESS", f"{description}: run {run['runId']} {run['status']}\n{_logs_tail(ui)}"
    return run


def _asset_runs(asset: str):
    return lambda runs: next((r for r in runs if [asset] in [a["path"] for a in r["assetSelection"] or []]), None)


@pytest.fixture
def page(ui):
    """Headless Debian chromium (as root: --no-sandbox), closed after the test."""
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is not installed (scripts/test_deps.sh installs it)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            pg = browser.new_page(viewport=VIEWPORT)
            pg.set_default_timeout(60_000)
            yield pg
        finally:
            browser.close()


@contextmanager
def screenshot_on_failure(page):
    """A failing step leaves the page as it was in failure.png, beside the other screenshots."""
    try:
        yield
    except BaseException:
        try:
            page.screenshot(path=str(OUT / "failure.png"), full_page=True)
            print(f"failure screenshot: {OUT / 'failure.png'} (page {page.url})")
        except Exception as e:  # the browser itself may be what failed
            print(f"no failure screenshot: {e}")
        raise


def _shot(page, name: str) -> None:
    page.screenshot(path=str(OUT / f"{name}.png"))


def test_the_ui_shows_the_graph_and_materializes_a_partition(ui, page):
    with screenshot_on_failure(page):
        _walk_through_the_ui(ui, page)


def _walk_through_the_ui(ui, page):
    from playwright.sync_api import expect

    from embed_assets.definitions import defs

    expect.set_options(timeout=60_000)
    graph = defs.resolve_asset_graph()
    assets = sorted(k.to_user_string() for k in graph.get_all_asset_keys())
    checks_by_asset: dict[str, set[str]] = defaultdict(set)
    for c in graph.asset_check_keys:
        checks_by_asset[c.asset_key.to_user_string()].add(c.name)
    # Cross-check with what the webserver's GraphQL API serves (the UI's own source).
    nodes = gql(ui, "{ assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } } }")
    assert sorted("/".join(n["assetKey"]["path"]) for n in nodes["assetNodes"]) == assets
    assert {"/".join(n["assetKey"]["path"]): {c["name"] for c in n["assetChecksOrError"]["checks"]}
            for n in nodes["assetNodes"] if n["assetChecksOrError"]["checks"]} == dict(checks_by_asset)

    # 1. The global asset lineage, every group expanded (Alt+E, the graph's "Expand all groups"): every asset.
    groups = {graph.get(k).group_name for k in graph.get_all_asset_keys()}
    page.goto(f"{ui.url}/asset-groups")
    names = page.locator('[class*="AssetNode_assetName"]')
    collapsed = page.locator('[class*="CollapsedGroupNode_collapsedGroupNodeContainer"]')
    expect(collapsed).to_have_count(len(groups))  # the graph is drawn, each group folded (a fresh browser)
    for group in groups:
        expect(collapsed.filter(has=page.get_by_text(group, exact=True))).to_have_count(1)
    page.keyboard.press("Alt+KeyE")  # the graph's "Expand all groups" (it toggles: press once)
    expect(collapsed).to_have_count(0)
    expect(names).to_have_count(len(assets))
    for a in assets:
        expect(names.filter(has_text=re.compile(rf"^\s*{re.escape(a)}\s*$"))).to_have_count(1)
    assert sorted(t.strip() for t in names.all_inner_texts()) == assets
    _shot(page, "01_asset_graph")

    # 2. Each asset's Checks tab lists its checks.
    for asset, checks in sorted(checks_by_asset.items()):
        page.goto(f"{ui.url}/assets/{asset}?view=checks")
        expect(page.get_by_text(f"Checks ({len(checks)})", exact=True)).to_be_visible()
        for check in checks:
            expect(page.get_by_text(check, exact=True).first).to_be_visible()
        _shot(page, f"02_checks_{asset}")

    # 3. processed_items: the asset page's Materialize button; the daemon runs it; the partitions appear.
    page.goto(f"{ui.url}/assets/processed_items")
    page.locator("button:has(span:text-is('Materialize'))").click()
    expect(page.get_by_text("Launched run").first).to_be_visible()
    _wait_for_run(ui, "processed_items", _asset_runs("processed_items"))
    assert sorted(ui.instance.get_dynamic_partitions("item_partitions")) == sorted(ui.partitions)

    # 4. item_embeddings: Materialize… offers exactly those partitions; pick one, launch one run.
    key = sorted(ui.partitions)[0]
    page.goto(f"{ui.url}/assets/item_embeddings")
    page.locator("button:has(span:text-is('Materialize…'))").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Launch runs to materialize item_embeddings")).to_be_visible()
    dialog.get_by_text("Select a partition or create one").click()
    options = page.get_by_role("menuitem").locator("[title]")  # one per partition, its key as the title
    expect(options).to_have_count(len(ui.partitions))
    assert sorted(options.nth(i).get_attribute("title") for i in range(len(ui.partitions))) == sorted(ui.partitions)
    page.get_by_role("menuitem").filter(has=page.locator(f'[title="{key}"]')).click()
    page.keyboard.press("Escape")  # closes the partition list, not the dialog
    expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
    _shot(page, "03_launch_one_partition")
    dialog.locator("button:has(span:text-is('Launch 1 run'))").click()
    expect(page.get_by_text("Launched run").first).to_be_visible()
    run = _wait_for_run(ui, f"item_embeddings {key}",
                        lambda runs: next((r for r in runs if {"key": "dagster/partition", "value": key} in r["tags"]),
                                          None))
    assert [a["path"] for a in run["assetSelection"]] == [["item_embeddings"]]
    assert ui.layout.shard_pt(key).exists()

    # 5. The Partitions tab shows it materialized, the others missing; the blocking check passed.
    page.goto(f"{ui.url}/assets/item_embeddings?view=partitions&partition={key}")
    expect(page.get_by_text(f"Materialized (1)", exact=True)).to_be_visible()
    expect(page.get_by_text(f"Missing ({len(ui.partitions) - 1})", exact=True)).to_be_visible()
    expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
    expect(page.get_by_text(run["runId"][:8], exact=True)).to_be_visible()
    _shot(page, "04_partition_materialized")
    stats = gql(ui, '{ assetNodeOrError(assetKey: {path: ["item_embeddings"]}) { ... on AssetNode { '
                    'partitionStats { numMaterialized numPartitions numFailed } } } }')
    assert stats["assetNodeOrError"]["partitionStats"] == {"numMaterialized": 1, "numPartitions": len(ui.partitions),
                                                          "numFailed": 0}
    page.goto(f"{ui.url}/assets/item_embeddings?view=checks")
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible()

    # 6. What the asset page tells a user about item_embeddings: what the Definitions say.
    node = graph.get(dg.AssetKey("item_embeddings"))
    page.goto(f"{ui.url}/assets/item_embeddings")
    page.get_by_text("Compute details", exact=True).click()
    field = lambda label: page.locator(  # noqa: E731  (the value beside a label of the Definition panel)
        f"xpath=//span[normalize-space()='{label}']/following-sibling::span[1]")
    expect(field("Group")).to_have_text(node.group_name)
    for owner in node.owners:
        expect(field("Owners")).to_contain_text(owner.removeprefix("team:"))
    expect(field("Code version")).to_contain_text(node.code_version)
    expect(field("Pool")).to_contain_text(node.assets_def.op.pool)
    kinds = next(s for s in node.assets_def.specs if s.key == node.key).kinds
    shown = field("Kinds").locator("[class*=OpTags_opTagsContainer]")  # one tag per kind: icon + display name
    expect(shown).to_have_count(len(kinds))
    assert sorted(t.strip().lower() for t in shown.all_inner_texts()) == sorted(kinds)
    expect(page.get_by_text("partition_keys", exact=True)).to_be_visible()
    _shot(page, "05_item_embeddings_overview")

    # 7. The graph again, after the runs (what a user sees once the first partition is in).
    page.goto(f"{ui.url}/asset-groups")
    expect(page.get_by_text("processed_items", exact=True).first).to_be_visible()
    page.wait_for_timeout(2000)
    _shot(page, "06_asset_graph_after_runs")

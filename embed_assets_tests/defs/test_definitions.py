import subprocess
import sys

import dagster as dg

ASSETS = {"processed_items", "item_embeddings", "embedding_norms", "faiss_index", "retrieval_report", "semantic_ids"}
CHECKS = {"shard_norm_check", "all_norms_within_tolerance", "retrieval_quality_check", "unique_semantic_ids",
          "extra_digit_capacity", "codebook_utilization"}


def test_defs_load_with_the_whole_graph():
    from embed_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == ASSETS
    checks = {c.name for c in graph.asset_check_keys}
    assert checks == CHECKS
    for job in ("process_items_job", "embed_shards_job", "index_and_report_job"):
        assert defs.resolve_job_def(job) is not None
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents["item_embeddings"] == {"processed_items"}
    assert parents["faiss_index"] == {"item_embeddings", "embedding_norms"}
    assert parents["retrieval_report"] == {"faiss_index"}
    assert parents["semantic_ids"] == {"item_embeddings", "embedding_norms"}
    assert graph.get(dg.AssetKey("item_embeddings")).partitions_def.name == "item_partitions"


def test_every_asset_and_check_carries_what_a_ui_user_needs():
    """Read from the Definitions, so an asset or check added later is held to the same: each asset is in the group of
    the concern folder it is defined in (embed_assets/defs/<group>/), has an owner, kinds, a code version and a
    description; each check has a description; item_embeddings runs in the encoder pool."""
    import re

    from embed_assets.defs.embeddings.assets import ENCODER_POOL
    from embed_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    assert graph.get_all_asset_keys()
    for key in graph.get_all_asset_keys():
        node, name = graph.get(key), key.to_user_string()
        module = node.assets_def.op.compute_fn.decorated_fn.__module__
        concern = re.fullmatch(r"embed_assets\.defs\.(\w+)\.assets", module)
        assert concern, f"{name} is defined in {module}, not in embed_assets/defs/<concern>/assets.py"
        assert node.group_name == concern.group(1), f"{name}: group {node.group_name!r}, defined in {module}"
        assert node.owners and all(re.fullmatch(r"team:[\w.-]+|[^@\s]+@[^@\s]+", o) for o in node.owners), name
        spec = next(s for s in node.assets_def.specs if s.key == key)
        assert spec.kinds, f"{name} has no kinds"
        assert isinstance(node.code_version, str) and node.code_version.strip(), f"{name} has no code_version"
        assert (node.description or "").strip(), f"{name} has no description"
        assert (spec.metadata.get("files") or "").startswith("HOME/"), f"{name}: where its files are, under HOME"
    for check in graph.asset_check_keys:
        assert (graph.get_check_spec(check).description or "").strip(), f"check {check.name} has no description"
    pools = {k.to_user_string(): graph.get(k).assets_def.op.pool for k in graph.get_all_asset_keys()}
    assert pools.pop("item_embeddings") == ENCODER_POOL == "encoder"
    assert set(pools.values()) == {None}  # only the encoder is scarce


def test_loading_the_code_location_imports_no_torch_faiss_or_sentence_transformers():
    code = ("import sys, embed_assets.definitions; "
            "print(sorted(m for m in ('torch', 'faiss', 'sentence_transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_workspace_yaml_points_at_the_definitions_module():
    import pathlib

    text = (pathlib.Path(__file__).parents[2] / "workspace.yaml").read_text()
    assert "module_name: embed_assets.definitions" in text


def test_dagster_webserver_serves_the_whole_graph(tmp_path):
    """What `dagster dev` shows: the webserver loads workspace.yaml and its GraphQL API lists every asset and check."""
    import json
    import os
    import pathlib
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = pathlib.Path(__file__).parents[2]
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "EMBED_ASSETS_HOME": str(tmp_path / "home")}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    proc = subprocess.Popen([str(pathlib.Path(sys.executable).with_name("dagster-webserver")), "-w",
                             str(root / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    query = {"query": "{ assetNodes { assetKey { path } groupName kinds opVersion description pools "
                      "owners { ... on TeamAssetOwner { team } ... on UserAssetOwner { email } } "
                      "assetChecksOrError { ... on AssetChecks { checks { name description } } } } }"}
    try:
        deadline = time.monotonic() + 120
        data = None
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps(query).encode(),
                                             headers={"Content-Type": "application/json"})
                data = json.loads(urllib.request.urlopen(req, timeout=10).read())
                if data.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert data and data.get("data"), data
        nodes = data["data"]["assetNodes"]
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} == ASSETS
        checks = {c["name"] for n in nodes for c in (n["assetChecksOrError"].get("checks") or [])}
        assert checks == CHECKS
        # what the UI shows of each asset is what the Definitions say
        from embed_assets.definitions import defs

        graph = defs.resolve_asset_graph()
        for n in nodes:
            node = graph.get(dg.AssetKey(n["assetKey"]["path"]))
            spec = next(s for s in node.assets_def.specs if s.key == node.key)
            assert n["groupName"] == node.group_name
            assert sorted(n["kinds"]) == sorted(spec.kinds)
            assert n["opVersion"] == node.code_version
            assert n["description"] == node.description
            assert [f"team:{o['team']}" if "team" in o else o["email"] for o in n["owners"]] == list(node.owners)
            assert n["pools"] == ([node.assets_def.op.pool] if node.assets_def.op.pool else [])
            for c in n["assetChecksOrError"]["checks"]:
                assert c["description"] == graph.get_check_spec(dg.AssetCheckKey(node.key, c["name"])).description
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_refresh_schedule_is_there_and_off_by_default():
    from embed_assets.definitions import defs

    sched = defs.resolve_schedule_def("refresh_schedule")
    assert sched.job_name == "process_items_job" and sched.cron_schedule == "0 2 * * *"
    assert sched.default_status == dg.DefaultScheduleStatus.STOPPED

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
    query = {"query": "{ assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } } }"}
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_refresh_schedule_is_there_and_off_by_default():
    from embed_assets.definitions import defs

    sched = defs.resolve_schedule_def("refresh_schedule")
    assert sched.job_name == "process_items_job" and sched.cron_schedule == "0 2 * * *"
    assert sched.default_status == dg.DefaultScheduleStatus.STOPPED

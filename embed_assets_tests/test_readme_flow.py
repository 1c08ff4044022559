"""The README's flow as a newcomer runs it: `embed-assets run` (what scripts/demo.sh runs), then the UI command
(`embed-assets ui`, what scripts/ui.sh runs) with no DAGSTER_HOME and no EMBED_ASSETS_* set, and the UI's GraphQL API
shows what the run did: every partition of item_embeddings materialized, with its metadata, and the checks passed.

A small catalog (120 SciFact titles, four partitions) instead of the 5,183-item sample, so it takes seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from embed_assets.core.items import load_partitions
from embed_assets.core.layout import Layout
from embed_assets_tests.conftest import expected_partitions, sample_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
PARTITION_SIZE = 30

QUERY = """
query ($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) {
    __typename
    ... on AssetNode {
      partitionKeys
      partitionStats { numMaterialized numPartitions numFailed numMaterializing }
      assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } }
      assetMaterializations(partitions: $partitions) { partition runId metadataEntries { label } }
    }
  }
  assetCheckExecutions(assetKey: $key, checkName: "shard_norm_check", limit: 100) { partition status }
  assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId } }
}
"""


RESOURCE = """
query ($sel: ResourceSelector!) {
  topLevelResourceDetailsOrError(resourceSelector: $sel) { ... on ResourceDetails { configuredValues { key value } } }
}
"""


def _user_env() -> dict[str, str]:
    """The environment of a user who has set nothing: no DAGSTER_HOME, no EMBED_ASSETS_* (except this test session's
    precision-probe cache, see conftest)."""
    return {k: v for k, v in os.environ.items()
            if k != "DAGSTER_HOME" and (not k.startswith("EMBED_ASSETS_") or k == "EMBED_ASSETS_PRECISION_PROBE_CACHE")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query, "variables": variables}).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


@pytest.fixture
def ui(tmp_path):
    """Start `embed-assets ui` on a free loopback port; stop its whole process group (dg dev, the webserver, the
    daemon, the code server) afterwards, also when the test fails."""
    procs = []

    def start(home: Path, cwd: Path) -> tuple[int, Path]:
        port = _free_port()
        log = tmp_path / "ui.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "embed_assets.cli", "ui", "--home", str(home), "--host", "127.0.0.1",
                 "--port", str(port)], cwd=cwd, env=_user_env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True))
        return port, log

    yield start
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)  # dg dev shuts its webserver, daemon and code servers down
            p.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group is left (a SIGTERM that lands while dg dev starts up can go unanswered)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)


def test_the_ui_shows_what_the_cli_ran(tmp_path, ui):
    docs = sample_docs(120)
    corpus = write_jsonl(tmp_path / "raw" / "corpus.jsonl", docs)
    want = expected_partitions([d["_id"] for d in docs], PARTITION_SIZE)
    assert len(want) >= 3  # several partitions, or the test shows little
    work = tmp_path / "cwd"  # the user's checkout; HOME is the default ./data in it
    work.mkdir()

    # 1. `bash scripts/demo.sh --items ...` runs `embed-assets run --home data --items ...`
    run = subprocess.run([sys.executable, "-m", "embed_assets.cli", "run", "--home", "data", "--items", str(corpus),
                          "--text-fields", "title", "--partition-size", str(PARTITION_SIZE), "--no-semantic-ids"],
                         cwd=work, env=_user_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    home = work / "data"
    assert (home / "dagster" / "dagster.yaml").is_file()  # the instance lives in HOME
    assert not list(work.glob(".tmp_dagster_home*"))
    summary = json.loads((home / "reports" / "run_summary.json").read_text())
    assert summary["ok"] and summary["n_partitions"] == len(want)
    assert sorted(p["partition"] for p in load_partitions(Layout.at(home))) == sorted(want)

    # 2. `bash scripts/ui.sh` runs `embed-assets ui --home data`, from the same checkout, with nothing exported
    port, log = ui(home=Path("data"), cwd=work)
    variables = {"key": {"path": ["item_embeddings"]}, "partitions": sorted(want)}
    deadline, data, err = time.monotonic() + 240, None, None
    while time.monotonic() < deadline:
        try:
            data = _graphql(port, QUERY, variables)
            if data.get("data", {}).get("assetNodeOrError", {}).get("__typename") == "AssetNode":
                break
        except OSError as e:  # not serving yet
            err = e
        time.sleep(1)
    assert data and data.get("data"), f"{data or err}\n{log.read_text()[-4000:]}"
    node = data["data"]["assetNodeOrError"]
    assert node["__typename"] == "AssetNode", f"{data}\n{log.read_text()[-4000:]}"

    # every partition the run made is there, materialized, none failed
    assert sorted(node["partitionKeys"]) == sorted(want)
    assert node["partitionStats"] == {"numMaterialized": len(want), "numPartitions": len(want), "numFailed": 0,
                                      "numMaterializing": 0}
    assert sorted(node["assetPartitionStatuses"]["materializedPartitions"]) == sorted(want)
    assert node["assetPartitionStatuses"]["failedPartitions"] == []
    # with the metadata the run recorded, one materialization per partition
    mats = node["assetMaterializations"]
    assert sorted(m["partition"] for m in mats) == sorted(want)
    for m in mats:
        labels = {e["label"] for e in m["metadataEntries"]}
        assert {"rows", "n_encoded", "precision"} <= labels, (m["partition"], labels)
    # the blocking per-partition check passed on each
    checks = data["data"]["assetCheckExecutions"]
    assert sorted(c["partition"] for c in checks) == sorted(want)
    assert {c["status"] for c in checks} == {"SUCCEEDED"}
    # and the rest of the graph the run materialized (semantic IDs were left out)
    materialized = {"/".join(n["assetKey"]["path"]) for n in data["data"]["assetNodes"] if n["assetMaterializations"]}
    assert materialized == {"processed_items", "item_embeddings", "embedding_norms", "faiss_index", "retrieval_report"}
    # the UI loaded the run's settings (HOME/settings.json), not the bundled sample's: the same items, fields and
    # partition size, so a materialization from the UI does what the run did
    res = _graphql(port, RESOURCE, {"sel": {"repositoryLocationName": "embed_assets.definitions",
                                            "repositoryName": "__repository__", "resourceName": "items"}})
    values = {v["key"]: v["value"] for v in res["data"]["topLevelResourceDetailsOrError"]["configuredValues"]}
    assert json.loads(values["paths"]) == [str(corpus.resolve())], values
    assert json.loads(values["text_fields"]) == ["title"] and values["partition_size"] == str(PARTITION_SIZE), values

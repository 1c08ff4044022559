"""item_embeddings through Dagster Pipes (runner subprocess, and the k8s runner's wiring) against the in-process path:
the same shard bytes, catalog rows and metadata; failures that say what went wrong."""

import importlib.util
import json
import os
import shutil
import sys
import types

import dagster as dg
import pytest
import torch

from embed_assets.core import catalog
from embed_assets.core.layout import Layout
from embed_assets.core.shards import read_manifest
from embed_assets.definitions import build_definitions
from embed_assets.resources import EncoderResource
from embed_assets.settings import Settings, k8s_from_env

# The catalog's shard rows, less what differs by HOME or by the moment of writing.
SHARD_COLUMNS = "* EXCLUDE (path, created_at, ingested_at)"
# Vary from run to run (time, memory, this run's HOME path): compared by type only.
VOLATILE = {"items_per_s", "tokens_per_s", "encode_seconds", "seconds", "cpu_seconds", "peak_rss_mb", "path",
            "summary"}  # the summary table shows items/s and seconds too


def _settings(tmp_path, name, corpus, runner="in_process", **k8s):
    # Titles: short texts, so the comparison costs seconds; fp32 on both sides, so "auto" cannot pick differently.
    return Settings(home=str(tmp_path / name), items=[str(corpus)], text_fields=["title"], partition_size=30,
                    precision="fp32", semantic_ids=False, encode_runner=runner, k8s=k8s)


def _defs(s):
    # A small token budget: a partition of titles is encoded in several batches, as a real partition is.
    return build_definitions(s, EncoderResource(precision="fp32", token_budget=128))


def _processed(defs):
    instance = dg.DagsterInstance.ephemeral()
    assert defs.resolve_job_def("process_items_job").execute_in_process(instance=instance).success
    return instance, instance.get_dynamic_partitions("item_partitions")


def _embed(defs, instance, key, raise_on_error=True):
    return defs.resolve_job_def("embed_shards_job").execute_in_process(instance=instance, partition_key=key,
                                                                       raise_on_error=raise_on_error)


def _messages(instance, result):
    return [e.message or "" for e in instance.all_logs(result.run_id)]


def _failure(result):
    [event] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.event_specific_data.error


def test_pipes_subprocess_writes_the_same_shard_as_in_process(tmp_path, small_corpus):
    shard, meta, rows, items = {}, {}, {}, {}
    for name, runner in (("in_process", "in_process"), ("pipes", "subprocess")):
        defs = _defs(_settings(tmp_path, name, small_corpus, runner))
        instance, keys = _processed(defs)
        key = keys[0]
        result = _embed(defs, instance, key)
        assert [(c.check_name, c.passed) for c in result.get_asset_check_evaluations()] == [("shard_norm_check", True)]
        mat = result.asset_materializations_for_node("item_embeddings")[0]
        meta[name] = mat.metadata
        layout = Layout.at(tmp_path / name)
        m = read_manifest(layout, key)
        data = torch.load(layout.shard_pt(key), weights_only=True)
        shard[name] = {"pt": layout.shard_pt(key).read_bytes(), "items": layout.shard_items(key).read_bytes(),
                       "ids": data["item_id"], "vectors": data["embeddings"].numpy().tobytes(),
                       "manifest": {k: v for k, v in json.loads(layout.shard_manifest(key).read_text()).items()
                                    if k != "created_at"}}
        assert (m.shard_sha256, m.fingerprint) == (meta[name]["sha256"].value, meta[name]["fingerprint"].value)
        assert mat.tags["dagster/data_version"] == m.fingerprint  # the data version, as in-process
        rows[name] = catalog.query(layout, f"SELECT {SHARD_COLUMNS} FROM shards ORDER BY partition")
        items[name] = catalog.query(layout, 'SELECT item_id, partition, "row", text_hash FROM items ORDER BY item_id')
        if runner == "subprocess":
            log = _messages(instance, result)
            [opened] = [msg for msg in log if "encoding in an external process" in msg]
            assert f"(pid {os.getpid()}," not in opened  # really another process
            assert any(f"{key}: {m.n_rows} items, 0 re-used from earlier shards, {m.n_rows} to encode" in msg
                       for msg in log)  # the external step's progress reached the run's log through Pipes
            # A second run of the finished partition: the external step finds it current, the orchestrator checks
            # that the catalog holds it; nothing is rewritten.
            before = layout.shard_pt(key).stat().st_mtime_ns
            again = _embed(defs, instance, key).asset_materializations_for_node("item_embeddings")[0].metadata
            assert again["skipped_unchanged"].value is True and again["n_encoded"].value == 0
            assert again["cataloged"].value is True and again["sha256"].value == m.shard_sha256
            assert layout.shard_pt(key).stat().st_mtime_ns == before
            assert {k: type(v) for k, v in again.items()} == {k: type(v) for k, v in meta[name].items()}

    a, b = shard["in_process"], shard["pipes"]
    assert a["ids"] == b["ids"] and len(a["ids"]) > 0
    assert a["vectors"] == b["vectors"]  # the fp16 vectors, byte for byte
    assert a["pt"] == b["pt"] and a["items"] == b["items"]
    assert a["manifest"] == b["manifest"]  # checksums, fingerprint, norms, precision, counts
    assert a["manifest"]["n_encoded"] == len(a["ids"]) and a["manifest"]["precision"] == "fp32"
    assert rows["in_process"] == rows["pipes"] and len(rows["pipes"]) == 1
    assert items["in_process"] == items["pipes"] and len(items["pipes"]) == len(a["ids"])

    ma, mb = meta["in_process"], meta["pipes"]
    assert {k: type(v) for k, v in ma.items()} == {k: type(v) for k, v in mb.items()}
    assert list(ma) == list(mb)  # the same order in the UI
    assert {k: v for k, v in ma.items() if k not in VOLATILE} == {k: v for k, v in mb.items() if k not in VOLATILE}
    assert mb["cataloged"].value is True and mb["path"].value == str(Layout.at(tmp_path / "pipes").shard_pt(key))


def test_bad_input_in_the_external_step_fails_the_step_with_its_message(tmp_path, small_corpus):
    defs = _defs(_settings(tmp_path, "home", small_corpus, "subprocess"))
    instance, keys = _processed(defs)
    layout = Layout.at(tmp_path / "home")
    layout.partition_file(keys[1]).unlink()
    result = _embed(defs, instance, keys[1], raise_on_error=False)
    assert not result.success
    error = _failure(result)
    assert f"partition {keys[1]} does not exist in processed_items" in error.message
    assert str(layout.partition_file(keys[1])) in error.message
    assert not layout.shard_manifest(keys[1]).exists()


class _FakeK8s:
    """dagster_k8s as far as this code uses it, without a cluster: `PipesK8sClient.run` records the pod it was
    asked for and runs its command as a local process (the pod), with the same Pipes extras and env."""

    def __init__(self):
        self.calls = []
        fake = self

        class PipesK8sClient:
            def __init__(self, **kwargs):
                fake.calls.append(("init", kwargs))

            def run(self, *, context, extras, image, command, namespace, env, base_pod_spec):
                fake.calls.append(("run", {"extras": extras, "image": image, "command": command,
                                           "namespace": namespace, "env": env, "base_pod_spec": base_pod_spec}))
                assert command[0] == "python"
                return dg.PipesSubprocessClient().run(context=context, extras=extras, env=env,
                                                      command=[sys.executable, *command[1:]])

        self.module = types.ModuleType("dagster_k8s")
        self.module.PipesK8sClient = PipesK8sClient
        self.module.k8s_job_executor = dg.executor(name="k8s", config_schema=dg.Permissive())(
            lambda init_context: None)


def test_k8s_runner_sends_the_gpu_pod_and_checks_the_shard_is_on_this_home(tmp_path, small_corpus, monkeypatch):
    fake = _FakeK8s()
    monkeypatch.setitem(sys.modules, "dagster_k8s", fake.module)
    # A HOME with the shard already written (in process), and the pod's view of it: a copy at another path.
    defs = _defs(_settings(tmp_path, "home", small_corpus))
    instance, keys = _processed(defs)
    key = keys[2]
    _embed(defs, instance, key)
    shutil.copytree(tmp_path / "home", tmp_path / "pod_home")
    k8s = {"image": "registry.example/embed-assets:1", "namespace": "embed", "gpus": 1, "memory": "16Gi",
           "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, "home_claim": "embed-home",
           "home": str(tmp_path / "pod_home"), "env": {"EMBED_ASSETS_PRECISION_PROBE": "on"}}

    defs = _defs(_settings(tmp_path, "home", small_corpus, "k8s", **k8s))
    result = _embed(defs, instance, key)
    meta = result.asset_materializations_for_node("item_embeddings")[0].metadata
    assert meta["skipped_unchanged"].value is True and meta["cataloged"].value is True
    assert meta["path"].value == str(Layout.at(tmp_path / "home").shard_pt(key))
    [(_, run)] = [c for c in fake.calls if c[0] == "run"]
    assert run["image"] == k8s["image"] and run["namespace"] == "embed" and run["env"] == k8s["env"]
    assert run["command"] == ["python", "-m", "embed_assets.pipes.encode_partition"]
    assert run["extras"]["home"] == k8s["home"] and run["extras"]["encoder"]["precision"] == "fp32"
    assert run["extras"]["encoder"]["token_budget"] == 128
    spec = run["base_pod_spec"]
    [container] = spec["containers"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1", "memory": "16Gi"},
                                      "requests": {"memory": "16Gi"}}
    assert container["volume_mounts"] == [{"name": "embed-assets-home", "mount_path": k8s["home"]}]
    assert spec["volumes"] == [{"name": "embed-assets-home", "persistent_volume_claim": {"claim_name": "embed-home"}}]
    assert spec["node_selector"] == k8s["node_selector"] and spec["restart_policy"] == "Never"

    # The pod wrote (here: found) its shard in a HOME that is not the orchestrator's: the step fails and says so.
    other = _defs(_settings(tmp_path, "other", small_corpus, "k8s", **k8s))
    instance2, _ = _processed(other)
    result = _embed(other, instance2, key, raise_on_error=False)
    assert not result.success
    message = _failure(result).message
    assert "the external encode step reported shard sha256" in message and "another HOME" in message
    assert str(Layout.at(tmp_path / "other").shard_manifest(key)) in message


def test_k8s_settings_shape_the_pod_and_the_k8s_job_executor(tmp_path, monkeypatch):
    from embed_assets.defs.embeddings.pipes import k8s_executor_config, k8s_pod_spec
    from embed_assets.resources import K8sEncodeConfig

    env = {"EMBED_ASSETS_K8S_IMAGE": "img:2", "EMBED_ASSETS_K8S_GPUS": "2",
           "EMBED_ASSETS_K8S_NODE_SELECTOR": "pool=gpu, accelerator=h100",
           "EMBED_ASSETS_K8S_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
           "EMBED_ASSETS_K8S_HOME_CLAIM": "home-rwx"}
    got = k8s_from_env(env)
    assert got == {"image": "img:2", "gpus": 2, "node_selector": {"pool": "gpu", "accelerator": "h100"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "home_claim": "home-rwx"}
    with pytest.raises(ValueError, match="EMBED_ASSETS_K8S_NODE_SELECTOR='pool'"):
        k8s_from_env({"EMBED_ASSETS_K8S_NODE_SELECTOR": "pool"})
    with pytest.raises(ValueError, match="EMBED_ASSETS_K8S_GPUS"):
        k8s_from_env({"EMBED_ASSETS_K8S_GPUS": "one"})

    cfg = K8sEncodeConfig(**got, pod_spec={"priority_class_name": "batch", "containers": [{"name": "encode"}]})
    spec = k8s_pod_spec(cfg, "/data/home")
    assert spec["tolerations"] == got["tolerations"] and spec["priority_class_name"] == "batch"
    assert spec["containers"] == [{"name": "encode"}]  # a list in pod_spec replaces the built one
    cpu = k8s_pod_spec(K8sEncodeConfig(gpus=0), "/h")
    assert cpu == {"containers": [{"name": "encode"}], "restart_policy": "Never"}

    ex = k8s_executor_config(K8sEncodeConfig(**got), "/data/home")
    assert ex == {
        "job_image": "img:2",
        "volumes": [{"name": "embed-assets-home", "persistent_volume_claim": {"claim_name": "home-rwx"}}],
        "volume_mounts": [{"name": "embed-assets-home", "mount_path": "/data/home"}],
        "per_step_k8s_config": {"item_embeddings": {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": "2"}}},
            "pod_spec_config": {"node_selector": {"pool": "gpu", "accelerator": "h100"},
                                "tolerations": got["tolerations"]}}},
    }

    # EMBED_ASSETS_EXECUTOR=k8s_job puts the (here: stand-in) dagster_k8s executor, so configured, on every job.
    fake = _FakeK8s()
    monkeypatch.setitem(sys.modules, "dagster_k8s", fake.module)
    s = Settings(home=str(tmp_path / "home"), items=[], executor="k8s_job", k8s=got)
    job = build_definitions(s).resolve_job_def("embed_shards_job")
    assert job.executor_def.name == "k8s"
    on_this_home = {**ex, "volume_mounts": [{"name": "embed-assets-home", "mount_path": str(tmp_path / "home")}]}
    assert job.executor_def.config_schema.resolve_config({}).value == {"config": on_this_home}
    with pytest.raises(ValueError, match="EMBED_ASSETS_EXECUTOR='celery'"):
        build_definitions(Settings(home=str(tmp_path / "home"), items=[], executor="celery"))


@pytest.mark.skipif(importlib.util.find_spec("dagster_k8s") is not None, reason="dagster-k8s is installed here")
def test_k8s_switches_without_dagster_k8s_say_what_to_install(tmp_path, small_corpus):
    with pytest.raises(ImportError, match=r"EMBED_ASSETS_EXECUTOR=k8s_job needs the "
                                                               r"dagster-k8s package.*pip install dagster-k8s"):
        build_definitions(Settings(home=str(tmp_path / "home"), items=[], executor="k8s_job"))
    defs = _defs(_settings(tmp_path, "home", small_corpus, "k8s", image="img:1"))
    instance, keys = _processed(defs)
    result = _embed(defs, instance, keys[0], raise_on_error=False)
    assert not result.success
    message = _failure(result).message
    assert "encode_compute.runner 'k8s'" in message and "pip install dagster-k8s" in message

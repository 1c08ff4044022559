"""HOME's Dagster instance (embed_assets/instance): where it is, its profile (run queue and encoder pool limits), a
user's DAGSTER_HOME and dagster.yaml winning, and runs of a killed `embed-assets run` releasing their encoder slot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from embed_assets.instance import (CLI_HOST_TAG, CLI_PID_TAG, ENCODER_POOL, PROFILE, cli_run_tags, dagster_home,
                                   ensure_instance, open_instance, release_dead_cli_runs)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_user_dagster_home(monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


@dg.op(pool=ENCODER_POOL)
def encode_step(context) -> dict:
    """What the encoder pool looks like from inside a step of it."""
    info = context.instance.event_log_storage.get_concurrency_info(ENCODER_POOL)
    return {"limit": info.slot_count, "holders": sorted(s.run_id for s in info.claimed_slots)}


@dg.job
def encode_job():
    encode_step()


def test_the_instance_lives_in_home_with_the_shipped_profile(tmp_path):
    home = tmp_path / "home"
    assert dagster_home(home) == home.resolve() / "dagster"
    folder = ensure_instance(home)
    assert folder == home.resolve() / "dagster"
    assert (folder / "dagster.yaml").read_bytes() == PROFILE.read_bytes()
    with open_instance(home) as instance:
        assert not instance.is_ephemeral
        assert Path(instance.root_directory) == folder
        assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
        config = instance.get_concurrency_config()
        assert config.run_queue_config.max_concurrent_runs == 2
        assert config.pool_config.default_pool_limit == 1
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 60
        assert instance.event_log_storage.supports_global_concurrency_limits


def test_the_encoder_pool_has_one_slot_until_the_user_sets_another(tmp_path):
    home = tmp_path / "home"
    with open_instance(home) as instance:
        result = encode_job.execute_in_process(instance=instance)
        assert result.output_for_node("encode_step") == {"limit": 1, "holders": [result.run_id]}
        assert instance.event_log_storage.get_concurrency_info(ENCODER_POOL).claimed_slots == []  # freed
        # `dagster instance concurrency set encoder 2`: a limit of the pool's own wins over the profile's default,
        # and opening the instance again keeps it
        instance.event_log_storage.set_concurrency_slots(ENCODER_POOL, 2)
    with open_instance(home) as instance:
        result = encode_job.execute_in_process(instance=instance)
        assert result.output_for_node("encode_step") == {"limit": 2, "holders": [result.run_id]}


def test_a_users_profile_is_never_overwritten(tmp_path):
    home = tmp_path / "home"
    folder = ensure_instance(home)
    mine = "concurrency:\n  runs:\n    max_concurrent_runs: 5\n"
    (folder / "dagster.yaml").write_text(mine)
    assert ensure_instance(home) == folder
    assert (folder / "dagster.yaml").read_text() == mine
    with open_instance(home) as instance:
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 5
    # a dagster.yml (the other name Dagster reads) counts as the user's profile too
    other = tmp_path / "other"
    (other / "dagster").mkdir(parents=True)
    (other / "dagster" / "dagster.yml").write_text("telemetry:\n  enabled: false\n")
    ensure_instance(other)
    assert not (other / "dagster" / "dagster.yaml").exists()


def test_an_explicit_dagster_home_wins(tmp_path, monkeypatch):
    mine = tmp_path / "my_dagster_home"
    mine.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(mine))
    home = tmp_path / "home"
    assert dagster_home(home) == mine.resolve()
    assert ensure_instance(home) == mine.resolve()
    assert not (home / "dagster").exists()
    assert not (mine / "dagster.yaml").exists()  # the user's folder, the user's profile: nothing written
    with open_instance(home) as instance:
        assert Path(instance.root_directory) == mine.resolve()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="DAGSTER_HOME=.*missing is not a folder"):
        ensure_instance(home)


CRASHING_RUN = r"""
import os, signal, sys
import dagster as dg
from embed_assets.instance import cli_run_tags

@dg.op(pool="encoder")
def encode(context):
    with open(sys.argv[2], "w") as fh:
        fh.write(context.run_id)
    os.kill(os.getpid(), signal.SIGKILL)  # killed while it holds the encoder slot

@dg.job
def job():
    encode()

with dg.DagsterInstance.from_config(sys.argv[1]) as instance:
    job.execute_in_process(instance=instance, tags=cli_run_tags())
"""


def test_the_runs_of_a_killed_cli_release_their_encoder_slot(tmp_path):
    home = tmp_path / "home"
    folder = ensure_instance(home)
    run_id_file = tmp_path / "run_id"
    child = subprocess.run([sys.executable, "-c", CRASHING_RUN, str(folder), str(run_id_file)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-3000:]
    dead = run_id_file.read_text()
    with open_instance(home) as instance:
        assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.STARTED
        info = instance.event_log_storage.get_concurrency_info(ENCODER_POOL)
        assert [s.run_id for s in info.claimed_slots] == [dead]  # held by a process that is gone
        # in progress and left alone: a live CLI (this process) and another machine's run
        live = instance.create_run_for_job(encode_job, tags=cli_run_tags())
        elsewhere = instance.create_run_for_job(encode_job, tags={CLI_HOST_TAG: "another-machine",
                                                                  CLI_PID_TAG: "1"})
        lines = []
        assert release_dead_cli_runs(instance, lines.append) == [dead]
        assert dead in lines[0]
        assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(live.run_id).status == dg.DagsterRunStatus.NOT_STARTED
        assert instance.get_run_by_id(elsewhere.run_id).status == dg.DagsterRunStatus.NOT_STARTED
        assert instance.event_log_storage.get_concurrency_info(ENCODER_POOL).claimed_slots == []
        # the next encoding step gets the slot (before the release it would have waited for ever)
        result = encode_job.execute_in_process(instance=instance)
        assert result.output_for_node("encode_step") == {"limit": 1, "holders": [result.run_id]}
        assert release_dead_cli_runs(instance) == []  # idempotent


def test_dg_check_defs_passes(tmp_path):
    """`dg check defs` in the checkout ([tool.dg] in pyproject.toml) loads the definitions."""
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    out = subprocess.run([str(Path(sys.executable).with_name("dg")), "check", "defs"], cwd=ROOT,
                         env={**os.environ, "DAGSTER_HOME": str(tmp_path)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "All definitions loaded successfully" in out.stdout + out.stderr


def test_every_way_to_start_dagster_names_the_same_code_location():
    """A backfill or a sensor belongs to a code location by name: the daemon of one command must find the location
    another command named. workspace.yaml, the one `embed-assets ui` loads, [tool.dagster], [tool.dg.project] and
    `-m embed_assets.definitions` (whose location is the module's name) all agree."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    import yaml

    from embed_assets.instance import WORKSPACE

    def names(path: Path) -> list[str]:
        return [e["python_module"].get("location_name", e["python_module"]["module_name"])
                for e in yaml.safe_load(path.read_text())["load_from"]]

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    assert names(ROOT / "workspace.yaml") == names(WORKSPACE) == ["embed_assets.definitions"]
    assert tool["dagster"]["code_location_name"] == tool["dg"]["project"]["code_location_name"] == \
        tool["dg"]["project"]["code_location_target_module"] == "embed_assets.definitions"

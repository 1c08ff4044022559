"""The Dagster instance of a HOME: one instance for `embed-assets run`, `embed-assets ui` (`dg dev`) and the daemon.

Without DAGSTER_HOME, `dagster dev` and `dg dev` store everything in a throw-away `.tmp_dagster_home_*` folder in the
current directory, deleted when they exit (dagster/_cli/utils.py: `get_possibly_temporary_instance_for_cli`), and the
CLI used an in-memory instance: the UI never saw what a run did. So by default the instance lives in the HOME it
describes, `HOME/dagster/`, with the profile `dagster.yaml` shipped beside this module (run queue and encoder pool
limits), written once if absent and never overwritten. An explicit DAGSTER_HOME always wins, with whatever profile
the user keeps there.

Cost at 10M items: the instance holds runs and events, not items: the CLI makes one run per partition (50 at 10M
items), each a few hundred events in SQLite, a few MB in all; the UI reads it in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

DAGSTER_DIR = "dagster"
PROFILE = Path(__file__).with_name("dagster.yaml")
WORKSPACE = Path(__file__).with_name("workspace.yaml")
# The pool of the encoding step (item_embeddings); the profile's `pools: default_limit` is its limit.
ENCODER_POOL = "encoder"
# Tags on the CLI's in-process runs: which process ran them, so a later run can tell a run whose process died.
CLI_HOST_TAG = "embed_assets/cli_host"
CLI_PID_TAG = "embed_assets/cli_pid"
CLI_START_TAG = "embed_assets/cli_started"


def _is_uri(home: str | os.PathLike) -> bool:
    return "://" in str(home)


def default_dagster_home(home: str | os.PathLike) -> Path:
    """Where HOME's instance lives when DAGSTER_HOME is not set: HOME/dagster. A HOME on an object store (a URI) has
    its instance on this machine instead (SQLite needs a local disk), in ~/.local/share/embed_assets/dagster/<slug>."""
    if _is_uri(home):
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        slug = hashlib.sha256(str(home).encode()).hexdigest()[:16]
        return (base / "embed_assets" / DAGSTER_DIR / slug).resolve()
    return Path(home).resolve() / DAGSTER_DIR


def user_dagster_home() -> Path | None:
    """DAGSTER_HOME as the user set it (made absolute), or None."""
    value = os.environ.get("DAGSTER_HOME")
    return Path(value).expanduser().resolve() if value else None


def dagster_home(home: str | os.PathLike) -> Path:
    """The instance folder for HOME: $DAGSTER_HOME when set (the user's choice wins), else HOME/dagster."""
    return user_dagster_home() or default_dagster_home(home)


def _init_lock(folder: Path):
    from embed_assets.core.atomic import file_lock

    return file_lock(folder / ".embed_assets_init.lock")


def write_profile(folder: Path) -> bool:
    """Write the shipped dagster.yaml into `folder` unless it already has one (dagster.yaml or dagster.yml): atomic
    (temp file, then a hard link that fails if the name exists), so a user's file is never replaced. True if
    written."""
    from embed_assets.core.atomic import temp_path_for

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "dagster.yaml"
    if target.exists() or (folder / "dagster.yml").exists():
        return False
    tmp = temp_path_for(target)
    try:
        tmp.write_bytes(PROFILE.read_bytes())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def create_storage(instance) -> None:
    """Create the SQLite schemas now, in one process: two processes creating them at once (the webserver and the
    daemon that `dg dev` starts together) can both stamp the schema version, and then nothing loads."""
    instance.get_runs(limit=1)
    instance.all_instigator_state()
    instance.get_dynamic_partitions("item_partitions")
    instance.event_log_storage.get_concurrency_keys()


@contextmanager
def _prepared(home: str | os.PathLike, log: Callable[[str], None] | None) -> Iterator:
    """HOME's instance, opened once with its storage initialized (see `ensure_instance`)."""
    import dagster as dg

    user = user_dagster_home()
    if user is not None:
        if not user.is_dir():
            raise FileNotFoundError(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']} is not a folder: create it, or unset "
                                    f"DAGSTER_HOME to use the instance in HOME ({default_dagster_home(home)})")
        with dg.DagsterInstance.from_config(str(user)) as instance:
            create_storage(instance)
            yield instance
        return
    folder = default_dagster_home(home)
    folder.mkdir(parents=True, exist_ok=True)
    with _init_lock(folder):
        if write_profile(folder) and log:
            log(f"Dagster instance: {folder} (new; profile {folder / 'dagster.yaml'})")
        instance = dg.DagsterInstance.from_config(str(folder))
        try:
            create_storage(instance)
        except BaseException:
            instance.dispose()
            raise
    with instance:
        yield instance


def ensure_instance(home: str | os.PathLike, log: Callable[[str], None] | None = None) -> Path:
    """The instance folder for HOME, ready to open: with DAGSTER_HOME set it must exist (Dagster's own rule) and is
    used as it is; else HOME/dagster is created with the shipped profile if it has none. Either way its storage is
    initialized. Idempotent."""
    with _prepared(home, log) as instance:
        return Path(instance.root_directory)


@contextmanager
def open_instance(home: str | os.PathLike, log: Callable[[str], None] | None = None):
    """HOME's instance (see `ensure_instance`), disposed on exit."""
    with _prepared(home, log) as instance:
        yield instance


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), which tells a pid that was re-used by
    another process; None where there is no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def cli_run_tags() -> dict[str, str]:
    """Tags for a run the CLI executes in its own process (execute_in_process)."""
    tags = {CLI_HOST_TAG: socket.gethostname(), CLI_PID_TAG: str(os.getpid())}
    start = _process_start(os.getpid())
    if start is not None:
        tags[CLI_START_TAG] = start
    return tags


def _cli_process_gone(tags) -> bool:
    if tags.get(CLI_HOST_TAG) != socket.gethostname() or not str(tags.get(CLI_PID_TAG, "")).isdigit():
        return False  # another machine's run, or not the CLI's: not ours to judge
    from embed_assets.core.atomic import process_gone

    pid = int(tags[CLI_PID_TAG])
    if process_gone(pid):
        return True
    started = tags.get(CLI_START_TAG)
    return started is not None and _process_start(pid) not in (None, started)


def release_dead_cli_runs(instance, log: Callable[[str], None] | None = None) -> list[str]:
    """Mark failed the in-progress runs of `embed-assets run` processes on this machine that no longer exist (killed,
    crashed, machine rebooted) and free their pool slots. Without this, a run killed while its encoding step held the
    `encoder` slot would hold it for ever and every later run would wait for it. Returns the run ids released."""
    import dagster as dg

    released = []
    in_progress = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
                   dg.DagsterRunStatus.CANCELING]
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=in_progress)):
        if not _cli_process_gone(run.tags):
            continue
        instance.report_run_failed(run, f"embed-assets run process {run.tags[CLI_PID_TAG]} on "
                                        f"{run.tags[CLI_HOST_TAG]} is gone (killed or crashed); marked failed by "
                                        "the next `embed-assets run`")
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
        if log:
            log(f"released run {run.run_id} ({run.job_name}): its process {run.tags[CLI_PID_TAG]} is gone")
    return released

"""A real, throwaway PostgreSQL server for tests: Debian's binaries, a temporary data directory, a free loopback port.

`scripts/test_deps.sh` (run by `scripts/test.sh`, i.e. CI) installs Debian's `postgresql` package when it is missing;
its binaries live in /usr/lib/postgresql/<major>/bin, not on PATH. PostgreSQL refuses to run as root, so when the
tests run as root the server runs as the `postgres` user (which the package creates), or `nobody`, and its directory
belongs to that user. The server stops in the fixture's teardown, whatever the tests did.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = ("install Debian's `postgresql` package (`apt-get install postgresql`; scripts/test_deps.sh, which "
                "scripts/test.sh runs, does it when run as root)")
SUPERUSER = "embed_assets"  # the cluster's superuser; trust authentication on loopback only


def find_pg_bin() -> Path:
    """The folder holding initdb, pg_ctl and postgres: the one `initdb` on PATH lives in, else the newest
    /usr/lib/postgresql/<major>/bin."""
    candidates = []
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    majors = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1, reverse=True)
    candidates += majors
    for d in candidates:
        if all((d / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return d
    looked = ", ".join(str(c) for c in candidates) or "PATH and /usr/lib/postgresql/*/bin"
    raise RuntimeError(f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found (looked in {looked}): "
                       f"{INSTALL_HINT}")


def _server_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root (PostgreSQL refuses root); None: run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return pw.pw_uid, pw.pw_gid
    raise RuntimeError("running as root, and there is no `postgres` (created by Debian's postgresql package) or "
                       "`nobody` user to run the PostgreSQL server as: " + INSTALL_HINT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    bin_dir: Path
    base: Path  # owned by the server's user: data/, the unix socket, server.log
    port: int = 0
    host: str = "127.0.0.1"
    user: str = SUPERUSER

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        as_user = _server_user()
        kw = {} if as_user is None else {"user": as_user[0], "group": as_user[1], "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], cwd=self.base, env=env, capture_output=True,
                              text=True, timeout=timeout, **kw)

    def start(self) -> "PostgresServer":
        out = self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                        "--locale=C", "--no-sync")
        if out.returncode:
            raise RuntimeError(f"initdb failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        for _ in range(3):  # a free port can be taken by someone else before the server binds it: try another
            self.port = _free_port()
            opts = (f"-h {self.host} -p {self.port} -k {self.base} -F -c shared_buffers=32MB -c max_connections=60 "
                    "-c log_min_messages=warning")
            out = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start")
            if out.returncode == 0:
                return self
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "could not bind" not in log and "already in use" not in log:
                break
        raise RuntimeError(f"PostgreSQL did not start ({out.returncode}):\n{out.stdout}\n{out.stderr}\n{log[-3000:]}")

    def stop(self) -> None:
        if not (self.data / "postmaster.pid").exists():
            return
        if self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop").returncode:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=dbname)

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its name."""
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name


def start_postgres() -> PostgresServer:
    """Start a server in a new temporary folder (outside pytest's tmp tree, which the server's user cannot enter)."""
    bin_dir = find_pg_bin()
    as_user = _server_user()
    base = Path(tempfile.mkdtemp(prefix="embed_assets_pg_"))
    if as_user is not None:
        os.chown(base, *as_user)
    server = PostgresServer(bin_dir=bin_dir, base=base)
    try:
        return server.start()
    except BaseException:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server per test session (tests each create their own database); stopped and removed in
    teardown, also when a test fails. Fails (never skips) without the binaries: CI installs them."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)

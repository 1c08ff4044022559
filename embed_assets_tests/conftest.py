"""Shared fixtures. Tests use the bundled SciFact sample or data they make, never ../shared."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embed_assets.settings import SAMPLE_CORPUS, SAMPLE_QRELS, SAMPLE_QUERIES, Settings


def pytest_configure(config):
    """The precision probe's verdict cache lives in this session's temp folder (inherited by every process a test
    starts), so each test session probes the machine it runs on rather than trusting a user's cache."""
    import tempfile

    if "EMBED_ASSETS_PRECISION_PROBE_CACHE" not in os.environ:
        probe_dir = tempfile.mkdtemp(prefix="embed_assets_probe_")
        config._embed_assets_probe_dir = probe_dir
        os.environ["EMBED_ASSETS_PRECISION_PROBE_CACHE"] = str(Path(probe_dir) / "precision_probe.json")


def pytest_unconfigure(config):
    """The probe folder this session made goes with it (one was left in /tmp per test session)."""
    import shutil

    probe_dir = getattr(config, "_embed_assets_probe_dir", None)
    if probe_dir:
        shutil.rmtree(probe_dir, ignore_errors=True)
        os.environ.pop("EMBED_ASSETS_PRECISION_PROBE_CACHE", None)


def sample_docs(n: int, start: int = 0) -> list[dict]:
    out = []
    with gzip.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= start + n:
                break
            if i >= start:
                out.append(json.loads(line))
    return out


def expected_partitions(ids: list[str], partition_size: int) -> dict[str, list[str]]:
    """{partition key: its ids, sorted} that a first processed_items run makes of these distinct ids, from the
    partitioning rule alone (initial depth from the count, splits past 1.25 x the size, id-hash prefixes): an oracle
    independent of the ingest code."""
    from embed_assets.core.partitioning import full_level, id_hash, initial_depth, split_overfull

    hashes = {i: id_hash(i) for i in ids}
    leaves, _ = split_overfull(full_level(initial_depth(len(hashes), partition_size)),
                               lambda leaf: sum(leaf.holds(h) for h in hashes.values()), partition_size)
    out = {leaf.key: sorted(i for i, h in hashes.items() if leaf.holds(h)) for leaf in leaves}
    return {k: v for k, v in out.items() if v}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def encoder():
    """One real all-MiniLM-L6-v2 encoder per test session (the model loads once)."""
    from embed_assets.core.encoder import Encoder

    return Encoder()


@pytest.fixture(scope="session")
def encoder32():
    """The same encoder forced to fp32, for exact comparisons (auto may pick bf16 autocast on this CPU)."""
    from embed_assets.core.encoder import Encoder

    return Encoder(precision="fp32")


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """120 real SciFact documents: with a partition size of 30, the four 2-bit hash prefixes p00..p11 (26 to 34
    items each; `expected_partitions` derives them)."""
    return write_jsonl(tmp_path / "raw" / "corpus.jsonl", sample_docs(120))


@pytest.fixture
def settings(tmp_path: Path, small_corpus: Path) -> Settings:
    return Settings(home=str(tmp_path / "home"), items=[str(small_corpus)], partition_size=30,
                    queries=str(SAMPLE_QUERIES), qrels=str(SAMPLE_QRELS), min_recall_at_100=0.0)


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def run_cli(args: list[str], cwd: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """`embed-assets ARGS` in a fresh process, as a user runs it (optionally told to SIGKILL itself at a point)."""
    env = {k: v for k, v in os.environ.items() if k != "EMBED_ASSETS_CRASH_AT"}
    if crash_at:
        env["EMBED_ASSETS_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "embed_assets.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


class CountingEncoder:
    """The real encoder, recording the texts it is given (what a cache saved it from encoding). `version` replaces
    the embedding version it reports (another model, as far as a cache can tell)."""

    def __init__(self, encoder, version: dict | None = None):
        self.encoder, self.texts = encoder, []
        self.version = version or encoder.version

    def encode(self, texts):
        self.texts += list(texts)
        return self.encoder.encode(texts)


def embed_catalog(layout, corpus: Path, encoder, partition_size: int) -> None:
    """processed_items (titles as the text) and every partition's shard, through the core functions."""
    from embed_assets.core.embed import embed_partition
    from embed_assets.core.items import load_partitions, process_items

    process_items(layout, [corpus], "_id", ["title"], partition_size)
    for p in load_partitions(layout):
        embed_partition(layout, p["partition"], encoder)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3-compatible server (moto in server mode, on loopback, a free port) for this test session, with the
    standard AWS variables pointing at it (as a user would point them at MinIO or S3); stopped at the end. Tests
    create their own bucket (`new_bucket`)."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def new_bucket(s3_endpoint) -> str:
    """A fresh bucket on the session's S3 server: `s3://<bucket>`."""
    import uuid

    import boto3

    name = f"embed-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"

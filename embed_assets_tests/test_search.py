"""The query side, end to end: a HOME built by the real pipeline (real model, real FAISS), searched through the
Python API, the CLI and the HTTP server on loopback; bad requests; an index rebuilt under a running server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from embed_assets.cli import run_pipeline
from embed_assets.core.index import load_index, save_index
from embed_assets.core.layout import Layout
from embed_assets.core.search import MAX_K, MAX_QUERY_CHARS, NoIndex, QueryError, Searcher, TTLCache, UnknownItem
from embed_assets.core.text import clean_text
from embed_assets.settings import Settings
from embed_assets_tests.conftest import sample_docs, write_jsonl

CLI = [sys.executable, "-m", "embed_assets.cli"]
N_DOCS, N_NEW = 200, 12


class Built:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.docs = sample_docs(N_DOCS)
        self.corpus = write_jsonl(tmp / "raw" / "c.jsonl", self.docs)
        self.settings = Settings(home=str(tmp / "home"), items=[str(self.corpus)], partition_size=100,
                                 min_recall_at_100=0.0, semantic_ids=False)
        self.home = Path(self.settings.home)

    def run(self) -> dict:
        code, summary = run_pipeline(self.settings, log=lambda *_: None)
        assert code == 0, summary.get("failures")
        return summary


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """One HOME for the module, built by the real pipeline over 200 SciFact documents (2 partitions)."""
    b = Built(tmp_path_factory.mktemp("search"))
    b.run()
    return b


@pytest.fixture(scope="module")
def searcher(built) -> Searcher:
    return Searcher(built.home)


def _title(doc) -> str:
    return clean_text(doc["title"])


# -- Python API ---------------------------------------------------------------------------------------------------

def test_search_finds_each_item_by_its_own_title(built, searcher):
    for doc in built.docs[:8]:
        hits = searcher.search(doc["title"], k=5)
        assert len(hits) == 5
        assert hits[0].item_id == doc["_id"] and hits[0].title == _title(doc)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and scores[0] <= 1.0 + 1e-4
    # the query vector is cached: the same text again is a cache hit and gives the same answer
    hits_before = searcher.cache.hits
    assert searcher.search(built.docs[0]["title"], k=5) == searcher.search(built.docs[0]["title"], k=5)
    assert searcher.cache.hits >= hits_before + 2
    # k larger than the catalog gives the whole catalog
    assert len(searcher.search("cells", k=MAX_K)) == N_DOCS


def test_similar_uses_the_stored_vector_and_leaves_the_item_out(built, searcher):
    index, ids, _ = load_index(Layout.at(built.home))
    item = built.docs[3]["_id"]
    hits = searcher.similar(item, k=7)
    assert len(hits) == 7 and item not in [h.item_id for h in hits]
    # the same as brute force over the stored vectors, the item itself removed
    vecs = index.reconstruct_n(0, index.ntotal)
    row = list(ids).index(item)
    scores = vecs @ vecs[row]
    scores[row] = -np.inf
    want = [ids[int(r)] for r in np.argsort(-scores, kind="stable")[:7]]
    assert [h.item_id for h in hits] == want
    np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:7], atol=1e-5)


def test_bad_queries_are_refused_with_what_to_fix(searcher):
    for text, words in [("", "empty"), ("  \t\n ", "empty"), ("x" * (MAX_QUERY_CHARS + 1), "limit is 2,000")]:
        with pytest.raises(QueryError, match=words):
            searcher.search(text, k=5)
    for k in (0, -1, MAX_K + 1, 100_000, 2.5, "3"):
        with pytest.raises(QueryError, match="k must be"):
            searcher.search("cells", k=k)
    with pytest.raises(UnknownItem, match="not in the current index"):
        searcher.similar("no-such-item", k=5)
    assert searcher.search("x" * MAX_QUERY_CHARS, k=1)  # the limit itself is fine


def test_swap_to_a_new_index_and_refuse_another_embedding_version(built, tmp_path):
    """A second HOME holding a copy of the index: a rebuilt index is swapped in; one built with another embedding
    version is refused and the old one keeps serving; a query that took the old index finishes on it."""
    layout = Layout.at(tmp_path / "h2")
    shutil.copytree(built.home / "index", layout.index_root, symlinks=True)
    s = Searcher(layout.home)
    old = s.current()
    assert old.n_items == N_DOCS and s.refresh() is False  # nothing changed: one stat

    index, ids, manifest = load_index(layout)
    meta = {k: v for k, v in manifest.items() if k not in ("n_items", "created_at")}
    drop = ids[0]
    index.remove_ids(np.array([0], dtype=np.int64))
    bad_version = {**manifest["version"], "model_revision": "another-model"}
    save_index(layout, index, ids[1:], {**meta, "version": bad_version})
    assert s.refresh() is False
    assert "embedding version" in s.last_error and "another-model" in s.last_error
    assert s.current() is old and s.n_rejected == 1
    assert s.refresh() is False  # a refused version is not read again until the manifest changes

    save_index(layout, index, ids[1:], meta)
    assert s.refresh() is True
    new = s.current()
    assert new is not old and new.n_items == N_DOCS - 1 and s.last_error is None and s.n_swaps == 1
    assert old.n_items == N_DOCS and old.row_of(drop) == 0  # what an in-flight query holds is untouched
    assert new.row_of(drop) is None
    with pytest.raises(UnknownItem):
        s.similar(drop, 3)

    # a HOME with no index: a clear NoIndex, not a crash
    with pytest.raises(NoIndex, match="no index yet"):
        Searcher(tmp_path / "empty").search("cells", 3)


def test_ivf_index_with_holes_left_by_removals(tmp_path):
    """Labels are positions in the id map: an IVF index updated in place by removal keeps its labels and leaves null
    ids behind (hashtable direct map, so stored vectors are still found by label). Searches and similar-item queries
    never return a hole, and a removed item is unknown."""
    import faiss
    import pyarrow as pa

    from embed_assets.core.index import ItemIds

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    quantizer = faiss.IndexFlatIP(384)
    index = faiss.IndexIVFFlat(quantizer, 384, 4, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.add_with_ids(x, np.arange(400, dtype=np.int64))
    index.nprobe = 4  # all lists: exact
    gone = np.arange(0, 400, 3, dtype=np.int64)
    index.remove_ids(faiss.IDSelectorArray(len(gone), faiss.swig_ptr(gone)))
    ids = [None if i % 3 == 0 else f"item-{i}" for i in range(400)]
    version = {"model_id": "test", "model_revision": "r"}
    layout = Layout.at(tmp_path / "h")
    save_index(layout, index, ItemIds(pa.array(ids, pa.string())), {"kind": "ivf", "version": version})

    class FixedEncoder:  # the query "text" is the vector of item-1
        def encode(self, texts):
            return x[1:2].copy(), None

    FixedEncoder.version = version
    s = Searcher(layout.home, encoder=FixedEncoder(), titles=False, threads=None)
    assert s.current().n_items == 400 - len(gone)
    hits = s.search("anything", k=MAX_K)
    assert len(hits) == 400 - len(gone) and hits[0].item_id == "item-1"
    assert all(h.item_id is not None and int(h.item_id.split("-")[1]) % 3 for h in hits)
    near = s.similar("item-1", k=5)
    assert [h.item_id for h in near] == [h.item_id for h in hits[1:6]]
    with pytest.raises(UnknownItem):
        s.similar("item-0", k=5)


def test_ttl_cache_expires_and_stays_bounded():
    now = [0.0]
    c = TTLCache(maxsize=2, ttl_s=10, clock=lambda: now[0])
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1
    c.put("c", 3)  # evicts the least recently used: b
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3 and len(c) == 2
    now[0] = 10.5
    assert c.get("a") is None and c.get("c") is None
    off = TTLCache(maxsize=10, ttl_s=0)
    off.put("a", 1)
    assert off.get("a") is None


# -- CLI ------------------------------------------------------------------------------------------------------------

def test_cli_search_json(built):
    doc = built.docs[11]
    out = subprocess.run(CLI + ["search", doc["title"], "-k", "3", "--home", str(built.home), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    hits = json.loads(out.stdout)
    assert [set(h) for h in hits] == [{"item_id", "score", "title"}] * 3
    assert hits[0]["item_id"] == doc["_id"] and hits[0]["title"] == _title(doc)

    bad = subprocess.run(CLI + ["search", "   ", "--home", str(built.home)], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "error: the query is empty" in bad.stderr


# -- HTTP -----------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`embed-assets serve` in a subprocess on a free loopback port."""

    def __init__(self, home: Path, log_path: Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            CLI + ["serve", "--home", str(home), "--port", str(self.port), "--reload-check-s", "0.2"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not answer /healthz in 180 s:\n{self.log()}")
            time.sleep(0.3)

    def get(self, path: str, timeout: float = 30) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                status, body, ctype = r.status, r.read().decode("utf-8"), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, body, ctype = e.code, e.read().decode("utf-8"), e.headers.get("content-type", "")
        return status, (json.loads(body) if ctype.startswith("application/json") else body)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    srv = Server(built.home, tmp_path_factory.mktemp("serve") / "serve.log")
    yield srv
    srv.stop()


def _q(text: str, k: int | str = 5) -> str:
    return "/search?" + urllib.parse.urlencode({"q": text, "k": k})


def test_http_search_similar_healthz_metrics(built, server):
    doc = built.docs[20]
    status, body = server.get(_q(doc["title"], 4))
    assert status == 200, body
    assert body["hits"][0]["item_id"] == doc["_id"] and body["hits"][0]["title"] == _title(doc)
    assert len(body["hits"]) == 4 and set(body["hits"][0]) == {"item_id", "score", "title"}

    status, body = server.get(f"/items/{urllib.parse.quote(doc['_id'], safe='')}/similar?k=6")
    assert status == 200 and len(body["hits"]) == 6 and doc["_id"] not in [h["item_id"] for h in body["hits"]]

    status, health = server.get("/healthz")
    _, _, manifest = load_index(Layout.at(built.home))
    assert status == 200 and health["status"] == "ok" and health["n_items"] == N_DOCS
    assert health["index_sha256"] == manifest["index_sha256"][:12]
    assert health["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert health["model_revision"] == manifest["version"]["model_revision"]

    status, text = server.get("/metrics")
    assert status == 200
    for name in ('embed_assets_http_requests_total{endpoint="/search",method="GET",status="200"}',
                 'embed_assets_http_requests_total{endpoint="/items/{item_id}/similar",method="GET",status="200"}',
                 'embed_assets_http_request_seconds_bucket{endpoint="/search",le="0.1"}',
                 'embed_assets_search_seconds_count{endpoint="/search"}',
                 "embed_assets_query_cache_total", "embed_assets_index_items 200.0"):
        assert name in text, name


def test_http_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(built, server):
    unknown = urllib.parse.quote("no such item", safe="")
    cases = [
        ("/search?q=&k=5", 422, "empty"),
        ("/search?k=5", 422, "?q="),
        (_q("a" * 10_000), 422, "limit is 2,000"),
        (_q("cells", 0), 422, "k must be from 1 to 1000"),
        (_q("cells", 100_000), 422, "k must be from 1 to 1000"),
        (_q("cells", "ten"), 422, "k: "),
        (f"/items/{unknown}/similar?k=5", 404, "not in the current index"),
        (f"/items/{built.docs[0]['_id']}/similar?k=0", 422, "k must be"),
        ("/items//similar", 422, "item id"),
        ("/items/x/similar/more", 404, "not found"),
        ("/nothing/here", 404, "not found"),
    ]
    for path, want, words in cases:
        status, body = server.get(path)
        assert status == want and isinstance(body, dict) and words in body["error"], (path, status, body)
    # not even HTTP: uvicorn answers 400 itself
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert b"400" in s.recv(1000).split(b"\r\n")[0]
    # ... and the server still answers a good request, and counted the refusals
    doc = built.docs[1]
    status, body = server.get(_q(doc["title"], 1))
    assert status == 200 and body["hits"][0]["item_id"] == doc["_id"]
    _, text = server.get("/metrics")
    assert 'embed_assets_http_requests_total{endpoint="/search",method="GET",status="422"}' in text
    assert 'embed_assets_http_requests_total{endpoint="unmatched",method="GET",status="404"}' in text


def test_hot_swap_under_load_drops_no_request(built, server):
    """Clients query in a loop while the catalog grows and the pipeline rebuilds the index: every request
    succeeds, answers come from the old index then the new one, and the new items are found after the swap."""
    _, before = server.get("/healthz")
    new_docs = sample_docs(N_NEW, start=N_DOCS)
    probe = new_docs[0]
    errors: list[str] = []
    seen: list[str] = []
    stop = threading.Event()

    def client(n: int):
        paths = [_q(probe["title"], 3), _q(built.docs[n]["title"], 3), "/healthz",
                 f"/items/{built.docs[n + 1]['_id']}/similar?k=3"]
        i = 0
        while not stop.is_set():
            path = paths[i % len(paths)]
            i += 1
            try:
                status, body = server.get(path)
            except Exception as e:  # a dropped connection, a timeout: the test fails on any
                errors.append(f"{path}: {type(e).__name__}: {e}")
                continue
            if status != 200:
                errors.append(f"{path}: {status} {body}")
            elif "hits" in body:
                seen.append(body["index_sha256"])

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        write_jsonl(built.corpus, built.docs + new_docs)
        summary = built.run()
        assert summary["n_items"] == N_DOCS + N_NEW and summary["n_encoded"] == N_NEW
        _, _, manifest = load_index(Layout.at(built.home))
        new_sha = manifest["index_sha256"][:12]
        assert new_sha != before["index_sha256"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not seen or seen[-1] != new_sha):
            time.sleep(0.1)
        time.sleep(0.5)  # a little traffic on the new index too
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:5]
    assert seen[0] == before["index_sha256"] and seen[-1] == new_sha, (seen[:3], seen[-3:])
    assert len(seen) > 20

    status, health = server.get("/healthz")
    assert status == 200 and health["index_sha256"] == new_sha and health["n_items"] == N_DOCS + N_NEW
    assert health["n_swaps"] >= 1 and health["last_error"] is None
    status, body = server.get(_q(probe["title"], 3))
    assert status == 200 and body["hits"][0]["item_id"] == probe["_id"], body
    assert body["hits"][0]["title"] == _title(probe)
    status, body = server.get(f"/items/{urllib.parse.quote(probe['_id'], safe='')}/similar?k=3")
    assert status == 200 and len(body["hits"]) == 3
    _, text = server.get("/metrics")
    assert f"embed_assets_index_items {N_DOCS + N_NEW}.0" in text
    assert "embed_assets_index_swaps_total 0.0" not in text

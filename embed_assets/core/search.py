"""Query side: nearest items to a text, or to an item, over the current FAISS index (the CLI and the server use it).

    from embed_assets.core.search import Searcher
    s = Searcher("data")                 # loads the current index; the model loads on the first query
    s.search("red cotton t-shirt", k=10)  # [Hit(item_id, score, title), ...], best first
    s.similar("4983", k=10)              # the item's stored vector; the item itself left out
    s.refresh()                          # pick up a newer index, if one was built (True when it swapped)

- **Which index is current** is decided in one place, `load_current_index` (with its cheap change signal,
  `current_index_stamp`): today `HOME/index/manifest.json`, which each build replaces atomically and which names the
  index and id files by sha256. If the index moves to versioned folders with a `current` pointer, only those two
  functions change.
- **Swaps never drop a request.** A new index is loaded beside the old one (on `refresh()`, which the server calls
  from a background thread at most every `reload_check_s`), then one reference is replaced. A query takes that
  reference once, at its start, and uses that object (index, ids, titles) to the end, so in-flight queries finish on
  the index they started with. A new index whose embedding version (model id and revision, max tokens, chunking)
  differs from the query encoder's is refused, logged, and the old one keeps serving; so is one that fails its
  checksums (a build in progress), which is tried again later.
- **Query vectors are cached** for a short window (`cache_ttl_s`, 300 s; at most `cache_size` texts, 10,000): a
  popular query is encoded once per window. Results are not cached (they depend on the index).
- **Bounds** (`QueryError`, which the server answers with 422): a query is 1 to `MAX_QUERY_CHARS` characters after
  the pipeline's own cleaning (control characters removed, whitespace collapsed); k is 1 to `MAX_K`.

Dagster-free; torch and faiss load inside functions (via the encoder and `load_index`), never at import.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from embed_assets.core.index import IndexBuildError, ItemIds, load_index, read_index_manifest
from embed_assets.core.layout import Layout
from embed_assets.core.text import clean_text

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 2_000  # longer texts are refused; the model reads only its first 256 tokens anyway
MAX_K = 1_000
DEFAULT_K = 10
DEFAULT_CACHE_TTL_S = 300.0
DEFAULT_CACHE_SIZE = 10_000
SHA_PREFIX = 12  # how much of the index sha256 /healthz and the logs show


class QueryError(ValueError):
    """A query the searcher refuses (empty, too long, k out of bounds): the caller's to fix (HTTP 422)."""


class UnknownItem(KeyError):
    """`similar` was asked about an item id the current index does not hold (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "unknown item"


class NoIndex(RuntimeError):
    """No usable index under HOME yet (none built, or none that passes its checks): HTTP 503."""


@dataclass(frozen=True)
class Hit:
    """One result: the item's id, its cosine similarity to the query (inner product of unit vectors) and its title
    (empty when the item has none, or the processed items no longer list it)."""

    item_id: str
    score: float
    title: str

    def as_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "score": self.score, "title": self.title}


@dataclass(frozen=True)
class Result:
    """What a query returned: the hits, the seconds spent encoding and searching (titles and the wait for the encoder
    not included: what the server's search histogram records), the index that answered (the one the query took at
    its start) and the seconds it waited for the encoder (busy with other queries: one encode at a time)."""

    hits: list[Hit]
    seconds: float
    index: "LoadedIndex"
    encoder_wait_seconds: float = 0.0


# -- which index is current -------------------------------------------------------------------------------------

def current_index_stamp(layout: Layout) -> tuple | None:
    """A cheap signal that the current index may have changed: the stat of the file that names it (today
    `index/manifest.json`, replaced by rename on every build, so a new build means a new inode and mtime). None when
    there is none. Costs one stat; `load_current_index` decides whether the contents really changed."""
    try:
        st = os.stat(layout.index_manifest)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass
class LoadedIndex:
    """One loaded version of the index, never changed once built (a newer index is another object): the FAISS index,
    its row -> item id map and its manifest. Queries hold on to one of these for their whole life."""

    index: Any
    ids: ItemIds
    manifest: dict[str, Any]
    stamp: tuple | None
    loaded_at: float = field(default_factory=time.time)
    titles: "TTLCache | None" = field(default=None, repr=False)  # item_id -> title, for this index's lifetime
    _rows: dict[str, int] | None = field(default=None, repr=False)
    _rows_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sha256(self) -> str:
        return str(self.manifest.get("index_sha256", ""))

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the contents: the index file's and the id map's checksums."""
        return (self.sha256, str(self.manifest.get("ids_sha256", "")))

    @property
    def version(self) -> dict[str, Any]:
        return self.manifest.get("version") or {}

    @property
    def n_items(self) -> int:
        return int(self.index.ntotal)

    def row_of(self, item_id: str) -> int | None:
        """The item's row, or None. The id -> row dict is built on the first call (memory grows with the catalog), so
        an index that only answers text queries never pays for it."""
        if self._rows is None:
            with self._rows_lock:
                if self._rows is None:
                    self._rows = {item: row for row, item in enumerate(self.ids.arrow.to_pylist())
                                  if item is not None}
        return self._rows.get(item_id)

    def describe(self) -> dict[str, Any]:
        v = self.version
        return {"n_items": self.n_items, "model_id": v.get("model_id"), "model_revision": v.get("model_revision"),
                "index_sha256": self.sha256[:SHA_PREFIX], "index_kind": self.manifest.get("kind"),
                "index_created_at": self.manifest.get("created_at"), "loaded_at": self.loaded_at}


def load_current_index(layout: Layout, loaded: LoadedIndex | None = None) -> LoadedIndex:
    """THE place that knows which index is current and how to load it. Returns `loaded` itself when the current
    index is the same one (same checksums: a rebuild that changed nothing, or a touched manifest), else the new one,
    every file checked against the manifest. Raises `NoIndex` when there is none or it fails its checks (e.g. a
    build is replacing the files right now: try again later)."""
    stamp = current_index_stamp(layout)
    try:
        if loaded is not None:
            m = read_index_manifest(layout)
            if (str(m.get("index_sha256", "")), str(m.get("ids_sha256", ""))) == loaded.key:
                loaded.stamp = stamp  # same contents: nothing to load
                return loaded
        index, ids, manifest = load_index(layout)
    except IndexBuildError as e:
        raise NoIndex(str(e)) from e
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # faiss raises RuntimeError on a damaged file
        raise NoIndex(f"{layout.index_dir}: could not load the index ({type(e).__name__}: {e}); re-materialize "
                      "faiss_index (embed-assets run)") from e
    # Labels are positions in the id map. A flat index holds every position; an index updated in place by removal
    # may leave holes (null ids, never returned by a search), so the map can be longer than the index, never shorter.
    if len(ids) < int(index.ntotal):
        raise NoIndex(f"{layout.index_dir}: the index holds {index.ntotal} vectors but its id map only {len(ids)}; "
                      "re-materialize faiss_index")
    return LoadedIndex(index=index, ids=ids, manifest=manifest, stamp=stamp)


# -- query vector cache -----------------------------------------------------------------------------------------

class TTLCache:
    """A small thread-safe LRU whose entries expire `ttl_s` seconds after they were stored (cachetools is not a
    dependency of this project; this is its TTLCache in 30 lines). `ttl_s <= 0` or `maxsize <= 0` disables it."""

    def __init__(self, maxsize: int = DEFAULT_CACHE_SIZE, ttl_s: float = DEFAULT_CACHE_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.maxsize, self.ttl_s, self.clock = int(maxsize), float(ttl_s), clock
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            entry = self._data.get(key)
            if entry is not None and entry[0] > self.clock():
                self._data.move_to_end(key)
                self.hits += 1
                return entry[1]
            if entry is not None:
                del self._data[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        if self.ttl_s <= 0 or self.maxsize <= 0:
            return
        with self._lock:
            self._data[key] = (self.clock() + self.ttl_s, value)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


# -- the searcher -----------------------------------------------------------------------------------------------

def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise QueryError(f"k must be an integer from 1 to {MAX_K} (got {k!r})")
    if not 1 <= int(k) <= MAX_K:
        raise QueryError(f"k must be from 1 to {MAX_K} (got {k})")
    return int(k)


def check_query(text) -> str:
    """The query as the pipeline cleans item texts (so an item's own title finds it), or QueryError."""
    if not isinstance(text, str):
        raise QueryError(f"the query must be a string (got {type(text).__name__})")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(text):,} characters; the limit is {MAX_QUERY_CHARS:,} (the model reads "
                         "its first 256 tokens only): shorten it")
    cleaned = clean_text(text)
    if not cleaned:
        raise QueryError("the query is empty: give some text to search for")
    return cleaned


class Searcher:
    """Nearest items over the current index of a HOME: `search(text, k)`, `similar(item_id, k)`, `refresh()`.

    Thread-safe: any number of threads may query while another calls `refresh()` (see the module docstring for how
    swaps work). `encoder` defaults to the platform's `Encoder()` (all-MiniLM-L6-v2, precision auto); the model loads
    on the first text query. The index loads on the first call that needs it, or on `refresh()`.

    `threads` (default 1) is the torch and FAISS thread count of this process (both are process-wide settings;
    None leaves them alone). One query is a few dozen tokens and one vector, too small to split: measured on this
    project's 2-core AMD EPYC while another job kept it busy (2026-11-24), `Encoder(num_threads=1).encode([title])`
    took 5-9 ms and 2 threads 470-780 ms; FAISS `IndexFlatIP` search of one query over 200,000 vectors took 10-12 ms
    with 1 OpenMP thread and 28-36 ms with 2 (the threads wait for each other on busy cores). Concurrency comes from
    serving requests in parallel, not from splitting one query."""

    def __init__(self, home: str | os.PathLike, encoder=None, cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
                 cache_size: int = DEFAULT_CACHE_SIZE, titles: bool = True, threads: int | None = 1):
        self.layout = Layout.at(home)
        self._encoder = encoder
        self.threads = threads
        self._threads_set = False
        self._encoder_lock = threading.Lock()  # one encode at a time: the model's own threads use the cores
        self._refresh_lock = threading.Lock()
        self._current: LoadedIndex | None = None
        self.cache = TTLCache(cache_size, cache_ttl_s)
        self.titles = titles
        self.last_error: str | None = None  # why the last refresh kept the old index (or has none)
        self.n_swaps = 0
        self.n_rejected = 0
        self._rejected_stamp: tuple | None = None  # a refused version: not re-read until the manifest changes
        self._failed_stamp: tuple | None = None  # an unreadable index: retried with back-off while it stays the same
        self._retry_at = 0.0
        self._retry_wait_s = 0.0
        self.on_swap: Callable[[LoadedIndex | None, LoadedIndex], None] | None = None
        self.on_reject: Callable[[str, str], None] | None = None  # (reason, message)

    # -- encoder ------------------------------------------------------------------------------------------------
    @property
    def encoder(self):
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    from embed_assets.core.encoder import Encoder

                    self._encoder = Encoder(num_threads=self.threads)
        return self._encoder

    def encode_query(self, text: str) -> np.ndarray:
        """The query's unit vector (1 x dim, float32), from the cache when it was encoded within the TTL."""
        return self._encode_timed(text)[0]

    def _encode_timed(self, text: str) -> tuple[np.ndarray, float]:
        """(vector, seconds spent waiting for the encoder, which encodes one query at a time)."""
        vec = self.cache.get(text)
        wait = 0.0
        if vec is None:
            enc = self.encoder
            t0 = time.perf_counter()
            with self._encoder_lock:
                wait = time.perf_counter() - t0
                vec = np.ascontiguousarray(enc.encode([text])[0], dtype=np.float32)
            self.cache.put(text, vec)
        return vec, wait

    # -- the current index --------------------------------------------------------------------------------------
    @property
    def served(self) -> LoadedIndex | None:
        """The index queries use now, or None if none is loaded yet (never loads anything)."""
        return self._current

    def current(self) -> LoadedIndex:
        """The index queries use now (loaded on first use). Raises NoIndex when none could be loaded."""
        cur = self._current
        if cur is None:
            self.refresh()
            cur = self._current
            if cur is None:
                raise NoIndex(self.last_error or f"{self.layout.index_dir}: no index")
        return cur

    def refresh(self, force: bool = False) -> bool:
        """Swap to the current index on disk if it is another one and usable; True when it swapped. Cheap when
        nothing changed (one stat). A refused or unreadable index leaves the old one serving and sets `last_error`;
        an unreadable one is retried with back-off (1 s doubling to 60 s), a refused version only once it changes."""
        stamp = current_index_stamp(self.layout)
        cur = self._current
        if not force and cur is not None and stamp == cur.stamp:
            return False
        if not force and stamp is not None and stamp == self._rejected_stamp:
            return False
        if not force and stamp == self._failed_stamp and time.monotonic() < self._retry_at:
            return False
        with self._refresh_lock:
            self._set_threads()
            cur = self._current
            if not force and cur is not None and current_index_stamp(self.layout) == cur.stamp:
                return False  # another thread just did it
            try:
                new = load_current_index(self.layout, cur)
            except NoIndex as e:
                if stamp != self._failed_stamp:
                    self._failed_stamp, self._retry_wait_s = stamp, 0.0
                self._retry_wait_s = min(max(2 * self._retry_wait_s, 1.0), 60.0)
                self._retry_at = time.monotonic() + self._retry_wait_s
                self._reject("unreadable", str(e), keep=cur)
                return False
            if new is cur:
                return False
            self._failed_stamp, self._retry_wait_s, self._retry_at = None, 0.0, 0.0
            want = self._query_version()
            if new.version and want is not None and new.version != want:
                self._rejected_stamp = new.stamp
                self._reject("version", f"index {new.sha256[:SHA_PREFIX]} was built with embedding version "
                             f"{new.version}, but queries are encoded with {want}; rebuild the index with this "
                             "model (embed-assets run) or serve with the encoder it was built with", keep=cur)
                return False
            self._current = new  # the swap: one reference; queries in flight keep the object they took
            self.last_error, self._rejected_stamp = None, None
            if cur is not None:
                self.n_swaps += 1
                log.info("index swapped: %s (%d items) -> %s (%d items)", cur.sha256[:SHA_PREFIX], cur.n_items,
                         new.sha256[:SHA_PREFIX], new.n_items)
            if self.on_swap:
                self.on_swap(cur, new)
            return True

    def _set_threads(self) -> None:
        """FAISS's OpenMP threads for this process, once (a process-wide setting; `threads=None` leaves it)."""
        if self.threads and not self._threads_set:
            import faiss

            faiss.omp_set_num_threads(int(self.threads))
            self._threads_set = True

    def _query_version(self) -> dict | None:
        # cheap: no model load (revision and dim come from the package files); an encoder without one is not checked
        return getattr(self.encoder, "version", None)

    def _reject(self, reason: str, msg: str, keep: LoadedIndex | None) -> None:
        self.last_error = msg
        self.n_rejected += 1
        if keep is not None:
            msg = f"{msg} (still serving index {keep.sha256[:SHA_PREFIX]}, {keep.n_items} items)"
        # nothing served yet and nothing refused: the caller gets NoIndex with the message; a log line is for servers
        log.log(logging.WARNING if keep is not None or reason == "version" else logging.INFO,
                "index not loaded: %s", msg)
        if self.on_reject:
            self.on_reject(reason, msg)

    def watch(self, interval_s: float = 1.0) -> "Watcher":
        """Start a daemon thread that calls `refresh()` every `interval_s` seconds; `.stop()` ends it."""
        w = Watcher(self, interval_s)
        w.start()
        return w

    # -- queries ------------------------------------------------------------------------------------------------
    def search(self, text: str, k: int = DEFAULT_K) -> list[Hit]:
        """The k items nearest to `text` (cosine), best first."""
        return self.search_result(text, k).hits

    def search_result(self, text: str, k: int = DEFAULT_K) -> "Result":
        """`search`, with the seconds spent encoding and searching and the index that answered."""
        k = check_k(k)
        text = check_query(text)
        cur = self.current()
        if cur.n_items == 0:
            return Result([], 0.0, cur)
        t0 = time.perf_counter()
        vec, wait = self._encode_timed(text)
        scores, rows = cur.index.search(vec.reshape(1, -1), min(k, cur.n_items))
        seconds = time.perf_counter() - t0 - wait
        return Result(self._hits(cur, rows[0], scores[0], k), seconds, cur, wait)

    def similar(self, item_id: str, k: int = DEFAULT_K) -> list[Hit]:
        """The k items nearest to `item_id`'s stored vector, the item itself left out."""
        return self.similar_result(item_id, k).hits

    def similar_result(self, item_id: str, k: int = DEFAULT_K) -> "Result":
        """`similar`, with the seconds spent looking up and searching and the index that answered."""
        k = check_k(k)
        if not isinstance(item_id, str) or not item_id:
            raise QueryError("give an item id")
        cur = self.current()
        t0 = time.perf_counter()
        row = cur.row_of(item_id)
        if row is None:
            raise UnknownItem(f"item {item_id!r} is not in the current index ({cur.n_items:,} items, index "
                              f"{cur.sha256[:SHA_PREFIX]}); check the id, or wait for the index to include it")
        vec = np.asarray(cur.index.reconstruct(row), dtype=np.float32).reshape(1, -1)
        scores, rows = cur.index.search(vec, min(k + 1, cur.n_items))
        keep = rows[0] != row
        rows, scores = rows[0][keep][:k], scores[0][keep][:k]
        seconds = time.perf_counter() - t0
        return Result(self._hits(cur, rows, scores, k), seconds, cur)

    def _hits(self, cur: LoadedIndex, rows: np.ndarray, scores: np.ndarray, k: int) -> list[Hit]:
        found = [(i, float(s)) for r, s in zip(rows, scores) if r >= 0 and (i := cur.ids[int(r)]) is not None][:k]
        titles = self._titles(cur, [i for i, _ in found])
        return [Hit(item_id=i, score=s, title=titles.get(i, "")) for i, s in found]

    def _titles(self, cur: LoadedIndex, item_ids: list[str]) -> dict[str, str]:
        """Titles from the processed items (`titles_of`, ~10 ms a call here: it opens DuckDB over the partition
        files), remembered per loaded index for the query cache's TTL. A title is a courtesy: if the partition files
        are being rewritten right now the read is tried once more, then the hits go out without titles (logged)."""
        if not self.titles or not item_ids:
            return {}
        from embed_assets.core.items import titles_of

        cache = cur.titles
        if cache is None:
            cache = cur.titles = TTLCache(self.cache.maxsize, self.cache.ttl_s)
        out = {i: t for i in item_ids if (t := cache.get(i)) is not None}
        missing = [i for i in item_ids if i not in out]
        if not missing:
            return out
        for attempt in range(2):
            try:
                found = titles_of(self.layout, missing)
                break
            except Exception as e:  # duckdb.IOException and friends: a partition file replaced under the glob
                if attempt:
                    log.warning("titles not read (%s: %s); results go out without titles", type(e).__name__, e)
                    return out
        for i in missing:
            out[i] = found.get(i) or ""
            cache.put(i, out[i])
        return out


class Watcher(threading.Thread):
    """Calls `searcher.refresh()` every `interval_s` seconds in the background, so loading a new index never happens
    on a request's time. Errors are logged, never raised: the old index keeps serving."""

    def __init__(self, searcher: Searcher, interval_s: float = 1.0):
        super().__init__(name="embed-assets-index-watcher", daemon=True)
        self.searcher, self.interval_s = searcher, float(interval_s)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                self.searcher.refresh()
            except Exception:  # never let the watcher die: the next tick tries again
                log.exception("index refresh failed; still serving the previous index")

    def stop(self, timeout: float | None = 5.0) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout)

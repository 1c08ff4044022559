"""`embed-assets serve`: the search API over HTTP (FastAPI on uvicorn), on top of `core.search.Searcher`.

    GET /search?q=TEXT&k=10            nearest items to a text
    GET /items/{item_id}/similar?k=10  nearest items to an item (its stored vector; the item left out)
    GET /healthz                       the index being served: n_items, model id/revision, index sha256 prefix
    GET /metrics                       Prometheus text: requests by endpoint and status, latency histograms

Answers are JSON. Bad requests get a 4xx with `{"error": "..."}` saying what to fix, and the server goes on serving:
an empty or over-long query or k out of 1..1000 -> 422, an unknown item -> 404, an unknown path -> 404, no usable
index yet -> 503. A background thread checks every `reload_check_s` (1 s) whether a newer index was built and swaps
to it without dropping a request (see `core/search.py`).

Endpoints are plain `def`: FastAPI runs them in its thread pool, so a query's encode and search (blocking, in C)
never hold up the event loop. One process holds one model and one index; run more processes behind a balancer to
scale out.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Any

from embed_assets.core.search import (DEFAULT_CACHE_SIZE, DEFAULT_CACHE_TTL_S, DEFAULT_K, MAX_K, MAX_QUERY_CHARS,
                                      SHA_PREFIX, NoIndex, QueryError, Result, Searcher, UnknownItem)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CONVERTOR = re.compile(r":\w+}")
ENDPOINTS = ["/search?q=TEXT&k=10", "/items/{item_id}/similar?k=10", "/healthz", "/metrics"]


class Metrics:
    """This app's Prometheus metrics, in a registry of its own (two apps in one process do not collide):
    - embed_assets_http_requests_total{endpoint, method, status}: requests answered (endpoint = the route template,
      e.g. /items/{item_id}/similar, or "unmatched"), whatever the outcome;
    - embed_assets_http_request_seconds{endpoint}: whole-request latency, as the app saw it;
    - embed_assets_search_seconds{endpoint}: encode + search only, for /search and /similar;
    - embed_assets_encoder_wait_seconds: how long /search queries queued for the encoder (one encode at a time);
    - embed_assets_query_cache_total{result="hit"|"miss"}, embed_assets_index_items,
      embed_assets_index_swaps_total, embed_assets_index_rejected_total: read from the searcher when scraped."""

    def __init__(self, searcher: Searcher):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("embed_assets_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.request_seconds = Histogram("embed_assets_http_request_seconds", "Whole-request latency in seconds",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.search_seconds = Histogram("embed_assets_search_seconds",
                                        "Encode + search seconds of a query (titles not included)",
                                        ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.encoder_wait_seconds = Histogram("embed_assets_encoder_wait_seconds",
                                              "Seconds a query waited for the encoder (one encode at a time)",
                                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_SearcherCollector(searcher))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SearcherCollector:
    """The searcher's own counters (cache, swaps, refusals, index size), read at scrape time."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.searcher
        cache = CounterMetricFamily("embed_assets_query_cache", "Query vector cache look-ups", labels=["result"])
        cache.add_metric(["hit"], s.cache.hits)
        cache.add_metric(["miss"], s.cache.misses)
        yield cache
        yield CounterMetricFamily("embed_assets_index_swaps", "Times a newer index replaced the served one",
                                  value=s.n_swaps)
        yield CounterMetricFamily("embed_assets_index_rejected",
                                  "Index loads refused (other embedding version) or failed (checksums, I/O)",
                                  value=s.n_rejected)
        cur = s.served
        yield GaugeMetricFamily("embed_assets_index_items", "Items in the served index (0: none loaded)",
                                value=cur.n_items if cur is not None else 0)


class _MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP answer by route template and status, and times it. Inside FastAPI's
    error handling, so 4xx answers are counted with their status; an unhandled crash counts as 500."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            # the route's template, its convertors dropped: /items/{item_id:path}/similar -> /items/{item_id}/similar
            endpoint = _CONVERTOR.sub("}", getattr(route, "path", None) or "unmatched")
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)


def _error(status: int, message: str, **extra):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, **extra}, status_code=status)


def _answer(result: Result, **head) -> dict[str, Any]:
    idx = result.index
    return {**head, "index_sha256": idx.sha256[:SHA_PREFIX], "n_items": idx.n_items,
            "hits": [h.as_dict() for h in result.hits]}


def create_app(searcher: Searcher, reload_check_s: float = 1.0, warm: bool = True):
    """The FastAPI app over `searcher`. On startup (before it accepts a connection) it loads the index and the model
    and encodes one text, so the first request is not slow and /healthz answering means ready; then a watcher thread
    checks for a newer index every `reload_check_s` seconds (0: never; `searcher.refresh()` by hand)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = Metrics(searcher)

    @asynccontextmanager
    async def lifespan(app):
        if warm:
            def warm_up():
                searcher.refresh()
                try:
                    searcher.encoder.encode(["warm up"])  # loads the model (and runs the precision probe) now
                except Exception:
                    log.exception("encoder warm-up failed; the first query will try again")
            await anyio.to_thread.run_sync(warm_up)
            cur = searcher.served
            log.info("ready: %s", f"index {cur.sha256[:SHA_PREFIX]}, {cur.n_items:,} items" if cur else
                     f"no index yet ({searcher.last_error}); checking every {reload_check_s:g} s")
        watcher = searcher.watch(reload_check_s) if reload_check_s and reload_check_s > 0 else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()

    app = FastAPI(title="embed_assets search", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.searcher, app.state.metrics = searcher, metrics
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, e: QueryError):
        return _error(422, str(e))

    @app.exception_handler(UnknownItem)
    async def _unknown_item(request: Request, e: UnknownItem):
        return _error(404, str(e))

    @app.exception_handler(NoIndex)
    async def _no_index(request: Request, e: NoIndex):
        return _error(503, f"no index to search yet: {e}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path")]
            parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return _error(404, f"not found: {request.url.path}", endpoints=ENDPOINTS)
        if e.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}; use GET",
                          endpoints=ENDPOINTS)
        return _error(e.status_code, str(e.detail))

    @app.get("/search")
    def search(q: str | None = None, k: int = DEFAULT_K):
        """Nearest items to the text `q` (1 to 2,000 characters), best first; k from 1 to 1,000."""
        if q is None:
            raise QueryError(f"give the text to search for as ?q=... (1 to {MAX_QUERY_CHARS:,} characters)")
        result = searcher.search_result(q, k)
        metrics.search_seconds.labels("/search").observe(result.seconds)
        metrics.encoder_wait_seconds.observe(result.encoder_wait_seconds)
        return JSONResponse(_answer(result, query=q, k=k))

    @app.get("/items/{item_id:path}/similar")
    def similar(item_id: str, k: int = DEFAULT_K):
        """Nearest items to `item_id` (its stored vector), the item itself left out; k from 1 to 1,000."""
        result = searcher.similar_result(item_id, k)
        metrics.search_seconds.labels("/items/{item_id}/similar").observe(result.seconds)
        return JSONResponse(_answer(result, item_id=item_id, k=k))

    @app.get("/healthz")
    def healthz():
        """200 with the served index (n_items, model id/revision, index sha256 prefix), or 503 with why there is
        none. `last_error` tells why the newest index on disk is not the one served, when it is not."""
        state = {"n_swaps": searcher.n_swaps, "n_rejected": searcher.n_rejected, "last_error": searcher.last_error,
                 "query_cache": {"entries": len(searcher.cache), "hits": searcher.cache.hits,
                                 "misses": searcher.cache.misses, "ttl_s": searcher.cache.ttl_s}}
        try:
            cur = searcher.current()
        except NoIndex as e:
            return JSONResponse({"status": "no index", "error": str(e), **state}, status_code=503)
        return JSONResponse({"status": "ok", **cur.describe(), "max_k": MAX_K, "max_query_chars": MAX_QUERY_CHARS,
                             **state})

    @app.get("/metrics")
    def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


def serve(home: str, host: str = "127.0.0.1", port: int = 8000, cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
          cache_size: int = DEFAULT_CACHE_SIZE, reload_check_s: float = 1.0, threads: int | None = 1,
          log_level: str = "info", access_log: bool = False) -> int:
    """Serve HOME's index until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("embed_assets")
    pkg.addHandler(handler)
    pkg.setLevel(log_level.upper())
    searcher = Searcher(home, cache_ttl_s=cache_ttl_s, cache_size=cache_size, threads=threads)
    app = create_app(searcher, reload_check_s=reload_check_s)
    log.info("serving %s on http://%s:%d (query cache %g s, %d entries; index check every %g s)",
             searcher.layout.home, host, port, cache_ttl_s, cache_size, reload_check_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
    return 0

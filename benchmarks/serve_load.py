"""Load test of `embed-assets serve`: N concurrent clients on loopback for T seconds, optionally promoting a new index
in the middle (the catalog grows and `embed-assets run` rebuilds the index while the clients keep querying).

    python benchmarks/serve_load.py [--clients 8] [--seconds 30] [--promote-at 15] [--items 1000] [--add 100]
                                    [--home DIR] [--json OUT.json]

Without --home it builds a HOME in a temp folder from the first --items bundled SciFact documents (`embed-assets
run`, real model); --promote-at S then appends the next --add documents to that catalog S seconds into the load and
runs `embed-assets run` again in another process, and the server swaps to the new index when it is written. With
--home it serves that HOME as it is (no promotion: the script does not know its catalog).

Each client is a thread with one keep-alive connection, looping: 80% `GET /search?...&k=10` and 20%
`GET /items/<random id>/similar?k=10`. Half of the searches are texts never asked before (a catalog title plus a
random number: always encoded), half repeat catalog titles (popular queries: the query cache serves them once seen).
If the promotion has not reached the clients by the end of --seconds, the load goes on until it has, plus 2 s.
Client and server share this machine's cores: on a small machine the clients' own CPU is part of what is measured.
Reports total requests, failures (any non-200 or connection error), p50/p95/p99 latency and QPS overall, per endpoint
and around the promotion, the index checksums the answers came from, the server's own encode+search time from
/metrics, the CPU (`cpu_info()`) and the load average before and after.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
CLI = [sys.executable, "-m", "embed_assets.cli"]
# the subprocesses (pipeline, server) import this checkout's package, like this script does
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))]


def summarize(rows: list[tuple], seconds: float) -> dict:
    """rows: (t_start, latency_s, ok, endpoint, sha)."""
    lat = [r[1] * 1e3 for r in rows if r[2]]
    return {"requests": len(rows), "failures": sum(not r[2] for r in rows),
            "qps": round(len(rows) / seconds, 1) if seconds > 0 else None,
            "p50_ms": _r(pct(lat, 50)), "p95_ms": _r(pct(lat, 95)), "p99_ms": _r(pct(lat, 99)),
            "max_ms": _r(max(lat) if lat else None)}


def _r(x):
    return None if x is None else round(x, 2)


def sample_docs(n: int) -> list[dict]:
    """The first n bundled SciFact documents (`_id`, `title`, `text`)."""
    from embed_assets.settings import SAMPLE_CORPUS

    out = []
    with gzip.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(out) >= n:
                break
            out.append(json.loads(line))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _plain(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def run_cli(args: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        out = subprocess.run(CLI + args, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    if out.returncode != 0:
        raise SystemExit(f"`embed-assets {' '.join(args)}` failed ({out.returncode}); see {log}")


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--promote-at", type=float, default=None,
                   help="seconds into the load at which the catalog grows and the index is rebuilt (default: never)")
    p.add_argument("--items", type=int, default=1000, help="SciFact documents in the built HOME (default 1000)")
    p.add_argument("--add", type=int, default=100, help="documents appended at the promotion (default 100)")
    p.add_argument("--home", help="serve this HOME instead of building one (no promotion)")
    p.add_argument("--similar-share", type=float, default=0.2, help="share of /similar requests (default 0.2)")
    p.add_argument("--new-query-share", type=float, default=0.5,
                   help="share of /search queries never asked before (a title plus a random number: always encoded); "
                        "the rest repeat catalog titles and hit the query cache once seen (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (HOME, server and pipeline logs)")
    a = p.parse_args()
    if a.home and a.promote_at is not None:
        p.error("--promote-at needs the benchmark's own catalog: leave out --home")

    from embed_assets.core.encoder import cpu_info
    from embed_assets.core.index import load_index
    from embed_assets.core.items import titles_of
    from embed_assets.core.layout import Layout

    command = "python benchmarks/serve_load.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    tmp = Path(tempfile.mkdtemp(prefix="embed_serve_load_"))
    log_path = tmp / "log.txt"
    load_before = os.getloadavg()
    build_args = None
    t_build = 0.0
    if a.home:
        home = Path(a.home)
    else:
        home = tmp / "home"
        corpus = write_jsonl(tmp / "raw" / "items.jsonl", sample_docs(a.items))
        build_args = ["run", "--home", str(home), "--items", str(corpus), "--partition-size", str(max(100, a.items // 4)),
                      "--no-semantic-ids"]
        t0 = time.perf_counter()
        print(f"building a HOME of {a.items} SciFact documents in {home} ...", file=sys.stderr)
        run_cli(build_args, log_path)
        t_build = time.perf_counter() - t0
    layout = Layout.at(home)
    _, ids, manifest = load_index(layout)
    ids = list(ids)
    titles = [t for t in titles_of(layout, ids).values() if t]

    port = free_port()
    server_log = open(tmp / "serve.log", "w")
    server = subprocess.Popen(CLI + ["serve", "--home", str(home), "--port", str(port), "--reload-check-s", "1"],
                              stdout=server_log, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"serve exited ({server.returncode}); see {tmp / 'serve.log'}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                if get(c, "/healthz")[0] == 200:
                    c.close()
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("serve did not come up in 300 s")
            time.sleep(0.3)

        rows: list[tuple] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()
        t_start = time.perf_counter()

        def client(n: int):
            rng = random.Random(a.seed * 1000 + n)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine = []
            while not stop.is_set():
                if rng.random() < a.similar_share:
                    endpoint = "similar"
                    path = f"/items/{urllib.parse.quote(rng.choice(ids), safe='')}/similar?k=10"
                else:
                    endpoint = "search"
                    q = rng.choice(titles)
                    if rng.random() < a.new_query_share:
                        q = f"{q} {rng.randrange(10**9)}"
                    path = "/search?" + urllib.parse.urlencode({"q": q, "k": 10})
                t0 = time.perf_counter()
                try:
                    status, body = get(conn, path)
                    ok = status == 200
                    sha = json.loads(body).get("index_sha256") if ok else None
                    if not ok:
                        with lock:
                            errors.append(f"{path[:80]}: {status} {body[:200]!r}")
                except Exception as e:
                    ok, sha = False, None
                    with lock:
                        errors.append(f"{path[:80]}: {type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                t1 = time.perf_counter()
                mine.append((t0 - t_start, t1 - t0, ok, endpoint, sha))
            conn.close()
            with lock:
                rows.extend(mine)

        promo: dict = {}

        def promote():
            promo["started_s"] = time.perf_counter() - t_start
            more = sample_docs(a.items + a.add)
            write_jsonl(Path(build_args[build_args.index("--items") + 1]), more)
            run_cli(build_args, log_path)
            promo["pipeline_done_s"] = time.perf_counter() - t_start
            promo["new_sha256"] = load_index(layout)[2]["index_sha256"][:12]

        def served_new() -> bool:
            try:
                hc = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                sha = json.loads(get(hc, "/healthz")[1]).get("index_sha256")
                hc.close()
                return sha == promo.get("new_sha256")
            except (OSError, ValueError):
                return False

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(a.clients)]
        for t in threads:
            t.start()
        promoter = None
        if a.promote_at is not None:
            timer_end = t_start + a.promote_at
            while time.perf_counter() < timer_end:
                time.sleep(0.05)
            promoter = threading.Thread(target=promote, daemon=True)
            promoter.start()
        while time.perf_counter() - t_start < a.seconds:
            time.sleep(0.05)
        if promoter is not None:  # keep the load on until the new index answers (and 2 s more), at most 300 s
            late = time.perf_counter() + 300
            while time.perf_counter() < late and (promoter.is_alive() or not served_new()):
                time.sleep(0.1)
            time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        wall = time.perf_counter() - t_start
        if promoter is not None:
            promoter.join(timeout=600)

        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        health = json.loads(get(c, "/healthz")[1])
        metrics_text = get(c, "/metrics")[1].decode()
        c.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()

    def metric(name: str, label: str) -> float | None:
        m = re.search(rf'^{re.escape(name)}{{endpoint="{re.escape(label)}"}} (\S+)$', metrics_text, re.M)
        return float(m.group(1)) if m else None

    rows.sort()
    out = {
        "command": command,
        "cpu": cpu_info(), "nproc": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "clients": a.clients, "seconds": round(wall, 2), "n_items": len(ids), "build_seconds": round(t_build, 1),
        "overall": summarize(rows, wall),
        "by_endpoint": {e: summarize([r for r in rows if r[3] == e], wall) for e in ("search", "similar")},
        "server_encode_search_ms_mean": {
            e: _r(1e3 * metric("embed_assets_search_seconds_sum", label) / n)
            if (n := metric("embed_assets_search_seconds_count", label)) else None
            for e, label in (("search", "/search"), ("similar", "/items/{item_id}/similar"))},
        "server_encoder_wait_ms_mean": _r(1e3 * _plain(metrics_text, "embed_assets_encoder_wait_seconds_sum")
                                          / n) if (n := _plain(metrics_text, "embed_assets_encoder_wait_seconds_count"))
        else None,
        "query_cache": health.get("query_cache"),
        "errors_first": errors[:10],
        "health_after": {k: health.get(k) for k in ("n_items", "index_sha256", "n_swaps", "n_rejected", "last_error")},
        "index_sha256_before": manifest["index_sha256"][:12],
    }
    step = 5.0
    out["timeline_5s"] = [{"from_s": t0, **summarize([r for r in rows if t0 <= r[0] < t0 + step], step),
                           "index_sha256": sorted({r[4] for r in rows if t0 <= r[0] < t0 + step and r[4]})}
                          for t0 in np.arange(0.0, wall, step).round(1).tolist()]
    if promo:
        shas = [r[4] for r in rows if r[4]]
        first_new = next((r[0] for r in rows if r[4] == promo.get("new_sha256")), None)
        out["promotion"] = {
            **promo, "started_s": round(promo["started_s"], 2),
            "pipeline_done_s": round(promo.get("pipeline_done_s", float("nan")), 2),
            "first_answer_from_new_index_s": _r(first_new),
            "answers_from_old_index": sum(s == out["index_sha256_before"] for s in shas),
            "answers_from_new_index": sum(s == promo.get("new_sha256") for s in shas),
            "during_rebuild": summarize([r for r in rows if promo["started_s"] <= r[0] <= (first_new or wall)],
                                        (first_new or wall) - promo["started_s"]),
        }
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")

    o = out["overall"]
    print(f"command: {command}")
    print(f"cpu: {out['cpu']['model']}, {out['nproc']} cores; load average before {out['loadavg_before']}, "
          f"after {out['loadavg_after']} (shared machine: another job was running)")
    print(f"{a.clients} clients x {wall:.1f} s on loopback, {len(ids):,} items, flat index; "
          f"{1 - a.similar_share:.0%} /search ({a.new_query_share:.0%} of them new texts, the rest repeated titles), "
          f"{a.similar_share:.0%} /similar")
    print(f"total {o['requests']:,} requests, {o['failures']} failures, {o['qps']} QPS; latency p50 {o['p50_ms']} ms, "
          f"p95 {o['p95_ms']} ms, p99 {o['p99_ms']} ms, max {o['max_ms']} ms")
    for e, s in out["by_endpoint"].items():
        print(f"  {e:<8} {s['requests']:>7,} req  {s['failures']} failed  {s['qps']} QPS  p50 {s['p50_ms']} ms  "
              f"p95 {s['p95_ms']} ms  p99 {s['p99_ms']} ms")
    print(f"server side, mean: encode+search {out['server_encode_search_ms_mean']} ms, waiting for the encoder "
          f"{out['server_encoder_wait_ms_mean']} ms a search; query cache {out['query_cache']}")
    if promo:
        pr = out["promotion"]
        d = pr["during_rebuild"]
        print(f"promotion: +{a.add} items and `embed-assets run` started at {pr['started_s']} s (done at "
              f"{pr['pipeline_done_s']} s, index then report); first answer from the new index "
              f"{pr.get('new_sha256')} at {pr['first_answer_from_new_index_s']} s; "
              f"answers old/new index: {pr['answers_from_old_index']:,}/{pr['answers_from_new_index']:,}")
        print(f"  while the pipeline ran: {d['requests']:,} requests, {d['failures']} failures, {d['qps']} QPS, "
              f"p50 {d['p50_ms']} ms, p95 {d['p95_ms']} ms, p99 {d['p99_ms']} ms")
    print(f"after: {out['health_after']}")
    print("per 5 s (start of request): requests, failures, p50/p99 ms, index")
    for w in out["timeline_5s"]:
        print(f"  {w['from_s']:>5.0f} s  {w['requests']:>5}  {w['failures']}  {w['p50_ms']:>7} / {w['p99_ms']:>7}  "
              f"{','.join(w['index_sha256'])}")
    if errors:
        print("first errors:\n  " + "\n  ".join(errors[:10]))
    if a.keep or o["failures"]:
        print(f"kept {tmp} (HOME, serve.log, log.txt)", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not o["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The catalog at 1M and 10M items: one partition's write and a re-use lookup, with and without the old text_hash index.

Baseline, measured in the same run: the schema before this change (an ART index on items.text_hash, no DuckDB memory
limit). Current: `core.catalog` as shipped (no index, `memory_limit` from $EMBED_ASSETS_CATALOG_MEMORY_MB, 256 MB by
default), written through `catalog.connect` and looked up through `catalog.partitions_holding`.

The items table is synthetic (ids 'item-<i>', sha256 text hashes, 64 partitions); only its size matters here. Each
measurement runs in its own process, so its peak RSS is its own.

    .venv/bin/python benchmarks/catalog.py --items 1000000 --items 10000000 --json benchmarks/results/catalog.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTITIONS = 64
LOOKUPS = 1_500  # text hashes looked up: about 1% of a 156k-item partition
MODEL = ("sentence-transformers/all-MiniLM-L6-v2", "rev", 256, 384)


def _build(home: Path, n: int, indexed: bool) -> None:
    """A catalog with n items over 64 partitions, one shards row per partition (so partitions_holding accepts them)."""
    from embed_assets.core import catalog
    from embed_assets.core.layout import Layout

    layout = Layout.at(home)
    with catalog.connect(layout.catalog_db) as con:
        con.execute(f"INSERT INTO items SELECT 'item-' || i, 'p' || (i % {PARTITIONS}), i, sha256(i::VARCHAR) "
                    f"FROM range({n}) t(i)")
        con.execute(f"INSERT INTO shards (partition, rows, model_id, model_revision, max_seq_length, dim) "
                    f"SELECT 'p' || k, {n // PARTITIONS}, ?, ?, ?, ? FROM range({PARTITIONS}) t(k)", list(MODEL))
        con.execute("CHECKPOINT")
    if indexed:  # the old schema; built without the memory limit (under 256 MB the index cannot even be created)
        import duckdb

        with duckdb.connect(str(layout.catalog_db)) as con:
            con.execute("CREATE INDEX items_text_hash ON items (text_hash)")
            con.execute("CHECKPOINT")


def _measure(home: Path, n: int, variant: str, op: str) -> dict:
    """Runs in a child process: one operation, its seconds and this process's peak RSS."""
    import duckdb
    import pyarrow as pa

    from embed_assets.core import catalog
    from embed_assets.core.layout import Layout

    from embed_assets.core.metering import metered

    layout = Layout.at(home)
    per = n // PARTITIONS
    rss_before = 0.0
    if op == "write":  # what catalog._write does for one partition: delete its rows, insert the new ones, commit
        items = pa.table({"item_id": [f"item-new-{i}" for i in range(per)], "row": list(range(per)),
                          "text_hash": [f"{i:064x}" for i in range(per)]})
        rss_before = _rss_mb()
        with metered() as usage:
            opened = (catalog.connect(layout.catalog_db) if variant == "current"
                      else _plain(duckdb, layout.catalog_db))
            with opened as con:
                con.execute("BEGIN TRANSACTION")
                con.execute("DELETE FROM items WHERE partition = 'p0'")
                con.register("_shard_items", items)
                con.execute("INSERT INTO items SELECT item_id, 'p0', \"row\", text_hash FROM _shard_items")
                con.execute("COMMIT")
        found = per
    else:  # lookup: partitions holding 1,500 text hashes spread over the catalog
        step = max(1, n // LOOKUPS)
        with duckdb.connect(str(layout.catalog_db), read_only=True) as con:
            wanted = [h for (h,) in con.execute(
                f"SELECT sha256(i::VARCHAR) FROM range(0, {n}, {step}) t(i)").fetchall()]
        rss_before = _rss_mb()
        with metered() as usage:
            if variant == "current":
                version = dict(zip(("model_id", "model_revision", "max_seq_length", "dim"), MODEL))
                found = len(catalog.partitions_holding(layout, wanted, version))
            else:  # the old code asked the index one hash at a time
                with _plain(duckdb, layout.catalog_db, read_only=True) as con:
                    parts = set()
                    for h in wanted:
                        parts.update(p for (p,) in con.execute(
                            "SELECT DISTINCT partition FROM items WHERE text_hash = ?", [h]).fetchall())
                found = len(parts)
    # the operation's own seconds and peak RSS (core.metering: the process's high-water mark reset when it starts;
    # the process already holds Python, DuckDB, Arrow and the rows to write)
    return {"seconds": round(usage.seconds, 3), "found": found, "peak_rss_mb": round(usage.peak_rss_mb, 1),
            "rss_before_mb": round(rss_before, 1)}


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))


class _plain:
    """The baseline's connection: no memory limit, no schema statement (which would drop the index)."""

    def __init__(self, duckdb, path: Path, read_only: bool = False):
        self.con = duckdb.connect(str(path), read_only=read_only)

    def __enter__(self):
        return self.con

    def __exit__(self, *exc):
        self.con.close()


def _child(home: Path, n: int, variant: str, op: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(home), str(n), variant, op],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, action="append", help="catalog sizes (repeatable; default 1M)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        home, n, variant, op = args.child
        print(json.dumps(_measure(Path(home), int(n), variant, op)))
        return
    sizes = args.items or [1_000_000]
    results = {"cpu": _cpu_model(), "cores": os.cpu_count(), "partitions": PARTITIONS, "lookups": LOOKUPS,
               "catalog_memory_mb": int(os.environ.get("EMBED_ASSETS_CATALOG_MEMORY_MB") or 256), "runs": []}
    print(f"CPU {results['cpu']}, {results['cores']} cores; {PARTITIONS} partitions; "
          f"catalog memory limit {results['catalog_memory_mb']} MB (current only)")
    print("write/lookup MB: the operation's peak RSS, and in brackets what the process held when it started")
    print(f"{'items':>11} {'variant':>9} {'db MB':>7} {'write s':>8} {'write MB':>15} {'lookup s':>9} {'lookup MB':>15}")
    with tempfile.TemporaryDirectory(prefix="catalog-bench-") as tmp:
        for n in sizes:
            row = {"items": n}
            for variant in ("baseline", "current"):
                home = Path(tmp) / f"{variant}-{n}"
                _build(home, n, indexed=(variant == "baseline"))
                from embed_assets.core.layout import Layout
                db = Layout.at(home).catalog_db
                size_mb = round(db.stat().st_size / 2**20, 1)
                lookup = _child(home, n, variant, "lookup")
                write = _child(home, n, variant, "write")
                row[variant] = {"db_mb": size_mb, "write": write, "lookup": lookup}
                print(f"{n:>11,} {variant:>9} {size_mb:>7,.0f} {write.get('seconds', float('nan')):>8.2f} "
                      f"{write.get('peak_rss_mb', float('nan')):>7,.0f} ({write.get('rss_before_mb', 0):>5,.0f}) "
                      f"{lookup.get('seconds', float('nan')):>9.3f} "
                      f"{lookup.get('peak_rss_mb', float('nan')):>7,.0f} ({lookup.get('rss_before_mb', 0):>5,.0f})"
                      + (f"  write error: {write['error']}" if "error" in write else "")
                      + (f"  lookup error: {lookup['error']}" if "error" in lookup else ""))
                for p in db.parent.glob(db.name + "*"):
                    p.unlink()
            b, c = row["baseline"], row["current"]
            if "seconds" in b["write"] and "seconds" in c["write"]:
                row["write_speedup"] = round(b["write"]["seconds"] / max(c["write"]["seconds"], 1e-9), 2)
                row["write_memory_ratio"] = round(c["write"]["peak_rss_mb"] / b["write"]["peak_rss_mb"], 2)
                print(f"{'':>11} current/baseline: write {row['write_speedup']}x faster, "
                      f"{row['write_memory_ratio']}x the peak RSS")
            results["runs"].append(row)
    if len(sizes) > 1:
        small, big = results["runs"][0]["current"], results["runs"][-1]["current"]
        if "peak_rss_mb" in small["write"] and "peak_rss_mb" in big["write"]:
            r = big["write"]["peak_rss_mb"] / small["write"]["peak_rss_mb"]
            results["current_write_rss_ratio_largest_to_smallest"] = round(r, 2)
            print(f"current write peak RSS, {sizes[-1]:,} vs {sizes[0]:,} items: {r:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Peak RSS of encoding one partition: bounded by the row-group size, not the catalog size.

    python benchmarks/memory.py [--csv ../shared/data/myntra/myntra_products_catalog.csv]

Builds catalogs of unique product texts (Myntra descriptions, cycled, each made unique with its row number) and
encodes exactly one partition in a fresh process, reporting that process's peak RSS:
  a) 20,000-row row group in a 20,000-item catalog
  b) 20,000-row row group in a 200,000-item catalog (same partition size, 10x the catalog)
  c) one 200,000-row row group (the seed's batch size)
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE.parent.parent / "shared" / "data" / "myntra" / "myntra_products_catalog.csv"

CHILD = """
import json, resource, sys, time
from embed_assets.core.layout import Layout
from embed_assets.core.encoder import Encoder
from embed_assets.core.embed import embed_partition
from embed_assets.core.items import load_partitions
layout = Layout.at(sys.argv[1])
t = time.perf_counter()
key = load_partitions(layout)[0]["partition"]  # one partition (hash prefix), about the target size
out = embed_partition(layout, key, Encoder(), reuse=False, say=lambda m: None)
print(json.dumps({"rows": out.manifest.n_rows, "seconds": time.perf_counter() - t,
                  "items_per_s": out.stats.items_per_s,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(home: Path, texts: list[str], n_items: int, row_group: int) -> None:
    from embed_assets.core.items import process_items
    from embed_assets.core.layout import Layout

    raw = home / "items.jsonl"
    home.mkdir(parents=True, exist_ok=True)
    with open(raw, "w", encoding="utf-8") as fh:
        for i in range(n_items):
            fh.write(json.dumps({"id": str(i), "text": f"{texts[i % len(texts)]} (item {i})"}) + "\n")
    process_items(Layout.at(home), [raw], "id", ["text"], row_group)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--json")
    a = p.parse_args()
    with open(a.csv, newline="", encoding="utf-8") as fh:
        texts = [r["Description"] for r in csv.DictReader(fh)]
    results = {}
    for label, n_items, rg in (("20k_of_20k", 20_000, 20_000), ("20k_of_200k", 200_000, 20_000),
                               ("200k_of_200k", 200_000, 200_000)):
        home = Path(tempfile.mkdtemp(prefix=f"bench_mem_{label}_"))
        build(home, texts, n_items, rg)
        out = subprocess.run([sys.executable, "-c", CHILD, str(home)], capture_output=True, text=True, check=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[label]
        print(f"{label:<14} rows {r['rows']:>7,}  peak RSS {r['peak_rss_mb']:8,.0f} MB  "
              f"{r['items_per_s']:6.1f} items/s  {r['seconds']:6.1f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The whole pipeline at catalog scale, with the STAND-IN encoder (deterministic vectors from text bytes; see
embed_assets/testing.py): what the platform itself costs at 1M and 10M items, and what a small change costs.

    python benchmarks/scale.py --items 1000000 [--items 10000000] [--partition-size 200000]
                               [--memory-budget-mb 2048] [--json benchmarks/results/scale.json]

Rows are built from the Myntra catalog (../shared/data/myntra) with unique ids and a unique suffix on every text, five
fields. For each size: a full run (every step's seconds and peak RSS from its materialization metadata), then
  - a 1% change (half of it edits of existing items, half new items),
  - deleting one item,
  - adding one item,
each followed by a whole run, with the partitions written and seconds. The real model is not used: it encodes a few
hundred texts a second on two cores (benchmarks/encode.py measures it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MYNTRA = Path(os.environ.get("EMBED_ASSETS_MYNTRA_CSV", HERE.parent.parent / "shared" / "data" / "myntra" / "myntra_products_catalog.csv"))


def cpu_model() -> str:
    from embed_assets.core.encoder import cpu_info

    info = cpu_info()
    return f"{info['model']} (bf16 flags: {', '.join(info['bf16_flags']) or 'none'}; {os.cpu_count()} cores)"


def base_rows() -> list[dict]:
    with open(MYNTRA, newline="", encoding="utf-8") as fh:
        return [{"name": r["ProductName"], "brand": r["ProductBrand"], "description": r["Description"],
                 "color": r["PrimaryColor"], "gender": r["Gender"], "pid": r["ProductID"]}
                for r in csv.DictReader(fh)]


def write_catalog(path: Path, n: int, base: list[dict], edits: dict[int, str] | None = None,
                  skip: set[int] | None = None, extra: int = 0) -> None:
    edits, skip = edits or {}, skip or set()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n + extra):
            if i in skip:
                continue
            r = base[i % len(base)]
            desc = edits.get(i, r["description"])
            fh.write(json.dumps({"id": f"{r['pid']}-{i}", "name": f"{r['name']} #{i}", "brand": r["brand"],
                                 "description": f"{desc} (item {i})", "color": r["color"], "gender": r["gender"]},
                                ensure_ascii=False) + "\n")


def run(settings, label: str) -> dict:
    from embed_assets.cli import run_pipeline
    from embed_assets.testing import standin_encoder_resource

    t0 = time.perf_counter()
    code, summary = run_pipeline(settings, log=lambda *_: None, encoder_resource=standin_encoder_resource())
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"{label}: run failed: {summary.get('failures')} {summary.get('checks')[:3]}")
    steps = summary["steps"]
    out = {"label": label, "wall_s": round(wall, 1), "n_items": summary["n_items"],
           "n_encoded": summary["n_encoded"], "n_reused": summary["n_reused"],
           "partitions_written": summary["n_partitions_written"], "n_partitions": summary["n_partitions"],
           "items_partitions_written": steps["processed_items"]["n_partitions_written"],
           "steps": steps}
    print(json.dumps({k: v for k, v in out.items() if k != "steps"}), flush=True)
    for name, st in steps.items():
        extra = ""
        if st.get("bytes"):
            mb = st["bytes"] / 2**20
            extra = (f"   index {mb:,.0f} MB, overhead above it {st.get('peak_rss_mb', 0) - mb:,.0f} MB"
                     f" ({st.get('update_mode')})")
        elif st.get("rows_per_s"):
            extra = f"   {st['rows_per_s']:,.0f} rows/s"
        print(f"    {name:<18} {st.get('seconds', 0):>8.1f} s ({st.get('cpu_seconds', 0):>7.1f} s CPU)   "
              f"peak RSS {st.get('peak_rss_mb', 0):>8,.0f} MB{extra}", flush=True)
    return out


def bench(n: int, partition_size: int, budget: int, work: Path, semantic_ids: bool = False) -> dict:
    from embed_assets.settings import Settings

    base = base_rows()
    raw = work / f"items_{n}.jsonl"
    write_catalog(raw, n, base)
    s = Settings(home=str(work / f"home_{n}"), items=[str(raw)], id_field="id", text_fields=["name", "description"],
                 partition_size=partition_size)
    import shutil

    shutil.rmtree(s.home, ignore_errors=True)  # a full run starts from nothing (a leftover HOME would be re-used)
    s.memory_budget_mb = budget
    s.min_recall_at_100 = 0.0
    s.semantic_ids = semantic_ids  # off by default: their cost has its own benchmark (semantic_ids.py)
    s.index_kind = "flat"  # exact: the stand-in's vectors are uniform noise, no ANN structure could be tuned on them
    res = {"n": n, "raw_bytes": raw.stat().st_size, "full": run(s, f"{n:,} full run")}

    rng = random.Random(0)
    k = max(2, n // 100)
    edits = {i: f"edited description {i}" for i in rng.sample(range(n), k // 2)}
    write_catalog(raw, n, base, edits=edits, extra=k // 2)
    res["change_1pct"] = run(s, "1% change (half edits, half new)")
    n2 = n + k // 2
    write_catalog(raw, n2, base, edits=edits, skip={n2 // 2})
    res["delete_one"] = run(s, "delete one item")
    write_catalog(raw, n2 + 1, base, edits=edits, skip={n2 // 2})
    res["add_one"] = run(s, "add one item")
    raw.unlink()
    shutil.rmtree(s.home, ignore_errors=True)  # the next size needs the disk
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, action="append", required=True)
    p.add_argument("--partition-size", type=int, default=200_000)
    p.add_argument("--memory-budget-mb", type=int, default=2048)
    p.add_argument("--workdir")
    p.add_argument("--semantic-ids", action="store_true", help="include the semantic_ids step in every run")
    p.add_argument("--json")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="embed_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "cpu": cpu_model(),
               "encoder": "STAND-IN (embed_assets.testing.StandInEncoder), not the model", "runs": []}
    print(f"cpu: {results['cpu']}", flush=True)
    for n in a.items:
        if len(a.items) == 1:
            results["runs"].append(bench(n, a.partition_size, a.memory_budget_mb, work, a.semantic_ids))
        else:  # each size in a process of its own: the larger size's peaks never start from the smaller's heap
            part = work / f"scale_{n}.json"
            cmd = [sys.executable, __file__, "--items", str(n), "--partition-size", str(a.partition_size),
                   "--memory-budget-mb", str(a.memory_budget_mb), "--workdir", str(work), "--json", str(part)]
            if a.semantic_ids:
                cmd.append("--semantic-ids")
            if subprocess.run(cmd).returncode != 0:
                return 1
            results["runs"].extend(json.loads(part.read_text())["runs"])
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

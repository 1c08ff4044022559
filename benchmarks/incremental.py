"""Incremental cost: a full run, then a run after 1% of the items changed (half rewritten, half new), same process.

    python benchmarks/incremental.py [--csv ../shared/data/myntra/myntra_products_catalog.csv] [--change 0.01]
                                     [--scale K]

--scale K repeats the catalog K times (ids and descriptions suffixed with the copy number, so every text is
distinct) to see how the ratio moves with catalog size: the fixed costs (three Dagster runs, the report) stay put.

Both runs are the whole headless pipeline (`embed-assets run`: items, partitions, norms, index, report). Prints the
second run's time as a ratio of the first, and n_encoded / n_reused of each.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE.parent.parent / "shared" / "data" / "myntra" / "myntra_products_catalog.csv"


def write_items(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--change", type=float, default=0.01)
    p.add_argument("--row-group-size", "--partition-size", dest="row_group_size", type=int, default=None,
                   help="items per partition (default: the product's default, settings.DEFAULT_PARTITION_SIZE)")
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args()

    from embed_assets.cli import run_pipeline
    from embed_assets.core.encoder import cpu_info
    from embed_assets.settings import DEFAULT_PARTITION_SIZE, Settings

    partition_size = a.row_group_size or DEFAULT_PARTITION_SIZE

    with open(a.csv, newline="", encoding="utf-8") as fh:
        rows = [{"id": r["ProductID"], "name": r["ProductName"], "description": r["Description"]}
                for r in csv.DictReader(fh)]
    if a.scale > 1:
        rows = [{"id": f"{r['id']}-{k}", "name": r["name"], "description": f"{r['description']} (copy {k})"}
                for k in range(a.scale) for r in rows]
    tmp = Path(tempfile.mkdtemp(prefix="embed_incr_"))
    items = tmp / "items.jsonl"
    n_change = max(2, int(len(rows) * a.change))
    base, new = rows[: len(rows) - n_change // 2], rows[len(rows) - n_change // 2:]
    write_items(items, base)
    s = Settings(home=str(tmp / "home"), items=[str(items)], id_field="id", text_fields=["name", "description"],
                 partition_size=partition_size)
    quiet = lambda *_: None  # noqa: E731

    t0 = time.perf_counter()
    code1, s1 = run_pipeline(s, log=quiet)
    t_full = time.perf_counter() - t0

    changed = [dict(r) for r in base]
    step = max(1, len(changed) // (n_change - len(new)))
    for i in range(0, len(changed), step)[: n_change - len(new)]:
        changed[i]["description"] += " Now in a new colour."
    write_items(items, changed + new)
    t0 = time.perf_counter()
    code2, s2 = run_pipeline(s, log=quiet)
    t_incr = time.perf_counter() - t0

    res = {"items_first": len(base), "items_second": len(changed) + len(new), "changed_or_new": n_change,
           "full_s": t_full, "incremental_s": t_incr, "ratio": t_incr / t_full,
           # CPU seconds of this process (the runs are in-process): barely moved by other work on the same cores
           "full_cpu_s": s1.get("cpu_seconds"), "incremental_cpu_s": s2.get("cpu_seconds"),
           "cpu_ratio": (s2.get("cpu_seconds") or 0) / max(s1.get("cpu_seconds") or 0, 1e-9),
           "cpu": cpu_info(), "partition_size": partition_size}
    for name, summ in (("first", s1), ("second", s2)):
        res[name] = {k: summ.get(k) for k in ("n_encoded", "n_reused", "ok", "precision", "n_partitions",
                                               "n_partitions_written", "n_partitions_skipped")}
        res[name]["steps"] = summ.get("steps")
    print(f"cpu             {res['cpu']['model']} (bf16 flags: {', '.join(res['cpu']['bf16_flags']) or 'none'}), "
          f"precision {s1.get('precision')}, partition size {partition_size:,}")
    print(f"full run        {res['items_first']:,} items  {t_full:8.1f} s  encoded {s1.get('n_encoded'):,}")
    print(f"after {a.change:.0%} change {res['items_second']:,} items  {t_incr:8.1f} s  encoded "
          f"{s2.get('n_encoded'):,}, re-used {s2.get('n_reused'):,}")
    print(f"ratio           {res['ratio']:.2%} of the full run in wall time; in CPU seconds "
          f"{res['incremental_cpu_s']:,.1f} / {res['full_cpu_s']:,.1f} = {res['cpu_ratio']:.2%}")
    for name in ("first", "second"):
        print(f"{name} run: {res[name]['n_partitions_written']} of {res[name]['n_partitions']} partitions written")
        for step, st in (res[name]["steps"] or {}).items():
            print(f"    {step:<18} {st.get('seconds', 0):>8.1f} s ({st.get('cpu_seconds', 0):>8.1f} s CPU)   "
                  f"peak RSS {st.get('peak_rss_mb', 0):>8,.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if code1 == 0 and code2 == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

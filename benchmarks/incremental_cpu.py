"""A 1% change on an existing HOME, measured in CPU seconds as well as wall seconds (load on a shared machine moves
wall time, hardly CPU time), with the per-step breakdown. Used beside benchmarks/incremental.py when the machine is
shared: the full run's CPU seconds come from that run's own measurement.

    python benchmarks/incremental_cpu.py --home DIR --items ITEMS.jsonl [--change 0.01] [--json OUT]

ITEMS.jsonl is the file the HOME was built from (rows with id, name, description); it is rewritten with the change.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    p.add_argument("--items", required=True)
    p.add_argument("--change", type=float, default=0.01)
    p.add_argument("--json")
    a = p.parse_args()

    from embed_assets.cli import run_pipeline
    from embed_assets.core.encoder import cpu_info
    from embed_assets.settings import DEFAULT_PARTITION_SIZE, Settings

    s = Settings(home=a.home, items=[a.items], id_field="id", text_fields=["name", "description"],
                 partition_size=DEFAULT_PARTITION_SIZE, semantic_ids=False)
    quiet = lambda *_: None  # noqa: E731
    code, catch_up = run_pipeline(s, log=quiet)  # bring the HOME to its file first (not measured)
    assert code == 0, catch_up.get("failures")
    rows = [json.loads(line) for line in Path(a.items).read_text().splitlines()]
    rng = random.Random(7)
    k = max(2, int(len(rows) * a.change))
    for i in rng.sample(range(len(rows)), k // 2):
        rows[i]["description"] += " Now in a new colour."
    base = rows[rng.randrange(len(rows))]
    rows += [{**base, "id": f"new-{j}", "description": f"{base['description']} (new item {j})"} for j in range(k // 2)]
    Path(a.items).write_text("".join(json.dumps(r) + "\n" for r in rows))
    t0, c0 = time.perf_counter(), time.process_time()
    code, summ = run_pipeline(s, log=quiet)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert code == 0, summ.get("failures")
    res = {"command": "python benchmarks/incremental_cpu.py " + " ".join(sys.argv[1:]), "cpu": cpu_info(),
           "n_items": summ["n_items"], "changed_or_new": k, "n_encoded": summ["n_encoded"],
           "n_reused": summ["n_reused"], "n_partitions_written": summ["n_partitions_written"],
           "wall_s": wall, "cpu_s": cpu, "steps": summ["steps"]}
    print(json.dumps({x: y for x, y in res.items() if x != "steps"}))
    for name, st in summ["steps"].items():
        print(f"    {name:<18} {st.get('seconds', 0):>8.1f} s wall {st.get('cpu_seconds', 0):>8.1f} s CPU")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

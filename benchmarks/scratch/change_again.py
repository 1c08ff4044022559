"""Another change on the HOME that benchmarks/incremental.py left (its temp folder), in one process: first a warm-up
change of 0.01% (loads the model, the precision verdict and the imports, as the benchmark's first run had), then a
1% change made the way incremental.py makes it (half of the items edited, spread evenly; half new), measured.

    .venv/bin/python benchmarks/scratch/change_again.py /tmp/embed_incr_XXXX TAG [--json OUT]

PROFILE=out.prof runs the measured change under cProfile (which inflates Python-heavy steps).
"""
import json
import os
import sys
import time
from pathlib import Path

from embed_assets.cli import run_pipeline
from embed_assets.core.encoder import cpu_info
from embed_assets.settings import DEFAULT_PARTITION_SIZE, Settings

root, tag = Path(sys.argv[1]), sys.argv[2]
out = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--json" else None
items = root / "items.jsonl"
s = Settings(home=str(root / "home"), items=[str(items)], id_field="id", text_fields=["name", "description"],
             partition_size=DEFAULT_PARTITION_SIZE)


def change(fraction: float, label: str) -> int:
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    n = max(2, int(len(rows) * fraction))
    step = max(1, len(rows) // (n - n // 2))
    for i in range(0, len(rows), step)[: n - n // 2]:
        rows[i]["description"] += f" Edited {label}."
    rows += [{"id": f"new-{label}-{i}", "name": rows[i]["name"], "description": f"{rows[i]['description']} new {label}"}
             for i in range(n // 2)]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return n


change(0.0001, f"{tag}-warm")
run_pipeline(s, log=lambda *_: None)
n = change(0.01, tag)
prof = None
if os.environ.get("PROFILE"):  # PROFILE=out.prof: the measured run under cProfile (its overhead inflates the times)
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
t0, c0 = time.perf_counter(), time.process_time()
code, summ = run_pipeline(s, log=lambda *_: None)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
if prof:
    prof.disable()
    prof.dump_stats(os.environ["PROFILE"])
res = {"cpu": cpu_info()["model"], "changed_or_new": n, "wall_s": wall, "cpu_s": cpu, "ok": summ.get("ok"),
       "n_encoded": summ.get("n_encoded"), "steps": summ.get("steps")}
print(f"cpu {res['cpu']}; 1% change ({n:,} rows edited or new): {wall:.1f} s wall, {cpu:.1f} s CPU, "
      f"encoded {summ.get('n_encoded'):,}, ok={summ.get('ok')}")
for step, st in (summ.get("steps") or {}).items():
    extra = {k: st[k] for k in ("update_mode", "action") if k in st}
    print(f"    {step:<18} {st.get('seconds', 0):>8.1f} s ({st.get('cpu_seconds', 0):>8.1f} s CPU)   "
          f"peak RSS {st.get('peak_rss_mb', 0):>8,.0f} MB  {extra or ''}")
if out:
    Path(out).write_text(json.dumps(res, indent=2) + "\n")

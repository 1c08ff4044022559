"""Profile one more 1% change on the real 500k HOME left by benchmarks/incremental.py --scale 40 (copied first), under cProfile.

    .venv/bin/python benchmarks/scratch/profile_change.py DEST TAG     (the source HOME is the path in `src` below)
"""
import cProfile, json, pstats, shutil, sys, time
from pathlib import Path
src = Path("/tmp/embed_incr_88ct0sd9")
dst = Path(sys.argv[1]); tag = sys.argv[2]
if dst.exists():
    shutil.rmtree(dst)
shutil.copytree(src, dst, symlinks=True)
items = dst / "items.jsonl"
rows = [json.loads(l) for l in open(items)]
n = len(rows) // 100
step = len(rows) // (n // 2)
for i in range(0, len(rows), step)[: n // 2]:
    rows[i]["description"] += f" Edited again {tag}."
rows += [{"id": f"new-{tag}-{i}", "name": rows[i]["name"], "description": rows[i]["description"] + f" fresh {tag} {i}"} for i in range(n - n // 2)]
with open(items, "w") as fh:
    for r in rows: fh.write(json.dumps(r) + "\n")
from embed_assets.cli import run_pipeline
from embed_assets.settings import Settings
s = Settings.load(str(dst / "home")) if hasattr(Settings, "load") else None
s = Settings(home=str(dst / "home"), items=[str(items)], id_field="id", text_fields=["name", "description"],
             partition_size=200_000)
pr = cProfile.Profile()
t0 = time.perf_counter(); c0 = time.process_time()
pr.enable()
code, summ = run_pipeline(s, log=lambda *a: print(*a, flush=True))
pr.disable()
print("TOTAL", time.perf_counter() - t0, "s", time.process_time() - c0, "cpu s", "code", code)
for k, st in (summ.get("steps") or {}).items():
    print(f"  {k:<18} {st.get('seconds',0):7.1f} s {st.get('cpu_seconds',0):7.1f} cpu {st.get('peak_rss_mb',0):8.0f} MB")
pr.dump_stats(f"/tmp/prof/p500_{tag}.prof")
pstats.Stats(pr).sort_stats("cumulative").print_stats(80)

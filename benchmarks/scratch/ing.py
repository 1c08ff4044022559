# One-off profiling script of 2026-11-24, kept as it was run (from /tmp/prof/ing.py; paths as on that machine).
# Cited in benchmarks/README.md and the issue notes. Not maintained: the numbers it printed are in those texts.
import sys, time, threading, os, json
sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
n = int(sys.argv[1]); budget = int(sys.argv[2]); raw = Path(f"/tmp/prof/items_{n}.jsonl")
if not raw.exists():
    import scale
    scale.write_catalog(raw, n, scale.base_rows())
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])//1024
state = {"phase": "start", "peak": 0, "peaks": {}}
def sample():
    while True:
        r = rss(); ph = state["phase"]
        state["peaks"][ph] = max(state["peaks"].get(ph, 0), r)
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
from embed_assets.core.layout import Layout
from embed_assets.core.items import process_items
import embed_assets.core.ingest as ING
_orig = ING._spill_block
cnt = [0]
def spy(con, block, *a, **k):
    cnt[0] += 1
    state["phase"] = f"block{cnt[0]:03d}-arrow"
    before = rss()
    out = _orig(con, block, *a, **k)
    print(f"block {cnt[0]} rows={block.table.num_rows} rss_before_spill={before} after={rss()} peak_so_far={max(state['peaks'].values())}", flush=True)
    state["phase"] = f"block{cnt[0]+1:03d}-parse"
    return out
ING._spill_block = spy
home = Path(f"/tmp/prof/home_{n}_{budget}"); import shutil; shutil.rmtree(home, ignore_errors=True)
lay = Layout.at(home)
def log(m):
    state["phase"] = m[:60]
    print(f"{time.strftime('%X')} rss={rss()} {m[:120]}", flush=True)
t = time.time()
state["phase"] = "read"
r = process_items(lay, [raw], "id", ["name", "description"], partition_size=200000, memory_budget_mb=budget, log=log)
print("done", time.time()-t, "s", r.n_items)
top = sorted(state["peaks"].items(), key=lambda kv: -kv[1])[:6]
for k, v in top: print(v, "MB", k)
print("VmHWM", [l for l in open("/proc/self/status") if l.startswith("VmHWM")])

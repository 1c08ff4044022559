# One-off profiling script of 2026-11-24, kept as it was run (from /tmp/prof/pipe.py; paths as on that machine).
# Cited in benchmarks/README.md and the issue notes. Not maintained: the numbers it printed are in those texts.
import shutil, gc, sys
from pathlib import Path
from embed_assets.cli import run_pipeline
from embed_assets.testing import standin_encoder_resource
from embed_assets.settings import Settings
from embed_assets.core.metering import _trim_heap
import pyarrow as pa
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])//1024
home = "/tmp/prof/pipehome"; shutil.rmtree(home, ignore_errors=True)
s = Settings(home=home, items=["/tmp/prof/items_200k.jsonl"], id_field="id", text_fields=["name", "description"], partition_size=50000)
s.memory_budget_mb = 2048; s.min_recall_at_100 = 0.0; s.semantic_ids = False; s.index_kind = "flat"
for i in range(3):
    code, summ = run_pipeline(s, log=lambda *_: None, encoder_resource=standin_encoder_resource())
    gc.collect(); _trim_heap(); pa.default_memory_pool().release_unused()
    print(i, code, "rss after run", rss(), {k: v.get("peak_rss_mb") for k, v in summ["steps"].items()}, flush=True)
    if i == 1:
        import collections
        import numpy as np
        big = [o for o in gc.get_objects() if isinstance(o, np.ndarray) and o.nbytes > 1<<20]
        print("big arrays", [(a.shape, a.dtype, a.nbytes>>20) for a in big][:10])
        import faiss
        print("faiss objs", sum(isinstance(o, faiss.Index) for o in gc.get_objects()))

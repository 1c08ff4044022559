# One-off profiling script of 2026-11-24, kept as it was run (from /tmp/prof/addone.py; paths as on that machine).
# Cited in benchmarks/README.md and the issue notes. Not maintained: the numbers it printed are in those texts.
"""Resume of benchmarks/scale.py at 10M after its 'add one item' run failed on a full disk (index/ held 3 versions of
14.4 GB + a 4th being written): the same HOME and settings as bench(), one more item added, one whole run."""
import json, random, sys, shutil, time
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks")
import scale
from embed_assets.settings import Settings
n = 10_000_000; work = Path("/tmp/scale_work")
base = scale.base_rows(); raw = work / f"items_{n}.jsonl"
rng = random.Random(0); k = max(2, n // 100)
edits = {i: f"edited description {i}" for i in rng.sample(range(n), k // 2)}
n2 = n + k // 2
scale.write_catalog(raw, n2 + 2, base, edits=edits, skip={n2 // 2})
s = Settings(home=str(work / f"home_{n}"), items=[str(raw)], id_field="id", text_fields=["name", "description"], partition_size=200_000)
s.memory_budget_mb = 2048; s.min_recall_at_100 = 0.0; s.semantic_ids = False; s.index_kind = "flat"
out = scale.run(s, "add one item (again, after the disk-full failure)")
Path("/tmp/scale_10m_addone.json").write_text(json.dumps(out, indent=2) + "\n")

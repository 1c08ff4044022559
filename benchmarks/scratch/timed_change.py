"""change_again.py with wall-time totals on named functions (no cProfile, whose overhead inflates Python-heavy
steps) and the wall time of each Dagster run.

    FUNCS=embed_assets.core.encoder.Encoder.encode,embed_assets.core.embed.reuse_vectors \
        .venv/bin/python benchmarks/scratch/timed_change.py /tmp/embed_incr_XXXX TAG [--json OUT]

Encoder.encode's total is the model's share; the run's wall minus it is the pipeline's own cost (`ab.sh`)."""
import importlib, json, sys, time, os
from pathlib import Path
T = {}
def wrap(modname, fname):
    m = importlib.import_module(modname)
    f = getattr(m, fname)
    key = f"{modname.split('.')[-1]}.{fname}"
    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[key] = T.get(key, [0.0, 0]); T[key][0] += time.perf_counter() - t; T[key][1] += 1
    setattr(m, fname, g)
SPEC = os.environ.get("FUNCS", "")
for s in SPEC.split(","):
    if not s:
        continue
    mod, fn = s.rsplit(".", 1)
    if mod.endswith(".Encoder"):  # a method: Encoder.encode
        import embed_assets.core.encoder as E
        f0 = getattr(E.Encoder, fn)
        def method(self, *a, _f=f0, _k=f"Encoder.{fn}", **k):
            t = time.perf_counter()
            try:
                return _f(self, *a, **k)
            finally:
                T.setdefault(_k, [0.0, 0]); T[_k][0] += time.perf_counter() - t; T[_k][1] += 1
        setattr(E.Encoder, fn, method)
    else:
        wrap(mod, fn)
import dagster as dg
JD = dg.JobDefinition
orig = JD.execute_in_process
def eip(self, *a, **k):
    t = time.perf_counter(); r = orig(self, *a, **k)
    T.setdefault("runs", []).append((self.name, k.get("partition_key"), round(time.perf_counter() - t, 2))); return r
JD.execute_in_process = eip
sys.argv = ["change_again.py"] + sys.argv[1:]
code = open(Path(__file__).with_name("change_again.py")).read()
marker = "t0, c0 = time.perf_counter(), time.process_time()"
code = code.replace(marker, "T.clear()\n" + marker)
exec(compile(code, "change_again", "exec"), globals())
for k, v in T.items():
    print(k, v if k == "runs" else f"{v[0]:.2f}s x{v[1]}")

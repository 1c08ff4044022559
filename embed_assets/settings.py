"""Configuration from the environment (used by definitions.py, i.e. `dagster dev`) and by the CLI.

`embed-assets run` saves the settings it ran with in HOME/settings.json; the UI (`Settings.from_env()`) starts from
them, so it shows and materializes what the CLI ran. Environment variables override them field by field; with
EMBED_ASSETS_ITEMS set, the environment describes another catalog and the saved settings are not used. Without
either, the bundled SciFact sample, so `dagster dev` shows a working graph on a fresh checkout.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from embed_assets.core.layout import home_from_env

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data" / "scifact"
SAMPLE_CORPUS = SAMPLE_DIR / "corpus.jsonl.gz"
SAMPLE_QUERIES = SAMPLE_DIR / "queries.jsonl.gz"
SAMPLE_QRELS = SAMPLE_DIR / "qrels" / "test.tsv"
# The sample is 5,183 items: a 1,000-row target makes eight hash-prefix partitions, enough to see partitioning at work.
SAMPLE_PARTITION_SIZE = 1_000
# The published numbers for all-MiniLM-L6-v2 on SciFact test (300 queries), from the MTEB leaderboard: what a run
# on the bundled sample should reproduce (the demo prints them beside its own; the acceptance test checks them).
SAMPLE_PUBLISHED = {
    "ndcg_at_1": 0.50333,
    "ndcg_at_10": 0.64508,
    "ndcg_at_100": 0.67665,
    "recall_at_1": 0.48233,
    "recall_at_10": 0.78333,
    "recall_at_100": 0.92500,
}
SAMPLE_PUBLISHED_SOURCE = "MTEB, sentence-transformers/all-MiniLM-L6-v2, SciFact test (300 queries)"
DEFAULT_PARTITION_SIZE = 200_000
SETTINGS_FILE = "settings.json"
_PATH_FIELDS = ("queries", "qrels")
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def split_fields(value: str) -> list[str]:
    """"title, text" -> ["title", "text"]."""
    return [f.strip() for f in value.split(",") if f.strip()]


@dataclass
class Settings:
    home: str
    items: list[str]
    base_uri: Optional[str] = None  # shards, index, semantic IDs and reports also live there (core/store.py)
    id_field: str = "_id"
    text_fields: list[str] = field(default_factory=lambda: ["title", "text"])
    partition_size: int = DEFAULT_PARTITION_SIZE
    memory_budget_mb: int = 2_048
    queries: Optional[str] = None
    qrels: Optional[str] = None
    norm_tolerance: Optional[float] = None
    min_ndcg_at_10: Optional[float] = None
    min_recall_at_100: Optional[float] = None
    min_ann_recall_at_10: Optional[float] = None
    index_kind: str = "auto"
    chunking: bool = False
    device: str = "auto"
    precision: str = "auto"
    semantic_ids: bool = True  # off: run and sensor leave the semantic_ids asset out
    sid_quantizer: str = "rq_kmeans"  # semantic IDs: rq_kmeans or rqvae
    sid_levels: int = 3
    sid_codebook_size: int = 256
    encode_runner: str = "in_process"  # where item_embeddings encodes a partition: in_process, subprocess or k8s
    executor: str = "default"  # default (multiprocess) or k8s_job (dagster_k8s.k8s_job_executor)
    k8s: dict = field(default_factory=dict)  # K8sEncodeConfig fields (the GPU pod), from EMBED_ASSETS_K8S_*

    @classmethod
    def sample(cls, home: str) -> "Settings":
        return cls(home=home, items=[str(SAMPLE_CORPUS)], partition_size=SAMPLE_PARTITION_SIZE,
                   queries=str(SAMPLE_QUERIES), qrels=str(SAMPLE_QRELS))

    def save(self) -> Path:
        """Write these settings to HOME/settings.json (atomic; paths made absolute, so the UI finds them from any
        directory). `embed-assets run` calls it before it runs."""
        from embed_assets.core.atomic import atomic_write_json

        data = asdict(self)
        data.pop("home")
        data["items"] = [_absolute(p) for p in self.items]
        for k in _PATH_FIELDS:
            data[k] = _absolute(data[k]) if data[k] else data[k]
        return atomic_write_json(settings_path(self.home), {"version": 1, "settings": data})

    @classmethod
    def load(cls, home: str) -> Optional["Settings"]:
        """The settings saved in HOME by its last `embed-assets run`, or None if there are none. Fields this version
        does not know are ignored; a missing one takes its default."""
        path = settings_path(home)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            data = raw["settings"]
            known = {f.name for f in fields(cls)} - {"home"}
            s = cls(home=home, **{k: v for k, v in data.items() if k in known})
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a settings file written by `embed-assets run` ({type(e).__name__}: {e}); "
                             "run `embed-assets run` again, or delete the file to use the defaults") from e
        if not isinstance(s.items, list) or not all(isinstance(p, str) for p in s.items):
            raise ValueError(f"{path}: `items` must be a list of paths; run `embed-assets run` again, or delete the "
                             "file to use the defaults")
        return s

    @classmethod
    def from_env(cls) -> "Settings":
        """HOME from $EMBED_ASSETS_HOME; then the settings saved in HOME (unless $EMBED_ASSETS_ITEMS names the items),
        else the bundled sample; then each EMBED_ASSETS_* variable that is set."""
        env = os.environ
        home = home_from_env()
        items = env.get("EMBED_ASSETS_ITEMS")
        if items:
            s = cls(home=home, items=items.split(os.pathsep))
        else:
            s = cls.load(home) or cls.sample(home)
        s.base_uri = env.get("EMBED_ASSETS_BASE_URI") or s.base_uri
        s.id_field = env.get("EMBED_ASSETS_ID_FIELD", s.id_field)
        if env.get("EMBED_ASSETS_TEXT_FIELDS"):
            s.text_fields = split_fields(env["EMBED_ASSETS_TEXT_FIELDS"])
        if env.get("EMBED_ASSETS_PARTITION_SIZE"):
            s.partition_size = int(env["EMBED_ASSETS_PARTITION_SIZE"])
        if env.get("EMBED_ASSETS_MEMORY_BUDGET_MB"):
            s.memory_budget_mb = int(env["EMBED_ASSETS_MEMORY_BUDGET_MB"])
        s.queries = env.get("EMBED_ASSETS_QUERIES", s.queries)
        s.qrels = env.get("EMBED_ASSETS_QRELS", s.qrels)
        s.index_kind = env.get("EMBED_ASSETS_INDEX_KIND", s.index_kind)
        s.device = env.get("EMBED_ASSETS_DEVICE", s.device)
        s.precision = env.get("EMBED_ASSETS_PRECISION", s.precision)
        if env.get("EMBED_ASSETS_CHUNKING"):
            s.chunking = env["EMBED_ASSETS_CHUNKING"].lower() in _ON
        if env.get("EMBED_ASSETS_SEMANTIC_IDS"):
            s.semantic_ids = env["EMBED_ASSETS_SEMANTIC_IDS"].lower() not in _OFF
        s.sid_quantizer = env.get("EMBED_ASSETS_SID_QUANTIZER", s.sid_quantizer)
        if env.get("EMBED_ASSETS_SID_LEVELS"):
            s.sid_levels = int(env["EMBED_ASSETS_SID_LEVELS"])
        if env.get("EMBED_ASSETS_SID_CODEBOOK_SIZE"):
            s.sid_codebook_size = int(env["EMBED_ASSETS_SID_CODEBOOK_SIZE"])
        s.encode_runner = env.get("EMBED_ASSETS_ENCODE_RUNNER", s.encode_runner)
        s.executor = env.get("EMBED_ASSETS_EXECUTOR", s.executor)
        s.k8s = {**s.k8s, **k8s_from_env(env)}
        return s


def settings_path(home: str | os.PathLike) -> Path:
    """HOME/settings.json: the settings of HOME's last `embed-assets run`."""
    return Path(home) / SETTINGS_FILE


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


# EMBED_ASSETS_K8S_<NAME> -> K8sEncodeConfig.<name>: how each variable is read.
_K8S_ENV = {"IMAGE": ("image", str), "NAMESPACE": ("namespace", str), "GPUS": ("gpus", int),
            "GPU_RESOURCE": ("gpu_resource", str), "CPU": ("cpu", str), "MEMORY": ("memory", str),
            "HOME": ("home", str), "HOME_CLAIM": ("home_claim", str), "SERVICE_ACCOUNT": ("service_account", str),
            "NODE_SELECTOR": ("node_selector", "pairs"), "TOLERATIONS": ("tolerations", "json")}


def k8s_from_env(env) -> dict:
    """The GPU pod's settings from EMBED_ASSETS_K8S_* (only those set). NODE_SELECTOR is `key=value,key=value`;
    TOLERATIONS a JSON list of k8s tolerations."""
    import json

    out: dict = {}
    for name, (fld, kind) in _K8S_ENV.items():
        var = f"EMBED_ASSETS_K8S_{name}"
        raw = env.get(var, "").strip()
        if not raw:
            continue
        try:
            if kind == "pairs":
                pairs = [p.partition("=") for p in raw.split(",") if p.strip()]
                if any(not k.strip() or not sep for k, sep, _ in pairs):
                    raise ValueError("expected key=value[,key=value...]")
                out[fld] = {k.strip(): v.strip() for k, _, v in pairs}
            elif kind == "json":
                value = json.loads(raw)
                if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                    raise ValueError("expected a JSON list of objects")
                out[fld] = value
            else:
                out[fld] = kind(raw)
        except ValueError as e:
            raise ValueError(f"{var}={raw!r}: {e}") from None
    return out

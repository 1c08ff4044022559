"""Small PNG charts for reports and Dagster metadata: the norm-error histogram and the recall@k curve.

Pure functions from numbers already computed (embedding_norms' histogram, the report's recall@k) to PNG bytes, so a
chart costs the same at 120 items as at 10M: about 0.1-0.3 s of rendering and 10-30 KB of PNG each, no vectors read.
matplotlib is imported inside the functions and drawn on its Agg canvas directly (no pyplot, no global backend
switch), so rendering never depends on, or changes, the backend of the process that runs it.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any, Sequence

# Small on purpose: 4.8 x 2.8 inches at 80 dpi is 384 x 224 pixels, a few tens of KB of PNG, enough to read in the
# Dagster UI's metadata panel and in a Markdown viewer.
FIG_SIZE = (4.8, 2.8)
DPI = 80


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    # No "Software" stamp: the same numbers give the same bytes, so rewriting an unchanged chart changes nothing.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def norm_histogram_png(hist: dict[str, Any], tolerance: float | None = None) -> bytes:
    """Bar chart of |norm - 1| on the histogram's log-spaced bins (shards.NORM_HIST_EDGES): counts per bin, the
    tolerance as a vertical line, non-finite norms in the title. `hist` is embedding_norms' `histogram`."""
    edges = [float(e) for e in hist["edges"]]
    counts = [int(c) for c in hist["counts"]]
    fig = _figure()
    ax = fig.add_subplot()
    # bin i is [edges[i], edges[i+1]); bin 0 starts at 0 (drawn from edges[1] / 10**0.25 on the log axis) and the
    # last bin (>= edges[-1]) is drawn one bin wide.
    step = edges[2] / edges[1] if len(edges) > 2 and edges[1] > 0 else 10 ** 0.25
    lefts = [edges[1] / step] + edges[1:]
    rights = edges[1:] + [edges[-1] * step]
    ax.bar(lefts, counts, width=[r - le for le, r in zip(lefts, rights)], align="edge", color="#4C72B0",
           edgecolor="white", linewidth=0.3)
    ax.set_xscale("log")
    if tolerance:
        ax.axvline(tolerance, color="#C44E52", linestyle="--", linewidth=1, label=f"tolerance {tolerance:g}")
        ax.legend(fontsize=7, loc="upper right", frameon=False)
    n = int(hist.get("n_vectors", sum(counts)))
    nonfinite = int(hist.get("nonfinite", 0))
    ax.set_title(f"norm error over {n:,} vectors" + (f" ({nonfinite:,} not finite)" if nonfinite else ""),
                 fontsize=9)
    ax.set_xlabel("|‖v‖ − 1|", fontsize=8)
    ax.set_ylabel("vectors", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(fig)


def recall_curve_png(ks: Sequence[int], series: dict[str, Sequence[float | None]]) -> bytes:
    """Line chart of recall@k for each named series (e.g. labelled recall, ANN recall vs exact); a None point is
    left out (a k the series has no value for)."""
    fig = _figure()
    ax = fig.add_subplot()
    markers = "os^D"
    for i, (name, values) in enumerate(series.items()):
        pts = [(k, v) for k, v in zip(ks, values) if v is not None and not math.isnan(v)]
        if pts:
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker=markers[i % len(markers)], markersize=3,
                    linewidth=1.2, label=name)
    ax.set_xscale("log")
    ax.set_xticks(list(ks))
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k", fontsize=8)
    ax.set_ylabel("recall@k", fontsize=8)
    ax.set_title("recall@k", fontsize=9)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.tick_params(labelsize=7)
    if series:
        ax.legend(fontsize=7, loc="lower right", frameon=False)
    return _png(fig)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_image(alt: str, png: bytes) -> str:
    """`![alt](data:image/png;base64,...)`: the image inside the Markdown itself (Dagster's Markdown metadata
    renders it; no file server needed)."""
    return f"![{alt}]({data_uri(png)})"


def write_png(path: Path, png: bytes) -> Path:
    """Atomically (temp file in the same folder, fsync, rename)."""
    from embed_assets.core.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png)
    return path

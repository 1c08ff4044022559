"""Progress lines of a long encode (what item_embeddings sends to context.log): first batch, then at most every
`progress_every_s`, then the last batch; items done/total, items/s, tokens/s and ETA. Real model, a clock we move."""

import re
import types

from embed_assets_tests.conftest import sample_docs

LINE = re.compile(r"^batch (?P<b>\d+)/(?P<n>\d+): (?P<done>[\d,]+)/(?P<total>[\d,]+) items \((?P<pct>[\d.]+)% of "
                  r"tokens\), (?P<ips>[\d,.]+) items/s, [\d,]+ tokens/s, ETA (?P<eta>[\d,]+) s$")


def _fake_clock(monkeypatch, step_s: float) -> None:
    """Each perf_counter() call inside the encoder moves time by step_s (one call per batch in the loop)."""
    import time

    import embed_assets.core.encoder as enc

    now = [1000.0]

    def perf_counter():
        now[0] += step_s
        return now[0]

    monkeypatch.setattr(enc, "time", types.SimpleNamespace(perf_counter=perf_counter, strftime=time.strftime))


def test_progress_first_every_interval_and_last(encoder32, monkeypatch):
    titles = [d["title"] for d in sample_docs(30)]
    texts = titles + titles[:6]  # duplicates count as done with their text
    monkeypatch.setattr(encoder32, "token_budget", 64)  # a few titles per batch: ~10 batches
    _fake_clock(monkeypatch, 4.0)
    lines: list[str] = []
    _, stats = encoder32.encode(texts, progress=lines.append, progress_every_s=10.0)
    got = [LINE.match(x) for x in lines]
    assert all(got), lines
    batches = [int(m["b"]) for m in got]
    n = stats.n_batches
    assert n >= 8 and all(int(m["n"]) == n for m in got)
    # 4 s per batch, 10 s interval: batch 1, then every third batch (12 s since the last line), and the last one
    assert batches == sorted({1, *range(4, n + 1, 3), n}), (batches, n)
    done = [int(m["done"].replace(",", "")) for m in got]
    assert done == sorted(done) and done[-1] == stats.n_texts == 36 and all(int(m["total"]) == 36 for m in got)
    assert 0 < done[0] < 36 and float(got[-1]["pct"]) == 100.0 and got[-1]["eta"] == "0"
    # items/s over the batches' own time: the last line's is items / (4 s x batches)
    assert abs(float(got[-1]["ips"]) - 36 / (4.0 * n)) < 0.06


def test_a_single_batch_logs_once_and_no_callback_logs_nothing(encoder32):
    lines: list[str] = []
    encoder32.encode(["red cotton t-shirt", "blue mug"], progress=lines.append)
    assert len(lines) == 1 and LINE.match(lines[0])["b"] == "1" and LINE.match(lines[0])["done"] == "2"
    encoder32.encode(["red cotton t-shirt"])  # progress=None: nothing to call, nothing computed for it

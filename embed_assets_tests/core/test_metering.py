"""Per-step peak RSS: a step's figure is its own, not the heap an earlier step freed but the process kept."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from embed_assets.core.metering import metered


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmRSS, clear_refs and malloc_trim are Linux/glibc")
def test_a_step_does_not_report_the_heap_an_earlier_step_freed():
    base = _rss_mb()
    # An "earlier step": 320 MB in 64 KB arrays (glibc's heap, below the mmap threshold), freed except the last one,
    # which pins the top of the heap so glibc cannot shrink it by itself.
    arrays = [np.ones(8_000) for _ in range(5_000)]
    keep = arrays[-1]
    del arrays
    retained = _rss_mb() - base
    assert retained > 200, f"the freed heap was returned without a trim ({retained:.0f} MB kept): nothing to test"

    with metered() as usage:
        small = np.ones(1_000_000)  # the step itself: 8 MB
    assert usage.peak_is_per_step
    assert usage.peak_rss_mb < base + 100, (usage.peak_rss_mb, base, retained)
    assert usage.seconds >= 0 and usage.cpu_seconds >= 0
    del keep, small


def test_a_steps_peak_includes_what_it_allocated():
    base = _rss_mb()
    with metered() as usage:
        big = np.ones(40_000_000)  # 320 MB, touched
        big[::512] = 2.0
        del big
    assert usage.peak_rss_mb > base + 250, (usage.peak_rss_mb, base)

"""Seconds and peak memory of one step, for run summaries and materialization metadata.

Peak RSS is the process's high-water mark (VmHWM). A step first returns the heap earlier steps freed to the OS
(`malloc_trim`), then resets the mark (Linux: `/proc/self/clear_refs`), so in a process that runs several steps (the
CLI, in-process runs) each step reports its own peak, not the largest so far nor what an earlier step left behind.
Where the reset is not possible the figure is the process's peak so far, and says so.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Usage:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0  # user + system CPU of this process during the step: unlike wall time, barely moved by
    # other processes competing for the cores
    peak_is_per_step: bool = True

    def as_metadata(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 3), "cpu_seconds": round(self.cpu_seconds, 3),
                "peak_rss_mb": round(self.peak_rss_mb, 1)}


def _trim_heap() -> None:
    """Hand memory that earlier steps freed back to the OS (glibc `malloc_trim`). A process that runs several steps
    (the CLI, in-process runs, a long backfill) otherwise keeps the largest step's freed heap resident, and every
    later step's peak starts from it. A no-op where the C library has no malloc_trim."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def metered():
    """`with metered() as u: ...` then u.seconds and u.peak_rss_mb."""
    _trim_heap()
    u = Usage(peak_is_per_step=_reset_peak())
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield u
    finally:
        u.seconds = time.perf_counter() - t0
        u.cpu_seconds = time.process_time() - c0
        u.peak_rss_mb = peak_rss_mb()

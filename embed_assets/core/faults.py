"""Crash points for the crash-safety tests: `EMBED_ASSETS_CRASH_AT=<name>` makes the process SIGKILL itself there.

Inert unless that variable names the point; it lets a test kill a real run at an exact moment (mid-encoding, between
a shard's files, inside the catalog transaction, between the index and its manifest) instead of racing a timer.
"""

import os
import signal

ENV = "EMBED_ASSETS_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

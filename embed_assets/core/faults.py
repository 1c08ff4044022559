"""Fault and pause points for the crash-safety and concurrency tests. Inert unless an environment variable names them.

- `EMBED_ASSETS_CRASH_AT=<name>`: the process SIGKILLs itself at that point (mid-encoding, between a shard's files,
  inside the catalog transaction, between the index and its manifest) instead of a test racing a timer.
- `EMBED_ASSETS_PAUSE_AT=<name>[:<seconds>][,<name>...]`: the process waits at that point, for the given seconds, or
  else while the file named by `EMBED_ASSETS_PAUSE_FILE` exists (at most 10 minutes). A test holds a real run at an
  exact moment (a live writer between its shard and its manifest, a run that the user then cancels).
"""

import os
import signal
import time

ENV = "EMBED_ASSETS_CRASH_AT"
PAUSE_ENV = "EMBED_ASSETS_PAUSE_AT"
PAUSE_FILE_ENV = "EMBED_ASSETS_PAUSE_FILE"
MAX_PAUSE_S = 600.0


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    pause_point(name)


def pause_point(name: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    for entry in spec.split(","):
        point, _, seconds = entry.strip().partition(":")
        if point != name:
            continue
        if seconds:
            time.sleep(float(seconds))
            return
        gate = os.environ.get(PAUSE_FILE_ENV)
        deadline = time.monotonic() + MAX_PAUSE_S
        while gate and os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.1)
        return

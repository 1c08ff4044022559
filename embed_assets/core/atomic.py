"""Atomic, durable file writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader sees either the old file or the complete new one, never a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    # Dot-prefixed and unique per writer, so globs like shard_*.pt never match it and two writers never collide.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then move the finished file into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


class HashingWriter:
    """A binary file for writers that take one (torch.save, faiss's PyCallbackIOWriter): what goes through
    `write` goes to `fh` and into a sha256, so the checksum of a file costs no second read of it."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def write_hashed(path: str | os.PathLike, write: Callable[[HashingWriter], Any], mtime_ns: int | None = None) -> str:
    """Write a file through `write(HashingWriter)`, not atomically (a file inside a work folder that is renamed
    whole, or `atomic_write_hashed`'s temp file); returns the sha256 of exactly the bytes written. `mtime_ns` sets
    the file's mtime afterwards (see shards.write_vouched)."""
    with open(path, "wb") as fh:
        hw = HashingWriter(fh)
        write(hw)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return hw.sha256.hexdigest()


def atomic_write_hashed(path: str | os.PathLike, write: Callable[[HashingWriter], Any],
                        mtime_ns: int | None = None) -> str:
    """`atomic_write` of `write_hashed`: returns the sha256 of exactly the bytes written."""
    digest: list[str] = []
    atomic_write(path, lambda tmp: digest.append(write_hashed(tmp, write, mtime_ns)))
    return digest[0]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, created if missing; released when the block ends or the process
    dies."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def process_gone(pid: int | None) -> bool:
    """True only when no process with this pid exists on this machine (None, or one we may not signal: not gone)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False



def _older_than(path: Path, max_age_s: float) -> bool:
    import time

    try:
        return time.time() - path.stat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def abandoned_temp_file(tmp: Path, max_age_s: float = 24 * 3600) -> bool:
    """A temp file whose writer is gone (its pid, part of the name, no longer runs) or that is older than a day."""
    parts = tmp.name.split(".")
    pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
    return process_gone(pid) or _older_than(tmp, max_age_s)


def abandoned_work_dir(work: Path, max_age_s: float = 24 * 3600) -> bool:
    """A scratch folder `.<what>-<pid>-<tag>` (e.g. ingest's spill folder) whose process is gone, or a day old."""
    parts = work.name.split("-")
    pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
    return process_gone(pid) or _older_than(work, max_age_s)

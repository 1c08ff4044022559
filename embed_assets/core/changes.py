"""What changed: content fingerprints of raw item files, partitions whose shard is not current, a stale index.

Pure functions over HOME, used by the sensor (and usable from a notebook) to decide what must run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from embed_assets.core.atomic import sha256_file
from embed_assets.core.index import IndexBuildError, read_index_manifest
from embed_assets.core.items import ItemsError, discover_files, load_row_groups
from embed_assets.core.layout import Layout
from embed_assets.core.shards import ShardError, embedding_fingerprint, read_manifest, verify_files


def fingerprint_files(paths: Sequence[str], known: dict[str, list] | None = None) -> tuple[dict[str, list], str]:
    """{path: [size, mtime_ns, sha256]} and one fingerprint over all files' contents.

    A file is re-hashed only when its size or mtime moved; the fingerprint itself is over content, so touching a
    file without changing it triggers nothing.
    """
    known = known or {}
    files: dict[str, list] = {}
    for f in discover_files(paths):
        st = f.stat()
        prev = known.get(str(f))
        if prev and prev[0] == st.st_size and prev[1] == st.st_mtime_ns:
            files[str(f)] = prev
        else:
            files[str(f)] = [st.st_size, st.st_mtime_ns, sha256_file(f)]
    blob = json.dumps(sorted((p, v[2]) for p, v in files.items())).encode()
    return files, hashlib.sha256(blob).hexdigest()[:32]


def stale_partitions(layout: Layout, version: dict[str, Any]) -> list[tuple[str, str]]:
    """(partition, wanted shard fingerprint) for every row group whose shard is missing or not current."""
    try:
        groups = load_row_groups(layout)
    except ItemsError:
        return []
    out = []
    for rg in groups:
        want = embedding_fingerprint(rg["fingerprint"], version)
        try:
            m = read_manifest(layout, rg["partition"])
        except ShardError:
            m = None
        if m is None or m.fingerprint != want or verify_files(layout, m, _cached_sha256):
            out.append((rg["partition"], want))
    return out


_HASHES: dict[tuple, str] = {}


def _cached_sha256(path) -> str:
    """sha256 cached by (path, size, mtime, inode): a sensor tick re-hashes only files written since the last
    tick, so a corrupted shard is still noticed without hashing every shard on every tick."""
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _HASHES:
            _HASHES[key] = sha256_file(path)
    except FileNotFoundError:
        return ""  # removed meanwhile: not intact
    return _HASHES[key]


def index_state(layout: Layout) -> tuple[bool, str]:
    """(is the index built over exactly the current shards?, fingerprint of the current shard set)."""
    try:
        groups = load_row_groups(layout)
    except ItemsError:
        return True, ""
    current = {}
    for rg in groups:
        try:
            m = read_manifest(layout, rg["partition"])
        except ShardError:
            m = None
        current[rg["partition"]] = m.fingerprint if m else None
    fp = hashlib.sha256(json.dumps(sorted(current.items())).encode()).hexdigest()[:32]
    try:
        built = read_index_manifest(layout).get("shard_fingerprints", {})
    except IndexBuildError:
        return False, fp  # no index, or an unreadable manifest: not current
    return built == current, fp

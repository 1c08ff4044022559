"""Trusted artifacts under a base URI that may be an object store: `s3://bucket/prefix` (s3fs), `file:///path`, or
any other fsspec URL. HOME stays a local working folder (catalog, hash caches, spill files, locks); the base URI
holds a copy of what HOME trusts: shards, index versions, semantic ID versions, reports.

An object store has no rename, so atomicity comes from the order of the writes and from checksums:
  - a data object is written in one request (s3fs: one PUT under 2 x its chunk size, else a multipart upload, which
    is invisible until completed); on a local file system each object goes to a dot-temp name and is renamed;
  - the manifest that names the data objects by sha256 is written after them, and a `current` pointer (a small
    JSON object naming a version and its manifest's sha256) after the version it names;
  - a reader trusts an object only when a manifest names it and the fetched bytes hash to what the manifest says.
    Data without a manifest, or a manifest whose data do not match (a half-finished upload, a concurrent writer, a
    corrupt object), is never used: `Untrusted` says which URI and what to do.
Publishing is idempotent: a manifest that is already there with the same bytes (and data objects of the right
sizes) is not uploaded again.

Configuration: the base URI (`EMBED_ASSETS_BASE_URI`, `embed-assets run --base-uri`, `HomeResource.base_uri`);
credentials and endpoint from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION /
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an S3-compatible server, AWS_PROFILE; botocore reads
them) or `FSSPEC_S3_<OPTION>` variables (fsspec reads them when it is imported, e.g. FSSPEC_S3_ENDPOINT_URL), plus
`EMBED_ASSETS_STORAGE_OPTIONS`, a JSON object passed to the file system (e.g. {"endpoint_url": "http://..."}).

`STATS` counts this process's requests and bytes (tests and the cost figures in the README use it).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from embed_assets.core.atomic import atomic_write, atomic_write_bytes, sha256_file

BASE_URI_ENV = "EMBED_ASSETS_BASE_URI"
STORAGE_OPTIONS_ENV = "EMBED_ASSETS_STORAGE_OPTIONS"
POINTER = "current"  # under a versions root: {"version", "manifest_sha256", "created_at"}
VERSION_MANIFEST = "manifest.json"
_VERSION_NAME = re.compile(r"^v\d{5,}$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class StoreError(RuntimeError):
    """The store cannot be reached or written (credentials, endpoint, bucket): says which URI."""


class Untrusted(StoreError):
    """An object in the store that no manifest vouches for, or whose bytes do not match it: never used."""


@dataclass
class StoreStats:
    gets: int = 0  # object reads (GET; a HEAD that a read needs is counted in it)
    heads: int = 0  # size checks
    puts: int = 0
    lists: int = 0
    deletes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, 0)


STATS = StoreStats()
_LOCK = threading.Lock()


def _count(**inc: int) -> None:
    with _LOCK:
        for k, v in inc.items():
            setattr(STATS, k, getattr(STATS, k) + v)


def base_uri_from_env() -> str | None:
    return os.environ.get(BASE_URI_ENV) or None


def storage_options_from_env() -> dict[str, Any]:
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError as e:
        raise StoreError(f"${STORAGE_OPTIONS_ENV} is not JSON ({e}); set it to an object such as "
                         '{"endpoint_url": "http://127.0.0.1:9000"}') from None
    if not isinstance(opts, dict):
        raise StoreError(f"${STORAGE_OPTIONS_ENV} must be a JSON object, not {type(opts).__name__}")
    return opts


def check_name(name: str, where: str) -> str:
    """A file name read from a manifest in the store: a plain name, never a path (nothing is written outside the
    folder it belongs in, whatever a manifest says)."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name):
        raise Untrusted(f"{where}: names the file {name!r}, which is not a plain file name; not used")
    return name


class Store:
    """One base URI: a file system (fsspec) and the root path in it. Paths given to the methods are relative
    (`embeddings/shard_p01.pt`); messages name the full URI."""

    def __init__(self, base_uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        from fsspec.core import url_to_fs

        self.base_uri = base_uri.rstrip("/")
        opts = dict(storage_options_from_env() if storage_options is None else storage_options)
        protocol = self.base_uri.split("://", 1)[0] if "://" in self.base_uri else "file"
        self.local = protocol in ("file", "local")
        if not self.local:
            # Another process (a second pod, a test) writes the same keys: never answer from a listing cache.
            opts.setdefault("use_listings_cache", False)
        try:
            self.fs, self.root = url_to_fs(self.base_uri, **opts)
        except (ImportError, ValueError) as e:
            raise StoreError(f"{self.base_uri}: no file system for this URI ({e}); use s3://bucket/prefix, "
                             "file:///path or another fsspec URL whose package is installed") from e
        self.root = self.root.rstrip("/")
        self._s3 = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else [self.fs.protocol])

    def __repr__(self) -> str:
        return f"Store({self.base_uri!r})"

    def uri(self, rel: str) -> str:
        return f"{self.base_uri}/{rel}" if rel else self.base_uri

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def _fail(self, what: str, rel: str, e: Exception) -> StoreError:
        return StoreError(f"{self.uri(rel)}: {what} failed ({type(e).__name__}: {e}); check the base URI, the "
                          "credentials and the endpoint (AWS_* variables or $EMBED_ASSETS_STORAGE_OPTIONS)")

    # ---- reads -----------------------------------------------------------------------------------------------
    def get_bytes(self, rel: str) -> bytes | None:
        """The object's bytes; None when there is no such object."""
        try:
            data = self.fs.cat_file(self._path(rel), **({"max_concurrency": 1} if self._s3 else {}))
        except FileNotFoundError:
            _count(gets=1)
            return None
        except IsADirectoryError:
            return None
        except Exception as e:  # noqa: BLE001 - the network, credentials, a missing bucket
            raise self._fail("read", rel, e) from e
        _count(gets=1, bytes_down=len(data))
        return data

    def size(self, rel: str) -> int | None:
        try:
            info = self.fs.info(self._path(rel))
        except FileNotFoundError:
            _count(heads=1)
            return None
        except Exception as e:  # noqa: BLE001
            raise self._fail("stat", rel, e) from e
        _count(heads=1)
        return int(info["size"]) if info.get("type", "file") == "file" else None

    def list_names(self, rel: str) -> list[str]:
        """Names directly under a folder (objects and prefixes); [] when there is none."""
        try:
            entries = self.fs.ls(self._path(rel), detail=False, **({"refresh": True} if self._s3 else {}))
        except FileNotFoundError:
            entries = []
        except Exception as e:  # noqa: BLE001
            raise self._fail("list", rel, e) from e
        _count(lists=1)
        return sorted({posixpath.basename(str(p).rstrip("/")) for p in entries})

    def get_file(self, rel: str, local: Path, sha256: str) -> int:
        """Download an object to `local` (atomically), only if its bytes hash to `sha256`; returns its size.
        Raises Untrusted (missing object, or other bytes) naming the URI."""
        seen: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            if self.local:
                shutil.copyfile(self._path(rel), tmp)
            else:
                self.fs.get_file(self._path(rel), str(tmp))
            seen["sha256"] = sha256_file(tmp)
            seen["bytes"] = tmp.stat().st_size
            if seen["sha256"] != sha256:
                raise Untrusted("mismatch")

        try:
            atomic_write(local, write)
        except FileNotFoundError:
            _count(gets=1)
            raise Untrusted(f"{self.uri(rel)} is missing though its manifest names it: a half-finished upload or "
                            "a deleted object; not used") from None
        except Untrusted:
            _count(gets=1, bytes_down=seen.get("bytes", 0))
            raise Untrusted(f"{self.uri(rel)} has sha256 {seen['sha256'][:16]}…, its manifest says {sha256[:16]}…: "
                            "a half-finished upload, a concurrent writer or a corrupt object; not used") from None
        except Exception as e:  # noqa: BLE001
            raise self._fail("download", rel, e) from e
        _count(gets=1, bytes_down=seen["bytes"])
        return seen["bytes"]

    # ---- writes ----------------------------------------------------------------------------------------------
    def put_file(self, local: Path, rel: str) -> int:
        """Upload one file as one object (atomic: readers see the old object or the whole new one)."""
        size = Path(local).stat().st_size
        try:
            if self.local:
                atomic_write(Path(self._path(rel)), lambda tmp: shutil.copyfile(local, tmp))
            else:
                self.fs.put_file(str(local), self._path(rel))
        except Exception as e:  # noqa: BLE001
            raise self._fail("upload", rel, e) from e
        _count(puts=1, bytes_up=size)
        return size

    def put_bytes(self, rel: str, data: bytes) -> None:
        try:
            if self.local:
                atomic_write_bytes(Path(self._path(rel)), data)
            else:
                self.fs.pipe_file(self._path(rel), data)
        except Exception as e:  # noqa: BLE001
            raise self._fail("upload", rel, e) from e
        _count(puts=1, bytes_up=len(data))

    def delete(self, rel: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(self._path(rel), recursive=recursive)
        except FileNotFoundError:
            return
        except Exception as e:  # noqa: BLE001
            raise self._fail("delete", rel, e) from e
        _count(deletes=1)


_STORES: dict[tuple[int, str, str], Store] = {}


def store_for(base_uri: str | None) -> Store | None:
    """The Store of a base URI (one per URI and storage options in a process: a forked step process makes its own,
    never shares its parent's connections); None when there is no base URI."""
    if not base_uri:
        return None
    opts = storage_options_from_env()
    key = (os.getpid(), base_uri, json.dumps(opts, sort_keys=True))
    st = _STORES.get(key)
    if st is None:
        st = _STORES[key] = Store(base_uri, opts)
    return st


# ---- file sets: data objects first, the manifest that names them last ---------------------------------------------

def publish_set(store: Store, rel_dir: str, files: Mapping[str, Path], manifest_name: str,
                manifest_bytes: bytes, sizes_must_match: bool = True) -> dict[str, int]:
    """Publish data files, then the manifest that vouches for them (a shard, an index or semantic-ID version).

    Skipped when the store already holds these exact manifest bytes and every data object has its local size (a
    HEAD each): re-publishing is idempotent. Returns {"uploaded": objects, "bytes": n, "skipped": 0|1}."""
    rel = lambda name: f"{rel_dir}/{name}" if rel_dir else name  # noqa: E731
    if store.get_bytes(rel(manifest_name)) == manifest_bytes:
        if not sizes_must_match or all(store.size(rel(n)) == Path(p).stat().st_size for n, p in files.items()):
            return {"uploaded": 0, "bytes": 0, "skipped": 1}
    n = 0
    for name, path in files.items():
        n += store.put_file(Path(path), rel(name))
    store.put_bytes(rel(manifest_name), manifest_bytes)
    return {"uploaded": len(files) + 1, "bytes": n + len(manifest_bytes), "skipped": 0}


def fetch_file(store: Store, rel: str, sha256: str, local: Path) -> int:
    """Download one object into place (atomically), only if its bytes match `sha256`."""
    return store.get_file(rel, Path(local), sha256)


# ---- versions with a `current` pointer (index, semantic IDs) ------------------------------------------------------

def pointer_bytes(name: str, manifest_bytes: bytes, created_at: float | None) -> bytes:
    return (json.dumps({"version": name, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                        "created_at": created_at}, sort_keys=True) + "\n").encode()


def read_pointer(store: Store, rel_root: str) -> dict[str, Any] | None:
    """The store's `current` pointer under a versions root; None when there is none. A pointer that is not what a
    publisher writes raises Untrusted."""
    raw = store.get_bytes(f"{rel_root}/{POINTER}")
    if raw is None:
        return None
    try:
        p = json.loads(raw)
        ok = isinstance(p, dict) and _VERSION_NAME.match(str(p.get("version"))) and \
            re.fullmatch(r"[0-9a-f]{64}", str(p.get("manifest_sha256")))
    except ValueError:
        ok = False
    if not ok:
        raise Untrusted(f"{store.uri(rel_root + '/' + POINTER)} is not a version pointer; not used (delete it: "
                        "the next build publishes a new one)")
    return p


def remote_versions(store: Store, rel_root: str) -> list[str]:
    """Version folders (`v00001`, ...) under a versions root in the store, oldest first (one LIST)."""
    return sorted((n for n in store.list_names(rel_root) if _VERSION_NAME.match(n)), key=lambda n: int(n[1:]))


def publish_version(store: Store, rel_root: str, folder: Path, files: Mapping[str, str],
                    keep: int | None = None, check: bool = True) -> dict[str, Any]:
    """Publish one local version folder and point the store's `current` at it: its data files (names -> sha256,
    checked against the local files first unless `check` is False: a writer that has just hashed them), then its
    manifest.json, then the pointer; with `keep`, older versions past the newest `keep` are deleted from the store
    (manifest first; never the current one).

    Idempotent: nothing is uploaded when the store's pointer already names this version with these manifest bytes."""
    name = folder.name
    mbytes = (folder / VERSION_MANIFEST).read_bytes()
    ptr = pointer_bytes(name, mbytes, json.loads(mbytes).get("created_at"))
    out: dict[str, Any] = {"version": name, "uploaded": 0, "bytes": 0, "skipped": 0, "pruned": []}
    try:
        live = read_pointer(store, rel_root)
    except Untrusted:
        live = None
    if live is not None and live["version"] == name and live["manifest_sha256"] == hashlib.sha256(mbytes).hexdigest():
        out["skipped"] = 1
        return out
    for fname, sha in files.items() if check else ():
        if sha256_file(folder / fname) != sha:
            raise StoreError(f"{folder / fname} does not match {folder / VERSION_MANIFEST}; not published "
                             "(rebuild it)")
    res = publish_set(store, f"{rel_root}/{name}", {f: folder / f for f in files}, VERSION_MANIFEST, mbytes)
    store.put_bytes(f"{rel_root}/{POINTER}", ptr)  # last: the version is complete in the store
    out.update(uploaded=res["uploaded"] + 1, bytes=res["bytes"] + len(ptr))
    if keep is not None:
        out["pruned"] = prune_versions(store, rel_root, keep, name)
    return out


def prune_versions(store: Store, rel_root: str, keep: int, current: str) -> list[str]:
    """Delete all but the newest `keep` versions from the store (never `current`), each manifest first so that no
    reader trusts a half-deleted version."""
    names = [n for n in remote_versions(store, rel_root) if n != current]
    gone = names[:max(0, len(names) - (keep - 1))] if keep > 0 else names
    for n in gone:
        store.delete(f"{rel_root}/{n}/{VERSION_MANIFEST}")
        store.delete(f"{rel_root}/{n}", recursive=True)
    return gone


def fetch_version(store: Store, rel_root: str, pointer: Mapping[str, Any], dest_root: Path,
                  files_of: Callable[[dict[str, Any]], Mapping[str, str]], work_name: str) -> Path:
    """Download the version a pointer names into `dest_root/<version>`: its manifest must hash to the pointer's
    sha256, every file it names to the manifest's sha256. Built in `dest_root/<work_name>` and renamed into place
    whole. An existing local folder of that name is kept when its manifest is the same bytes, else replaced.
    Raises Untrusted (naming the URI) when anything does not match."""
    name = pointer["version"]
    mrel = f"{rel_root}/{name}/{VERSION_MANIFEST}"
    mbytes = store.get_bytes(mrel)
    if mbytes is None:
        raise Untrusted(f"{store.uri(mrel)} is missing, though {store.uri(rel_root + '/' + POINTER)} names "
                        f"version {name}: a half-finished publish; not used")
    if hashlib.sha256(mbytes).hexdigest() != pointer["manifest_sha256"]:
        raise Untrusted(f"{store.uri(mrel)} does not match the checksum its `current` pointer gives: a publish in "
                        "progress or a corrupt object; not used")
    try:
        manifest = json.loads(mbytes)
        files = {check_name(f, store.uri(mrel)): sha for f, sha in files_of(manifest).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Untrusted(f"{store.uri(mrel)}: unreadable manifest ({e}); not used") from e
    dest = dest_root / name
    if dest.is_dir() and (dest / VERSION_MANIFEST).is_file() and (dest / VERSION_MANIFEST).read_bytes() == mbytes \
            and all((dest / f).is_file() and sha256_file(dest / f) == sha for f, sha in files.items()):
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    work = dest_root / work_name
    work.mkdir()
    try:
        for fname, sha in files.items():
            fetch_file(store, f"{rel_root}/{name}/{fname}", sha, work / fname)
        atomic_write_bytes(work / VERSION_MANIFEST, mbytes)
        if dest.exists():  # the same name with other contents: replaced (the store's live version wins)
            trash = dest_root / (f"{work_name[:-4]}-old.tmp" if work_name.endswith(".tmp") else f"{work_name}-old")
            os.rename(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(work, dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return dest


# ---- reports: one object each, with a small manifest beside it ------------------------------------------------------

REPORTS = "reports"


def sync_current(store: Store, rel_root: str, local_root: Path, local: str | None,
                 files_of: Callable[[dict[str, Any]], Mapping[str, str]], publish: Callable[[str], Any],
                 point: Callable[[str], None], work_name: Callable[[str], str], what: str, on_untrusted: str,
                 say: Callable[[str], None]) -> str:
    """Make HOME's live version (`local`, a folder under `local_root`) and the store's `current` agree, by their
    manifests' created_at: the store's version is fetched (checksums verified) and made current here with `point`
    when it is newer or HOME has none; HOME's is published with `publish` when it is newer or the store has none (an
    earlier publish that failed). A fetch is built in `local_root/work_name(version)`. An untrusted pointer or
    version is reported and left alone. Returns what it did:
    same, published, none, fetched or untrusted. Used by the index and the semantic IDs alike."""
    try:
        ptr = read_pointer(store, rel_root)
    except Untrusted as e:
        say(str(e))
        ptr = None
    local_created, local_sha = None, None
    if local is not None:
        try:
            raw = (local_root / local / VERSION_MANIFEST).read_bytes()
            local_created, local_sha = json.loads(raw).get("created_at") or 0, hashlib.sha256(raw).hexdigest()
        except (OSError, ValueError):
            local = None
    if ptr is not None and ptr["manifest_sha256"] == local_sha:
        return "same"
    if local is not None and (ptr is None or local_created > (ptr.get("created_at") or 0)):
        publish(local)
        return "published"
    if ptr is None:
        return "none"
    try:
        fetch_version(store, rel_root, ptr, local_root, files_of, work_name(ptr["version"]))
    except Untrusted as e:
        say(f"{e}; {on_untrusted}")
        return "untrusted"
    point(ptr["version"])
    say(f"{what} {ptr['version']} taken from {store.uri(rel_root)} (checksums verified)")
    return "fetched"


def publish_reports(store: Store, reports_dir: Path, names: list[str] | None = None) -> dict[str, int]:
    """Publish report files (all files in `reports_dir` by default): each as one object, then
    `<name>.manifest.json` with its sha256 and size. A report whose manifest in the store already has its sha256 is
    skipped (one GET)."""
    reports_dir = Path(reports_dir)
    if names is None:
        names = sorted(p.name for p in reports_dir.iterdir()
                       if p.is_file() and not p.name.startswith(".")) if reports_dir.is_dir() else []
    out = {"uploaded": 0, "bytes": 0, "skipped": 0}
    for name in names:
        path = reports_dir / name
        if not path.is_file():
            continue
        sha = sha256_file(path)
        manifest = (json.dumps({"file": name, "sha256": sha, "bytes": path.stat().st_size}, sort_keys=True)
                    + "\n").encode()
        res = publish_set(store, REPORTS, {name: path}, f"{name}.manifest.json", manifest, sizes_must_match=False)
        for k in out:
            out[k] += res[k]
    return out


def fetch_report(store: Store, name: str, local: Path) -> Path:
    """A report from the store, checked against its manifest."""
    rel = f"{REPORTS}/{name}.manifest.json"
    raw = store.get_bytes(rel)
    if raw is None:
        raise Untrusted(f"{store.uri(rel)} is missing: report {name} was never published (or half-published)")
    try:
        sha = json.loads(raw)["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise Untrusted(f"{store.uri(rel)}: unreadable manifest ({e}); not used") from e
    fetch_file(store, f"{REPORTS}/{check_name(name, store.uri(rel))}", sha, local)
    return local


def work_dir_name(prefix: str) -> str:
    """A scratch name `<prefix>-<pid>-<tag>` that `atomic.abandoned_work_dir` can judge."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

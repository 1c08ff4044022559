"""Reading the seed-format shard file (`torch.save({"item_id": [...], "embeddings": fp16 tensor})`) fast and safely.

`torch.load(weights_only=True)` is safe but unpickles in pure Python: on a 125,826-row shard it takes 0.24 s, of
which the tensor is 0.02 s and the list of item ids the rest (a full pipeline run reads each shard 6-8 times).
`read_shard_pt` does what Python's documentation calls "restricting globals": the C unpickler, with `find_class`
allowing exactly the three names a shard's pickle refers to (`torch._utils._rebuild_tensor_v2`, a `torch.*Storage`
type, `collections.OrderedDict`) and mapping them to numpy, so the vectors come straight out of the zip member
without torch. Anything else (another global, a non-contiguous or big-endian tensor, a storage type not listed)
raises `NotASimpleShard`, and the caller falls back to torch's own safe loader, which accepts or refuses it.

Measured: `benchmarks/shard_load.py` (results in benchmarks/results/shard_load.txt).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile

import numpy as np

_DTYPES = {"HalfStorage": np.float16, "FloatStorage": np.float32, "DoubleStorage": np.float64}


class NotASimpleShard(Exception):
    """The file is not the plain layout `read_shard_pt` reads; use torch.load(weights_only=True) instead."""


class _Storage:
    def __init__(self, dtype) -> None:
        self.dtype = dtype


def _rebuild_array(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2, for a C-contiguous tensor, as a numpy view of its storage."""
    if not isinstance(storage, np.ndarray) or requires_grad or hooks or metadata:
        raise NotASimpleShard("a tensor this reader does not handle")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    want, acc = [], 1
    for s in reversed(size):
        want.append(acc)
        acc *= s
    if stride != tuple(reversed(want)) and math.prod(size) > 1:
        raise NotASimpleShard(f"a non-contiguous tensor (size {size}, stride {stride})")
    n = math.prod(size)
    if offset < 0 or offset + n > len(storage):
        raise NotASimpleShard("a tensor past the end of its storage")
    return storage[offset:offset + n].reshape(size)


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str, data: bytes) -> None:
        super().__init__(fh)
        self._archive, self._prefix, self._data = archive, prefix, data

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_array
        if module == "torch" and name in _DTYPES:
            return _Storage(_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise NotASimpleShard(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise NotASimpleShard(f"storage reference {pid!r:.80}")
        _, storage, key, _location, numel = pid
        try:
            info = self._archive.getinfo(f"{self._prefix}/data/{key}")
        except KeyError:
            raise NotASimpleShard(f"storage {key} missing") from None
        arr = np.frombuffer(_member_bytes(self._data, info), dtype=storage.dtype)
        if len(arr) != int(numel):
            raise NotASimpleShard(f"storage {key}: {len(arr)} values, the pickle says {numel}")
        return arr


def _member_bytes(data: bytes, info: zipfile.ZipInfo) -> memoryview:
    """A stored (uncompressed) member's bytes as a view into the archive: no copy, and no CRC pass (zipfile's read
    spends 75 ms on a 150 MB member computing one; the caller has already checked the whole file's sha256)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise NotASimpleShard(f"{info.filename} is compressed")
    head = data[info.header_offset:info.header_offset + 30]
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise NotASimpleShard(f"{info.filename}: bad local header")
    start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
    if start + info.file_size > len(data):
        raise NotASimpleShard(f"{info.filename} runs past the end of the file")
    return memoryview(data)[start:start + info.file_size]


def read_shard_pt(data: bytes) -> tuple[list[str], np.ndarray]:
    """(item ids, embeddings) of a shard file's bytes; raises NotASimpleShard when torch must read it instead."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as e:
        raise NotASimpleShard(f"not a zip archive ({e})") from None
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise NotASimpleShard("no single data.pkl")
    prefix = pkl[0].rsplit("/", 1)[0]
    if f"{prefix}/byteorder" in names and archive.read(f"{prefix}/byteorder") != b"little":
        raise NotASimpleShard("big-endian storages")
    try:
        obj = _Unpickler(io.BytesIO(archive.read(pkl[0])), archive, prefix, data).load()
    except NotASimpleShard:
        raise
    except Exception as e:  # a malformed pickle: torch's loader gives the error the user sees
        raise NotASimpleShard(f"{type(e).__name__}: {e}") from None
    if not (isinstance(obj, dict) and set(obj) == {"item_id", "embeddings"} and isinstance(obj["item_id"], list)
            and isinstance(obj["embeddings"], np.ndarray) and obj["embeddings"].ndim == 2
            and all(type(i) is str for i in obj["item_id"])):
        raise NotASimpleShard("not {'item_id': list[str], 'embeddings': 2-d tensor}")
    return obj["item_id"], obj["embeddings"]

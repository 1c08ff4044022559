"""core/shard_pt.py: the fast reader gives exactly what torch.load(weights_only=True) gives, and refuses what it
does not know (the caller then uses torch's own safe loader)."""

import io
import pickle

import numpy as np
import pytest

from embed_assets.core.shard_pt import NotASimpleShard, read_shard_pt
from embed_assets.core.shards import _load_pt, write_shard_pt


def _torch_load(data: bytes):
    import torch

    d = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    return list(d["item_id"]), d["embeddings"].numpy()


@pytest.mark.parametrize("n", [0, 1, 3_000])
def test_reads_what_torch_reads(n, tmp_path):
    import hashlib

    rng = np.random.default_rng(n)
    ids = [f"item-{i}-é" for i in range(n)]
    emb = rng.standard_normal((n, 384)).astype(np.float16)
    digest = write_shard_pt(tmp_path / "shard.pt", ids, emb)  # torch.save streamed into the file, hashed on the way
    data = (tmp_path / "shard.pt").read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    got_ids, got = read_shard_pt(data)
    want_ids, want = _torch_load(data)
    assert got_ids == want_ids == ids
    assert got.dtype == want.dtype == np.float16 and got.shape == want.shape == (n, 384)
    assert got.tobytes() == want.tobytes() == emb.tobytes()


def test_other_layouts_fall_back_to_torch():
    import torch

    # a non-contiguous tensor (a transposed view) and an extra key: not the plain layout
    base = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    for obj in ({"item_id": ["a", "b", "c", "d"], "embeddings": base.t()},
                {"item_id": ["a", "b", "c"], "embeddings": base, "note": "x"}):
        buf = io.BytesIO()
        torch.save(obj, buf)
        with pytest.raises(NotASimpleShard):
            read_shard_pt(buf.getvalue())
    buf = io.BytesIO()
    torch.save({"item_id": ["a", "b", "c", "d"], "embeddings": base.t()}, buf)
    ids, emb = _load_pt(buf.getvalue())  # torch reads it
    assert ids == ["a", "b", "c", "d"] and emb.tolist() == base.t().tolist()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_that_calls_anything_else_is_refused(tmp_path):
    import torch

    buf = io.BytesIO()
    torch.save({"item_id": ["a"], "embeddings": torch.zeros(1, 4, dtype=torch.float16)}, buf)
    import zipfile

    # same archive, data.pkl replaced by one that calls print
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            body = pickle.dumps({"item_id": _Evil(), "embeddings": None}, protocol=2) if info.filename.endswith("data.pkl") \
                else src.read(info)
            z.writestr(info.filename, body)
    with pytest.raises(NotASimpleShard, match=r"builtin__?\.print"):
        read_shard_pt(out.getvalue())
    # and torch's loader, which the caller falls back to, refuses it too
    with pytest.raises(pickle.UnpicklingError):
        _load_pt(out.getvalue())
    with pytest.raises(NotASimpleShard, match="zip"):
        read_shard_pt(b"not a shard")

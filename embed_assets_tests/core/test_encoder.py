"""The encoder against plain SentenceTransformer.encode, on real text with the real model."""

import numpy as np
import pytest

from embed_assets_tests.conftest import sample_docs


@pytest.fixture(scope="module")
def texts():
    docs = sample_docs(40)
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
    # short texts, a duplicate, emoji/HTML, and one past the 256-token window
    return texts[:30] + ["red cotton t-shirt", "<b>mug</b> \U0001F600", texts[3], "word " * 600]


@pytest.mark.parametrize("which,min_cos", [("encoder", 0.9999), ("encoder32", 0.99999)])
def test_matches_sentence_transformers_encode(request, texts, which, min_cos):
    """The default path (bf16 autocast where the CPU has it) and the fp32 path against plain encode in fp32."""
    encoder = request.getfixturevalue(which)
    ours, stats = encoder.encode(texts)
    ref = request.getfixturevalue("encoder32").model.encode(texts, batch_size=32, convert_to_numpy=True,
                                                            normalize_embeddings=True)
    cos = np.sum(ours * ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= min_cos
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert stats.n_texts == len(texts) and stats.n_unique == len(texts) - 1  # texts[3] twice
    assert stats.n_truncated >= 1
    assert np.array_equal(ours[3], ours[len(texts) - 2])


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
    assert max(stats.n_padded_tokens // stats.n_batches, 0) <= 1024
    assert np.allclose(vecs[:1], ref, atol=1e-5)


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


def test_precision_auto_follows_the_hardware(encoder):
    from embed_assets.core.encoder import cpu_has_native_bf16, resolve_precision

    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    encoder.model  # precision is resolved when the model loads
    assert encoder.precision == resolve_precision("auto", encoder.device)


def test_encoder_knows_its_version_without_loading_the_model():
    from embed_assets.core.encoder import Encoder

    enc = Encoder()
    assert enc._model is None
    assert enc.version["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert enc.dim == 384 and enc.version["model_revision"].endswith("53aa51172d14")

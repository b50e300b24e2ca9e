"""The report ranker's MiniLM in ONNX Runtime against its torch reference (same tokeniser,
weights, pooling), on fresh random texts; and the graph cache."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from medseek.encoders.minilm_onnx import OnnxTextEncoder, _graph_name  # noqa: E402
from medseek.models.text_tower import TextEncoder, locate_minilm  # noqa: E402

WORDS = ("pleural", "effusion", "right", "left", "no", "heart", "size", "normal", "lungs",
         "clear", "opacity", "base", "mild", "cardiomegaly", "é", "42", ".", ",", "")


def _texts(rng, n):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 60)))) for _ in range(n)]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return TextEncoder(max_length=64), OnnxTextEncoder(max_length=64, cache_dir=cache), cache


def test_onnx_rows_equal_torch_rows_on_fresh_random_texts(encoders):
    torch_enc, onnx_enc, _ = encoders
    rng = np.random.default_rng()
    texts = _texts(rng, 45) + ["", "x" * 2000]  # empty, and one truncated at max_length
    a, b = torch_enc.encode(texts, batch_size=16), onnx_enc.encode(texts, batch_size=7)
    assert b.shape == (len(texts), 384) and b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) > 0.99999


def test_graph_is_cached_by_weights_and_reused(encoders):
    _, onnx_enc, cache = encoders
    files = sorted(p.name for p in cache.iterdir())
    assert files == [_graph_name(locate_minilm())]  # no temporary left behind
    again = OnnxTextEncoder(max_length=64, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == files
    texts = ["no pleural effusion", "enlarged heart"]
    np.testing.assert_array_equal(again.encode(texts), onnx_enc.encode(texts))


def test_bad_texts_are_refused(encoders):
    _, onnx_enc, _ = encoders
    with pytest.raises(TypeError, match="list of str"):
        onnx_enc.encode("one string")
    with pytest.raises(ValueError, match="batch_size"):
        onnx_enc.encode(["a"], batch_size=0)


def test_unwritable_cache_traces_in_memory(encoders, tmp_path):
    _, onnx_enc, _ = encoders
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    enc = OnnxTextEncoder(max_length=64, cache_dir=blocked / "cache")
    texts = ["right pleural effusion"]
    np.testing.assert_allclose(enc.encode(texts), onnx_enc.encode(texts), atol=1e-6)

"""The plain-torch MiniLM tower against sentence-transformers on the same weights."""

import os

import numpy as np
import pytest

# sentence-transformers must never try the network; set before it is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from medseek.models.text_tower import (  # noqa: E402
    MiniLMTextTower,
    TextEncoder,
    TextTowerConfig,
    _rename,
    count_parameters,
    locate_minilm,
)

LONG = " ".join(
    f"Finding number {i}: a small calcified granuloma in the right upper lobe, "
    "unchanged, with mild degenerative change of the thoracic spine." for i in range(40)
)
SENTENCES = [
    "",
    "The lungs are clear.",
    "No acute cardiopulmonary abnormality.",
    "Heart size is mildly enlarged with small bilateral pleural effusions.",
    "Left lower lobe opacity may represent pneumonia or atelectasis.",
    "Stable 2.5 cm nodule in the right upper lobe, e.g. a granuloma.",
    "There is a right chest port with tip in the SVC.",
    "XXXX XXXX. Comparison XXXX.",
    "CARDIOMEGALY!!!",
    "degenerative changes of the spine",
    "Pneumothorax?",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "Résumé: naïve café façade — ünïcödé text",
    "1. Cardiomegaly. 2. Mild pulmonary edema. 3. No effusion.",
    "   leading and trailing spaces   ",
    "Numbers 1 2 3 4 5 6 7 8 9 10 and 3.14159 and T12-L1",
    "Interval removal of the left PICC line; no pneumothorax.",
    LONG,
    LONG + " " + LONG,
    "The cardiomediastinal silhouette and pulmonary vasculature are within normal limits.",
]


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(1)
    return TextEncoder()


@pytest.fixture(scope="module")
def reference():
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(locate_minilm()), device="cpu")
    return model.encode(SENTENCES, batch_size=8, convert_to_numpy=True)


def test_config_is_read_from_config_json():
    cfg = TextTowerConfig.from_json(locate_minilm() / "config.json")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
    assert cfg.intermediate_size == 1536 and cfg.vocab_size == 30522
    assert cfg.max_length == 256


def test_matches_sentence_transformers(encoder, reference):
    ours = encoder.encode(SENTENCES, batch_size=4)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * reference).sum(1)
    assert cos.min() >= 0.999, dict(zip(SENTENCES, cos.round(5)))
    # same float32 arithmetic up to summation order
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_long_texts_are_truncated_to_max_length(encoder):
    ids, mask = encoder.tokenize([LONG, "short"])
    assert ids.shape[1] == 256 and int(mask[0].sum()) == 256
    assert int(mask[1].sum()) == 3  # [CLS] short [SEP]
    # everything after the first 254 word pieces is cut, so a longer tail changes nothing
    a, b = encoder.encode([LONG, LONG + " " + LONG])
    assert float(a @ b) > 0.99999


def test_empty_string_is_cls_sep(encoder):
    ids, mask = encoder.tokenize([""])
    assert ids.tolist() == [[101, 102]] and mask.tolist() == [[1, 1]]
    vec = encoder.encode([""])
    assert np.isfinite(vec).all() and abs(float(np.linalg.norm(vec)) - 1) < 1e-5


def test_padding_does_not_change_embeddings(encoder):
    # batch_size 1 never pads; a mixed batch pads the short texts heavily
    alone = encoder.encode(SENTENCES[:8], batch_size=1)
    batched = encoder.encode(SENTENCES[:8], batch_size=8)
    np.testing.assert_allclose(alone, batched, atol=2e-5)


def test_different_texts_differ(encoder):
    a, b, c = encoder.encode(["The lungs are clear.", "Lungs are clear.", "Large pneumothorax."])
    assert float(a @ b) > float(a @ c) + 0.1


def test_bad_inputs(encoder):
    with pytest.raises(TypeError):
        encoder.encode("not a list")
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["x"], batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(max_length=1000)
    with pytest.raises(KeyError):
        _rename("encoder.layer.0.attention.self.rotary.weight")


def test_parameter_count():
    # 22.7 M: embeddings 11.9 M + 6 layers x 1.77 M (no pooler)
    model = MiniLMTextTower(TextTowerConfig())
    assert count_parameters(model) == 22_565_376

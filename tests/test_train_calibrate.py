"""Calibrated finding thresholds and the concept bank built on them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseek.search.explain import ConceptBank, explain
from medseek.train.calibrate import NEVER, precision_threshold


def test_threshold_is_the_lowest_that_keeps_the_precision():
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    positive = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    # top 1: 1/1, top 2: 2/2, top 3: 2/3, top 4: 3/4, top 5: 3/5
    assert precision_threshold(logits, positive, 0.75, 1) == (1.0, 0.75, 1.0)
    assert precision_threshold(logits, positive, 0.8, 1) == (3.0, 1.0, 2 / 3)
    t, p, r = precision_threshold(logits, positive, 0.8, 3)  # 2 kept are too few
    assert t == NEVER and math.isnan(p) and r == 0.0
    # at 0.5 every item may be kept (3 of 6): the threshold lies below the lowest logit
    assert precision_threshold(logits, positive, 0.5, 1) == (-1.0, 0.5, 1.0)


def test_ties_are_never_split():
    logits = np.array([2.0, 1.0, 1.0, 0.0])
    positive = np.array([1, 1, 0, 0], dtype=bool)
    # ranks 2 and 3 share a logit: a threshold keeps both or neither
    t, p, _ = precision_threshold(logits, positive, 0.9, 1)
    assert t == 1.0 and p == 1.0  # keeps the top one only
    t, p, _ = precision_threshold(logits, positive, 0.6, 1)
    assert t == 0.0 and p == pytest.approx(2 / 3)


def test_no_positive_or_no_qualifying_cut_is_never_shown():
    logits = np.array([1.0, 0.5])
    assert precision_threshold(logits, np.zeros(2, bool), 0.8, 1)[0] == NEVER
    assert precision_threshold(logits, np.array([0, 1], bool), 0.8, 1)[0] == NEVER


def test_linear_bank_scores_are_calibrated_margins():
    rng = np.random.default_rng()
    w = rng.standard_normal((4, 6))
    b = rng.standard_normal(4)
    t = np.array([0.0, 1.0, -1.0, NEVER])
    bank = ConceptBank.from_linear(["a", "b", "c", "d"], w, b, t)
    e = rng.standard_normal((9, 6))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    logits = e @ w.T + b
    np.testing.assert_allclose(bank.scores(e), (logits - t) / np.linalg.norm(w, axis=1),
                               rtol=1e-5, atol=1e-5)
    assert ((bank.scores(e) > 0) == (logits > t)).all()
    assert not (bank.scores(e)[:, 3] > 0).any()  # NEVER: never shown
    with pytest.raises(ValueError, match="weight rows \\[1\\] are zero"):
        ConceptBank.from_linear(["a", "b"], np.array([[1.0, 0.0], [0.0, 0.0]]), np.zeros(2), np.zeros(2))


def test_prompt_pair_bank_shows_what_is_closer_than_its_negation():
    present = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    absent = np.array([[0.0, 0.0, 1.0], [0.0, 0.6, 0.8]])
    bank = ConceptBank.from_prompt_pairs(["x", "y"], present, absent)
    e = np.array([[0.8, 0.0, 0.6], [0.0, 0.0, 1.0]])
    s = bank.scores(e)
    want = np.sign(e @ present.T - e @ absent.T)
    np.testing.assert_array_equal(np.sign(s), want)
    # a hit explained by what it and the query both show, and nothing else
    why = explain(s[0], s, ["x", "y"])
    assert [m.concept for m in why[0]] == ["x"] and why[1] == ()


def test_the_calibrated_bank_travels_in_the_spec_and_the_server_uses_it():
    """EncoderSpec carries the finding bank (spec.json → Triton/ONNX encoders), and the
    server explains with an encoder's own bank, or with finding-vs-negation prompts."""
    import json

    import torch

    from medseek.encoders.base import EncoderSpec, spec_concept_bank
    from medseek.models.factory import create_model
    from medseek.serve.server import concept_bank

    torch.manual_seed(0)
    model = create_model("cxr-retrieval", pretrained_text=False).eval()
    with torch.no_grad():
        model.finding_threshold.uniform_(-1, 1)
    spec = EncoderSpec.from_dict(json.loads(json.dumps(EncoderSpec.from_model(model).to_dict())))
    e = torch.nn.functional.normalize(torch.randn(7, model.embed_dim), dim=1)
    want = model.concept_bank().scores(e.numpy())
    np.testing.assert_allclose(spec_concept_bank(spec).scores(e.numpy()), want, rtol=1e-5, atol=1e-6)
    logits = model.finding_logits(e) - model.finding_threshold
    assert ((want > 0) == (logits > 0).numpy()).all()
    assert EncoderSpec.from_config_name("cxr-retrieval").concepts is None  # shapes only

    class WithBank:
        def concept_bank(self):
            return model.concept_bank()

    assert concept_bank(WithBank()).names == model.concept_bank().names

    class PromptsOnly:  # no bank of its own: each finding against its negation
        def encode_texts(self, texts):
            rng = np.random.default_rng(len(texts[0]))
            x = rng.standard_normal((len(texts), 8))
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    bank = concept_bank(PromptsOnly())
    assert "pleural effusion" in bank.names and bank.embeddings.shape[1] == 8


def test_explanation_quality_counts_shown_concepts_against_the_hits_findings():
    from types import SimpleNamespace

    from medseek.text.concepts import concept_names
    from medseek.train.ablation import explanation_quality

    names = concept_names()
    eff, cardio = names.index("pleural effusion"), names.index("cardiomegaly")
    # 2-d embeddings; the bank shows effusion when x > 0 and cardiomegaly when y > 0
    w = np.zeros((len(names), 2))
    w[:, 0] = -1.0  # every other concept: shown only for x < 0, never in this data
    w[eff] = [1.0, 0.0]
    w[cardio] = [0.0, 1.0]
    bank = ConceptBank.from_linear(names, w, np.zeros(len(names)), np.zeros(len(names)))
    model = SimpleNamespace(concept_bank=lambda: bank)
    v = np.array([[0.6, 0.8], [0.8, 0.6], [0.6, -0.8]])
    records = [SimpleNamespace(report="", labels=("pleural effusion", "cardiomegaly")),
               SimpleNamespace(report="", labels=("pleural effusion",)),
               SimpleNamespace(report="", labels=("cardiomegaly",))]
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)  # each its own patient
    q = explanation_quality(model, v, s, SimpleNamespace(records=records), k=2)
    # shown = what both query and hit show. Query 0 (shows eff, cardio): hit 1 {eff,
    # cardio} (eff right, cardio wrong), hit 2 {eff} (wrong). Query 1: hit 0 {eff, cardio}
    # (both right), hit 2 {eff} (wrong). Query 2 (shows eff only): hit 1 {eff} (right),
    # hit 0 {eff} (right). 8 shown, 5 right.
    assert q["precision"] == pytest.approx(5 / 8)
    assert q["shown_per_hit"] == pytest.approx(8 / 6)
    # findings both assert: (0,1) eff; (0,2) cardio; (1,0) eff; (1,2) none; (2,1) none;
    # (2,0) cardio -> 4, of which shown: eff, eff -> 2
    assert q["recall"] == pytest.approx(2 / 4)


def test_findings_calibration_never_placed_are_left_out_of_the_bank():
    """A finding with threshold NEVER cannot be told either way: the bank leaves it out, so
    no caller reads its huge negative margin as strong evidence of absence."""
    import torch

    from medseek.models.factory import create_model
    from medseek.search.explain import ConceptBank
    from medseek.text.concepts import concept_names
    from medseek.train.calibrate import NEVER

    torch.manual_seed(0)
    model = create_model("cxr-retrieval", pretrained_text=False).eval()
    names = concept_names()
    with torch.no_grad():
        model.finding_threshold.zero_()
        model.finding_threshold[[1, 4]] = NEVER
    bank = model.concept_bank()
    assert bank.names == tuple(n for i, n in enumerate(names) if i not in (1, 4))
    e = torch.nn.functional.normalize(torch.randn(3, model.embed_dim), dim=1)
    full = ConceptBank.from_linear(names, model.finding_head.weight.detach().numpy(),
                                   model.finding_head.bias.detach().numpy(),
                                   model.finding_threshold.numpy())
    keep = [i for i in range(len(names)) if i not in (1, 4)]
    np.testing.assert_allclose(bank.scores(e.numpy()), full.scores(e.numpy())[:, keep],
                               rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        model.finding_threshold.fill_(NEVER)
    assert model.concept_bank() is None

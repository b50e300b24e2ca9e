"""The sentence-level finding term and the corpus-label → lexicon-finding targets.

Zero-shot prompts are single, often negated sentences ("No pleural effusion."); the
``sentence_finding`` term trains the shared finding head on the embedding of each report
sentence against what that sentence alone asserts. And the finding targets must reach
corpus labels whose name differs from the lexicon's ("catheter" → "indwelling catheter").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseek.models.factory import create_model
from medseek.text.concepts import concept_names
from medseek.text.phenotypes import LABEL_ALIASES
from medseek.train.data import (batch_sentences, collate, item_findings, load_tokenizer, report_sentences,
                                sentence_finding_vector)
from medseek.train.losses import LossConfig, combine_losses, encode_batch, sentence_finding_loss
from medseek.train.loop import cached_text_features
from medseek.train.text_features import TextFeatureCache, freeze_text_layers

NAMES = concept_names()
REPORTS = ("There is a small right pleural effusion. No pneumothorax. Heart size is normal.",
           "No pleural effusion. The lungs are clear. No pneumothorax.")


def test_sentence_targets_are_negation_aware_and_never_normal():
    assert not sentence_finding_vector("No pleural effusion.").any()
    assert not sentence_finding_vector("The lungs are clear.").any()  # normal axis stays 0
    pos = sentence_finding_vector("There is a small right pleural effusion.")
    assert pos[NAMES.index("pleural effusion")] == 1
    assert pos[NAMES.index("normal")] == 0 and pos.sum() == 1
    assert report_sentences(REPORTS[0]) == ("There is a small right pleural effusion.", "No pneumothorax.",
                                            "Heart size is normal.")
    # distinct sentences of a batch, in first-seen order
    items = [{"sentences": report_sentences(r)} for r in REPORTS]
    assert batch_sentences(items) == ["There is a small right pleural effusion.", "No pneumothorax.",
                                      "Heart size is normal.", "No pleural effusion.", "The lungs are clear."]


def test_item_findings_maps_corpus_label_names_onto_lexicon_findings():
    """A label such as "catheter" gets the target of "indwelling catheter" (it had none
    while labels were matched to finding names verbatim), and clears ``normal``."""
    for label, finding in LABEL_ALIASES.items():
        row = item_findings("No acute disease.", (label,))
        assert row[NAMES.index(finding)] == 1, label
        assert row[NAMES.index("normal")] == 0, label
    row = item_findings("No acute disease.", ("pleural effusion", "normal", "no such label"))
    assert row[NAMES.index("pleural effusion")] == 1 and row.sum() == 1
    # labels naming no lexicon finding leave a normal report normal
    assert item_findings("No acute disease.", ("technical quality unsatisfactory",))[NAMES.index("normal")] == 1


def _items(model) -> list[dict]:
    from medseek.train.data import item_findings as targets

    h, w = model.cfg.preprocess.image_size
    rng = np.random.default_rng(0)
    return [{"report": r, "labels": np.zeros(2, np.float32), "id": str(i), "findings": targets(r),
             "sentences": report_sentences(r), "image": rng.random((1, h, w), dtype=np.float32),
             "boxes": np.array([[0, 0, w, h]], np.float32), "captions": [""]}
            for i, r in enumerate(REPORTS)]


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = create_model("cxr-tiny", finding_head=True)
    tok = load_tokenizer(model.cfg.text.max_length)
    items = _items(model)
    return model, items, collate(items, tok, {}), tok


def test_sentence_finding_loss_is_bce_without_normal_and_trains_the_text_head(model_and_batch):
    model, _, batch, _ = model_and_batch
    assert batch["sentence_texts"] == batch_sentences(_items(model))
    y = batch["sentence_findings"]
    assert y.shape == (5, len(NAMES)) and y.sum() == 1  # only "small right pleural effusion"

    cfg = LossConfig(w_global=0.0, w_sentence_finding=3.0)
    model.zero_grad(set_to_none=True)
    emb = encode_batch(model, batch, cfg)
    assert emb["sentence_text"].shape == (5, model.embed_dim)
    loss, parts = combine_losses(model, emb, batch, cfg)
    assert set(parts) == {"sentence_finding"}
    keep = [j for j, n in enumerate(NAMES) if n != "normal"]
    want = F.binary_cross_entropy_with_logits(model.finding_logits(emb["sentence_text"])[:, keep], y[:, keep])
    torch.testing.assert_close(loss, 3.0 * want)
    loss.backward()
    for name in ("text_head", "finding_head"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name
    # a text-only term: nothing flows into the image side
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.visual_head.parameters())
    with pytest.raises(ValueError, match="columns"):
        sentence_finding_loss(model, emb["sentence_text"], y[:, :-1])


def test_default_weight_is_off_and_bad_weights_are_refused(model_and_batch):
    model, _, batch, _ = model_and_batch
    assert LossConfig().w_sentence_finding == 0
    emb = encode_batch(model, batch, LossConfig(w_finding=1.0))
    assert "sentence_text" not in emb
    _, parts = combine_losses(model, emb, batch, LossConfig(w_finding=1.0))
    assert "sentence_finding" not in parts
    with pytest.raises(ValueError, match="w_sentence_finding"):
        LossConfig(w_sentence_finding=-1.0)


def test_cached_sentence_features_give_the_same_loss_as_the_tower(model_and_batch):
    """With a frozen tower the Trainer feeds cached sentence features to the text head;
    the loss must equal the one computed through the tower from token ids."""
    model, items, batch, tok = model_and_batch
    freeze_text_layers(model, 0)
    cfg = LossConfig(w_global=0.0, w_sentence_finding=1.0)
    with torch.no_grad():
        direct, _ = combine_losses(model, encode_batch(model, batch, cfg), batch, cfg)
        cached = dict(batch)
        cached.update(cached_text_features(model, items, TextFeatureCache(tok), batch["sentence_texts"]))
        assert cached["sentence_text_features"].shape[0] == 5
        via_cache, _ = combine_losses(model, encode_batch(model, cached, cfg), cached, cfg)
    torch.testing.assert_close(via_cache, direct, rtol=1e-4, atol=1e-5)


def test_trainer_trains_the_sentence_term_from_a_warmed_cache(tmp_path):
    """End to end on a small synth-cxr corpus: with a frozen tower the Trainer embeds
    every training sentence up front and logs the ``sentence_finding`` term."""
    import json

    from medseek.data.synth.cxr import build_synth_cxr
    from medseek.train.ablation import variant_recipe
    from medseek.train.data import PairDataset
    from medseek.train.loop import Trainer

    build_synth_cxr(tmp_path / "cxr", n=12, size=64, progress=False)
    cfg = variant_recipe("retrieval-cxr", {"model": "cxr-tiny", "batch_size": 8, "log_every": 1,
                                           "model_overrides": {"finding_head": True},
                                           "loss": {"w_sentence_finding": 2.0}}, steps=2)
    torch.manual_seed(0)
    model = create_model(cfg.model, **cfg.model_overrides)
    train = PairDataset.from_manifest(tmp_path / "cxr", model.cfg, "train")
    trainer = Trainer(cfg, model, train, tmp_path / "run", progress=False)
    sentences = {s for r in train.records for s in report_sentences(r.report)}
    assert len(trainer.text_cache) >= len(sentences) > 0
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss_sentence_finding"] > 0 for r in rows)

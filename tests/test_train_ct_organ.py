"""Organ sentence → volume: the evaluation's queries and relevance, its chance level, and
the ``organ_volume`` loss term (values against hand formulas, gradients into the pool)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseek.data.synth.ct import REPORT_ORGAN_OF, REPORT_ORGANS
from medseek.models.factory import create_model
from medseek.text.concepts import concept_names
from medseek.train.ablation import chance_hit_at_k, organ_sentence_queries
from medseek.train.data import PairDataset, collate, load_tokenizer
from medseek.train.losses import LossConfig, combine_losses, encode_batch, organ_volume_loss


@pytest.fixture(scope="module")
def ct_ds(tmp_path_factory):
    from medseek.data.synth.ct import build_synth_ct

    out = tmp_path_factory.mktemp("synth-ct")
    build_synth_ct(out, n=12, seed=2, matrix=(32, 32), slices=(40, 56), progress=False)
    return PairDataset.from_manifest(out, create_model("ct-tiny").cfg, None)


def test_queries_are_the_abnormal_organ_sentences_and_relevance_is_by_finding_and_site(ct_ds):
    rows, texts, relevant = organ_sentence_queries(ct_ds)
    expected = [(i, o) for i, r in enumerate(ct_ds.records) for o in REPORT_ORGANS
                if any(REPORT_ORGAN_OF[f["name"]] == o for f in r.meta["findings"])]
    assert len(expected) > 0 and len(rows) == len(texts) == len(expected) == relevant.shape[0]
    assert relevant.shape == (len(rows), len(ct_ds))
    sites = [{(f["name"], f["organ"]) for f in r.meta["findings"]} for r in ct_ds.records]
    for q, (i, organ) in enumerate(expected):
        assert rows[q] == i
        sentence = {reg.name: reg.text for reg in ct_ds.records[i].regions}[organ]
        assert texts[q] == sentence and not sentence.endswith(("unremarkable.", "normal calibre."))
        assert relevant[q, i]  # its own volume always answers it
        key = {(f["name"], f["organ"]) for f in ct_ds.records[i].meta["findings"]
               if REPORT_ORGAN_OF[f["name"]] == organ}
        np.testing.assert_array_equal(relevant[q], [key <= s for s in sites])


def test_queries_without_finding_metadata_fall_back_to_the_own_volume(ct_ds):
    bare = replace(ct_ds, records=tuple(replace(r, meta={}) for r in ct_ds.records))
    rows, texts, relevant = organ_sentence_queries(bare)
    np.testing.assert_array_equal(relevant.sum(1), np.ones(len(rows)))
    np.testing.assert_array_equal(np.flatnonzero(relevant[0]), [rows[0]])
    assert len(set(zip(rows, texts))) == len(rows)  # one query per volume and sentence


def test_chance_of_a_hit_in_the_top_k():
    np.testing.assert_allclose(chance_hit_at_k(np.array([0, 1, 2, 4]), 4, 1), [0, 0.25, 0.5, 1])
    # 1 - C(n - r, k) / C(n, k), checked against a shuffled ranking
    got = chance_hit_at_k(np.array([6]), 100, 5)[0]
    assert got == pytest.approx(1 - math.comb(94, 5) / math.comb(100, 5))
    rng = np.random.default_rng(0)
    sim = np.mean([(rng.permutation(100)[:5] < 6).any() for _ in range(20000)])
    assert sim == pytest.approx(got, abs=0.01)
    with pytest.raises(ValueError, match="n_relevant"):
        chance_hit_at_k(np.array([5]), 4, 1)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_organ_volume_loss_spreads_the_target_over_volumes_with_the_findings():
    names = concept_names()
    col = {n: j for j, n in enumerate(names)}
    vis_f = torch.zeros(4, len(names))
    vis_f[0, col["cardiomegaly"]] = vis_f[2, col["cardiomegaly"]] = vis_f[2, col["nodule"]] = 1
    vis_f[1, col["nodule"]] = vis_f[3, col["normal"]] = 1
    sent_f = torch.zeros(3, len(names))
    sent_f[0, col["cardiomegaly"]] = 1  # volume 0's "Heart: Cardiomegaly." -> volumes 0 and 2
    sent_f[1, col["nodule"]] = 1  # volume 1's nodule sentence -> volumes 1 and 2
    sent_f[2, col["normal"]] = 1  # a normal phrasing: left out
    sent, vis, scale = unit(3, 8, seed=1), unit(4, 8, seed=2), torch.tensor(5.0)
    owner = torch.tensor([0, 1, 3])
    logp = torch.log_softmax(scale * sent @ vis.T, dim=1)
    expected = -0.5 * ((logp[0, 0] + logp[0, 2]) / 2 + (logp[1, 1] + logp[1, 2]) / 2)
    got = organ_volume_loss(sent, owner, sent_f, vis, vis_f, scale)
    torch.testing.assert_close(got, expected)
    # no sentence naming a finding: zero, still differentiable
    v = vis.clone().requires_grad_(True)
    zero = organ_volume_loss(sent[2:], owner[2:], sent_f[2:], v, vis_f, scale)
    assert zero.item() == 0.0
    zero.backward()
    with pytest.raises(ValueError, match="owner rows"):
        organ_volume_loss(sent, torch.tensor([0, 1, 4]), sent_f, vis, vis_f, scale)
    with pytest.raises(ValueError, match="owner"):
        organ_volume_loss(sent, owner[:2], sent_f, vis, vis_f, scale)


def test_organ_volume_term_trains_the_volume_pool_once_per_sentence(ct_ds):
    torch.manual_seed(0)
    model = create_model("ct-tiny")
    lexicon = {"nodule", "mass", "consolidation", "emphysema", "cardiomegaly", "pleural effusion"}
    ab = [i for i, r in enumerate(ct_ds.records) if {f["name"] for f in r.meta["findings"]} & lexicon][:2]
    assert len(ab) == 2
    batch = collate([ct_ds[i] for i in ab], load_tokenizer(model.cfg.text.max_length), ct_ds.text_ids)
    cfg = LossConfig(contrastive="clip", w_global=0.0, w_organ_volume=1.0)
    emb = encode_batch(model, batch, cfg)
    owners = emb["organ_volume_owner"].tolist()
    # each volume's seven organ sentences, once each (finding regions repeat them)
    assert sorted(owners) == sorted(b for b in range(len(ab)) for _ in REPORT_ORGANS)
    assert len(batch["organs"]) > len(owners)
    model.zero_grad()
    total, parts = combine_losses(model, emb, batch, cfg)
    assert set(parts) == {"organ_volume"} and math.isfinite(parts["organ_volume"])
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.pool.parameters())
    assert "organ_volume" not in combine_losses(model, encode_batch(model, batch, LossConfig()),
                                                batch, LossConfig())[1]
    with pytest.raises(ValueError, match="w_organ_volume"):
        LossConfig(w_organ_volume=-1.0)

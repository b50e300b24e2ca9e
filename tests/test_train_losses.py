"""Loss terms: values against hand formulas, and each term's gradient reaches the right towers."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from medseek import kernels
from medseek.models.factory import create_model
from medseek.train.data import PairDataset, collate, load_tokenizer, report_finding_vector
from medseek.train.losses import (LossConfig, combine_losses, encode_batch, grouped_pair_loss,
                                  grouped_siglip_loss, modality_gap_loss, neighbour_loss)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_gap_loss_is_squared_centroid_distance():
    x, y = unit(6, 8, seed=1), unit(6, 8, seed=2)
    expected = (x.mean(0) - y.mean(0)).pow(2).sum()
    torch.testing.assert_close(modality_gap_loss(x, y), expected, rtol=0, atol=0)
    assert modality_gap_loss(x, x) == 0
    # uniformity: log mean exp(-2 d^2) over distinct pairs of the union, lower when spread
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    off = ~torch.eye(12, dtype=torch.bool)
    uni = torch.log(torch.exp(-2 * d2[off]).mean())
    torch.testing.assert_close(modality_gap_loss(x, y, 0.5), expected + 0.5 * uni)


def test_grouped_siglip_matches_the_kernel_and_spares_duplicates():
    a, b = unit(5, 8, seed=3), unit(5, 8, seed=4)
    scale, bias = torch.tensor([10.0]), torch.tensor([-5.0])
    distinct = torch.arange(5)
    torch.testing.assert_close(grouped_siglip_loss(a, b, distinct, scale, bias),
                               kernels.siglip_loss(a, b, scale, bias), rtol=1e-5, atol=1e-6)
    b2 = b.clone()
    b2[3] = b2[1]  # rows 1 and 3 share a caption: same text embedding
    groups = torch.tensor([0, 1, 2, 1, 4])
    plain = grouped_pair_loss(a, b2, distinct, scale, bias, "siglip")
    grouped = grouped_pair_loss(a, b2, groups, scale, bias, "siglip")
    assert abs(float(plain.detach()) - float(grouped.detach())) > 1e-3  # the duplicate is no longer a negative
    # CLIP: duplicates change nothing, so grouping is the kernel's plain loss
    torch.testing.assert_close(grouped_pair_loss(a, b2, groups, scale, None, "clip"),
                               kernels.clip_loss(a, b2, scale))
    with pytest.raises(ValueError, match="group_ids"):
        grouped_pair_loss(a, b, groups[:2], scale, bias, "clip")


def test_neighbour_loss_is_jaccard_soft_infonce_without_self():
    vis = unit(4, 8, seed=7)
    labels = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    # hand formula, row by row: Jaccard targets over the other rows, softmax over them
    want, rows = 0.0, 0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        jac = []
        for j in others:
            inter = float((labels[i] * labels[j]).sum())
            union = float(((labels[i] + labels[j]) > 0).sum())
            jac.append(inter / union)
        if sum(jac) == 0:
            continue  # row 3 shares nothing: no target
        logits = torch.stack([vis[i] @ vis[j] for j in others]) / 0.1
        logp = torch.log_softmax(logits, 0)
        want = want - sum(t / sum(jac) * lp for t, lp in zip(jac, logp))
        rows += 1
    torch.testing.assert_close(neighbour_loss(vis, labels, 0.1), want / rows)
    # the same rows in another order: the same loss
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(neighbour_loss(vis[perm], labels[perm], 0.1), want / rows)
    # no row shares a label: zero, and still differentiable
    v = vis.clone().requires_grad_(True)
    loss = neighbour_loss(v, torch.eye(4), 0.1)
    loss.backward()
    assert float(loss.detach()) == 0 and v.grad is not None


def test_neighbour_loss_pulls_label_sharing_images_together():
    torch.manual_seed(0)
    raw = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], dtype=torch.float32)
    opt = torch.optim.SGD([raw], lr=0.5)

    def gap():  # mean similarity within a label minus across labels
        v = F.normalize(raw.detach(), dim=1)
        sim = v @ v.T
        same = (labels @ labels.T).bool() & ~torch.eye(6, dtype=torch.bool)
        return float(sim[same].mean() - sim[~(labels @ labels.T).bool()].mean())

    before = gap()
    for _ in range(50):
        opt.zero_grad()
        neighbour_loss(F.normalize(raw, dim=1), labels, 0.1).backward()
        opt.step()
    assert gap() > before + 0.5


def test_neighbour_term_trains_the_image_side_only(wrist_batch):
    model, batch = wrist_batch
    g, parts = grads_after(model, batch, LossConfig(w_global=0.0, w_neighbours=1.0))
    assert set(parts) == {"neighbours"}
    assert g["visual"] and g["visual_head"] and not g["text"] and not g["text_head"]


def test_neighbour_term_with_unpaired_rows_uses_every_real_image(wrist_batch):
    """Unpaired training: image-only rows are neighbours (their labels are theirs),
    report-only rows (a zero image) are not."""
    from medseek.train.unpaired import IMAGE_ONLY, PAIRED, REPORT_ONLY

    model, _ = wrist_batch
    emb = {"visual": unit(5, 32, seed=8), "text": unit(5, 32, seed=9)}
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1]], dtype=torch.float32)
    pairing = torch.tensor([PAIRED, IMAGE_ONLY, PAIRED, REPORT_ONLY, IMAGE_ONLY])
    batch = {"labels": labels, "pairing": pairing}
    _, parts = combine_losses(model, emb, batch, LossConfig(w_global=0.0, w_neighbours=1.0))
    rows = torch.tensor([0, 1, 2, 4])
    want = neighbour_loss(emb["visual"][rows], labels[rows], 0.1)
    assert parts["neighbours"] == pytest.approx(float(want), rel=1e-6)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="contrastive"):
        LossConfig(contrastive="triplet")
    with pytest.raises(ValueError, match="soft_labels"):
        LossConfig(contrastive="siglip", soft_labels=True)
    with pytest.raises(ValueError, match="w_gap"):
        LossConfig(w_gap=-1)
    with pytest.raises(ValueError, match="w_neighbours"):
        LossConfig(w_neighbours=-1)
    with pytest.raises(ValueError, match="neighbour_temperature"):
        LossConfig(neighbour_temperature=0)


@pytest.fixture(scope="module")
def wrist_batch(tmp_path_factory):
    from medseek.data.synth.wrist import build_synth_wrist

    out = tmp_path_factory.mktemp("synth-wrist")
    build_synth_wrist(out, n=4, seed=0, progress=False)
    torch.manual_seed(0)
    model = create_model("wrist-tiny")
    ds = PairDataset.from_manifest(out, model.cfg, "train")
    batch = collate([ds[i] for i in range(4)], load_tokenizer(model.cfg.text.max_length), ds.text_ids)
    return model, batch


def grads_after(model, batch, cfg):
    model.zero_grad(set_to_none=True)
    emb = encode_batch(model, batch, cfg)
    loss, parts = combine_losses(model, emb, batch, cfg)
    loss.backward()
    assert math.isfinite(float(loss.detach()))

    def has(module):
        return module is not None and any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    return {name: has(getattr(model, name)) for name in ("visual", "text", "visual_head", "region_head",
                                                          "text_head")}, parts


def test_each_image_term_reaches_its_towers(wrist_batch):
    model, batch = wrist_batch
    g, parts = grads_after(model, batch, LossConfig(contrastive="siglip", w_global=1.0))
    assert set(parts) == {"global"}
    assert g == {"visual": True, "text": True, "visual_head": True, "region_head": False, "text_head": True}
    g, parts = grads_after(model, batch, LossConfig(contrastive="clip", w_global=0.0, w_region=1.0))
    assert set(parts) == {"region"}
    assert g == {"visual": True, "text": True, "visual_head": False, "region_head": True, "text_head": True}
    g, parts = grads_after(model, batch, LossConfig(contrastive="clip", soft_labels=True))
    assert set(parts) == {"global"} and g["visual_head"] and not g["region_head"]
    g, parts = grads_after(model, batch, LossConfig(w_global=0.0, w_gap=1.0))
    assert set(parts) == {"gap"} and g["visual_head"] and g["text_head"]
    assert not g["region_head"]


def test_soft_labels_reach_the_kernel(wrist_batch):
    model, _ = wrist_batch
    emb = {"visual": unit(4, 32, seed=5), "text": unit(4, 32, seed=6)}
    batch = {"labels": torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])}
    hard, _ = combine_losses(model, emb, batch, LossConfig(contrastive="clip"))
    soft, _ = combine_losses(model, emb, batch, LossConfig(contrastive="clip", soft_labels=True))
    want = kernels.clip_loss(emb["visual"], emb["text"], model.logit_scale.scale(), batch["labels"])
    torch.testing.assert_close(soft, want)
    assert abs(float(hard.detach()) - float(soft.detach())) > 1e-3


@pytest.fixture(scope="module")
def ct_batch(tmp_path_factory):
    from medseek.data.synth.ct import build_synth_ct

    out = tmp_path_factory.mktemp("synth-ct")
    build_synth_ct(out, n=2, seed=0, matrix=(32, 40), slices=(40, 70), progress=False)
    torch.manual_seed(0)
    model = create_model("ct-tiny")
    ds = PairDataset.from_manifest(out, model.cfg, None)
    batch = collate([ds[i] for i in range(2)], load_tokenizer(model.cfg.text.max_length), ds.text_ids)
    return model, batch


def test_organ_term_trains_chunks_not_the_volume_pool(ct_batch):
    model, batch = ct_batch
    assert batch["organs"] and batch["organ_input_ids"].shape[0] == len(batch["organs"])

    def pool_grad():
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.pool.parameters())

    g, parts = grads_after(model, batch, LossConfig(contrastive="siglip", w_global=0.0, w_organ=1.0))
    assert set(parts) == {"organ"} and g["visual"] and g["visual_head"] and g["text"]
    assert not pool_grad()  # organ embeddings come from chunks, never the pooled volume
    g, parts = grads_after(model, batch, LossConfig(contrastive="siglip"))
    assert set(parts) == {"global"} and pool_grad()


def test_finding_loss_is_bce_of_both_modalities_through_one_head(wrist_batch):
    """The finding term: BCE of the shared finding head on image and on report embeddings
    against the findings extracted from the report; it trains the visual and text heads
    and the finding head, and a model without the head says so."""
    from medseek.text.concepts import concept_names, report_concepts

    _, batch = wrist_batch
    torch.manual_seed(3)
    model = create_model("wrist-tiny", finding_head=True)
    names = concept_names()
    assert batch["findings"].shape == (4, len(names))
    assert set(batch["findings"].unique().tolist()) <= {0.0, 1.0}
    text = "Small left pleural effusion. No pneumothorax."
    row = report_finding_vector(text)
    np.testing.assert_array_equal(row, report_concepts([text])[0])
    assert row[names.index("pleural effusion")] == 1 and row[names.index("pneumothorax")] == 0

    emb = {"visual": unit(4, 32, seed=7), "text": unit(4, 32, seed=8)}
    y = torch.zeros(4, len(concept_names()))
    y[0, 3] = y[1, 5] = y[2, -1] = y[3, -1] = 1.0
    loss, parts = combine_losses(model, emb, {"findings": y}, LossConfig(w_global=0.0, w_finding=2.0))
    head = model.finding_head
    want = 0.5 * (F.binary_cross_entropy_with_logits(head(emb["visual"]), y)
                  + F.binary_cross_entropy_with_logits(head(emb["text"]), y))
    torch.testing.assert_close(loss, 2.0 * want)
    assert set(parts) == {"finding"}

    model.zero_grad(set_to_none=True)
    emb = encode_batch(model, batch, LossConfig())
    loss, _ = combine_losses(model, emb, batch, LossConfig(w_global=0.0, w_finding=1.0))
    loss.backward()
    for name in ("visual", "visual_head", "text_head", "finding_head"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for p in getattr(model, name).parameters()), name
    with pytest.raises(TypeError, match="no finding head"):
        combine_losses(wrist_batch[0], emb, batch, LossConfig(w_finding=1.0))


def test_region_finding_loss_supervises_each_bone_by_its_caption(wrist_batch):
    """The region_finding term: the finding head on each region embedding and on its
    caption's embedding, against the findings the caption asserts ("fracture" for a
    fractured bone, nothing but "normal" for a normal one); it reaches the region head."""
    from medseek.text.concepts import concept_names

    _, batch = wrist_batch
    torch.manual_seed(4)
    model = create_model("wrist-tiny", finding_head=True)
    names = concept_names()
    y = batch["region_findings"]
    assert y.shape == (int(batch["region_valid"].sum()), len(names))
    # each caption asserts findings, or else exactly "normal"
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y[:, -1] == 1, y[:, :-1].sum(1) == 0)
    emb = encode_batch(model, batch, LossConfig(w_region=1.0))
    cfg = LossConfig(w_global=0.0, w_region=0.0, w_region_finding=3.0)
    loss, parts = combine_losses(model, emb, batch, cfg)
    head = model.finding_head
    want = 0.5 * (F.binary_cross_entropy_with_logits(head(emb["region"]), y)
                  + F.binary_cross_entropy_with_logits(head(emb["region_text"]), y))
    torch.testing.assert_close(loss, 3.0 * want)
    assert set(parts) == {"region_finding"}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.region_head.parameters())

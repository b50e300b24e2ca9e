"""LGDEA unpaired evidence alignment (medseek.train.unpaired): the pairing split, the
masking of the contrastive term, the extractor interface, and that the unpaired finding
loss trains on a tiny synth-cxr corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseek.train import unpaired as up
from medseek.train.data import PairDataset, collate, load_tokenizer
from medseek.train.losses import LossConfig, combine_losses, encode_batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from medseek.data.synth.cxr import build_synth_cxr

    out = tmp_path_factory.mktemp("synth-cxr")
    build_synth_cxr(out, n=40, size=64, progress=False)
    return out


def tiny_model():
    from medseek.models.factory import create_model

    torch.manual_seed(0)
    return create_model("cxr-tiny", finding_head=True)


@pytest.fixture(scope="module")
def train_ds(synth_dir):
    return PairDataset.from_manifest(synth_dir, tiny_model().cfg, "train")


def _patient(rec) -> str:
    return rec.patient_id or rec.study_id or rec.id


def test_pairing_split_leaves_no_pair_recoverable(train_ds):
    cfg = up.UnpairedConfig(pairs_kept=0.25, seed=3)
    ds = up.apply_unpaired(train_ds, cfg)
    assert isinstance(ds, up.UnpairedDataset)
    split = ds.split
    pats = {name: {_patient(train_ds.records[i]) for i in getattr(split, name)}
            for name in ("paired", "image_only", "report_only")}
    assert pats["paired"] and pats["image_only"] and pats["report_only"]
    assert not pats["paired"] & pats["image_only"]
    assert not pats["paired"] & pats["report_only"]
    assert not pats["image_only"] & pats["report_only"]  # no image-only item has its report here
    n_pat = len({_patient(r) for r in train_ds.records})
    assert len(pats["paired"]) == round(0.25 * n_pat)
    # the items themselves carry only their own side
    roles = ds.roles()
    for i in np.flatnonzero(roles == up.IMAGE_ONLY)[:5]:
        item = ds[int(i)]
        assert item["report"] == "" and item["image"].any()
    for i in np.flatnonzero(roles == up.REPORT_ONLY)[:5]:
        item = ds[int(i)]
        assert item["report"] and not item["image"].any()
    studies = [train_ds.records[i].study_id for i in split.report_only]
    assert len(studies) == len(set(studies))  # one report-only item per study
    # paired rows are repeated to about half of the items
    assert 0.3 < float((roles == up.PAIRED).mean()) < 0.7
    # another seed gives another split; the paired-only baseline is exactly the pairs
    other = up.split_pairing(train_ds, 0.25, seed=4)
    assert other.paired != split.paired
    only = up.apply_unpaired(train_ds, up.UnpairedConfig(pairs_kept=0.25, seed=3, use_unpaired=False))
    assert [r.id for r in only.records] == [train_ds.records[i].id for i in split.paired]
    assert up.apply_unpaired(train_ds, up.UnpairedConfig()) is train_ds  # pairs_kept 1.0: off
    with pytest.raises(ValueError, match="pairs_kept"):
        up.UnpairedConfig(pairs_kept=0.0)
    with pytest.raises(ValueError, match="extractor"):
        up.apply_unpaired(train_ds, up.UnpairedConfig(pairs_kept=0.5, extractor="nope"))


def test_image_only_rows_do_not_enter_the_contrastive_term(train_ds):
    model = tiny_model().eval()
    ds = up.apply_unpaired(train_ds, up.UnpairedConfig(pairs_kept=0.25, seed=0))
    roles = ds.roles()
    pick = [*np.flatnonzero(roles == up.PAIRED)[:4], *np.flatnonzero(roles == up.IMAGE_ONLY)[:4],
            *np.flatnonzero(roles == up.REPORT_ONLY)[:2]]
    items = [ds[int(i)] for i in pick]
    tok = load_tokenizer(model.cfg.text.max_length)
    batch = collate(items, tok, ds.text_ids)
    assert batch["pairing"].tolist() == [0] * 4 + [1] * 4 + [2] * 2
    cfg = LossConfig(soft_labels=True, w_finding=1.0, w_finding_unpaired=2.0)
    with torch.no_grad():
        emb = encode_batch(model, batch, cfg)
        total, parts = combine_losses(model, emb, batch, cfg)
        keep = batch["pairing"] == up.PAIRED
        emb_p = {"visual": emb["visual"][keep], "text": emb["text"][keep]}
        batch_p = {"labels": batch["labels"][keep], "findings": batch["findings"][keep]}
        total_p, parts_p = combine_losses(model, emb_p, batch_p, cfg)
    assert set(parts) == {"global", "finding", "finding_unpaired"} and set(parts_p) == {"global", "finding"}
    assert parts["global"] == pytest.approx(parts_p["global"], rel=1e-6)
    assert parts["finding"] == pytest.approx(parts_p["finding"], rel=1e-6)
    assert parts["finding_unpaired"] > 0
    assert float(total - total_p) == pytest.approx(2.0 * parts["finding_unpaired"], rel=1e-5)
    # the unpaired term reads the image side of image-only rows and the text side of
    # report-only rows only: moving the other side changes nothing
    moved = {"visual": emb["visual"].clone(), "text": emb["text"].clone()}
    moved["text"][roles[pick] == up.IMAGE_ONLY] = emb["text"][0]
    moved["visual"][roles[pick] == up.REPORT_ONLY] = emb["visual"][0]
    with torch.no_grad():
        _, parts_m = combine_losses(model, moved, batch, cfg)
    assert parts_m == pytest.approx(parts, rel=1e-6)
    with pytest.raises(ValueError, match="w_organ"):
        combine_losses(model, emb, batch, LossConfig(w_organ=1.0))
    with pytest.raises(ValueError, match="w_finding_unpaired"):
        LossConfig(w_finding_unpaired=-1.0)


def test_extractor_is_pluggable(train_ds):
    from medseek.text.concepts import concept_names

    width = len(concept_names())
    fixed = np.zeros(width, dtype=np.float32)
    fixed[0] = 1.0
    up.register_extractor("test-fixed", lambda report: fixed)
    try:
        ds = up.apply_unpaired(train_ds, up.UnpairedConfig(pairs_kept=0.25, extractor="test-fixed"))
        i = int(np.flatnonzero(ds.roles() == up.REPORT_ONLY)[0])
        assert np.array_equal(ds[i]["findings"], fixed)
        # the default rule extractor reads the report itself
        rules = up.apply_unpaired(train_ds, up.UnpairedConfig(pairs_kept=0.25))
        assert np.array_equal(rules[i]["findings"], up.rule_extract(rules[i]["report"]))
        bad = up.apply_unpaired(train_ds, up.UnpairedConfig(pairs_kept=0.25),
                                extract=lambda report: np.zeros(3))
        with pytest.raises(ValueError, match="shape"):
            bad[i]
    finally:
        up.EXTRACTORS.pop("test-fixed", None)
    with pytest.raises(TypeError, match="callable"):
        up.register_extractor("x", "not a function")


def test_unpaired_finding_loss_moves_on_a_tiny_corpus(train_ds, tmp_path):
    """The unpaired rows' finding BCE falls with training, and falls further with the
    unpaired term on than with the paired finding term alone (same head, same steps)."""
    from medseek.train.loop import Trainer
    from medseek.train.recipe import recipe_from_dict

    def run(w_unpaired: float) -> tuple[float, float, dict]:
        cfg = recipe_from_dict({"model": "cxr-tiny", "steps": 25, "batch_size": 16, "seed": 0,
                                "model_overrides": {"finding_head": True},
                                "loss": {"w_global": 1.0, "w_finding": 1.0, "w_finding_unpaired": w_unpaired},
                                "unpaired": {"pairs_kept": 0.25},
                                "optim": {"name": "adamw", "lr": 0.01, "adam_lr": 0.01, "warmup_steps": 0},
                                "log_every": 0})
        model = tiny_model()
        ds = up.apply_unpaired(train_ds, cfg.unpaired)
        pick = [int(i) for i in np.flatnonzero(ds.roles() != up.PAIRED)]
        batch = collate([ds[i] for i in pick], load_tokenizer(model.cfg.text.max_length), ds.text_ids)

        def unpaired_loss() -> float:
            with torch.no_grad():
                model.eval()
                emb = encode_batch(model, batch, cfg.loss)
                return float(up.unpaired_finding_loss(model, emb["visual"], emb["text"], batch["findings"],
                                                      batch["pairing"]))

        before = unpaired_loss()
        last = Trainer(cfg, model, ds, tmp_path / f"w{w_unpaired}", progress=False).fit()
        return before, unpaired_loss(), last

    before, after, last = run(1.0)
    _, after_off, last_off = run(0.0)
    assert "loss_finding_unpaired" in last and "loss_global" in last
    assert "loss_finding_unpaired" not in last_off
    assert after < 0.8 * before, (before, after)
    assert after < after_off, (after, after_off)


def test_unpaired_recipe_is_the_retrieval_recipe_plus_unpaired_evidence():
    from medseek.train.recipe import load_recipe

    base = load_recipe("retrieval-cxr").to_dict()
    un = load_recipe("retrieval-cxr-unpaired").to_dict()
    assert un["unpaired"]["pairs_kept"] == 0.1 and base["unpaired"]["pairs_kept"] == 1.0
    assert un["loss"]["w_finding_unpaired"] > 0 and base["loss"]["w_finding_unpaired"] == 0
    for d in (base, un):
        d.pop("unpaired"), d.pop("name"), d["loss"].pop("w_finding_unpaired")
    assert un == base


# ------------------------------------------------------------------ wrist: region terms


@pytest.fixture(scope="module")
def wrist_ds(tmp_path_factory):
    from medseek.data.synth.wrist import build_synth_wrist

    out = tmp_path_factory.mktemp("synth-wrist")
    build_synth_wrist(out, n=16, seed=0, size=64, progress=False)
    torch.manual_seed(0)
    from medseek.models.factory import create_model

    return PairDataset.from_manifest(out, create_model("wrist-tiny").cfg, "train")


def test_wrist_unpaired_items_lose_their_region_captions(wrist_ds):
    """Region captions are report sentences: only paired items keep them; an image-only
    item's evidence comes from its labels, "distal radius fracture" giving ``fracture``."""
    from medseek.text.concepts import concept_names

    names = concept_names()
    ds = up.apply_unpaired(wrist_ds, up.UnpairedConfig(pairs_kept=0.3, seed=1))
    roles = ds.roles()
    fractured_image_only = 0
    for i, role in enumerate(roles):
        item = ds[i]
        rec = ds.records[i]
        if role == up.PAIRED:
            assert all(item["captions"]) and len(item["captions"]) == 3
            continue
        assert item["captions"] == ["", "", ""]
        if role == up.IMAGE_ONLY:
            assert item["sentences"] == () and item["report"] == ""
            fractured = any(lab.endswith("fracture") for lab in rec.labels)
            found = {names[j] for j in np.flatnonzero(item["findings"])}
            assert found == ({"fracture"} if fractured else {"normal"}), (rec.labels, found)
            fractured_image_only += fractured
    assert fractured_image_only > 0
    # without named regions the label evidence is item_findings' own (synth-cxr unchanged)
    assert up.label_evidence(("distal radius fracture",))[names.index("normal")] == 1.0


def test_region_terms_read_the_pairs_regions_only(wrist_ds):
    from medseek.models.factory import create_model

    torch.manual_seed(0)
    model = create_model("wrist-tiny", finding_head=True).eval()
    ds = up.apply_unpaired(wrist_ds, up.UnpairedConfig(pairs_kept=0.3, seed=1))
    roles = ds.roles()
    paired = [int(i) for i in np.flatnonzero(roles == up.PAIRED)[:3]]
    pick = paired + [int(i) for i in np.flatnonzero(roles != up.PAIRED)[:4]]
    tok = load_tokenizer(model.cfg.text.max_length)
    cfg = LossConfig(w_region=0.5, w_region_finding=1.0, w_finding=1.0, w_finding_unpaired=1.0)
    batch = collate([ds[i] for i in pick], tok, ds.text_ids)
    only = collate([ds[i] for i in paired], tok, ds.text_ids)
    with torch.no_grad():
        _, parts = combine_losses(model, encode_batch(model, batch, cfg), batch, cfg)
        _, parts_p = combine_losses(model, encode_batch(model, only, cfg), only,
                                    LossConfig(w_region=0.5, w_region_finding=1.0, w_finding=1.0))
    assert {"region", "region_finding", "finding_unpaired"} <= set(parts)
    assert parts["region"] == pytest.approx(parts_p["region"], rel=1e-5)
    assert parts["region_finding"] == pytest.approx(parts_p["region_finding"], rel=1e-5)
    # an unpaired row that still carries a caption is refused, not silently aligned
    leaked = dict(batch, region_valid=batch["region_valid"].clone())
    leaked["region_valid"][len(paired)] = True
    with pytest.raises(ValueError, match="region caption"):
        combine_losses(model, encode_batch(model, batch, cfg), leaked, cfg)


def test_wrist_unpaired_recipe_is_the_wrist_recipe_plus_unpaired_evidence():
    from medseek.train.recipe import load_recipe

    base = load_recipe("retrieval-wrist").to_dict()
    un = load_recipe("retrieval-wrist-unpaired").to_dict()
    assert un["unpaired"]["pairs_kept"] == 0.1 and un["loss"]["w_finding_unpaired"] > 0
    assert un["loss"]["w_region"] > 0 and un["loss"]["w_region_finding"] > 0
    for d in (base, un):
        d.pop("unpaired"), d.pop("name"), d["loss"].pop("w_finding_unpaired")
    assert un == base

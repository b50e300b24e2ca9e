"""Ablation runner (medseek.train.ablation), frozen-text feature cache, report prompts,
and the pretrained-MiniLM tiny recipes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medseek.eval.prompts import prompt_embeddings, report_prompts
from medseek.models.factory import create_model
from medseek.train import ablation
from medseek.train.data import PairDataset, collate, load_tokenizer, tokenize
from medseek.train.losses import LossConfig, encode_batch
from medseek.train.recipe import load_recipe
from medseek.train.text_features import TextFeatureCache, freeze_text_layers, text_tower_frozen


@pytest.fixture(scope="module")
def cxr_dir(tmp_path_factory):
    from medseek.data.synth.cxr import build_synth_cxr

    out = tmp_path_factory.mktemp("synth-cxr")
    build_synth_cxr(out, n=40, size=64, progress=False)
    return out


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory):
    from medseek.data.synth.ct import build_synth_ct

    out = tmp_path_factory.mktemp("synth-ct")
    build_synth_ct(out, n=20, matrix=(32, 32), slices=(40, 48), progress=False)
    return out


def tiny_recipe(tmp_path, base: str, **changes) -> str:
    """A copy of a shipped recipe with a random tiny text tower (fast), frozen, so the
    cached-feature path runs without loading MiniLM."""
    raw = load_recipe(base).to_dict()
    raw.update({"model": "cxr-tiny" if "cxr" in base else "ct-tiny", "batch_size": 4, "steps": 2,
                "text_trainable_layers": 0, "log_every": 1, **changes})
    raw.pop("name")
    path = tmp_path / f"{base}-test.json"
    path.write_text(json.dumps(raw))
    return str(path)


def test_freeze_text_layers_counts_from_the_top():
    model = create_model("cxr-tiny", text={"num_hidden_layers": 3})
    freeze_text_layers(model, 1)
    trains = [any(p.requires_grad for p in layer.parameters()) for layer in model.text.layers]
    assert trains == [False, False, True]
    assert not model.text.word_embeddings.weight.requires_grad
    assert all(p.requires_grad for p in model.text_head.parameters())
    assert not text_tower_frozen(model)
    freeze_text_layers(model, 0)
    assert text_tower_frozen(model) and all(p.requires_grad for p in model.visual.parameters())
    with pytest.raises(ValueError, match="text_trainable_layers 4"):
        freeze_text_layers(model, 4)


def test_cached_features_equal_the_live_tower(cxr_dir, tmp_path):
    torch.manual_seed(0)
    model = create_model("cxr-tiny")
    freeze_text_layers(model, 0)
    tok = load_tokenizer(model.cfg.text.max_length)
    ds = PairDataset.from_manifest(cxr_dir, model.cfg, "train")
    items = [ds[i] for i in range(6)]
    cache = TextFeatureCache(tok, batch_size=4)
    feats = cache.features(model, [it["report"] for it in items])
    ids, mask = tokenize(tok, [it["report"] for it in items])
    with torch.no_grad():
        torch.testing.assert_close(feats, model.text(ids, mask), rtol=1e-5, atol=1e-6)
        batch = collate(items, tok, ds.text_ids)
        live = encode_batch(model, batch, LossConfig())["text"]
        batch["text_features"] = feats
        cached = encode_batch(model, batch, LossConfig())["text"]
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    # saved and read back, the cache serves the same rows; another tower is not served
    cache.save(tmp_path / "f.pt")
    again = TextFeatureCache(tok)
    assert again.load(tmp_path / "f.pt") == len(cache)
    torch.testing.assert_close(again.features(model, [items[2]["report"]]), feats[2:3], rtol=0, atol=0)
    other = create_model("cxr-tiny")  # another random init
    freeze_text_layers(other, 0)
    assert not torch.allclose(again.features(other, [items[2]["report"]]), feats[2:3])
    unfrozen = create_model("cxr-tiny")
    with pytest.raises(ValueError, match="trains"):
        cache.features(unfrozen, ["x"])


def test_tiny_cxr_recipe_starts_from_pretrained_minilm():
    from medseek.models.text_tower import TextEncoder

    cfg = load_recipe("tiny-cxr")
    assert cfg.text_trainable_layers == 0
    model = create_model(cfg.model, pretrained_text=cfg.pretrained_text, **cfg.model_overrides)
    ref = TextEncoder(max_length=model.cfg.text.max_length)
    ids, mask = ref.tokenize(["There is a small left pleural effusion.", "No pneumothorax."])
    with torch.no_grad():
        ours, theirs = model.text(ids, mask), ref.model(ids, mask)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert float((ours * theirs).sum(1).min()) >= 0.999


def test_report_prompts_and_their_ensemble():
    pos, neg = report_prompts("pleural_effusion")
    assert pos[0] == "There is pleural effusion." and neg[0] == "No pleural effusion."
    assert "Heart size is normal." in report_prompts("cardiomegaly")[1]
    assert not any("There is normal" in p for p in report_prompts("normal")[0])
    with pytest.raises(ValueError):
        report_prompts("  ")
    rng = np.random.default_rng(0)
    table = {}

    def encode(texts):
        return np.stack([table.setdefault(t, rng.standard_normal(8)) for t in texts])

    out = prompt_embeddings(encode, ["nodule", "cardiomegaly"])
    assert out.shape == (2, 2, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=2), 1.0)
    unit = {t: v / np.linalg.norm(v) for t, v in table.items()}
    want = np.mean([unit[t] for t in report_prompts("cardiomegaly")[1]], axis=0)
    np.testing.assert_allclose(out[1, 1], want / np.linalg.norm(want))


def test_variant_recipes_follow_the_table():
    siglip = ablation.variant_recipe("tiny-cxr", ablation.VARIANTS["image"]["siglip"], steps=40)
    assert siglip.loss.contrastive == "siglip" and siglip.model_overrides["loss"] == "siglip"
    curated = ablation.variant_recipe("tiny-cxr", ablation.VARIANTS["image"]["curated-25"], steps=40)
    assert curated.curation.method == "curated" and curated.steps == 10  # same epochs
    whole = ablation.variant_recipe("tiny-ct", ablation.VARIANTS["volume"]["whole-report"])
    assert whole.loss.w_organ == 0 and load_recipe("tiny-ct").loss.w_organ > 0


def _check_ci(m):
    assert m["lo"] <= m["value"] <= m["hi"], m


def test_runner_trains_and_evaluates_on_test(cxr_dir, tmp_path):
    recipe = tiny_recipe(tmp_path, "tiny-cxr")
    rows = ablation.run_variant("base", recipe, {}, cxr_dir, tmp_path / "out", n_boot=50, eval_untrained=True)
    assert set(rows) == {"untrained", "base"}
    base, untrained = rows["base"], rows["untrained"]
    assert base["steps"] == 2 and base["samples_seen"] == 8 and untrained["steps"] == 0
    te = base["test"]
    ds = PairDataset.from_manifest(cxr_dir, create_model("cxr-tiny").cfg, "test")
    train = PairDataset.from_manifest(cxr_dir, create_model("cxr-tiny").cfg, "train")
    assert te["n_items"] == len(ds)
    assert not {r.patient_id for r in ds.records} & {r.patient_id for r in train.records}
    for key in ("i2i_ndcg@10", "t2i_ndcg@10", "t2i_recall@1", "zero_shot_auroc"):
        if te[key]["value"] is not None:
            _check_ci(te[key])
            assert 0 <= te[key]["value"] <= 1
    # training changed the model: the embeddings (hence the gap) differ from the untrained ones
    assert te["gap"]["centroid_distance"] != untrained["test"]["gap"]["centroid_distance"]
    # a second variant into the same folder, then one table from the JSON rows
    ablation.run_variant("random-25", recipe, ablation.VARIANTS["image"]["random-25"], cxr_dir,
                         tmp_path / "out", n_boot=50, labels=base["labels"])
    rnd = json.loads((tmp_path / "out" / "random-25.json").read_text())
    assert rnd["train_pairs"] == round(0.25 * len(train)) and rnd["steps"] == 1
    md = ablation.write_table(tmp_path / "out")
    lines = md.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| untrained", "| base", "| random-25"]
    assert json.loads((tmp_path / "out" / "table.json").read_text()).keys() == {"untrained", "base", "random-25"}
    # re-evaluating from the checkpoints (untrained: the seeded init) reproduces the metrics
    assert sorted(ablation.reevaluate(tmp_path / "out", cxr_dir, n_boot=50)) == ["base", "random-25", "untrained"]
    for name, row in rows.items():
        again = json.loads((tmp_path / "out" / f"{name}.json").read_text())["test"]
        assert again["i2i_ndcg@10"] == row["test"]["i2i_ndcg@10"]
        assert again["zero_shot_auroc"] == row["test"]["zero_shot_auroc"]
    # a trained variant loaded back gives per-query nDCG whose means are the row's metrics
    # (what the paired benchmarks compare query by query)
    from medseek.train.loop import embed_dataset

    model, _ = ablation.load_variant_model(tmp_path / "out", {**base, "variant": "base"})
    tok = load_tokenizer(model.cfg.text.max_length)
    v, t = embed_dataset(model, ds, tok)
    q = ablation.per_query_ndcg(v, ds, t)
    for key, vals, pid in (("i2i_ndcg@10", q["i2i"], q["pid"]),
                           ("t2i_ndcg@10", q["t2i"], q["pid"][q["first"]])):
        got = ablation._cluster_mean_ci(vals, pid, 50, 0)["value"]
        assert got == pytest.approx(te[key]["value"], abs=1e-6), key


def test_runner_volume_rows_report_text_to_volume_recall(ct_dir, tmp_path):
    recipe = tiny_recipe(tmp_path, "tiny-ct", batch_size=2)
    rows = ablation.run_variant("base", recipe, {}, ct_dir, tmp_path / "out", n_boot=20)
    te = rows["base"]["test"]
    assert te["organ2v_queries"] >= 0
    for key in ("t2i_recall@1", "i2i_ndcg@10"):
        if te[key]["value"] is not None:
            assert 0 <= te[key]["value"] <= 1
    assert "report→vol R@1" in ablation.write_table(tmp_path / "out")


def test_cluster_bootstrap_resamples_patients():
    values = np.array([1.0, 1.0, 0.0, np.nan, 0.5])
    clusters = np.array(["a", "a", "b", "b", "c"])
    m = ablation._cluster_mean_ci(values, clusters, n_boot=200, seed=0)
    assert m["n"] == 3 and math.isclose(m["value"], (1.0 + 0.0 + 0.5) / 3)
    _check_ci(m)

"""CheXficient-style curation: favours small clusters, deterministic by seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseek.train.curation import curation_report, select_curated, select_random, water_fill


def clustered(sizes=(300, 60, 12), seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(len(sizes), 8) * 10.0
    x = np.concatenate([c + rng.normal(size=(n, 8)) for c, n in zip(centers, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return x, truth


def test_water_fill_is_as_even_as_sizes_allow():
    q = water_fill(np.array([300, 60, 12]), 74)
    assert q.tolist() == [31, 31, 12] and q.sum() == 74
    assert water_fill(np.array([5, 5]), 10).tolist() == [5, 5]


def test_curated_favours_small_clusters_over_random():
    x, truth = clustered()
    cur, assign = select_curated(x, 0.2, seed=0, clusters=3)
    rnd = select_random(len(x), 0.2, seed=0)
    assert len(cur) == len(rnd) == round(0.2 * len(x))
    small = truth == 2
    assert small[cur].sum() == 12  # every member of the rarest cluster
    assert small[cur].sum() > 3 * small[rnd].sum()
    assert (truth[cur] == 0).sum() < (truth[rnd] == 0).sum()
    # the k-means clusters are the true ones (up to renaming)
    assert len({(a, t) for a, t in zip(assign, truth)}) == 3


def test_curation_is_deterministic_by_seed():
    x, _ = clustered()
    a, _ = select_curated(x, 0.2, seed=1, clusters=3)
    b, _ = select_curated(x, 0.2, seed=1, clusters=3)
    c, _ = select_curated(x, 0.2, seed=2, clusters=3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(select_random(50, 0.5, 3), select_random(50, 0.5, 3))


def test_loss_priority_prefers_high_loss_members():
    x, truth = clustered()
    losses = np.where(np.arange(len(x)) % 2 == 0, 5.0, 0.0)  # even rows are "hard"
    idx, _ = select_curated(x, 0.2, seed=0, losses=losses, clusters=3, loss_weight=10.0)
    big = idx[truth[idx] == 0]
    assert (big % 2 == 0).all()


def test_report_counts_rare_labels():
    labels = np.zeros((10, 3), dtype=bool)
    labels[:8, 0] = True
    labels[8:, 1] = True
    labels[9, 2] = True
    rep = curation_report(np.array([0, 8, 9]), labels, ["common", "rare", "rarest"], np.array([0] * 8 + [1] * 2))
    assert rep["rare_labels"][:2] == ["rarest", "rare"]
    assert rep["rare_kept_fraction"]["rare"] == 1.0 and rep["labels_chosen"]["common"] == 1
    assert rep["clusters_chosen"] == [1, 2]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="fraction"):
        select_random(10, 0.0, 0)
    with pytest.raises(ValueError, match="embeddings"):
        select_curated(np.zeros(5), 0.5, 0)
    with pytest.raises(ValueError, match="losses"):
        select_curated(np.zeros((5, 2)), 0.5, 0, losses=np.zeros(3))


# ---------------------------------------------------------------------------- online curation


def test_selection_moves_with_losses_and_prefers_hard_members():
    from medseek.train.curation import select_in_clusters

    x, truth = clustered()
    assign = truth  # fixed clusters, as online re-selection keeps them
    base = select_in_clusters(assign, 0.2, seed=0)
    assert np.array_equal(base, select_in_clusters(assign, 0.2, seed=0))  # noise fixed by seed
    rng = np.random.default_rng(5)
    losses = rng.normal(size=len(x))
    moved = select_in_clusters(assign, 0.2, seed=0, losses=losses, loss_weight=3.0)
    assert not np.array_equal(base, moved)
    # quotas per cluster do not depend on the losses: the rare cluster stays whole
    assert np.bincount(truth[moved], minlength=3).tolist() == np.bincount(truth[base], minlength=3).tolist()
    assert (truth[moved] == 2).sum() == 12
    # inside the big cluster the chosen pairs are harder than the ones left out
    big = np.flatnonzero(truth == 0)
    kept = np.isin(big, moved)
    assert losses[big][kept].mean() > losses[big][~kept].mean() + 1.0
    # a loss change alone (same seed) moves the subset: flip which pairs are hard
    flipped = select_in_clusters(assign, 0.2, seed=0, losses=-losses, loss_weight=3.0)
    assert len(np.intersect1d(flipped[truth[flipped] == 0], moved[truth[moved] == 0])) < kept.sum() // 2
    with pytest.raises(ValueError, match="losses must be finite"):
        select_in_clusters(assign, 0.2, 0, losses=np.full(len(x), np.nan))


def test_pair_losses_rank_mismatched_pairs_higher():
    from medseek.train.curation import negative_bank, pair_losses

    rng = np.random.default_rng(0)
    n, d = 60, 16
    v = rng.normal(size=(n, d))
    t = v + 0.1 * rng.normal(size=(n, d))  # matched pairs
    t[:10] = rng.normal(size=(10, d))  # the first ten reports belong to no image
    labels = np.eye(n, 4, dtype=bool)  # distinct label sets except the rows of no label
    bank = negative_bank(n, seed=0, size=32)
    assert np.array_equal(bank, negative_bank(n, seed=0, size=32)) and len(bank) == 32
    loss = pair_losses(v, t, labels, bank, scale=10.0)
    assert loss.shape == (n,) and np.isfinite(loss).all() and (loss >= 0).all()
    assert loss[:10].min() > loss[10:].max()
    # a bank pair with the same label set is no negative: all-same labels leave only i itself
    same = pair_losses(v, t, np.zeros((n, 4), dtype=bool), bank, scale=10.0)
    assert np.allclose(same, 0.0)


def test_online_config_errors_name_the_field():
    from medseek.train.recipe import CurationConfig, load_recipe

    with pytest.raises(ValueError, match="curation.rescore_every"):
        CurationConfig(method="curated", fraction=0.5, rescore_every=-1)
    with pytest.raises(ValueError, match="curation.rescore_every"):
        CurationConfig(method="curated", fraction=0.5, rescore_every=2.5)
    with pytest.raises(ValueError, match="curation.rescore_every needs method 'curated'"):
        CurationConfig(method="random", fraction=0.5, rescore_every=10)
    with pytest.raises(ValueError, match="curation.loss_weight"):
        CurationConfig(method="curated", fraction=0.5, loss_weight=-1.0)
    with pytest.raises(ValueError, match="curation.loss_weight"):
        CurationConfig(method="curated", fraction=0.5, loss_weight=float("nan"))
    with pytest.raises(ValueError, match=r"recipe.curation: \['rescore'\]"):
        load_recipe("tiny-cxr", curation={"method": "curated", "rescore": 5})
    ok = load_recipe("tiny-cxr", curation={"method": "curated", "fraction": 0.5, "rescore_every": 5,
                                           "loss_weight": 2.0})
    assert ok.curation.rescore_every == 5 and ok.curation.loss_weight == 2.0


@pytest.fixture(scope="module")
def cxr_dir(tmp_path_factory):
    from medseek.data.synth.cxr import build_synth_cxr

    out = tmp_path_factory.mktemp("synth-cxr")
    build_synth_cxr(out, n=24, seed=0, size=64, progress=False)
    return out


def _online_trainer(cxr_dir, out, **curation):
    import torch

    from medseek.models.factory import create_model
    from medseek.train.curation import apply_curation
    from medseek.train.data import PairDataset
    from medseek.train.loop import Trainer
    from medseek.train.recipe import load_recipe

    cur = {"method": "curated", "fraction": 0.5, "clusters": 3, "rescore_every": 2, "loss_weight": 5.0,
           **curation}
    cfg = load_recipe("tiny-cxr", steps=6, batch_size=8, log_every=1, eval_every=0, save_every=0, curation=cur)
    torch.manual_seed(0)
    model = create_model(cfg.model, **cfg.model_overrides)
    train = PairDataset.from_manifest(cxr_dir, model.cfg, "train")
    sub, report = apply_curation(train, cfg.curation, model)
    return Trainer(cfg, model, sub, out, progress=False), train, report


def test_loop_reselects_at_the_interval_and_the_subset_changes(cxr_dir, tmp_path):
    from medseek.train.curation import OnlineSubset

    trainer, pool, report = _online_trainer(cxr_dir, tmp_path / "run")
    assert isinstance(trainer.train, OnlineSubset) and report["rescore_every"] == 2
    first = trainer.train.indices.copy()
    assert len(first) == round(0.5 * len(pool))
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if "curation" in r]
    assert [r["step"] for r in rounds] == [2, 4]  # not at the last step: nothing would train on it
    assert [r["curation"]["round"] for r in rounds] == [1, 2]
    assert rounds[0]["curation"]["changed"] > 0
    assert not np.array_equal(first, trainer.train.indices)
    assert len(trainer.train.indices) == len(first)
    for r in rounds:  # the high-loss pairs are the ones kept
        assert r["curation"]["loss_chosen"] > r["curation"]["loss_pool"]
        assert set(r["curation"]["rare_kept_fraction"]) == set(report["rare_labels"])
    last = [r for r in rows if "loss" in r][-1]
    assert last["curation_flops"] > 0 and last["flops"] > last["curation_flops"]
    # the chosen indices travel in the checkpoint: a resumed trainer trains on the same subset
    again, _, _ = _online_trainer(cxr_dir, tmp_path / "run")
    again.resume()
    assert np.array_equal(again.train.indices, trainer.train.indices) and again.train.round == 2


def test_loop_without_rescoring_keeps_its_subset(cxr_dir, tmp_path):
    trainer, _, report = _online_trainer(cxr_dir, tmp_path / "static", rescore_every=0)
    assert "rescore_every" not in report and not trainer.online
    n = len(trainer.train)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "static" / "metrics.jsonl").read_text().splitlines()]
    assert not any("curation" in r for r in rows) and len(trainer.train) == n

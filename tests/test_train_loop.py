"""Trainer: loss falls, exact resume, the ``medseek train`` command end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from medseek.models.factory import create_model
from medseek.train.data import PairDataset
from medseek.train.loop import Trainer, stream_indices
from medseek.train.recipe import load_recipe


@pytest.fixture(scope="module")
def wrist_dir(tmp_path_factory):
    from medseek.data.synth.wrist import build_synth_wrist

    out = tmp_path_factory.mktemp("synth-wrist")
    build_synth_wrist(out, n=4, seed=0, progress=False)
    return out


def make_trainer(wrist_dir, out, seed=0, **overrides):
    cfg = load_recipe("tiny-wrist", **{"batch_size": 4, "steps": 6, "log_every": 1, "eval_every": 0,
                                       "save_every": 0, **overrides})
    torch.manual_seed(seed)
    model = create_model(cfg.model, **cfg.model_overrides)
    train = PairDataset.from_manifest(wrist_dir, model.cfg, "train")
    return Trainer(cfg, model, train, out, progress=False)


def test_stream_is_seeded_and_covers_each_epoch():
    a = stream_indices(5, seed=3, start=0, count=10)
    assert sorted(a[:5]) == list(range(5)) and sorted(a[5:]) == list(range(5))
    assert stream_indices(5, 3, 4, 3) == a[4:7]
    assert stream_indices(5, 4, 0, 10) != a


def test_loss_falls_on_a_fixed_batch(wrist_dir, tmp_path):
    # batch_size = the 6 train images: every step sees the same batch (in a new order)
    tr = make_trainer(wrist_dir, tmp_path, batch_size=6, steps=20,
                      optim={"name": "muon", "lr": 0.02, "adam_lr": 0.003})
    losses = [tr.train_step()["loss"] for _ in range(20)]
    assert min(losses[-3:]) < 0.7 * losses[0], losses


def test_checkpoint_resume_is_bit_identical(wrist_dir, tmp_path):
    straight = make_trainer(wrist_dir, tmp_path / "a")
    for _ in range(6):
        straight.train_step()
    first = make_trainer(wrist_dir, tmp_path / "b")
    for _ in range(3):
        first.train_step()
    ckpt = first.save(tmp_path / "b" / "ck.safetensors")
    halfway = {k: v.clone() for k, v in first.model.state_dict().items()}
    # fresh objects, initialised from another seed: only the checkpoint can make them equal
    resumed = make_trainer(wrist_dir, tmp_path / "c", seed=123)
    resumed.resume(ckpt)
    assert resumed.step == 3 and resumed.position == first.position
    for _ in range(3):
        resumed.train_step()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(not torch.equal(a[k], halfway[k]) for k in a)  # steps 4-6 changed something
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_command_runs_two_steps(wrist_dir, tmp_path):
    from medseek.train import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    out = tmp_path / "run"
    args = parser.parse_args(["train", "--recipe", "tiny-wrist", "--data", str(wrist_dir), "--out", str(out),
                              "--steps", "2", "--no-progress"])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [2] and steps[-1]["samples_seen"] == 32
    assert {"ndcg@10", "zero_shot_auroc", "gap_centroid_distance"} <= set(rows[-1]["eval"])
    assert (out / "checkpoint.safetensors").is_file()
    args = parser.parse_args(["train", "--recipe", "tiny-wrist", "--data", str(wrist_dir), "--out", str(out),
                              "--steps", "3", "--resume", "--no-progress"])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 3]


def test_recipe_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        load_recipe("tiny-wrist", batch_size=0)
    with pytest.raises(ValueError, match="unknown recipe keys"):
        load_recipe("tiny-wrist", bogus=1)
    with pytest.raises(ValueError, match="recipe must be"):
        load_recipe("no-such-recipe")


def test_train_command_curates_and_reports(wrist_dir, tmp_path):
    from medseek.train import commands

    recipe = tmp_path / "curated.json"
    recipe.write_text(json.dumps({"model": "wrist-tiny", "steps": 1, "batch_size": 2, "eval_every": 0,
                                  "loss": {"contrastive": "siglip"},
                                  "curation": {"method": "curated", "fraction": 0.5, "clusters": 2}}))
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    out = tmp_path / "run"
    args = parser.parse_args(["train", "--recipe", str(recipe), "--data", str(wrist_dir), "--out", str(out),
                              "--no-progress"])
    assert args.func(args) == 0
    rep = json.loads((out / "curation.json").read_text())
    assert rep["method"] == "curated" and rep["n_full"] == 6 and rep["n_chosen"] == 3
    assert sum(rep["clusters_chosen"]) == 3 and len(rep["clusters_full"]) == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["flops"] > 0 and rows[0]["cpu_s"] > 0


def test_image_rows_without_text_take_their_study_report(tmp_path):
    from medseek.data.manifest import read_manifest
    from medseek.data.synth.cxr import build_synth_cxr

    build_synth_cxr(tmp_path, n=3, seed=0, progress=False)
    raw = read_manifest(tmp_path / "manifest.parquet")
    assert any(r.kind == "image" and not r.report for r in raw)  # synth-cxr keeps text on report rows
    reports = {r.study_id: r.report for r in raw if r.kind == "report"}
    ds = PairDataset.from_manifest(tmp_path, create_model("cxr-tiny", device="meta").cfg, None)
    for rec in ds.records:
        assert rec.report and rec.report == reports[rec.study_id]

"""Phrase grounding on named region boxes (medseek.eval.grounding): the pointing metric on
constructed embeddings (perfect, inverted, random), its input checks, and the whole path
on a tiny synth-wrist corpus with a briefly trained wrist model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseek.eval import grounding as gr

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REGIONS = ["distal_radius", "distal_ulna", "ulnar_styloid"]


def _orthonormal(k: int, d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
    return q.T  # (k, d), rows orthonormal


def _phrases(d: int = 32, seed: int = 0):
    """Orthonormal (R, 2, D) named phrases (positive, negation) and a (2, D) finding phrase."""
    basis = _orthonormal(2 * len(REGIONS) + 2, d, seed)
    named = basis[:2 * len(REGIONS)].reshape(len(REGIONS), 2, d)
    return named, basis[-2:]


def _truth(n: int, seed: int, p: float = 0.4) -> np.ndarray:
    return np.random.default_rng(seed).random((n, len(REGIONS))) < p


def _patient_mean(values: np.ndarray, pid: np.ndarray) -> float:
    return float(np.mean([values[pid == p].mean() for p in np.unique(pid)]))


def test_region_truth_reads_region_labels():
    labels = [("normal",), ("distal radius fracture",), ("distal ulna fracture", "ulnar styloid fracture"),
              ("distal radius fracture", "cardiomegaly")]
    t = gr.region_truth(labels, REGIONS, "fracture")
    assert t.tolist() == [[False, False, False], [True, False, False], [False, True, True],
                          [True, False, False]]
    assert not gr.region_truth(labels, REGIONS, "dislocation").any()


def test_pointing_is_perfect_when_each_region_embeds_its_own_finding():
    """A fractured region's embedding is its phrase ("<region> fracture" + "fracture"), an
    intact one the negations: every query points right, under both scoring rules."""
    named, finding = _phrases()
    truth = _truth(200, seed=1)
    emb = np.where(truth[..., None], named[None, :, 0] + finding[0], named[None, :, 1] + finding[1])
    pid = np.arange(len(truth)) // 2
    for phrases, fphrase in ((named, finding), (named[:, 0], finding[0])):
        res = gr.score_grounding(emb, truth, pid, phrases, fphrase, n_boot=50)
        assert res["named"]["queries"] == int(truth.sum())
        mixed = truth.any(1) & ~truth.all(1)
        assert res["finding_only"]["queries"] == int(mixed.sum())
        for kind in ("named", "finding_only"):
            assert res[kind]["accuracy"]["value"] == 1.0
            assert res[kind]["hits"].min() == 1.0
        assert res["named"]["chance"] == pytest.approx(1 / 3)
        assert res["finding_only"]["chance"] == pytest.approx(_patient_mean(truth[mixed].sum(1) / 3, pid[mixed]))
        assert res["finding_only"]["lift"]["value"] == pytest.approx(1 - res["finding_only"]["chance"])
    # swapped: fractured regions carry the negation, intact ones the finding -> never right
    flipped = np.where(truth[..., None], named[None, :, 1] + finding[1], named[None, :, 0] + finding[0])
    res = gr.score_grounding(flipped, truth, pid, named, finding, n_boot=50)
    assert res["finding_only"]["accuracy"]["value"] == 0.0


def test_random_embeddings_point_at_chance():
    named, finding = _phrases(d=16)
    truth = _truth(3000, seed=2)
    emb = np.random.default_rng(3).normal(size=(len(truth), len(REGIONS), 16))
    pid = np.arange(len(truth)) // 2
    res = gr.score_grounding(emb, truth, pid, named, finding, n_boot=200)
    for kind in ("named", "finding_only"):
        acc, chance = res[kind]["accuracy"], res[kind]["chance"]
        assert abs(acc["value"] - chance) < 0.03, (kind, acc, chance)
        assert acc["lo"] <= chance + 0.01 and acc["hi"] >= chance - 0.01
        assert res[kind]["accuracy"]["n"] == len(np.unique(pid[gr.grounding_queries(truth)[kind]["row"]]))
    assert res["finding_only"]["chance"] > 1 / 3  # images with 2 of 3 fractured raise it


def test_a_constant_pointer_scores_the_majority_baseline():
    """Always pointing at the region that carries the finding most often reaches
    ``majority``, far above uniform chance, with no lift over it."""
    named, finding = _phrases()
    truth = _truth(400, seed=6, p=0.2)
    truth[:, 0] |= np.random.default_rng(7).random(len(truth)) < 0.6  # region 0 breaks most often
    emb = np.zeros((len(truth), 3, 32))
    emb[:, 0] = named[0, 0] + finding[0]  # region 0 looks fractured in every image
    emb[:, 1:] = named[1:, 1] + finding[1]
    pid = np.arange(len(truth)) // 3
    res = gr.score_grounding(emb, truth, pid, named, finding, n_boot=50)["finding_only"]
    assert res["majority_region"] == 0
    assert res["accuracy"]["value"] == pytest.approx(res["majority"])
    assert res["lift_majority"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert res["majority"] > res["chance"] + 0.2


def test_region_auroc_follows_the_region_embedding():
    named, finding = _phrases()
    truth = _truth(300, seed=4)
    emb = np.where(truth[..., None], named[None, :, 0], named[None, :, 1])
    pid = np.arange(len(truth))
    good = gr._region_auroc(emb, truth, pid, named, n_boot=50, seed=0)
    assert good["value"] == 1.0 and len(good["per_region"]) == 3
    bad = gr._region_auroc(emb[:, ::-1], truth, pid, named, n_boot=50, seed=0)  # regions shuffled
    assert bad["value"] < 0.75


def test_bad_input_is_refused_with_the_shapes():
    named, finding = _phrases()
    truth = _truth(10, seed=5)
    truth[0] = True
    emb = np.zeros((10, 3, 32))
    with pytest.raises(ValueError, match="truth"):
        gr.score_grounding(emb, truth[:, :2], np.arange(10), named, finding)
    with pytest.raises(ValueError, match="named_phrases"):
        gr.score_grounding(emb, truth, np.arange(10), named[:2], finding)
    with pytest.raises(ValueError, match="named_phrases"):
        gr.score_grounding(emb, truth, np.arange(10), named, finding[0])  # (R, 2, D) vs (D,)
    with pytest.raises(ValueError, match="all-False"):
        gr.pointing_hits(np.zeros((2, 32)), np.zeros((2, 3, 32)), np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="region_emb"):
        gr.pointing_hits(np.zeros((2, 32)), np.zeros((2, 32)), np.ones((2, 3), dtype=bool))


@pytest.fixture(scope="module")
def wrist_dir(tmp_path_factory):
    from medseek.data.synth.wrist import build_synth_wrist

    out = tmp_path_factory.mktemp("synth-wrist")
    build_synth_wrist(out, n=16, seed=0, size=64, progress=False)
    return out


def test_grounding_of_a_tiny_trained_wrist_model(wrist_dir, tmp_path):
    """Train the tiny wrist model a few steps with unpaired evidence alignment (region
    terms on), then ground its phrases on the train images: every query is counted, the
    chance rates follow the labels, and a model without named regions is refused."""
    from medseek.models.factory import create_model
    from medseek.train.data import PairDataset, load_tokenizer
    from medseek.train.loop import Trainer
    from medseek.train.recipe import recipe_from_dict
    from medseek.train.unpaired import apply_unpaired

    cfg = recipe_from_dict({"model": "wrist-tiny", "steps": 4, "batch_size": 8, "seed": 0,
                            "model_overrides": {"finding_head": True},
                            "loss": {"w_global": 1.0, "w_region": 0.5, "w_finding": 1.0,
                                     "w_region_finding": 1.0, "w_finding_unpaired": 1.0},
                            "unpaired": {"pairs_kept": 0.3},
                            "optim": {"name": "adamw", "lr": 0.01, "adam_lr": 0.01, "warmup_steps": 0},
                            "log_every": 0})
    torch.manual_seed(0)
    model = create_model("wrist-tiny", finding_head=True)
    train = PairDataset.from_manifest(wrist_dir, model.cfg, "train")
    last = Trainer(cfg, model, apply_unpaired(train, cfg.unpaired), tmp_path / "run", progress=False).fit()
    assert {"loss_region", "loss_finding_unpaired"} <= set(last)

    tok = load_tokenizer(model.cfg.text.max_length)
    res = gr.evaluate_grounding(model, train, tok, n_boot=50)
    truth = gr.region_truth([r.labels for r in train.records], REGIONS, "fracture")
    assert res["pathway"] == "region_head" and res["items"] == len(train)
    for mode in ("difference", "positive"):
        assert res[mode]["named"]["queries"] == int(truth.sum()) > 0
        assert res[mode]["finding_only"]["queries"] == int((truth.any(1) & ~truth.all(1)).sum()) > 0
        for kind in ("named", "finding_only"):
            acc = res[mode][kind]["accuracy"]
            assert 0.0 <= acc["lo"] <= acc["value"] <= acc["hi"] <= 1.0
            assert set(np.unique(res[mode][kind]["hits"])) <= {0.0, 1.0}
    assert 0.0 <= res["region_auroc"]["value"] <= 1.0
    row = gr.grounding_row(res)
    assert "hits" not in row["difference"]["named"] and "accuracy" in row["difference"]["named"]

    cxr = create_model("cxr-tiny")
    with pytest.raises(ValueError, match="named regions"):
        gr.evaluate_grounding(cxr, train, tok)
    with pytest.raises(ValueError, match="dislocation"):
        gr.evaluate_grounding(model, train, tok, finding="dislocation")

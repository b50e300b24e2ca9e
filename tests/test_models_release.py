"""Released weights: fp16 files without the pretrained text tower, a card with a SHA-256,
and a loaded model that embeds as the saved one did."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medseek.models.factory import create_model
from medseek.models.release import list_releases, load_release, read_card, save_release


@pytest.fixture(scope="module")
def trained_like():
    """cxr-retrieval with every non-text tensor moved off its initial value."""
    torch.manual_seed(0)
    model = create_model("cxr-retrieval").eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not name.startswith("text.") and t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t).abs() if "running_var" in name
                       else 0.1 * torch.randn_like(t))
        model.finding_threshold.copy_(torch.linspace(-1, 1, model.finding_threshold.numel()))
    return model


def test_round_trip_embeds_as_before(tmp_path, trained_like):
    card = save_release(trained_like, tmp_path, "r", {"recipe": "retrieval-cxr", "steps": 7})
    weights = tmp_path / "r.safetensors"
    assert card["bytes"] == weights.stat().st_size < 20 * 2**20
    assert card["model"] == "cxr-retrieval" and card["steps"] == 7 and card["excluded"]
    assert json.loads((tmp_path / "r.json").read_text()) == card == read_card(tmp_path / "r.json")

    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys
                   if f.get_tensor(k).is_floating_point())
    assert keys and not any(k.startswith("text.") for k in keys)
    assert "finding_threshold" in keys and "visual.stem.1.running_var" in keys

    loaded = load_release(tmp_path / "r.json")
    x = torch.rand(5, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = trained_like.encode_image(x).numpy(), loaded.encode_image(x).numpy()
    assert np.abs(a - b).max() < 2e-3 and (a * b).sum(1).min() > 0.9995
    torch.testing.assert_close(loaded.finding_threshold, trained_like.finding_threshold,
                               rtol=1e-3, atol=1e-3)
    sd = trained_like.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items() if k.startswith("text."))


def test_a_changed_file_or_a_modified_config_is_refused(tmp_path, trained_like):
    save_release(trained_like, tmp_path, "r", {})
    data = bytearray((tmp_path / "r.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "r.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_release(tmp_path / "r.json")
    other = create_model("cxr-retrieval", embed_dim=64)
    with pytest.raises(ValueError, match="shipped model config, unchanged"):
        save_release(other, tmp_path, "x", {})
    with pytest.raises(ValueError, match="release must be"):
        load_release("no-such-release")


@pytest.mark.parametrize("name", list_releases())
def test_shipped_releases_load_and_match_their_cards(name):
    card = read_card(name)
    assert card["bytes"] < 20 * 2**20
    model = load_release(name)
    assert model.cfg.name == card["model"]
    for metric in card["test"].values():
        assert metric["lo"] <= metric["value"] <= metric["hi"]


def test_reproduce_writes_a_release_with_test_metrics(tmp_path):
    """The whole `medseek train --release` path on a tiny corpus and two steps: corpus,
    training, calibration, test metrics with CIs in the card, a loadable release."""
    from medseek.train.release import compare_to_card, reproduce

    card = reproduce("chest-xr", tmp_path, steps=2, n_boot=50,
                     corpus_overrides={"n": 120, "size": 64}, log=lambda *_: None)
    assert card["steps"] == 2 and card["corpus"]["n"] == 120 and card["recipe"] == "retrieval-cxr"
    assert set(card["test"]) >= {"i2i_ndcg@10", "t2i_ndcg@10"}
    for name in ("i2i_ndcg@10", "t2i_ndcg@10"):  # (zero-shot needs more test positives)
        m = card["test"][name]
        assert 0 <= m["lo"] <= m["value"] <= m["hi"] <= 1, (name, m)
    assert (tmp_path / "runs" / "chest-xr" / "calibration.json").is_file()
    model = load_release(tmp_path / "release" / "chest-xr.json")
    # the calibrated thresholds travel with the weights; findings never calibrated (all of
    # them, after two steps) are left out of the concept bank
    from medseek.text.concepts import concept_names
    from medseek.train.calibrate import NEVER

    cal = json.loads((tmp_path / "runs" / "chest-xr" / "calibration.json").read_text())
    want = [cal[n]["threshold"] for n in concept_names()]
    np.testing.assert_allclose(model.finding_threshold.float().numpy(), want, rtol=1e-3)
    bank = model.concept_bank()
    assert (bank is None) == all(t >= NEVER for t in want)
    assert bank is None or set(bank.names) == {n for n, t in zip(concept_names(), want)
                                               if t < NEVER}
    rows = compare_to_card(card, card)
    assert rows and all(r["ok"] for r in rows)
    worse = json.loads(json.dumps(card))
    worse["test"]["i2i_ndcg@10"]["value"] -= 0.2
    assert not all(r["ok"] for r in compare_to_card(worse, card))


@pytest.mark.parametrize("name, overrides, metric", [
    ("wrist", {"n": 60, "size": 64}, "region_diagnosis.majority.macro_f1_global"),
    ("chest-ct", {"n": 60, "matrix": [32, 32], "slices": [16, 24]}, "t2i_recall@5"),
])
def test_reproduce_wrist_and_ct_releases(tmp_path, name, overrides, metric):
    """The wrist card carries the kNN fracture F1 (global and region rerank), the CT card
    report->volume recall; both reproduce end to end on tiny corpora."""
    from medseek.train.release import RELEASES, compare_to_card, reproduce

    card = reproduce(name, tmp_path, steps=2, n_boot=50, corpus_overrides=overrides,
                     log=lambda *_: None)
    assert card["recipe"] == RELEASES[name]["recipe"] and card["corpus"]["n"] == overrides["n"]
    m = card["test"][metric]
    assert 0 <= m["lo"] <= m["value"] <= m["hi"] <= 1, m
    if name == "wrist":
        assert "region_diagnosis.calibrated.macro_f1_region" in card["test"]
        assert load_release(tmp_path / "release" / "wrist.json").region_head is not None
    rows = compare_to_card(card, card)
    assert any(r["metric"] == metric for r in rows) and all(r["ok"] for r in rows)

"""Federated training (medseek.train.federated): partitions, missing-modality clients,
aggregation math, and a real Flower server with two client processes on 127.0.0.1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the federated extra (flwr) is not installed")

from medseek.train import federated as fed  # noqa: E402


def _fake_split(n_patients: int = 200, n_labels: int = 6, seed: int = 0):
    """Two images per patient; each patient has one primary label (and both images carry it)."""
    rng = np.random.default_rng(seed)
    prim = rng.integers(0, n_labels, n_patients)
    patients = np.repeat([f"p{j}" for j in range(n_patients)], 2)
    labels = np.zeros((2 * n_patients, n_labels), dtype=bool)
    labels[np.arange(2 * n_patients), np.repeat(prim, 2)] = True
    return patients, labels


def test_partitions_keep_patients_whole_and_cover_the_split():
    patients, labels = _fake_split()
    for scheme in fed.PARTITIONS:
        parts = fed.partition_patients(patients, labels, 4, scheme, alpha=0.2, seed=1)
        allidx = np.concatenate(parts)
        assert sorted(allidx.tolist()) == list(range(len(patients)))
        owners = {}
        for k, p in enumerate(parts):
            assert len(p) > 0
            for i in p:
                assert owners.setdefault(patients[i], k) == k, f"{scheme} split a patient"


def test_dirichlet_skew_grows_as_alpha_falls():
    patients, labels = _fake_split()
    skew = {}
    for scheme, alpha in (("iid", 0.0), ("dirichlet", 0.8), ("dirichlet", 0.2)):
        vals = [fed.label_skew(fed.partition_patients(patients, labels, 4, scheme, alpha=alpha or 1, seed=s),
                               labels) for s in range(5)]
        skew[(scheme, alpha)] = float(np.mean(vals))
    assert skew[("dirichlet", 0.2)] > skew[("dirichlet", 0.8)] > skew[("iid", 0.0)]
    assert skew[("dirichlet", 0.2)] > 2 * skew[("iid", 0.0)]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="strategy"):
        fed.load_federated_config({"recipe": "r", "data": "d", "strategy": "fedsgd"})
    with pytest.raises(ValueError, match="unknown keys"):
        fed.load_federated_config({"recipe": "r", "data": "d", "rounds_": 3})
    with pytest.raises(ValueError, match="client 7"):
        fed.load_federated_config({"recipe": "r", "data": "d", "missing": {"7": "image"}})


def test_fedavg_is_the_example_weighted_mean():
    a = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    b = [np.array([3.0, 6.0], np.float32), np.array([[4.0]], np.float32)]
    out = fed.fedavg([a, b], [1, 3])
    np.testing.assert_allclose(out[0], [2.5, 5.0])
    np.testing.assert_allclose(out[1], [[3.0]])
    assert out[0].dtype == np.float32


def test_fednova_normalises_by_local_steps():
    g = [np.zeros(2)]
    u1, u2 = [np.array([1.0, 1.0])], [np.array([4.0, 0.0])]  # client 2 ran 4x the steps
    out = fed.fednova(g, [u1, u2], [1, 1], [1, 4])
    # per-step directions (1,1) and (1,0), averaged (1, .5), times tau_eff 2.5
    np.testing.assert_allclose(out[0], [2.5, 1.25])
    np.testing.assert_allclose(fed.fednova(g, [u1, u2], [1, 3], [2, 2])[0], fed.fedavg([u1, u2], [1, 3])[0])


def test_fedprox_term_pulls_toward_the_global_weights():
    torch.manual_seed(0)
    g = torch.randn(5)
    w = torch.nn.Parameter(g + torch.randn(5))
    before = float((w.detach() - g).norm())
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        fed.proximal_term([w], [g], mu=1.0).backward()
        opt.step()
    assert float((w.detach() - g).norm()) < 0.7 * before
    assert float(fed.proximal_term([w], [g], mu=0.0).detach()) == 0.0


@pytest.fixture(scope="module")
def cxr_dir(tmp_path_factory):
    from medseek.data.synth.cxr import build_synth_cxr

    out = tmp_path_factory.mktemp("synth-cxr-fed")
    build_synth_cxr(out, n=40, size=64, progress=False)
    return out


def _recipe(tmp_path) -> str:
    from medseek.train.recipe import load_recipe

    raw = load_recipe("tiny-cxr").to_dict()
    raw.update({"model": "cxr-tiny", "batch_size": 4, "steps": 4, "text_trainable_layers": 0,
                "model_overrides": {"finding_head": True}})
    raw["loss"]["w_finding"] = 1.0
    raw["optim"]["warmup_steps"] = 0
    raw.pop("name")
    path = tmp_path / "tiny-fed.json"
    path.write_text(json.dumps(raw))
    return str(path)


def test_missing_modality_clients_lack_that_modality(cxr_dir, tmp_path):
    from medseek.train.data import PairDataset, load_tokenizer

    fc = fed.load_federated_config({"recipe": _recipe(tmp_path), "data": str(cxr_dir), "clients": 2,
                                    "missing": {"0": "image", "1": "report"}})
    cfg, model, names = fed.build_model(fc)
    train = PairDataset.from_manifest(cxr_dir, model.cfg, "train")
    img = fed.client_item(train, 0, "image")
    rep = fed.client_item(train, 0, "report")
    assert img["report"] == "" and "image" in img
    assert "image" not in rep and rep["report"] == train[0]["report"] != ""
    tok = load_tokenizer(model.cfg.text.max_length)
    for modality in ("image", "report"):
        items = [fed.client_item(train, i, modality) for i in range(4)]
        loss, parts = fed.local_loss(model, items, modality, cfg, tok, train.text_ids)
        assert set(parts) == {"finding"} and torch.isfinite(loss)
    from dataclasses import replace

    cfg = replace(cfg, loss=replace(cfg.loss, w_finding=0.0))
    with pytest.raises(ValueError, match="w_finding"):
        fed.local_loss(model, items, "report", cfg, tok, train.text_ids)


def test_real_flower_server_and_two_clients_change_the_global_weights(cxr_dir, tmp_path):
    fc = fed.load_federated_config({
        "recipe": _recipe(tmp_path), "data": str(cxr_dir), "out": str(tmp_path / "run"),
        "clients": 2, "rounds": 2, "local_steps": 2, "partition": "iid", "strategy": "fedprox",
        "mu": 0.1, "missing": {"1": "image"}, "timeout_s": 240})
    summary = fed.run_federated(fc)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["clients"] == 2 and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in summary["rounds"])
    assert all(r["update_norm"] > 0 for r in summary["rounds"])
    _, init, names = fed.build_model(fc)
    _, final = fed.load_global(fc)
    before, after = fed.get_weights(init, names), fed.get_weights(final, names)
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    # each round's global model is kept (rounds-to-target curves); the last is the final
    first = fed.get_weights(fed.load_global(fc, round_no=1)[1], names)
    last = fed.get_weights(fed.load_global(fc, round_no=2)[1], names)
    assert all(np.array_equal(a, b) for a, b in zip(last, after))
    assert any(not np.array_equal(a, b) for a, b in zip(first, after))


def test_train_cli_federated_flag_reads_and_checks_the_config(tmp_path):
    from medseek.cli import main

    bad = tmp_path / "fed.json"
    bad.write_text(json.dumps({"recipe": "tiny-cxr", "data": str(tmp_path), "partition": "by-site"}))
    with pytest.raises(ValueError, match="partition 'by-site'"):
        main(["train", "--federated", str(bad), "--out", str(tmp_path / "out")])


def test_batchnorm_statistics_travel_with_the_weights():
    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    trained(torch.randn(8, 1, 6, 6) * 3 + 2)  # train mode: the running statistics move
    names = fed.exchanged_names(trained)
    assert "1.running_mean" in names and "1.running_var" in names
    fresh = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    fed.set_weights(fresh, names, fed.get_weights(trained, names))
    assert torch.allclose(fresh[1].running_mean, trained[1].running_mean)
    assert not torch.allclose(fresh[1].running_mean, torch.zeros(4))
    x = torch.randn(2, 1, 6, 6)
    assert torch.allclose(fresh.eval()(x), trained.eval()(x))


def test_a_client_with_its_data_left_out_counts_for_nothing():
    rng = np.random.default_rng()
    g = [rng.normal(size=(3, 2)).astype(np.float32)]
    a, b = [rng.normal(size=(3, 2)).astype(np.float32)], [rng.normal(size=(3, 2)).astype(np.float32)]
    np.testing.assert_allclose(fed.fedavg([a, g], [5, 0])[0], a[0], rtol=1e-6)
    np.testing.assert_allclose(fed.fednova(g, [a, b, g], [4, 4, 0], [2, 2, 1])[0],
                               fed.fedavg([a, b], [4, 4])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="positive sum"):
        fed.fedavg([a, b], [0, 0])
    with pytest.raises(ValueError, match="positive sum"):
        fed.fednova(g, [a], [-1], [1])
    fc = fed.FederatedConfig(recipe="tiny-cxr", data="d", out="o", clients=3, missing={"2": "none"})
    assert [fc.modality(c) for c in range(3)] == ["both", "both", "none"]
    with pytest.raises(ValueError, match="'image', 'report' or 'none'"):
        fed.FederatedConfig(recipe="tiny-cxr", data="d", out="o", clients=3, missing={"1": "pixels"})

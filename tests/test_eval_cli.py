"""``medseek eval`` end to end, and the PNG figures of medseek.eval.plots."""

import json
import subprocess
import sys

import numpy as np
import pytest

from medseek.cli import build_parser, main
from medseek.eval.evaluate import load_embeddings
from medseek.eval.plots import pca_2d, plot_label_auroc, plot_modality_gap, plot_recall_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_npz(path, n=40, d=8, n_labels=3, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    labels = rng.random((n, n_labels)) < 0.4
    labels[0] = [True, False, False]
    centres = rng.normal(size=(n_labels, d)) * 2.0
    image = labels @ centres + 0.3 * rng.normal(size=(n, d))
    text = image + 0.01 * rng.normal(size=(n, d))  # nearly identical: every pair is found at rank 1
    arrays = dict(
        image=image.astype(np.float32),
        text=text.astype(np.float32),
        labels=labels,
        label_names=np.array(["effusion", "fracture", "nodule"]),
        patient_ids=np.arange(n) // 2,
        prompts=np.stack([centres, -centres], axis=1),
    )
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_SIGNATURE


def test_eval_command_writes_metrics_and_figures(tmp_path, capsys):
    npz = _write_npz(tmp_path / "emb.npz")
    out = tmp_path / "out"
    assert main(["eval", str(npz), "--out", str(out), "--n-boot", "100", "--ks", "1", "5", "100"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # K = 100 > N = 40 is dropped rather than reported as a meaningless 1.0.
    assert metrics["settings"]["ks"] == [1, 5]
    for direction in ("image_to_text", "text_to_image"):
        block = metrics["crossmodal"][direction]
        assert block["recall@1"] == {"value": 1.0, "lo": 1.0, "hi": 1.0}
        assert block["mrr"]["value"] == 1.0
    gap = metrics["modality_gap"]
    assert gap["centroid_distance"] < 0.05 and gap["mean_pair_cosine"] > 0.99
    i2i = metrics["image_to_image"]
    assert i2i["map"]["lo"] <= i2i["map"]["value"] <= i2i["map"]["hi"]
    assert set(metrics["diagnosis"]["per_label"]) == {"effusion", "fracture", "nodule"}
    assert metrics["diagnosis"]["n_queries"] == 40
    # Prompts are the label centres, so zero-shot ranking is near perfect.
    assert metrics["zero_shot"]["macro"]["auroc"] > 0.9
    names = {"recall_at_k.png", "modality_gap.png", "diagnosis_auroc.png", "zero_shot_auroc.png"}
    assert {p.split("/")[-1] for p in metrics["figures"]} == names
    assert all(_is_png(out / name) for name in names)
    table = capsys.readouterr().out
    assert "image_to_text recall@1" in table and "zero-shot macro auroc" in table


def test_eval_command_image_only_and_no_plots(tmp_path):
    npz = _write_npz(tmp_path / "emb.npz", text=None, prompts=None, label_names=None, patient_ids=None)
    out = tmp_path / "out"
    assert main(["eval", str(npz), "--out", str(out), "--n-boot", "20", "--no-plots", "--k", "5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "crossmodal" not in metrics and "zero_shot" not in metrics
    assert "ndcg@5" in metrics["image_to_image"]
    assert set(metrics["diagnosis"]["per_label"]) == {"label_0", "label_1", "label_2"}
    assert metrics["figures"] == [] and list(out.glob("*.png")) == []


def test_patient_exclusion_changes_image_retrieval(tmp_path):
    # Pairs of studies from one patient are near duplicates; excluding the patient
    # removes those easy matches, so MRR must change.
    rng = np.random.default_rng(2)
    base = rng.normal(size=(20, 8))
    image = np.repeat(base, 2, axis=0) + 0.01 * rng.normal(size=(40, 8))
    labels = rng.random((40, 3)) < 0.3
    with_ids = _write_npz(tmp_path / "a.npz", image=image, text=None, prompts=None, labels=labels,
                          label_names=None, patient_ids=np.arange(40) // 2)
    without = _write_npz(tmp_path / "b.npz", image=image, text=None, prompts=None, labels=labels,
                         label_names=None, patient_ids=None)
    results = []
    for npz in (with_ids, without):
        out = tmp_path / npz.stem
        assert main(["eval", str(npz), "--out", str(out), "--n-boot", "10", "--no-plots"]) == 0
        results.append(json.loads((out / "metrics.json").read_text())["image_to_image"]["mrr"]["value"])
    assert results[0] != results[1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image": None}, "key 'image'"),
        ({"text": np.ones((39, 8), np.float32)}, "text must have shape"),
        ({"image": np.full((40, 8), np.nan, np.float32)}, "image must be finite"),
        ({"labels": np.full((40, 3), 2)}, "labels must be bool or 0/1"),
        ({"prompts": np.ones((3, 4, 8))}, "prompts must have shape"),
        ({"extra": np.ones(3)}, "unknown keys"),
    ],
)
def test_eval_command_rejects_bad_files(tmp_path, capsys, overrides, message):
    npz = _write_npz(tmp_path / "bad.npz", **overrides)
    assert main(["eval", str(npz), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_eval_command_rejects_bad_arguments(tmp_path, capsys):
    npz = _write_npz(tmp_path / "emb.npz")
    assert main(["eval", str(npz), "--out", str(tmp_path / "o"), "--alpha", "2"]) == 2
    assert "--alpha must be in (0, 1)" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.npz" in capsys.readouterr().err


def test_parser_lists_eval():
    assert "eval" in build_parser().format_help()


def test_load_embeddings_names_labels(tmp_path):
    inputs = load_embeddings(_write_npz(tmp_path / "emb.npz"))
    assert inputs.label_names == ["effusion", "fracture", "nodule"]
    assert inputs.labels.dtype == bool and inputs.image.dtype == np.float64


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 5))
    assert _is_png(plot_recall_curves({"image→text": {1: 0.2, 5: 0.5, 10: 0.7}}, tmp_path / "r.png"))
    assert _is_png(plot_label_auroc({"a": (0.8, 0.7), "b": (float("nan"), float("nan"))}, tmp_path / "l.png"))
    assert _is_png(plot_modality_gap(a, a + 2.0, tmp_path / "sub" / "g.png", max_points=10))
    with pytest.raises(ValueError, match="recalls must hold"):
        plot_recall_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same dimension"):
        plot_modality_gap(a, a[:, :3], tmp_path / "x.png")


def test_pca_2d_finds_the_spread_axis():
    # Points spread along x (variance 100) and a little along y: PC1 is +x, PC2 is ±y.
    x = np.array([[-10.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    coords, mean, comps = pca_2d(x)
    np.testing.assert_allclose(mean, 0.0, atol=1e-12)
    np.testing.assert_allclose(comps[0], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(comps[1]), [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(coords[:, 0], [-10.0, 10.0, 0.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="x must be"):
        pca_2d(np.ones(3))


def test_command_module_import_is_light():
    # medseek --help imports medseek.eval.commands; NumPy and friends must wait for the handler.
    code = "import sys, medseek.eval.commands; print(sorted({'numpy', 'sklearn', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import medseek.eval

    with pytest.raises(AttributeError, match="no attribute 'ndcg'"):
        medseek.eval.ndcg  # noqa: B018

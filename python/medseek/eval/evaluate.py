"""The whole evaluation of one embedding file: what ``medseek eval`` runs.

Input: an ``.npz`` with these keys (only ``image`` is required)

=============  =======================  ==================================================
key            shape, dtype             meaning
=============  =======================  ==================================================
``image``      (N, D) float             image (or volume) embeddings
``text``       (N, D) float             report embeddings; row i is the report of image i
``labels``     (N, L) bool or 0/1       multi-hot findings of each study
``label_names``(L,) str                 names of the label columns
``patient_ids``(N,) int or str          studies of one patient never retrieve each other
``prompts``    (L, 2, D) or (L, D)      text embeddings of a positive and a negative
                                        prompt per label (zero-shot classification)
=============  =======================  ==================================================

What is measured, each with a bootstrap interval over queries where it is a mean:

- ``crossmodal`` (needs ``text``): exact-pair Recall@K and MRR, image→text and
  text→image, cosine scores.
- ``modality_gap`` (needs ``text``): :func:`medseek.eval.gap.modality_gap`.
- ``image_to_image`` (needs ``labels``): leave-one-out image retrieval (the query and,
  with ``patient_ids``, its patient's other studies are excluded) judged by label
  overlap: mAP, MRR and P@k with "shares a finding" relevance, nDCG@k graded by Jaccard.
- ``diagnosis`` (needs ``labels``): retrieval-based diagnosis as in WristMIR, a k-NN
  vote over the same leave-one-out ranking, scored by per-label and macro F1/AUROC/AUPRC.
- ``zero_shot`` (needs ``labels`` and ``prompts``): per-label AUROC/AUPRC of prompt
  scores.

The score matrices are dense ``(N, N)`` float64, so this is meant for evaluation sets
up to a few ten thousand studies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseek.eval.bootstrap import bootstrap_ci
from medseek.eval.classification import diagnosis_metrics, knn_label_vote, per_label_auroc_auprc, zero_shot_scores
from medseek.eval.gap import modality_gap
from medseek.eval.metrics import (
    average_precision,
    cosine_scores,
    hits_at_k,
    label_overlap_relevance,
    ndcg_at_k,
    precision_at_k,
    reciprocal_rank,
)

__all__ = ["EvalInputs", "EvalSettings", "evaluate", "load_embeddings"]

KNOWN_KEYS = ("image", "text", "labels", "label_names", "patient_ids", "prompts")


@dataclass(frozen=True)
class EvalInputs:
    """Validated contents of an embedding file (see module docstring for the keys)."""

    image: np.ndarray
    text: np.ndarray | None = None
    labels: np.ndarray | None = None
    label_names: list[str] | None = None
    patient_ids: np.ndarray | None = None
    prompts: np.ndarray | None = None


@dataclass(frozen=True)
class EvalSettings:
    """Knobs of :func:`evaluate`; the defaults are those of ``medseek eval``."""

    ks: tuple[int, ...] = (1, 5, 10, 50)
    k: int = 10
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0
    threshold: float = 0.5
    weighted: bool = False
    plots: bool = True


def load_embeddings(path: str | Path) -> EvalInputs:
    """Read and validate an embedding ``.npz``.

    Raises
    ------
    ValueError
        Naming the key, when a key is missing, unknown, or has the wrong shape/dtype.
    """
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    unknown = sorted(set(arrays) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected some of {list(KNOWN_KEYS)}")
    if "image" not in arrays:
        raise ValueError(f"{path}: key 'image' (N, D) is required, found keys {sorted(arrays)}")
    image = _float_matrix(arrays["image"], "image")
    n, d = image.shape
    text = arrays.get("text")
    if text is not None:
        text = _float_matrix(text, "text")
        if text.shape != (n, d):
            raise ValueError(f"text must have shape {(n, d)} like image, got {text.shape}")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 2 or labels.shape[0] != n:
            raise ValueError(f"labels must have shape ({n}, L), got {labels.shape}")
        if labels.dtype != bool and not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels must be bool or 0/1, got dtype {labels.dtype} with other values")
        labels = labels.astype(bool)
    names = arrays.get("label_names")
    if names is not None:
        if labels is None:
            raise ValueError("label_names given without labels")
        names = [str(x) for x in np.asarray(names).ravel()]
        if len(names) != labels.shape[1]:
            raise ValueError(f"label_names must have {labels.shape[1]} entries, got {len(names)}")
    elif labels is not None:
        names = [f"label_{j}" for j in range(labels.shape[1])]
    patients = arrays.get("patient_ids")
    if patients is not None and patients.shape != (n,):
        raise ValueError(f"patient_ids must have shape ({n},), got {patients.shape}")
    prompts = arrays.get("prompts")
    if prompts is not None:
        if labels is None:
            raise ValueError("prompts given without labels to score them against")
        expected = {(labels.shape[1], 2, d), (labels.shape[1], d)}
        if prompts.shape not in expected:
            raise ValueError(
                f"prompts must have shape {(labels.shape[1], 2, d)} or {(labels.shape[1], d)}, got {prompts.shape}"
            )
        prompts = prompts.astype(np.float64)
    return EvalInputs(image, text, labels, names, patients, prompts)


def _float_matrix(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be (N, D) with N >= 2, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, found non-finite values")
    return arr.astype(np.float64)


def _ci(values: np.ndarray, s: EvalSettings) -> dict:
    est, lo, hi = bootstrap_ci(values, n_boot=s.n_boot, alpha=s.alpha, seed=s.seed)
    return {"value": est, "lo": lo, "hi": hi}


def _crossmodal(inp: EvalInputs, ks: list[int], s: EvalSettings) -> dict:
    sims = cosine_scores(inp.image, inp.text)
    identity = np.arange(sims.shape[0])
    out = {}
    for name, scores in (("image_to_text", sims), ("text_to_image", sims.T)):
        hits = hits_at_k(scores, identity, ks)
        block = {f"recall@{k}": _ci(hits[:, j], s) for j, k in enumerate(ks)}
        block["mrr"] = _ci(reciprocal_rank(scores, np.eye(sims.shape[0], dtype=bool)), s)
        out[name] = block
    return out


def _leave_one_out_scores(inp: EvalInputs) -> np.ndarray:
    scores = cosine_scores(inp.image, inp.image)
    np.fill_diagonal(scores, -np.inf)
    if inp.patient_ids is not None:
        same = inp.patient_ids[:, None] == inp.patient_ids[None, :]
        scores[same] = -np.inf
    return scores


def evaluate(inp: EvalInputs, out_dir: str | Path, settings: EvalSettings | None = None) -> dict:
    """Compute every metric the inputs allow, write figures into ``out_dir``.

    Returns
    -------
    dict
        The metrics (JSON-ready apart from NaN, which :func:`to_json` turns into null);
        ``"figures"`` lists the PNG files written.
    """
    s = settings or EvalSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, d = inp.image.shape
    ks = sorted({k for k in s.ks if 1 <= k <= n})
    if not ks:
        raise ValueError(f"ks must hold a cut-off in [1, {n}], got {list(s.ks)}")
    k = min(s.k, n - 1)
    result: dict = {
        "n": n,
        "dim": d,
        "settings": {"ks": ks, "k": k, "n_boot": s.n_boot, "alpha": s.alpha, "seed": s.seed,
                     "threshold": s.threshold, "weighted": s.weighted},
    }
    figures: list[str] = []
    if inp.text is not None:
        result["crossmodal"] = _crossmodal(inp, ks, s)
        result["modality_gap"] = modality_gap(inp.image, inp.text, seed=s.seed).to_dict()
        if s.plots:
            from medseek.eval.plots import plot_modality_gap, plot_recall_curves

            curves = {}
            for direction, block in result["crossmodal"].items():
                curves[direction.replace("_to_", "→")] = {kk: block[f"recall@{kk}"]["value"] for kk in ks}
            figures.append(str(plot_recall_curves(curves, out_dir / "recall_at_k.png")))
            figures.append(str(plot_modality_gap(inp.image, inp.text, out_dir / "modality_gap.png", seed=s.seed)))
    if inp.labels is not None:
        result.update(_label_based(inp, k, s, out_dir, figures))
    result["figures"] = figures
    return result


def _label_based(inp: EvalInputs, k: int, s: EvalSettings, out_dir: Path, figures: list[str]) -> dict:
    out: dict = {}
    scores = _leave_one_out_scores(inp)
    any_rel = label_overlap_relevance(inp.labels, inp.labels, mode="any")
    graded = label_overlap_relevance(inp.labels, inp.labels, mode="jaccard")
    ap = average_precision(scores, any_rel)
    out["image_to_image"] = {
        "relevance": "shares a positive label (nDCG graded by Jaccard overlap)",
        "n_queries": int((~np.isnan(ap)).sum()),
        "map": _ci(ap, s),
        "mrr": _ci(reciprocal_rank(scores, any_rel), s),
        f"precision@{k}": _ci(precision_at_k(scores, any_rel, k), s),
        f"ndcg@{k}": _ci(ndcg_at_k(scores, graded, k), s),
    }
    probs = knn_label_vote(scores, inp.labels, k, weighted=s.weighted)
    answered = ~np.isnan(probs).any(axis=1)  # a query whose whole gallery is excluded has no vote
    diag = diagnosis_metrics(probs[answered], inp.labels[answered], s.threshold, inp.label_names)
    out["diagnosis"] = {"k": k, "n_queries": int(answered.sum()), **diag}
    if s.plots:
        from medseek.eval.plots import plot_label_auroc

        bars = {name: (v["auroc"], v["auprc"]) for name, v in diag["per_label"].items()}
        title = f"Retrieval diagnosis AUROC (k={k})"
        figures.append(str(plot_label_auroc(bars, out_dir / "diagnosis_auroc.png", title=title)))
    if inp.prompts is not None:
        zs = per_label_auroc_auprc(zero_shot_scores(inp.image, inp.prompts), inp.labels, inp.label_names)
        out["zero_shot"] = {
            "per_label": {name: {"auroc": a, "auprc": p} for name, (a, p) in zs.items()},
            "macro": {"auroc": _mean_defined([a for a, _ in zs.values()]),
                      "auprc": _mean_defined([p for _, p in zs.values()])},
        }
        if s.plots:
            from medseek.eval.plots import plot_label_auroc

            figures.append(str(plot_label_auroc(zs, out_dir / "zero_shot_auroc.png", title="Zero-shot AUROC")))
    return out


def _mean_defined(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def to_json(obj: object) -> object:
    """``obj`` with NaN/inf floats as None and NumPy scalars as Python ones (strict JSON)."""
    if isinstance(obj, dict):
        return {str(key): to_json(val) for key, val in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj

"""PNG figures of evaluation results, drawn with matplotlib's Agg canvas.

Each function builds its own :class:`matplotlib.figure.Figure` on a ``FigureCanvasAgg``
(no pyplot, no global backend state), writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["pca_2d", "plot_label_auroc", "plot_modality_gap", "plot_recall_curves"]


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_recall_curves(recalls: Mapping[str, Mapping[int, float]], path: str | Path, title: str = "Recall@K") -> Path:
    """Recall@K against K, one line per retrieval direction.

    Parameters
    ----------
    recalls : mapping of str to {k: recall}
        E.g. ``{"image→text": {1: 0.1, 5: 0.3}, "text→image": {...}}``.
    path : str or Path
        Output PNG.
    """
    if not recalls:
        raise ValueError("recalls must hold at least one direction, got {}")
    fig = _new_figure(5.0, 3.6)
    ax = fig.add_subplot()
    all_ks: set[int] = set()
    for name, curve in recalls.items():
        ks = sorted(int(k) for k in curve)
        all_ks.update(ks)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=str(name))
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])  # the measured K, not powers of 10
    ax.minorticks_off()
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_label_auroc(
    per_label: Mapping[str, Sequence[float]], path: str | Path, title: str = "Per-label AUROC"
) -> Path:
    """Horizontal bar chart of each label's AUROC; undefined (NaN) labels say "n/a".

    Parameters
    ----------
    per_label : mapping of label to (auroc, auprc)
        As returned by :func:`medseek.eval.per_label_auroc_auprc`.
    path : str or Path
        Output PNG.
    """
    if not per_label:
        raise ValueError("per_label must hold at least one label, got {}")
    names = [str(k) for k in per_label]
    values = np.array([float(v[0]) for v in per_label.values()])
    fig = _new_figure(6.0, 1.0 + 0.3 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(values, nan=0.0), color="tab:blue")
    for yi, v in zip(y, values):
        ax.text(0.01 if np.isnan(v) else v + 0.01, yi, "n/a" if np.isnan(v) else f"{v:.3f}", va="center", fontsize=8)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)  # chance
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.1)
    ax.set_xlabel("AUROC")
    ax.set_title(title)
    return _save(fig, path)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components (via SVD).

    Parameters
    ----------
    x : np.ndarray, shape (n, D), float, n >= 2, D >= 2

    Returns
    -------
    coords : np.ndarray, shape (n, 2), float64
    mean : np.ndarray, shape (D,)
    components : np.ndarray, shape (2, D)
        Unit principal axes; ``coords = (x - mean) @ components.T``. Each axis' sign
        is fixed so that its largest-magnitude entry is positive (deterministic).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"x must be (n, D) with n >= 2 and D >= 2, got shape {x.shape}")
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:2]
    signs = np.sign(comps[np.arange(2), np.argmax(np.abs(comps), axis=1)])
    comps = comps * signs[:, None]
    return (x - mean) @ comps.T, mean, comps


def plot_modality_gap(
    a_emb: np.ndarray,
    b_emb: np.ndarray,
    path: str | Path,
    names: tuple[str, str] = ("image", "text"),
    max_points: int = 2000,
    seed: int = 0,
) -> Path:
    """2-D PCA of two modalities' normalised embeddings, coloured by modality.

    Both sets are L2-normalised and projected together; each modality's centroid is
    marked with an X and the two are joined by a line whose length in the full space
    (the centroid distance) is written in the title.

    Parameters
    ----------
    a_emb : np.ndarray, shape (Na, D), float
    b_emb : np.ndarray, shape (Nb, D), float
    path : str or Path
        Output PNG.
    names : (str, str)
        Legend names of the two modalities.
    max_points : int
        At most this many points of each modality are drawn (seeded subset); the
        projection and centroids use every row.
    seed : int
    """
    from medseek.eval.metrics import _unit_rows

    a = _unit_rows(a_emb, "a_emb")
    b = _unit_rows(b_emb, "b_emb")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a_emb and b_emb must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    coords, mean, comps = pca_2d(np.concatenate([a, b]))
    ca, cb = coords[: a.shape[0]], coords[a.shape[0] :]
    centroids = (np.stack([a.mean(axis=0), b.mean(axis=0)]) - mean) @ comps.T
    distance = float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)))

    rng = np.random.default_rng(seed)
    fig = _new_figure(5.0, 4.5)
    ax = fig.add_subplot()
    for pts, name, color in ((ca, names[0], "tab:blue"), (cb, names[1], "tab:orange")):
        if pts.shape[0] > max_points:
            pts = pts[rng.choice(pts.shape[0], size=max_points, replace=False)]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.5, color=color, label=name)
    ax.plot(centroids[:, 0], centroids[:, 1], color="black", linewidth=1)
    ax.scatter(centroids[:, 0], centroids[:, 1], marker="X", s=120, color=["tab:blue", "tab:orange"],
               edgecolors="black", label="centroids")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"Modality gap: centroid distance {distance:.3f}")
    ax.legend(loc="best")
    return _save(fig, path)

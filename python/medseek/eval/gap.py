"""The modality gap between two embedding sets (e.g. images and their reports).

CLIP-style training leaves image and text embeddings in separate regions of the unit
sphere (Liang et al., 2022; shown for radiology image–report models in the
modality-gap seed paper). Three numbers describe it: how far apart the two centroids
are, how close true pairs are, and how easily a linear classifier tells the two
modalities apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from medseek.eval.metrics import _unit_rows

__all__ = ["ModalityGap", "modality_gap"]


@dataclass(frozen=True)
class ModalityGap:
    """Summary of the gap between modality ``a`` and modality ``b``.

    Attributes
    ----------
    centroid_distance : float
        ``||mean(a) - mean(b)||`` of the L2-normalised embeddings, in [0, 2].
    mean_pair_cosine : float
        Mean cosine of true pairs (row ``i`` of ``a`` with row ``i`` of ``b``); NaN when
        the sets are not paired.
    mean_cross_cosine : float
        Mean cosine over *all* (a, b) combinations, ``mean(a) · mean(b)``: the baseline
        that ``mean_pair_cosine`` should beat.
    separability : float
        Mean cross-validated accuracy of a logistic regression predicting the modality
        of an embedding: ~0.5 when the modalities overlap, ~1.0 when a hyperplane
        splits them.
    separability_std : float
        Standard deviation of that accuracy over the folds.
    n_a, n_b : int
        Number of embeddings of each modality used.
    """

    centroid_distance: float
    mean_pair_cosine: float
    mean_cross_cosine: float
    separability: float
    separability_std: float
    n_a: int
    n_b: int

    def to_dict(self) -> dict:
        """Plain ``dict`` for JSON."""
        return asdict(self)


def modality_gap(
    a_emb: np.ndarray,
    b_emb: np.ndarray,
    *,
    paired: bool = True,
    folds: int = 5,
    max_per_modality: int = 5000,
    seed: int = 0,
) -> ModalityGap:
    """Measure the modality gap between two sets of embeddings.

    Parameters
    ----------
    a_emb : np.ndarray, shape (Na, D), float
    b_emb : np.ndarray, shape (Nb, D), float
        Normalised here; all-zero rows are rejected.
    paired : bool
        Whether row ``i`` of ``a_emb`` pairs with row ``i`` of ``b_emb`` (needs
        ``Na == Nb``); when False ``mean_pair_cosine`` is NaN.
    folds : int, >= 2
        Stratified cross-validation folds for the separability classifier.
    max_per_modality : int
        The classifier sees at most this many rows of each modality (a seeded random
        subset), which bounds its cost; the other numbers use every row.
    seed : int
        Seeds the subset and the fold shuffle.

    Returns
    -------
    ModalityGap
    """
    a = _unit_rows(a_emb, "a_emb")
    b = _unit_rows(b_emb, "b_emb")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a_emb and b_emb must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    if paired and a.shape[0] != b.shape[0]:
        raise ValueError(f"paired=True needs the same number of rows, got a_emb {a.shape[0]} and b_emb {b.shape[0]}")
    if folds < 2 or min(a.shape[0], b.shape[0]) < folds:
        smallest = min(a.shape[0], b.shape[0])
        raise ValueError(f"folds must be >= 2 and <= the rows of each modality ({smallest}), got {folds}")
    if max_per_modality < folds:
        raise ValueError(f"max_per_modality must be >= folds ({folds}), got {max_per_modality}")

    mean_a = a.mean(axis=0)
    mean_b = b.mean(axis=0)
    pair_cos = float(np.einsum("nd,nd->n", a, b).mean()) if paired else float("nan")
    acc = _separability(a, b, folds=folds, max_per_modality=max_per_modality, seed=seed)
    return ModalityGap(
        centroid_distance=float(np.linalg.norm(mean_a - mean_b)),
        mean_pair_cosine=pair_cos,
        mean_cross_cosine=float(mean_a @ mean_b),
        separability=float(acc.mean()),
        separability_std=float(acc.std()),
        n_a=int(a.shape[0]),
        n_b=int(b.shape[0]),
    )


def _separability(a: np.ndarray, b: np.ndarray, *, folds: int, max_per_modality: int, seed: int) -> np.ndarray:
    """Per-fold accuracy of a logistic regression telling ``a`` rows from ``b`` rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    rng = np.random.default_rng(seed)

    def subset(x: np.ndarray) -> np.ndarray:
        if x.shape[0] <= max_per_modality:
            return x
        return x[np.sort(rng.choice(x.shape[0], size=max_per_modality, replace=False))]

    a_sub, b_sub = subset(a), subset(b)
    x = np.concatenate([a_sub, b_sub])
    y = np.r_[np.zeros(a_sub.shape[0], dtype=int), np.ones(b_sub.shape[0], dtype=int)]
    # Unit-norm inputs are already on one scale, so no standardisation; a large
    # max_iter keeps lbfgs from stopping early (a ConvergenceWarning is an error in CI).
    clf = LogisticRegression(max_iter=5000)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_score(clf, x, y, cv=cv, scoring="accuracy")

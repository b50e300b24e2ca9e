"""Data curation (CheXficient): train on a fraction of the pairs, favouring the
under-represented ones.

CheXficient "systematically prioritizes under-represented training samples". Here:

1. embed every pair with a reference encoder (the model's text tower on the report,
   before training) and cluster the embeddings with seeded k-means (k-means++ init);
2. split the budget ``K = round(fraction · N)`` over clusters as evenly as their sizes
   allow (water-filling: each cluster gets ``min(size, share)``, what a small cluster
   cannot use goes to the larger ones), so a cluster's sampling rate falls as its
   density rises;
3. inside a cluster, take the highest priority: seeded Gumbel noise, plus
   ``loss_weight ×`` the standardised per-sample loss when ``losses`` are given
   (loss-based priority: pairs the model still gets wrong are informative).

:func:`select_random` is the uniform baseline; :func:`curation_report` says what was
chosen (cluster and label histograms, rare labels in the subset vs the full set).
"""

from __future__ import annotations

import numpy as np


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means (k-means++ init, Lloyd steps): ``(assign (N,), centroids (k, d))``."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centroids)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centroids.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
    c = np.array(centroids)
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)  # (N, k)
        new = d2.argmin(1)
        for j in range(k):
            if (new == j).any():
                c[j] = x[new == j].mean(0)
        if (new == assign).all() and _ > 0:
            break
        assign = new
    return assign, c


def _check(n: int, fraction: float) -> int:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"N must be a positive int, got {n!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return max(1, int(round(fraction * n)))


def water_fill(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Quotas ``q_c <= sizes[c]`` summing to ``budget``, as equal as the sizes allow."""
    quota = np.zeros(len(sizes), dtype=np.int64)
    order = np.argsort(sizes, kind="stable")
    left = budget
    for pos, c in enumerate(order):
        share = left // (len(order) - pos)
        quota[c] = min(int(sizes[c]), share)
        left -= quota[c]
    for c in order[::-1]:  # remainder of the integer division: largest clusters first
        extra = min(left, int(sizes[c] - quota[c]))
        quota[c] += extra
        left -= extra
    return quota


def select_curated(embeddings: np.ndarray, fraction: float, seed: int, losses: np.ndarray | None = None,
                   *, clusters: int = 8, loss_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the curated subset (sorted) and the cluster of every pair.

    Parameters
    ----------
    embeddings : (N, d) float, reference-encoder embeddings of the pairs
    fraction : share of the N pairs to keep, in (0, 1]
    seed : seeds k-means and the within-cluster draw (same seed, same subset)
    losses : (N,) float, optional per-pair loss for loss-based priority
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, d), got shape {x.shape}")
    budget = _check(x.shape[0], fraction)
    assign, _ = kmeans(x, clusters, seed)
    sizes = np.bincount(assign, minlength=assign.max() + 1)
    quota = water_fill(sizes, budget)
    rng = np.random.default_rng(seed + 1)
    priority = rng.gumbel(size=x.shape[0])
    if losses is not None:
        loss = np.asarray(losses, dtype=np.float64)
        if loss.shape != (x.shape[0],):
            raise ValueError(f"losses must be ({x.shape[0]},), got {loss.shape}")
        priority = priority + loss_weight * (loss - loss.mean()) / (loss.std() + 1e-12)
    chosen = []
    for c, q in enumerate(quota):
        members = np.flatnonzero(assign == c)
        chosen.append(members[np.argsort(-priority[members], kind="stable")[:q]])
    return np.sort(np.concatenate(chosen)), assign


def select_random(n: int, fraction: float, seed: int) -> np.ndarray:
    """A uniform random subset of ``round(fraction · n)`` indices, sorted."""
    budget = _check(n, fraction)
    return np.sort(np.random.default_rng(seed).choice(n, size=budget, replace=False))


def curation_report(indices: np.ndarray, labels: np.ndarray, label_names, assign: np.ndarray | None = None,
                    rare: int = 3) -> dict:
    """Histograms of what was chosen: per-label counts full vs subset, the ``rare``
    rarest labels' share kept, and (curated) the cluster sizes full vs subset."""
    labels = np.asarray(labels, dtype=bool)
    full = labels.sum(0)
    sub = labels[indices].sum(0)
    order = np.argsort(full, kind="stable")
    rare_names = [label_names[j] for j in order if full[j] > 0][:rare]
    out = {
        "n_full": int(labels.shape[0]), "n_chosen": int(len(indices)),
        "labels_full": {n: int(full[j]) for j, n in enumerate(label_names)},
        "labels_chosen": {n: int(sub[j]) for j, n in enumerate(label_names)},
        "rare_labels": rare_names,
        "rare_kept_fraction": {n: float(sub[label_names.index(n)] / full[label_names.index(n)])
                               for n in rare_names},
    }
    if assign is not None:
        out["clusters_full"] = np.bincount(assign).tolist()
        out["clusters_chosen"] = np.bincount(assign[indices], minlength=assign.max() + 1).tolist()
    return out


def reference_embeddings(model, ds, batch_size: int = 64, text_cache=None) -> np.ndarray:
    """Reference embeddings for curation: the model's text tower (before training) on
    each pair's report, ``(N, text dim)``; from ``text_cache`` (a
    :class:`~medseek.train.text_features.TextFeatureCache`) when the tower is frozen."""
    import torch

    from .data import load_tokenizer, tokenize
    from .text_features import text_tower_frozen

    reports = [r.report for r in ds.records]
    if text_cache is not None and text_tower_frozen(model):
        return text_cache.features(model, reports).numpy()
    tok = load_tokenizer(model.cfg.text.max_length)
    out = []
    with torch.no_grad():
        for s in range(0, len(reports), batch_size):
            ids, mask = tokenize(tok, reports[s:s + batch_size])
            dev = next(model.parameters()).device
            out.append(model.text(ids.to(dev), mask.to(dev)).float().cpu().numpy())
    return np.concatenate(out)


def apply_curation(ds, cfg, model, text_cache=None):
    """``(subset, report)`` for a :class:`~medseek.train.recipe.CurationConfig`;
    ``(ds, None)`` when ``cfg.method == "none"``. ``text_cache`` serves the reference
    embeddings of a frozen text tower."""
    if cfg.method == "none":
        return ds, None
    seed = cfg.seed
    if cfg.method == "random":
        idx, assign = select_random(len(ds), cfg.fraction, seed), None
    else:
        idx, assign = select_curated(reference_embeddings(model, ds, text_cache=text_cache), cfg.fraction, seed,
                                     clusters=cfg.clusters)
    report = {"method": cfg.method, "fraction": cfg.fraction,
              **curation_report(idx, ds.label_matrix(), list(ds.label_names), assign)}
    return ds.subset(idx), report

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

Online curation (``curation.rescore_every > 0``): the first subset comes from the
reference clusters and the noise alone; every ``rescore_every`` optimizer steps the
trainer scores the *whole* pool with the current model (:func:`pool_losses`) and
re-selects with those losses (:class:`OnlineSubset`). The clusters (reference encoder)
and the Gumbel noise (seed) stay fixed for the whole run, so a re-selection moves the
subset only because the losses moved: pairs the model has learnt give way, inside their
cluster, to pairs it still gets wrong, while each cluster keeps its water-filled quota
(the rare clusters stay in).

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
    _check(x.shape[0], fraction)
    assign, _ = kmeans(x, clusters, seed)
    return select_in_clusters(assign, fraction, seed, losses, loss_weight=loss_weight), assign


def select_in_clusters(assign: np.ndarray, fraction: float, seed: int, losses: np.ndarray | None = None,
                       *, loss_weight: float = 1.0) -> np.ndarray:
    """Steps 2-3 of the module doc on a fixed cluster assignment ``assign`` (N,): the
    sorted indices of the ``round(fraction · N)`` pairs chosen. The Gumbel noise depends
    on ``seed`` alone, so with the same seed only a change of ``losses`` moves the subset
    (what online re-selection relies on)."""
    assign = np.asarray(assign, dtype=np.int64)
    n = assign.shape[0]
    budget = _check(n, fraction)
    sizes = np.bincount(assign, minlength=assign.max() + 1)
    quota = water_fill(sizes, budget)
    rng = np.random.default_rng(seed + 1)
    priority = rng.gumbel(size=n)
    if losses is not None:
        loss = np.asarray(losses, dtype=np.float64)
        if loss.shape != (n,):
            raise ValueError(f"losses must be ({n},), got {loss.shape}")
        if not np.isfinite(loss).all():
            raise ValueError("losses must be finite")
        priority = priority + loss_weight * (loss - loss.mean()) / (loss.std() + 1e-12)
    chosen = []
    for c, q in enumerate(quota):
        members = np.flatnonzero(assign == c)
        chosen.append(members[np.argsort(-priority[members], kind="stable")[:q]])
    return np.sort(np.concatenate(chosen))


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
    embeddings of a frozen text tower. With ``cfg.rescore_every > 0`` the subset is an
    :class:`OnlineSubset`, which the :class:`~medseek.train.loop.Trainer` re-selects
    during training."""
    if cfg.method == "none":
        return ds, None
    seed = cfg.seed
    if cfg.method == "random":
        idx, assign = select_random(len(ds), cfg.fraction, seed), None
    else:
        ref = reference_embeddings(model, ds, text_cache=text_cache)
        idx, assign = select_curated(ref, cfg.fraction, seed, clusters=cfg.clusters)
    report = {"method": cfg.method, "fraction": cfg.fraction,
              **curation_report(idx, ds.label_matrix(), list(ds.label_names), assign)}
    if cfg.method == "curated" and cfg.rescore_every > 0:
        report["rescore_every"], report["loss_weight"] = cfg.rescore_every, cfg.loss_weight
        return OnlineSubset(ds, cfg, assign, idx), report
    return ds.subset(idx), report


# ---------------------------------------------------------------------------- online

NEGATIVE_BANK = 256  # reports/images every pair is scored against (fixed per run)


def negative_bank(n: int, seed: int, size: int = NEGATIVE_BANK) -> np.ndarray:
    """The fixed, seeded negative bank of :func:`pair_losses`: ``min(size, n)`` pool
    indices, the same at every re-selection so that losses of different rounds compare."""
    return np.sort(np.random.default_rng(seed + 2).choice(n, size=min(size, n), replace=False))


def pair_losses(visual: np.ndarray, text: np.ndarray, labels: np.ndarray, bank: np.ndarray,
                scale: float) -> np.ndarray:
    """Per-pair contrastive loss ``(N,)`` against a fixed negative bank.

    Pair ``i`` is scored like one row of a CLIP batch whose other members are the pairs
    in ``bank``: ``½ (CE(image_i → [report_i, bank reports]) + CE(report_i → [image_i,
    bank images]))`` at logit ``scale`` on unit-norm embeddings. Why a fixed bank and not
    the training batch: every pair then faces the same negatives, so losses compare
    across pairs and across rounds. A bank pair that is ``i`` itself or has exactly
    ``i``'s label set is masked out (a false negative: two "normal" films are not a
    mismatch, and counting them would make every common-label pair look hard)."""
    v = _unit(visual)
    t = _unit(text)
    y = np.asarray(labels, dtype=bool)
    same = (y[:, None, :] == y[bank][None, :, :]).all(-1)  # (N, B)
    same |= np.arange(len(v))[:, None] == bank[None, :]
    pos = scale * (v * t).sum(1)  # (N,)

    def ce(neg: np.ndarray) -> np.ndarray:
        neg = np.where(same, -np.inf, neg)
        top = np.maximum(pos, neg.max(1))
        lse = top + np.log(np.exp(pos - top) + np.exp(neg - top[:, None]).sum(1))
        return lse - pos

    return 0.5 * (ce(scale * v @ t[bank].T) + ce(scale * t @ v[bank].T))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class OnlineSubset:
    """A curated subset that the trainer re-selects during training (online curation).

    It stands in for a :class:`~medseek.train.data.PairDataset` (``len``, item access,
    ``records``, ``label_names``, ``text_ids``, ``label_matrix``) over the *current*
    subset, and keeps the whole ``pool``: its cluster assignment (reference encoder,
    fixed for the run) and the chosen pool indices. Decoded pool items are cached by pool
    index, so a pair that leaves and comes back is decoded once.
    """

    def __init__(self, pool, cfg, assign: np.ndarray, indices: np.ndarray) -> None:
        self.pool, self.cfg = pool, cfg
        self.assign = np.asarray(assign, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.round = 0
        self.bank = negative_bank(len(pool), cfg.seed)
        self._items: dict[int, dict] = {}

    # PairDataset surface over the current subset
    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.pool_item(int(self.indices[i]))

    def pool_item(self, j: int) -> dict:
        if j not in self._items:
            self._items[j] = self.pool[j]
        return self._items[j]

    @property
    def records(self):
        return tuple(self.pool.records[int(j)] for j in self.indices)

    @property
    def label_names(self):
        return self.pool.label_names

    @property
    def text_ids(self):
        return self.pool.text_ids

    @property
    def model_cfg(self):
        return self.pool.model_cfg

    def label_matrix(self) -> np.ndarray:
        return self.pool.label_matrix()[self.indices]

    # resumable state
    def state(self) -> dict:
        return {"round": self.round, "indices": self.indices.tolist()}

    def restore(self, state: dict) -> None:
        idx = np.asarray(state["indices"], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.pool)):
            raise ValueError(f"curation state: indices outside the pool of {len(self.pool)} pairs")
        self.indices, self.round = idx, int(state["round"])

    def reselect(self, losses: np.ndarray) -> dict:
        """Re-select with per-pair ``losses`` (N,) of the pool; returns what changed:
        ``changed`` (share of the new subset that was not in the old one), the mean loss
        of the chosen pairs vs the pool, and the rare labels' share kept."""
        losses = np.asarray(losses, dtype=np.float64)
        new = select_in_clusters(self.assign, self.cfg.fraction, self.cfg.seed, losses,
                                 loss_weight=self.cfg.loss_weight)
        changed = 1.0 - len(np.intersect1d(new, self.indices)) / max(len(new), 1)
        self.indices = new
        self.round += 1
        rep = curation_report(new, self.pool.label_matrix(), list(self.pool.label_names))
        return {"round": self.round, "changed": float(changed), "n_chosen": int(len(new)),
                "loss_pool": float(losses.mean()), "loss_chosen": float(losses[new].mean()),
                "rare_kept_fraction": rep["rare_kept_fraction"]}

    def score(self, model, tokenizer, device="cpu", text_cache=None, batch_size: int = 256) -> np.ndarray:
        """Per-pair losses ``(N,)`` of the whole pool under the current ``model``
        (:func:`pair_losses`; embeddings with no_grad, eval mode, in batches)."""
        import torch

        from .data import collate
        from .loop import _EVAL_LOSS
        from .losses import encode_batch
        from .text_features import text_tower_frozen

        was_training = model.training
        model.eval()
        vis, txt = [], []
        with torch.no_grad():
            for s in range(0, len(self.pool), batch_size):
                items = [self.pool_item(j) for j in range(s, min(s + batch_size, len(self.pool)))]
                batch = collate(items, tokenizer, self.pool.text_ids)
                if text_cache is not None and text_tower_frozen(model):
                    batch["text_features"] = text_cache.features(model, [it["report"] for it in items])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                emb = encode_batch(model, batch, _EVAL_LOSS)
                vis.append(emb["visual"].float().cpu().numpy())
                txt.append(emb["text"].float().cpu().numpy())
            scale = float(model.logit_scale.scale())
        model.train(was_training)
        return pair_losses(np.concatenate(vis), np.concatenate(txt), self.pool.label_matrix(), self.bank, scale)

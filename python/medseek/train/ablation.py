"""The training ablation table of issue 5: each variant of a base recipe trained from the
same seed on the same corpus, evaluated on the same patient-disjoint ``test`` split.

Rows (:data:`VARIANTS`): CLIP vs SigLIP; hard vs PRIMA soft labels; Muon vs AdamW; all
pairs vs CheXficient-curated 25 % vs random 25 % (same epochs, so a quarter of the
steps; the compute spent is reported); gap-closing term off vs on; for volumes,
SigVLP's chunk-wise organ alignment vs whole-report alignment only. ``untrained`` is the
base variant's initial model (same seed), evaluated before any step.

Test metrics (:func:`evaluate_split`), each with a 95 % percentile bootstrap interval
(:func:`medseek.eval.bootstrap.bootstrap_ci`) that resamples *patients*, since a
patient's images (PA and lateral) are not independent:

* ``i2i_ndcg@10``: image→image (volume→volume) retrieval, graded by Jaccard label
  overlap; the query's own patient is excluded from the gallery;
* ``t2i_ndcg@10``: report→image retrieval, one query per study, same relevance (the
  study's own images are in the gallery and count by their labels);
* ``t2i_recall@k``: report→image exact retrieval (a hit is an image of the query's study);
  for volumes also ``organ2v_recall@k``, abnormal organ sentence → its volume;
* ``zero_shot_auroc``: mean over the evaluated labels (those with at least
  ``min_pos_patients`` positive patients in the split) of the per-label AUROC of
  report-phrased prompt ensembles (:mod:`medseek.eval.prompts`);
* ``zero_shot_auroc_rarer_half``: the same mean over the half of those labels that is
  rarest in the train split (CheXficient's under-represented findings that still have
  enough test positives to score);
* ``rare``: for the rarest labels (train frequency) that have at least two positive
  patients in the split, zero-shot AUROC and image→image precision@10 of that label;
* ``gap``: :func:`medseek.eval.gap.modality_gap` of image vs report embeddings.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .recipe import load_recipe, recipe_from_dict

VARIANTS: dict[str, dict[str, dict]] = {
    "image": {
        "base": {},
        "siglip": {"loss": {"contrastive": "siglip"}, "model_overrides": {"loss": "siglip"}},
        "soft-labels": {"loss": {"soft_labels": True}},
        "adamw": {"optim": {"name": "adamw"}},
        "curated-25": {"curation": {"method": "curated", "fraction": 0.25}},
        "random-25": {"curation": {"method": "random", "fraction": 0.25}},
        "gap-on": {"loss": {"w_gap": 1.0, "gap_uniformity": 0.1}},
    },
    "volume": {
        "base": {},  # the tiny-ct recipe: SigLIP, chunk-wise organ alignment on
        "whole-report": {"loss": {"w_organ": 0.0}},
    },
}
ROW_NOTES = {
    "base": "recipe as shipped",
    "siglip": "sigmoid loss instead of InfoNCE",
    "soft-labels": "PRIMA soft CLIP targets from labels",
    "adamw": "AdamW for every weight (lr = adam_lr)",
    "curated-25": "CheXficient curation, 25 % of pairs, same epochs",
    "random-25": "uniform 25 % of pairs, same epochs",
    "gap-on": "modality-gap term, w 1.0, uniformity 0.1",
    "whole-report": "no organ term: whole report ↔ volume only",
    "untrained": "base init, no training",
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def variant_recipe(recipe: str, overrides: dict, steps: int | None = None):
    """The base recipe with a variant's section overrides merged in. Curated/random
    subsets keep the epochs: their steps are ``round(fraction · steps)``."""
    base = load_recipe(recipe).to_dict()
    raw = _merge(base, overrides)
    raw["steps"] = int(steps if steps is not None else raw["steps"])
    frac = raw["curation"]["fraction"] if raw["curation"]["method"] != "none" else 1.0
    raw["steps"] = max(1, int(round(raw["steps"] * frac)))
    raw["eval_every"], raw["save_every"] = 0, 0
    raw.pop("name", None)
    return recipe_from_dict(raw, name=f"{Path(str(recipe)).stem}")


# ---------------------------------------------------------------------------- evaluation


def _has_split(data, split: str) -> bool:
    from medseek.data.manifest import read_manifest

    root = Path(data)
    path = root / "manifest.parquet" if root.is_dir() else root
    return any(r.split == split for r in read_manifest(path))


def _patients(ds) -> np.ndarray:
    return np.array([r.patient_id or r.study_id or r.id for r in ds.records])


def _cluster_mean_ci(values: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean of per-query ``values`` with a bootstrap CI over clusters (patients): each
    cluster contributes the mean of its defined queries."""
    from medseek.eval.bootstrap import bootstrap_ci

    per = []
    for c in np.unique(clusters):
        v = values[clusters == c]
        v = v[~np.isnan(v)]
        if v.size:
            per.append(v.mean())
    est, lo, hi = bootstrap_ci(np.asarray(per, dtype=np.float64), n_boot=n_boot, seed=seed)
    return {"value": est, "lo": lo, "hi": hi, "n": len(per)}


def _cluster_stat_ci(stat, clusters: np.ndarray, n_boot: int, seed: int) -> dict:
    """A statistic of rows (callable on row indices) with a CI resampling clusters."""
    from medseek.eval.bootstrap import bootstrap_ci

    uniq = np.unique(clusters)
    rows = [np.flatnonzero(clusters == c) for c in uniq]

    def on_clusters(idx: np.ndarray) -> float:
        return stat(np.concatenate([rows[i] for i in idx]))

    est, lo, hi = bootstrap_ci(on_clusters, n_boot=n_boot, seed=seed, n=len(uniq))
    return {"value": est, "lo": lo, "hi": hi, "n": len(uniq)}


def choose_labels(train_ds, test_ds, min_pos_patients: int = 5, n_rare: int = 4) -> dict:
    """Labels to evaluate zero-shot (``>= min_pos_patients`` positive patients in the
    split) and the ``n_rare`` rarest train labels with at least 2 positive patients in
    the split (the CheXficient rare-label comparison)."""
    names = list(test_ds.label_names)
    y = test_ds.label_matrix()
    pid = _patients(test_ds)
    pos_patients = np.array([len(set(pid[y[:, j]])) for j in range(len(names))])
    n_pat = len(set(pid))
    train_freq = train_ds.label_matrix().sum(0)
    zs = [n for j, n in enumerate(names) if min_pos_patients <= pos_patients[j] <= n_pat - min_pos_patients]
    candidates = [j for j in range(len(names)) if pos_patients[j] >= 2 and train_freq[j] > 0]
    rare = [names[j] for j in sorted(candidates, key=lambda j: (train_freq[j], names[j]))[:n_rare]]
    by_freq = sorted(zs, key=lambda n: (train_freq[names.index(n)], n))
    return {"zero_shot": zs, "rare": rare, "zero_shot_rarer_half": by_freq[:len(by_freq) // 2],
            "train_freq": {n: int(train_freq[names.index(n)]) for n in sorted(set(zs) | set(rare))},
            "test_pos_patients": {n: int(pos_patients[names.index(n)]) for n in sorted(set(zs) | set(rare))}}


def image_to_image_ndcg(v: np.ndarray, ds, n_boot: int = 1000, seed: int = 0) -> dict:
    """Image→image nDCG@10 of embeddings ``v`` (N, D), one row per item of ``ds``, graded
    by Jaccard label overlap, the query's own patient excluded from its gallery; mean over
    patients with a patient-level bootstrap CI. Any embedding is scored this way: a
    trained tower, raw pixels, a supervised reference (``benchmarks/quality_reference.py``).
    """
    q = per_query_ndcg(v, ds)
    return _cluster_mean_ci(q["i2i"], q["pid"], n_boot, seed)


def per_query_ndcg(v: np.ndarray, ds, t: np.ndarray | None = None) -> dict:
    """Per-query nDCG@10 graded by Jaccard label overlap, for paired comparisons of two
    models on the same queries: ``i2i`` (N,), image→image with the query's own patient
    excluded; with report embeddings ``t`` (N, D), ``t2i`` (S,), one report query per study
    (its first item, rows ``first``) against every image. Also ``pid`` (N,) and ``y``."""
    from medseek.eval.metrics import label_overlap_relevance, ndcg_at_k

    y, pid = ds.label_matrix(), _patients(ds)
    jac = label_overlap_relevance(y, y, "jaccard")
    s = v @ v.T
    s[pid[:, None] == pid[None, :]] = -np.inf
    out = {"i2i": ndcg_at_k(s, jac, 10), "pid": pid, "y": y}
    if t is not None:
        study = np.array([r.study_id or r.id for r in ds.records])
        first = np.sort(np.unique(study, return_index=True)[1])
        out.update(t2i=ndcg_at_k(t[first] @ v.T, jac[first], 10), first=first)
    return out


def explanation_quality(model, v: np.ndarray, s: np.ndarray, ds, k: int = 10) -> dict:
    """How right the concepts shown for image→image hits are, with the model's
    calibrated concept bank and the search pipeline's rule (a concept explains a hit when
    its score is > 0 for both query and hit). ``v`` (N, D) are the embeddings, ``s``
    (N, N) their image→image scores with each query's own patient at ``-inf``; the hits
    are each query's top ``k``.

    ``precision``: of the (hit, concept) pairs shown, the share whose concept the hit's
    report asserts; ``recall``: of the concepts both reports assert, the share shown;
    ``distinct_sets``: distinct explanation sets among the shown top-k of a query,
    averaged (1.0 would mean every hit gets the same explanation)."""
    from medseek.search.explain import explain

    from .data import item_findings

    from medseek.text.concepts import concept_names

    truth = np.stack([item_findings(r.report, r.labels) for r in ds.records]) > 0  # (N, F)
    bank = model.concept_bank()  # the calibrated findings only (may be none)
    if bank is None:
        return {"precision": float("nan"), "recall": 0.0 if truth.any() else float("nan"),
                "shown_per_hit": 0.0, "distinct_sets": 1.0}
    scores = bank.scores(v)  # (N, C), C <= F
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    full = {n: j for j, n in enumerate(concept_names())}
    col = {n: full[n] for n in bank.names}  # bank concept -> column of truth
    shown = correct = both = both_shown = 0
    distinct = []
    for q in range(len(v)):
        why = explain(scores[q], scores[top[q]], bank.names, top=len(bank.names))
        sets = set()
        for hit, matches in zip(top[q], why):
            js = [col[m.concept] for m in matches]
            sets.add(tuple(js))
            shown += len(js)
            correct += int(truth[hit, js].sum())
            true_both = truth[q] & truth[hit]
            both += int(true_both.sum())
            both_shown += int(true_both[js].sum())
        distinct.append(len(sets))
    return {"precision": correct / shown if shown else float("nan"),
            "recall": both_shown / both if both else float("nan"),
            "shown_per_hit": shown / (len(v) * k), "distinct_sets": float(np.mean(distinct))}


@torch.no_grad()
def embed_images_and_regions(model, ds, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Global ``(N, D)`` and region ``(N, R, D)`` embeddings of an image split, the regions
    (``model.cfg.preprocess.regions``) pooled over each item's boxes by the region pathway."""
    was_training = model.training
    model.eval()
    glob, reg = [], []
    for s in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        images = torch.from_numpy(np.stack([it["image"] for it in items]))
        boxes = torch.from_numpy(np.stack([it["boxes"] for it in items]))
        g, r = model.encode_image_and_regions(images, boxes)
        glob.append(g.float().numpy())
        reg.append(r.float().numpy())
    model.train(was_training)
    return np.concatenate(glob), np.concatenate(reg)


def region_diagnosis(model, archive_ds, test_ds, val_ds=None, n_boot: int = 1000,
                     seed: int = 0) -> dict | None:
    """WristMIR kNN diagnosis of ``test_ds`` against ``archive_ds`` (the train split: the
    prior cases), global vs region rerank (:func:`medseek.eval.region_diagnosis.
    knn_region_diagnosis`), for a model with named regions whose labels are
    ``"<region> fracture"``; None for any other model.

    Returns ``{"majority": ..., "calibrated": ...}``: votes thresholded at 0.5, and at
    per-label thresholds fitted on ``val_ds`` (queried against the same archive; only
    with ``val_ds``)."""
    from medseek.eval.region_diagnosis import fit_vote_thresholds, knn_region_diagnosis, knn_votes

    regions = [r.replace("_", " ") for r in model.cfg.preprocess.regions]
    if model.modality != "image" or not regions:
        return None
    labels = [f"{r} fracture" for r in regions]
    if any(lab not in test_ds.label_names for lab in labels):
        return None

    def label_matrix(ds) -> np.ndarray:
        return np.array([[lab in r.labels for lab in labels] for r in ds.records], dtype=bool)

    a_glob, a_reg = embed_images_and_regions(model, archive_ds)
    q_glob, q_reg = embed_images_and_regions(model, test_ds)
    y_arch, y_test = label_matrix(archive_ds), label_matrix(test_ds)

    def score(thresholds) -> dict:
        return knn_region_diagnosis(q_glob, q_reg, a_glob, a_reg, y_arch, y_test,
                                    _patients(test_ds), labels, thresholds=thresholds,
                                    n_boot=n_boot, seed=seed)

    out = {"majority": score(0.5)}
    if val_ds is not None:
        v_glob, v_reg = embed_images_and_regions(model, val_ds)
        votes = knn_votes(v_glob, v_reg, a_glob, a_reg, y_arch)
        y_val = label_matrix(val_ds)
        out["calibrated"] = score({key: fit_vote_thresholds(v, y_val) for key, v in votes.items()})
    return out


@torch.no_grad()
def evaluate_split(model, ds, tokenizer, labels: dict, *, text_cache=None, device="cpu",
                   n_boot: int = 1000, seed: int = 0, ks=(1, 5, 10)) -> dict:
    """Test metrics of ``model`` on ``ds`` (module doc), JSON-ready (NaN as None)."""
    from medseek.eval.classification import auroc, zero_shot_scores
    from medseek.eval.evaluate import to_json
    from medseek.eval.gap import modality_gap
    from medseek.eval.metrics import hits_at_k, label_overlap_relevance, ndcg_at_k, precision_at_k
    from medseek.eval.prompts import prompt_embeddings

    from .loop import embed_dataset, encode_texts

    v, t = embed_dataset(model, ds, tokenizer, device, text_cache=text_cache)
    y = ds.label_matrix()
    names = list(ds.label_names)
    pid = _patients(ds)
    out: dict = {"n_items": len(ds), "n_patients": int(len(set(pid))), "n_boot": n_boot}
    jac = label_overlap_relevance(y, y, "jaccard")
    out["i2i_ndcg@10"] = image_to_image_ndcg(v, ds, n_boot, seed)
    s = v @ v.T  # image -> image scores, own patient excluded (explanations, rare-label P@10)
    s[pid[:, None] == pid[None, :]] = -np.inf

    # report -> image: one query per study (its first item)
    study = np.array([r.study_id or r.id for r in ds.records])
    _, first = np.unique(study, return_index=True)
    first = np.sort(first)
    st = t[first] @ v.T  # (S, N)
    out["t2i_ndcg@10"] = _cluster_mean_ci(ndcg_at_k(st, jac[first], 10), pid[first], n_boot, seed)
    own = study[first][:, None] == study[None, :]
    kk = [k for k in ks if k <= len(ds)]
    hits = hits_at_k(st, own, kk)
    for j, k in enumerate(kk):
        out[f"t2i_recall@{k}"] = _cluster_mean_ci(hits[:, j], pid[first], n_boot, seed)

    if model.modality == "volume":  # abnormal organ sentence -> volumes that show it
        q_rows, q_text, relevant = organ_sentence_queries(ds)
        out["organ2v_queries"] = len(q_text)
        if q_text:
            qe = encode_texts(model, q_text, tokenizer, device, text_cache=text_cache)
            so = qe @ v.T
            oh = hits_at_k(so, relevant, kk)
            own = hits_at_k(so, np.asarray(q_rows), kk)
            for j, k in enumerate(kk):
                out[f"organ2v_recall@{k}"] = _cluster_mean_ci(oh[:, j], pid[q_rows], n_boot, seed)
                out[f"organ2v_chance@{k}"] = float(np.mean(chance_hit_at_k(relevant.sum(1), len(ds), k)))
                out[f"organ2v_own_recall@{k}"] = _cluster_mean_ci(own[:, j], pid[q_rows], n_boot, seed)

    if getattr(model, "finding_head", None) is not None:
        out["explanations@10"] = explanation_quality(model, v, s, ds)

    # zero-shot
    pe = prompt_embeddings(lambda xs: encode_texts(model, xs, tokenizer, device, text_cache=text_cache), names)
    zs = zero_shot_scores(v, pe)
    col = {n: j for j, n in enumerate(names)}
    zl = [col[n] for n in labels["zero_shot"]]

    def mean_auc(rows: np.ndarray) -> float:
        vals = [auroc(zs[rows, j], y[rows, j]) for j in zl]
        vals = [a for a in vals if not math.isnan(a)]
        return float(np.mean(vals)) if vals else float("nan")

    out["zero_shot_auroc"] = _cluster_stat_ci(mean_auc, pid, n_boot, seed)
    out["zero_shot_labels"] = len(zl)
    half = [col[n] for n in labels.get("zero_shot_rarer_half", [])]
    if half:
        def mean_auc_half(rows: np.ndarray) -> float:
            vals = [a for a in (auroc(zs[rows, j], y[rows, j]) for j in half) if not math.isnan(a)]
            return float(np.mean(vals)) if vals else float("nan")

        out["zero_shot_auroc_rarer_half"] = _cluster_stat_ci(mean_auc_half, pid, n_boot, seed)
    out["zero_shot_per_label"] = {n: auroc(zs[:, col[n]], y[:, col[n]]) for n in labels["zero_shot"]}

    # rarest labels: zero-shot AUROC and image->image precision@10 of the label
    rare: dict = {}
    for n in labels["rare"]:
        j = col[n]
        has = y[:, j]
        p10 = np.full(len(ds), np.nan)
        p10[has] = precision_at_k(s[has], np.broadcast_to(has, s[has].shape), min(10, len(ds) - 1))
        rare[n] = {"zero_shot_auroc": _cluster_stat_ci(lambda rows, j=j: auroc(zs[rows, j], y[rows, j]),
                                                       pid, n_boot, seed),
                   "i2i_precision@10": _cluster_mean_ci(p10, pid, n_boot, seed)}
    out["rare"] = rare

    gap = modality_gap(v, t, seed=seed, folds=min(5, len(ds)))
    out["gap"] = {"centroid_distance": gap.centroid_distance, "separability": gap.separability,
                  "mean_pair_cosine": gap.mean_pair_cosine}
    return to_json(out)


def organ_sentence_queries(ds) -> tuple[list[int], list[str], np.ndarray]:
    """The organ-sentence→volume queries of a volume split: ``(rows, texts, relevant)``,
    one query per volume and organ whose sentence reports a finding, ``relevant`` a
    ``(Q, len(ds))`` bool matrix.

    With the synth-ct finding list in every record's ``meta["findings"]``, a volume is
    relevant to a sentence when it holds every finding the sentence names at the same
    site (lobe, side, organ): "Heart: Cardiomegaly." is answered by every volume with
    cardiomegaly, not only by the one whose report it came from, and sizes are not
    asked to match (a 7 mm nodule in the right upper lobe answers "an 8 mm nodule in
    the right upper lobe"). Without that list, relevance falls back to the sentence's
    own volume and "abnormal" to a sentence that is not a stock phrasing (used in at
    most two volumes).
    """
    from medseek.data.synth.ct import REPORT_ORGAN_OF

    if all(isinstance((r.meta or {}).get("findings"), list) for r in ds.records):
        sites = [{(f["name"], f["organ"]) for f in r.meta["findings"]} for r in ds.records]
        rows, texts, keys = [], [], []
        for i, r in enumerate(ds.records):
            by_organ = {reg.name: reg.text for reg in r.regions if reg.text}
            for organ in dict.fromkeys(REPORT_ORGAN_OF[f["name"]] for f in r.meta["findings"]):
                if organ not in by_organ:
                    raise ValueError(f"volume {r.id} reports a finding in {organ!r} but has no "
                                     f"{organ!r} region sentence")
                rows.append(i)
                texts.append(by_organ[organ])
                keys.append({(f["name"], f["organ"]) for f in r.meta["findings"]
                             if REPORT_ORGAN_OF[f["name"]] == organ})
        relevant = np.array([[key <= s for s in sites] for key in keys], dtype=bool)
        return rows, texts, relevant.reshape(len(keys), len(ds))
    from collections import Counter

    volumes = Counter(t for r in ds.records for t in {reg.text for reg in r.regions if reg.text})
    pairs = dict.fromkeys((i, reg.text) for i, r in enumerate(ds.records) for reg in r.regions
                          if reg.text and volumes[reg.text] <= 2)
    rows = [i for i, _ in pairs]
    relevant = np.zeros((len(rows), len(ds)), dtype=bool)
    relevant[np.arange(len(rows)), rows] = True
    return rows, [t for _, t in pairs], relevant


def chance_hit_at_k(n_relevant: np.ndarray, n: int, k: int) -> np.ndarray:
    """Probability that a random ranking of ``n`` items puts at least one of
    ``n_relevant`` (per query) in its top ``k``: ``1 − C(n − r, k) / C(n, k)``."""
    r = np.asarray(n_relevant, dtype=np.int64)
    if r.ndim != 1 or (r < 0).any() or (r > n).any() or not 1 <= k <= n:
        raise ValueError(f"need 0 <= n_relevant <= n and 1 <= k <= n, got n={n}, k={k}, "
                         f"n_relevant range {r.min() if r.size else None}..{r.max() if r.size else None}")
    miss = np.array([math.comb(n - x, k) / math.comb(n, k) for x in r], dtype=np.float64)
    return 1.0 - miss


# ---------------------------------------------------------------------------- running


def run_variant(name: str, recipe: str, overrides: dict, data: str | Path, out_dir: str | Path, *,
                steps: int | None = None, text_cache=None, labels: dict | None = None,
                n_boot: int = 1000, device: str = "cpu", eval_untrained: bool = False) -> dict:
    """Train one variant and evaluate it on ``test``; writes ``out_dir/<name>.json``
    (and ``untrained.json`` when asked). Returns the row(s) written."""
    from medseek.models.factory import create_model

    from .curation import apply_curation
    from .data import PairDataset
    from .data import load_tokenizer
    from .loop import Trainer
    from .text_features import TextFeatureCache, freeze_text_layers, text_tower_frozen

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = variant_recipe(recipe, overrides, steps)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained_text=cfg.pretrained_text, **cfg.model_overrides)
    train = PairDataset.from_manifest(data, model.cfg, "train")
    test = PairDataset.from_manifest(data, model.cfg, "test")
    labels = labels or choose_labels(train, test)
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    freeze_text_layers(model, cfg.text_trainable_layers)
    tokenizer = load_tokenizer(model.cfg.text.max_length)
    cache = None
    if text_tower_frozen(model):
        cache = text_cache if text_cache is not None else TextFeatureCache(tokenizer)
        texts = {r.report for r in train.records + test.records}
        texts |= {reg.text for r in train.records + test.records for reg in r.regions if reg.text}
        cache.features(model, sorted(texts))  # one batched pass (cheaper than per step)
    rows = {}
    if eval_untrained:
        rows["untrained"] = {"variant": "untrained", "recipe": cfg.to_dict(), "steps": 0,
                             "samples_seen": 0, "wall_s": 0.0, "flops": 0.0, "train_pairs": 0,
                             "test": evaluate_split(model, test, tokenizer, labels, text_cache=cache,
                                                    device=device, n_boot=n_boot)}
    sub, report = apply_curation(train, cfg.curation, model, text_cache=cache)
    if report is not None:
        (run_dir / "curation.json").write_text(json.dumps(report, indent=1))
    from .unpaired import apply_unpaired

    sub = apply_unpaired(sub, cfg.unpaired)
    trainer = Trainer(cfg, model, sub, run_dir, device=device, progress=False, text_cache=cache)
    t0 = time.perf_counter()
    last = trainer.fit()
    wall = time.perf_counter() - t0
    if model.finding_head is not None:
        from .calibrate import calibrate_finding_thresholds

        val = PairDataset.from_manifest(data, model.cfg, "val")
        calibration = calibrate_finding_thresholds(model, val, tokenizer, text_cache=cache,
                                                   device=device)
        (run_dir / "calibration.json").write_text(json.dumps(calibration, indent=1))
        trainer.save()  # the thresholds are a model buffer: into the checkpoint with it
    rows[name] = {"variant": name, "recipe": cfg.to_dict(), "steps": trainer.step,
                  "samples_seen": trainer.samples_seen, "train_pairs": len(sub),
                  "wall_s": wall, "train_wall_s": trainer.compute["wall_s"],
                  "flops": trainer.compute.get("flops", 0.0), "final_loss": last.get("loss"),
                  "test": evaluate_split(model, test, tokenizer, labels, text_cache=cache,
                                         device=device, n_boot=n_boot)}
    val = PairDataset.from_manifest(data, model.cfg, "val") if _has_split(data, "val") else None
    diagnosis = region_diagnosis(model, train, test, val, n_boot=n_boot)
    if diagnosis is not None:
        rows[name]["test"]["region_diagnosis"] = diagnosis
    if report is not None:
        rows[name]["curation"] = {"rare_labels": report["rare_labels"],
                                  "rare_kept_fraction": report["rare_kept_fraction"]}
    for key, row in rows.items():
        row["labels"] = labels
        row["data"] = str(data)
        (out_dir / f"{key}.json").write_text(json.dumps(row, indent=1))
    return rows


def load_variant_model(out_dir: str | Path, row: dict, device: str = "cpu"):
    """The model of a trained variant (``row``: its ``out_dir/<variant>.json``) as it was
    trained: the recipe's seeded init, the variant's checkpoint (none for ``untrained``),
    the recipe's frozen text layers, in eval mode; returns ``(model, recipe)``."""
    from medseek.models.factory import create_model

    from .checkpoint import load_model_weights
    from .recipe import recipe_from_dict
    from .text_features import freeze_text_layers

    raw = dict(row["recipe"])
    cfg = recipe_from_dict({k: v for k, v in raw.items() if k != "name"}, name=raw.get("name", ""))
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained_text=cfg.pretrained_text, **cfg.model_overrides)
    if row["variant"] != "untrained":
        load_model_weights(Path(out_dir) / row["variant"] / "checkpoint.safetensors", model)
    model.to(device)
    freeze_text_layers(model, cfg.text_trainable_layers)
    return model.eval(), cfg


def reevaluate(out_dir: str | Path, data: str | Path, *, text_cache=None, n_boot: int = 1000,
               device: str = "cpu") -> list[str]:
    """Re-run the test evaluation of every ``out_dir/<variant>.json`` from its saved
    checkpoint (``untrained``: the recipe's seeded init), keeping the training numbers;
    for when the metrics change after the variants were trained."""
    from .data import PairDataset, load_tokenizer
    from .text_features import TextFeatureCache, text_tower_frozen

    out_dir = Path(out_dir)
    done, labels = [], None
    for path in sorted(out_dir.glob("*.json")):
        row = json.loads(path.read_text())
        if "variant" not in row or "recipe" not in row:
            continue
        model, cfg = load_variant_model(out_dir, row, device)
        tokenizer = load_tokenizer(model.cfg.text.max_length)
        cache = None
        if text_tower_frozen(model):
            cache = text_cache if text_cache is not None else TextFeatureCache(tokenizer)
        test = PairDataset.from_manifest(data, model.cfg, "test")
        if labels is None:
            labels = choose_labels(PairDataset.from_manifest(data, model.cfg, "train"), test)
        row["test"] = evaluate_split(model, test, tokenizer, labels, text_cache=cache, device=device,
                                     n_boot=n_boot)
        row["labels"] = labels
        path.write_text(json.dumps(row, indent=1))
        done.append(row["variant"])
    return done


def _fmt(m: dict | None, digits: int = 3) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    lo, hi = m.get("lo"), m.get("hi")
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None else ""
    return f"{m['value']:.{digits}f}{ci}"


def write_table(out_dir: str | Path, order: list[str] | None = None) -> str:
    """Collect ``out_dir/*.json`` rows into ``table.md`` and ``table.json``; returns the
    markdown."""
    out_dir = Path(out_dir)
    rows = {}
    for p in sorted(out_dir.glob("*.json")):
        if p.name == "table.json":
            continue
        row = json.loads(p.read_text())
        if "variant" in row and "test" in row:
            rows[row["variant"]] = row
    if not rows:
        raise ValueError(f"no variant results in {out_dir}")
    known = order or ["untrained", *dict.fromkeys(k for v in VARIANTS.values() for k in v)]
    names = [n for n in known if n in rows] + sorted(set(rows) - set(known))
    volume = any("organ2v_recall@1" in rows[n]["test"] for n in names)
    head = ["variant", "what", "i2i nDCG@10", "t2i nDCG@10"]
    head += ["report→vol R@1", "report→vol R@5", "organ→vol R@5"] if volume else ["t2i R@10"]
    half = "zero_shot_auroc_rarer_half" in rows[names[0]]["test"]
    head += ["zero-shot AUROC"] + (["zero-shot AUROC, rarer half"] if half else [])
    head += ["gap (centroid)", "gap separability", "steps × batch", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        r, te = rows[n], rows[n]["test"]
        cells = [n, ROW_NOTES.get(n, ""), _fmt(te.get("i2i_ndcg@10")), _fmt(te.get("t2i_ndcg@10"))]
        if volume:
            cells += [_fmt(te.get("t2i_recall@1")), _fmt(te.get("t2i_recall@5")), _fmt(te.get("organ2v_recall@5"))]
        else:
            cells += [_fmt(te.get("t2i_recall@10"))]
        batch = r["recipe"]["batch_size"]
        cells += [_fmt(te.get("zero_shot_auroc"))] + ([_fmt(te.get("zero_shot_auroc_rarer_half"))] if half else [])
        cells += [f"{te['gap']['centroid_distance']:.3f}",
                  f"{te['gap']['separability']:.3f}", f"{r['steps']} × {batch} = {r['samples_seen']}",
                  f"{r.get('train_wall_s', 0.0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    any_row = rows[names[0]]
    rare = any_row["labels"]["rare"]
    if rare:
        lines += ["", "Rarest labels (train count; positive test patients): zero-shot AUROC / "
                  "image→image precision@10 of the label", "",
                  "| variant | " + " | ".join(
                      f"{n} ({any_row['labels']['train_freq'][n]}; {any_row['labels']['test_pos_patients'][n]})"
                      for n in rare) + " |",
                  "|" + "---|" * (len(rare) + 1)]
        for n in names:
            te = rows[n]["test"]
            cells = [f"{_fmt(te['rare'][lab]['zero_shot_auroc'], 2)} / "
                     f"{_fmt(te['rare'][lab]['i2i_precision@10'], 2)}" for lab in rare]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    te = any_row["test"]
    lines += ["", f"Test split: {te['n_items']} items of {te['n_patients']} patients; zero-shot AUROC is "
              f"the mean over {te['zero_shot_labels']} labels with >= 5 positive test patients"
              + (f" (rarer half: the {len(any_row['labels']['zero_shot_rarer_half'])} of them rarest in train)"
                 if half else "") + "; "
              f"95 % bootstrap CIs resample patients ({te.get('n_boot', 1000)} resamples)."]
    md = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(md)
    (out_dir / "table.json").write_text(json.dumps({n: rows[n] for n in names}, indent=1))
    return md


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .text_features import TextFeatureCache

    p = argparse.ArgumentParser(description="Train and evaluate the issue-5 ablation variants.")
    p.add_argument("--task", choices=sorted(VARIANTS), required=True,
                   help="image (synth-cxr) or volume (synth-ct)")
    p.add_argument("--recipe", required=True, help="base recipe (tiny-cxr, tiny-ct, or a JSON path)")
    p.add_argument("--data", required=True, help="corpus with train and test splits")
    p.add_argument("--out", required=True, help="folder for <variant>.json, table.md, table.json")
    p.add_argument("--steps", type=int, default=None, help="steps of the full-data variants")
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for "
                   "these tiny models on a shared CPU: more threads oversubscribe it)")
    p.add_argument("--table-only", action="store_true", help="only rebuild table.md from the JSONs")
    p.add_argument("--reeval", action="store_true", help="no training: re-evaluate every variant in "
                   "OUT from its checkpoint, then rebuild the table")
    p.add_argument("--text-cache", default=None, help="frozen-tower feature cache file, read and "
                   "updated (default OUT/text_features.pt)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.reeval or not args.table_only:
        from medseek.models.factory import load_config

        from .data import load_tokenizer

        variants = VARIANTS[args.task]
        chosen = [v for v in args.only.split(",") if v] or list(variants)
        bad = sorted(set(chosen) - set(variants))
        if bad:
            raise SystemExit(f"unknown variants {bad}; known: {list(variants)}")
        cache = TextFeatureCache(load_tokenizer(load_config(load_recipe(args.recipe).model).text.max_length))
        cache_path = Path(args.text_cache or Path(args.out) / "text_features.pt")
        if cache_path.is_file():
            cache.load(cache_path)
        if args.reeval:
            chosen = []
            again = reevaluate(args.out, args.data, text_cache=cache, n_boot=args.n_boot)
            print("re-evaluated:", ", ".join(again))
        for name in chosen:
            t0 = time.perf_counter()
            rows = run_variant(name, args.recipe, variants[name], args.data, args.out, steps=args.steps,
                               text_cache=cache, n_boot=args.n_boot, eval_untrained=name == "base")
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache.save(cache_path)
            te = rows[name]["test"]
            print(f"{name}: i2i nDCG@10 {_fmt(te['i2i_ndcg@10'])}, zero-shot AUROC "
                  f"{_fmt(te['zero_shot_auroc'])}, {time.perf_counter() - t0:.0f} s", flush=True)
    print(write_table(args.out))
    return 0

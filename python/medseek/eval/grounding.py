"""Phrase grounding on named region boxes (issue 17: LGDEA's phrase-grounding claim on
the wrist corpus's bone boxes).

A model *grounds* a finding phrase when, among the boxed regions of one image, the
region whose box carries the finding scores highest against the phrase. The region
embeddings are the model's own region pathway (:meth:`medseek.models.dual.DualEncoder.
encode_image_and_regions`: patch tokens pooled over each box and projected by the region
head, or by the global head when the model has none, i.e. box-pooled patch features),
the same call the server makes for a region child (:mod:`medseek.serve.regions`). The
phrase is embedded by the text tower as a small ensemble of report-style sentences
(:func:`medseek.eval.prompts.report_prompts`, the zero-shot prompts).

Queries, on the test images whose labels put the finding in at least one named region
(label ``"<region> <finding>"``, e.g. ``"distal radius fracture"``):

* ``named``: one query per (image, region with the finding); the phrase names the
  region and the finding ("There is distal radius fracture."). Correct when that
  region is the top-scoring one. Chance is ``1 / R``. A model can pass this by anatomy
  alone, whatever the image shows.
* ``finding_only``: one query per image that has the finding in some regions and not in
  others; the phrase names only the finding ("There is fracture."). Correct when the
  top-scoring region is one with the finding. Chance is ``|with finding| / R`` per
  image. This is the one that needs the region embedding to see the finding.

Each is scored two ways: ``positive``, the plain pointing game (a region's score is its
cosine to the phrase), and ``difference``, the cosine to the phrase minus the cosine to
its negation ("No fracture."), the rule zero-shot classification uses here
(:func:`medseek.eval.classification.zero_shot_scores`). The two differ a lot on wrist:
the intact-bone captions say "No fracture of the distal radius.", so a bare "fracture"
phrase sits close to intact regions, and only the contrast with the negation cancels
the shared word (measured on the shipped model; see ``benchmarks/RESULTS.md``).

``region_auroc``: per region, the ``difference`` score of ``"<region> <finding>"`` on
that region's embedding across all test images, AUROC against the labels, averaged over
regions: whether a region's embedding says if *that* bone carries the finding.

Accuracies come with a patient-bootstrap CI (queries of one patient resampled together),
and ``lift`` is accuracy minus chance per query, with its CI. Uniform chance is a low bar
when one region carries the finding far more often than the others (synth-wrist: the
distal radius), so ``majority``, the best constant pointer, is reported too: pointing
beats it only if the region embeddings see the finding.
"""

from __future__ import annotations

import math

import numpy as np


def region_truth(labels: list[tuple[str, ...]], regions: list[str], finding: str) -> np.ndarray:
    """``(N, R)`` bool: item ``i`` carries ``finding`` in region ``r`` when its labels hold
    ``"<region> <finding>"`` (region names with ``_`` read as spaces)."""
    names = [f"{r.replace('_', ' ')} {finding}" for r in regions]
    return np.array([[n in set(labs) for n in names] for labs in labels], dtype=bool).reshape(len(labels),
                                                                                               len(regions))


def pointing_hits(phrase: np.ndarray, region_emb: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Pointing game: 1.0 where the top-scoring region of a query is a correct one.

    Parameters
    ----------
    phrase : (Q, D) or (Q, 2, D) float, per query the phrase embedding, or the phrase
        ``[:, 0]`` and its negation ``[:, 1]``; a region then scores
        ``cos(region, phrase) − cos(region, negation)`` (the zero-shot "difference" rule)
    region_emb : (Q, R, D) float, the query image's region embeddings
    correct : (Q, R) bool, the regions that carry the query's finding

    Returns
    -------
    (Q,) float64 of 0.0 / 1.0. Ties go to the first region, so a constant embedding
    scores as if it always pointed at region 0.
    """
    phrase = np.asarray(phrase, dtype=np.float64)
    region_emb = np.asarray(region_emb, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if region_emb.ndim != 3 or phrase.ndim not in (2, 3):
        raise ValueError(f"phrase must be (Q, D) or (Q, 2, D) and region_emb (Q, R, D), got "
                         f"{phrase.shape} and {region_emb.shape}")
    q, r, d = region_emb.shape
    sides = phrase.reshape(q, -1, d) if phrase.shape[0] == q and phrase.shape[-1] == d else None
    if sides is None or sides.shape[1] not in (1, 2) or correct.shape != (q, r):
        raise ValueError(f"phrase {phrase.shape} and correct {correct.shape} must be ({q}, {d}) or "
                         f"({q}, 2, {d}), and ({q}, {r}), to match region_emb {region_emb.shape}")
    if q and not correct.any(1).all():
        raise ValueError("every query needs at least one correct region (correct has an all-False row)")
    unit = region_emb / np.maximum(np.linalg.norm(region_emb, axis=2, keepdims=True), 1e-12)
    sides = sides / np.maximum(np.linalg.norm(sides, axis=2, keepdims=True), 1e-12)
    cos = np.einsum("qrd,qsd->qrs", unit, sides)  # (Q, R, 1 or 2)
    scores = cos[..., 0] - cos[..., 1] if cos.shape[2] == 2 else cos[..., 0]
    top = np.argmax(scores, axis=1)
    return correct[np.arange(q), top].astype(np.float64)


def grounding_queries(truth: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """The ``named`` and ``finding_only`` queries of ``truth`` (N, R) (module doc): per
    kind, ``row`` (Q,) item index, ``correct`` (Q, R) bool and, for ``named``,
    ``region`` (Q,) the region the phrase names."""
    n, r = truth.shape
    rows, regs = np.nonzero(truth)
    named_correct = np.zeros((len(rows), r), dtype=bool)
    named_correct[np.arange(len(rows)), regs] = True
    mixed = np.flatnonzero(truth.any(1) & ~truth.all(1))
    return {"named": {"row": rows, "region": regs, "correct": named_correct},
            "finding_only": {"row": mixed, "correct": truth[mixed]}}


def score_grounding(region_emb: np.ndarray, truth: np.ndarray, patients: np.ndarray,
                    named_phrases: np.ndarray, finding_phrase: np.ndarray, n_boot: int = 1000,
                    seed: int = 0) -> dict:
    """Pointing accuracy from embeddings (no model): the testable core of
    :func:`evaluate_grounding`.

    Parameters
    ----------
    region_emb : (N, R, D) float, region embeddings of the N test items
    truth : (N, R) bool, :func:`region_truth`
    patients : (N,) patient id of each item (the bootstrap clusters)
    named_phrases : (R, D) or (R, 2, D) float, the phrase naming region ``r`` and the
        finding (and its negation: see :func:`pointing_hits`)
    finding_phrase : (D,) or (2, D) float, the phrase naming only the finding

    Returns
    -------
    dict with ``named`` and ``finding_only``: ``queries``, ``chance`` (the share of
    correct regions, averaged per patient then over patients like the accuracy),
    ``majority`` (the accuracy of always pointing at region ``majority_region``, the best
    constant choice on these very queries: a model that learned only which bone breaks
    most often reaches it), ``accuracy``, ``lift`` (accuracy − chance) and
    ``lift_majority`` (accuracy − majority, paired per query) as
    ``{"value", "lo", "hi", "n"}`` with ``n`` patients (absent without queries), and
    ``hits`` (Q,) for paired comparisons of two models on the same queries.
    """
    from medseek.train.ablation import _cluster_mean_ci

    region_emb = np.asarray(region_emb, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    patients = np.asarray(patients)
    named_phrases = np.asarray(named_phrases, dtype=np.float64)
    finding_phrase = np.asarray(finding_phrase, dtype=np.float64)
    if region_emb.ndim != 3:
        raise ValueError(f"region_emb must be (N, R, D), got {region_emb.shape}")
    n, r, d = region_emb.shape
    if truth.shape != (n, r) or patients.shape != (n,):
        raise ValueError(f"truth {truth.shape} and patients {patients.shape} must be ({n}, {r}) and ({n},)")
    if named_phrases.shape[0] != r or named_phrases.shape[1:] != finding_phrase.shape:
        raise ValueError(f"named_phrases must be ({r}, *S) with finding_phrase (*S), S = ({d},) or "
                         f"(2, {d}); got {named_phrases.shape} and {finding_phrase.shape}")
    out: dict = {}
    for kind, q in grounding_queries(truth).items():
        rows = q["row"]
        if kind == "named":
            phrase = named_phrases[q["region"]]
        else:
            phrase = np.broadcast_to(finding_phrase, (len(rows), *finding_phrase.shape))
        hits = pointing_hits(phrase, region_emb[rows], q["correct"])
        chance = q["correct"].sum(1) / r
        out[kind] = {"queries": int(len(rows)), "chance": math.nan, "hits": hits}
        if len(rows):
            out[kind]["accuracy"] = _cluster_mean_ci(hits, patients[rows], n_boot, seed)
            out[kind]["lift"] = _cluster_mean_ci(hits - chance, patients[rows], n_boot, seed)
            # averaged like the accuracy (per patient, then over patients): lift = accuracy − chance
            out[kind]["chance"] = out[kind]["accuracy"]["value"] - out[kind]["lift"]["value"]
            # the best constant pointer (always the same region), chosen on these queries
            const = max(range(r), key=lambda j: q["correct"][:, j].mean())
            beat = _cluster_mean_ci(hits - q["correct"][:, const], patients[rows], n_boot, seed)
            out[kind]["majority"] = out[kind]["accuracy"]["value"] - beat["value"]
            out[kind]["majority_region"] = int(const)
            out[kind]["lift_majority"] = beat
    return out


def _region_auroc(region_emb: np.ndarray, truth: np.ndarray, patients: np.ndarray,
                  prompts: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean over regions of the AUROC of region ``r``'s zero-shot score for its finding."""
    from medseek.eval.classification import auroc, zero_shot_scores
    from medseek.train.ablation import _cluster_stat_ci

    r = truth.shape[1]
    if np.shape(prompts)[:2] != (r, 2):
        raise ValueError(f"region_prompts must be ({r}, 2, D), got {np.shape(prompts)}")
    scores = np.stack([zero_shot_scores(region_emb[:, j], prompts[j:j + 1])[:, 0] for j in range(r)], 1)

    res = _cluster_stat_ci(lambda rows: mean_region_auroc(scores, truth, rows), patients, n_boot, seed)
    res["per_region"] = [auroc(scores[:, j], truth[:, j]) for j in range(r)]
    res["scores"] = scores  # (N, R), for paired comparisons; grounding_row drops it
    return res


def mean_region_auroc(scores: np.ndarray, truth: np.ndarray, rows: np.ndarray) -> float:
    """Mean over regions of the AUROC of ``scores[rows, r]`` against ``truth[rows, r]``
    (regions with one class only in ``rows`` left out; NaN when all are)."""
    from medseek.eval.classification import auroc

    vals = [auroc(scores[rows, j], truth[rows, j]) for j in range(truth.shape[1])]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def evaluate_grounding(model, ds, tokenizer, *, finding: str = "fracture", text_cache=None,
                       n_boot: int = 1000, seed: int = 0, device: str = "cpu") -> dict:
    """Phrase grounding of ``model`` on the image split ``ds`` (module doc).

    The regions are ``model.cfg.preprocess.regions`` with each item's boxes
    (:class:`medseek.train.data.PairDataset` scales them to the model input), embedded by
    :func:`medseek.train.ablation.embed_images_and_regions`. Raises ``ValueError`` when the
    model has no named regions or no item carries ``finding`` in a region.

    Returns ``{"difference": ..., "positive": ..., "region_auroc": ...}`` (the first two
    :func:`score_grounding` dicts; the per-query ``hits`` and the region AUROC's per-item
    ``scores`` are kept for paired comparisons, :func:`grounding_row` strips them) plus ``pathway``, ``regions``, ``finding``, ``items``.
    """
    from medseek.eval.prompts import prompt_embeddings
    from medseek.train.ablation import _patients, embed_images_and_regions
    from medseek.train.loop import encode_texts

    regions = list(model.cfg.preprocess.regions)
    if model.modality != "image" or not regions:
        raise ValueError(f"grounding needs an image model with named regions (preprocess.regions), "
                         f"got modality {model.modality!r} and regions {regions}")
    truth = region_truth([r.labels for r in ds.records], regions, finding)
    if not truth.any():
        raise ValueError(f"no item of the split has a label '<region> {finding}' for regions {regions}")
    was_training = model.training
    model.to(device).eval()
    _, region_emb = embed_images_and_regions(model, ds)
    names = [f"{r.replace('_', ' ')} {finding}" for r in regions]
    # (R + 1, 2, D): the report-style sentence ensemble of each phrase [:, 0] and of its
    # negation [:, 1], the zero-shot prompts
    prompts = prompt_embeddings(lambda xs: encode_texts(model, xs, tokenizer, device, text_cache=text_cache),
                                [*names, finding])
    model.train(was_training)
    pid = _patients(ds)
    out = {"difference": score_grounding(region_emb, truth, pid, prompts[:-1], prompts[-1], n_boot, seed),
           "positive": score_grounding(region_emb, truth, pid, prompts[:-1, 0], prompts[-1, 0], n_boot, seed),
           "region_auroc": _region_auroc(region_emb, truth, pid, prompts[:-1], n_boot, seed)}
    out.update(pathway="region_head" if getattr(model, "region_head", None) is not None
               else "box-pooled tokens, global head",
               regions=[r.replace("_", " ") for r in regions], finding=finding, items=len(ds))
    return out


def grounding_row(result: dict) -> dict:
    """:func:`evaluate_grounding`'s ``result`` without the per-query ``hits`` and per-item
    ``scores`` (JSON-ready)."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ("hits", "scores")}
        return v

    return strip(result)

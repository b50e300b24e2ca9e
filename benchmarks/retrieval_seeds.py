"""The seeds' retrieval methods measured through the real service pipeline (issue 7).

Rerunnable: ``python benchmarks/retrieval_seeds.py [--work runs/retrieval_seeds] [--only wrist]``;
results go to ``<work>/results_<task>-<recipe>.{json,md}``.

1. Builds synth-wrist and synth-cxr with ``medseek data build`` and trains tiny models
   with ``medseek train`` (both reused when already under ``--work``).
2. Encodes every image of a corpus with a model (trained, and untrained for context), and
   stores the train + val images in a real SQLite ``Store`` (collection ``image``) with a
   FAISS ``Catalog``; for synth-wrist also the three bone-region children of each image
   (collection ``region``, ``parent_id`` = the image) as the service stores them.
3. Runs the test images as queries through ``SearchPipeline``:

   * synth-wrist, retrieval-based diagnosis (``medseek.search.diagnose``, an unweighted
     vote of the top ``k`` hits): for each bone region r the query predicts the label
     "r fracture" from (a) the global top-k, (b) the global top-K' reranked by region r
     (WristMIR's second stage). The region is chosen by which label is predicted, never
     from the query's ground truth, so every query runs all three. A label is predicted
     at vote >= 0.5. Macro F1 averages the three labels, micro F1 pools their counts.
     Region embeddings: ``crop`` = the box cropped from the full image, resized and
     encoded by the image tower (what ``medseek serve`` stores for a region); ``head`` =
     the model's region head pooled over the box (WristMIR's region embedding).
   * synth-cxr, label-overlap precision@10 (a hit counts when it shares a finding label
     with the query; "normal" is a label; missing hits count as misses) and the
     near-duplicate rate of the top 10 (a hit is a near-duplicate when it comes from the
     same study as a higher-ranked hit, or its cosine with a higher-ranked hit is >= t;
     rate = such hits / hits), without and with diversification (MMR with lam, caps per
     patient/study/document, near-duplicate threshold). t is calibrated per model: the
     99.9th percentile of the archive's pairwise cosines (the closest 0.1 % of pairs),
     because tiny models pack their embeddings so tightly that the service's default
     0.98 sits below a typical neighbour's cosine; the default is run too.

Confidence intervals: percentile bootstrap over queries (``medseek.eval.bootstrap``), 1000
resamples; for F1 the whole statistic is recomputed on each resample, and the paired
difference (region − global) is resampled on the same queries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REGIONS = ("distal radius", "distal ulna", "ulnar styloid")
FRACTURE_LABELS = tuple(f"{r} fracture" for r in REGIONS)


def sh(cmd: list[str], log: Path) -> None:
    """Run a medseek command (niced), its output into ``log``; fail loudly."""
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["nice", "-n", "5", *cmd], stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}); see {log}")
    print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)


def ensure_corpus(work: Path, kind: str, n: int, seed: int) -> Path:
    out = work / kind.removeprefix("synth-")
    if not (out / "manifest.parquet").exists():
        if out.exists():
            shutil.rmtree(out)
        sh(["medseek", "data", "build", kind, "--out", str(out), "--n", str(n),
            "--seed", str(seed), "--quiet"], work / f"build_{kind}.log")
    return out


def ensure_run(work: Path, recipe: str, data: Path, steps: int | None) -> Path:
    """Train (or finish, with ``--resume``) the run; a finished run is reused as it is."""
    run = work / f"train-{recipe}"
    done = 0
    if (run / "metrics.jsonl").exists() and (run / "recipe.json").exists():
        target = json.loads((run / "recipe.json").read_text())["steps"]
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        done = max((r["step"] for r in logged if "loss" in r), default=0)
        if (run / "checkpoint.safetensors").exists() and done >= target:
            return run
    cmd = ["medseek", "train", "--recipe", recipe, "--data", str(data), "--out", str(run),
           "--device", "cpu", "--no-progress"]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    if (run / "checkpoint.safetensors").exists():
        cmd.append("--resume")
    sh(cmd, work / f"train_{recipe}.log")
    return run


# -- models and encoding -------------------------------------------------------------------
def load_model(run: Path, recipe: str, trained: bool):
    """The run's model with its trained weights, or as initialised at step 0 (same seed)."""
    import torch

    from medseek.models.factory import create_model
    from medseek.train.checkpoint import load_model_weights
    from medseek.train.recipe import load_recipe, recipe_from_dict

    if (run / "recipe.json").exists():  # what the run was trained with
        raw = json.loads((run / "recipe.json").read_text())
        cfg = recipe_from_dict({k: v for k, v in raw.items() if k != "name"}, raw["name"])
    else:
        cfg = load_recipe(recipe)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained_text=cfg.pretrained_text, **cfg.model_overrides)
    if trained:
        load_model_weights(run / "checkpoint.safetensors", model)
    return model.eval()


@dataclass
class Encoded:
    records: list  # ManifestRecord of the image rows, in order
    images: np.ndarray  # (n, d) global embeddings
    regions: dict[str, np.ndarray]  # mode -> (n, R, d) region embeddings (wrist only)


def encode_corpus(model, root: Path, regions: bool, batch: int = 64) -> Encoded:
    """Global (and region) embeddings of every image row of ``root``'s manifest, with the
    service's preprocessing (``medseek.serve.ingest``: min-max to [0, 1], bilinear resize;
    a region is the box cropped from the full image, then resized)."""
    import torch

    from medseek.data.manifest import read_manifest
    from medseek.io import read_image
    from medseek.serve.ingest import resize, to_unit_range

    size = tuple(model.cfg.preprocess.image_size)
    recs = [r for r in read_manifest(root / "manifest.parquet") if r.kind == "image"]
    glob, crop_emb, head_emb = [], [], []
    for s in range(0, len(recs), batch):
        part = recs[s:s + batch]
        full = [to_unit_range(read_image(root / r.path).pixels) for r in part]
        x = np.stack([resize(u, size) for u in full])[:, None]  # (B, 1, H, W)
        with torch.inference_mode():
            if not regions:
                glob.append(model.encode_image(torch.from_numpy(x)).numpy())
                continue
            boxes = np.zeros((len(part), len(REGIONS), 4), np.float32)
            crops = []
            for i, (r, u) in enumerate(zip(part, full)):
                by_name = {g.name: g.box for g in r.regions}
                sy, sx = size[0] / u.shape[0], size[1] / u.shape[1]
                for j, name in enumerate(REGIONS):
                    x0, y0, x1, y1 = by_name[name]
                    boxes[i, j] = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
                    c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
                    c1 = min(u.shape[1], int(np.ceil(x1)))
                    r1 = min(u.shape[0], int(np.ceil(y1)))
                    crops.append(resize(u[r0:r1, c0:c1], size))
            g, h = model.encode_image_and_regions(torch.from_numpy(x), torch.from_numpy(boxes))
            glob.append(g.numpy())
            head_emb.append(h.numpy())
            c = model.encode_image(torch.from_numpy(np.stack(crops)[:, None])).numpy()
            crop_emb.append(c.reshape(len(part), len(REGIONS), -1))
    unit = lambda a: np.ascontiguousarray(a / np.linalg.norm(a, axis=-1, keepdims=True),
                                          dtype=np.float32)
    out = {}
    if regions:
        out = {"crop": unit(np.concatenate(crop_emb)), "head": unit(np.concatenate(head_emb))}
    return Encoded(recs, unit(np.concatenate(glob)), out)


# -- the archive ---------------------------------------------------------------------------
def build_archive(path: Path, enc: Encoded, region_mode: str | None):
    """Store (train + val images, and their region children) + FAISS Catalog, opened."""
    from medseek.index import Catalog, CatalogConfig, ItemRecord, Store, StoreConfig

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    store = Store(StoreConfig(path / "medseek.sqlite"))
    keep = [i for i, r in enumerate(enc.records) if r.split in ("train", "val")]
    items = [ItemRecord(
        id=enc.records[i].id, collection="image", modality=enc.records[i].modality,
        body_part=enc.records[i].body_part, view=enc.records[i].view,
        labels=tuple(enc.records[i].labels), patient_pseudonym=enc.records[i].patient_id,
        study_pseudonym=enc.records[i].study_id, source_document=enc.records[i].source_id)
        for i in keep]
    results = store.upsert(items, enc.images[keep])
    if any(r.status == "duplicate" for r in results):
        raise RuntimeError("the archive folded duplicate images; every row should be distinct")
    if region_mode is not None:
        children, vecs = [], []
        for i, parent in zip(keep, items):
            for j, name in enumerate(REGIONS):
                children.append(ItemRecord(
                    id=f"{parent.id}/region/{name}", collection="region",
                    modality=parent.modality, body_part=parent.body_part, view=parent.view,
                    labels=parent.labels, patient_pseudonym=parent.patient_pseudonym,
                    study_pseudonym=parent.study_pseudonym,
                    source_document=parent.source_document, parent_id=parent.id, region=name,
                    box=tuple(float(v) for v in
                              {g.name: g.box for g in enc.records[i].regions}[name])))
                vecs.append(enc.regions[region_mode][i, j])
        store.upsert(children, np.ascontiguousarray(np.stack(vecs)))
    catalog = Catalog(store, CatalogConfig(path / "indexes"))
    catalog.open()
    return store, catalog


def test_rows(enc: Encoded) -> np.ndarray:
    rows = np.array([i for i, r in enumerate(enc.records) if r.split == "test"])
    if rows.size == 0:
        raise SystemExit("the corpus has no test split")
    return rows


# -- synth-wrist: retrieval-based diagnosis ------------------------------------------------
def f1_stats(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(macro F1 over labels with any positive or predicted case, micro F1)."""
    tp = (pred & truth).sum(0).astype(float)
    fp = (pred & ~truth).sum(0).astype(float)
    fn = (~pred & truth).sum(0).astype(float)
    den = 2 * tp + fp + fn
    macro = float(np.mean(2 * tp[den > 0] / den[den > 0])) if (den > 0).any() else float("nan")
    micro_den = den.sum()
    micro = float(2 * tp.sum() / micro_den) if micro_den > 0 else float("nan")
    return macro, micro


def wrist_diagnosis(pipeline, enc: Encoded, region_mode: str, k: int, alpha_note: str) -> dict:
    from medseek.search import RegionQuery
    from medseek.search.diagnose import diagnose

    rows = test_rows(enc)
    truth = np.array([[lab in enc.records[i].labels for lab in FRACTURE_LABELS] for i in rows])
    probs = {"global": np.zeros(truth.shape), "region": np.zeros(truth.shape)}
    t0 = time.perf_counter()
    glob = pipeline.search("image", enc.images[rows], k=k, diversify=False, explain=False)
    for qi, res in enumerate(glob):
        vote = diagnose([h.score for h in res.hits], [h.record.labels for h in res.hits], k,
                        label_names=FRACTURE_LABELS)
        probs["global"][qi] = [vote[lab] for lab in FRACTURE_LABELS]
    for j, name in enumerate(REGIONS):
        region = RegionQuery(name, np.ascontiguousarray(enc.regions[region_mode][rows, j]))
        reranked = pipeline.search("image", enc.images[rows], k=k, region=region,
                                   diversify=False, explain=False)
        for qi, res in enumerate(reranked):
            if sum(h.region_score is not None for h in res.hits) < len(res.hits):
                raise RuntimeError(f"a hit of query {qi} lacks its {name} region child")
            vote = diagnose([h.score for h in res.hits], [h.record.labels for h in res.hits],
                            k, label_names=FRACTURE_LABELS)
            probs["region"][qi, j] = vote[FRACTURE_LABELS[j]]
    elapsed = time.perf_counter() - t0
    return summarise_f1(probs, truth, elapsed, region_mode, alpha_note)


def summarise_f1(probs: dict, truth: np.ndarray, elapsed: float, mode: str, note: str) -> dict:
    from medseek.eval.bootstrap import bootstrap_ci
    from medseek.eval.classification import diagnosis_metrics

    n = truth.shape[0]
    pred = {key: p >= 0.5 for key, p in probs.items()}
    out = {"queries": n, "support": truth.sum(0).tolist(), "labels": list(FRACTURE_LABELS),
           "region_mode": mode, "rerank": note, "search_s": elapsed}
    for j, stat in enumerate(("macro_f1", "micro_f1")):
        for key in ("global", "region"):
            est, lo, hi = bootstrap_ci(lambda ix, key=key: f1_stats(pred[key][ix], truth[ix])[j],
                                       n=n, seed=0)
            out[f"{stat}_{key}"] = [est, lo, hi]
        diff = lambda ix: (f1_stats(pred["region"][ix], truth[ix])[j]
                           - f1_stats(pred["global"][ix], truth[ix])[j])
        out[f"{stat}_diff"] = list(bootstrap_ci(diff, n=n, seed=0))
    out["per_label_f1"] = {key: [f1_stats(pred[key][:, [j]], truth[:, [j]])[0]
                                 for j in range(truth.shape[1])] for key in pred}
    # threshold-free context: macro AUROC of the vote fractions
    out["macro_auroc"] = {key: diagnosis_metrics(p, truth)["macro"]["auroc"]
                          for key, p in probs.items()}
    return out


# -- synth-cxr: precision@10 and near-duplicates --------------------------------------------
def dup_threshold(enc: Encoded, pct: float = 99.9) -> float:
    """The ``pct`` percentile of the archive's pairwise cosines (module docstring)."""
    e = enc.images[[i for i, r in enumerate(enc.records) if r.split != "test"]]
    upper = np.triu_indices(e.shape[0], 1)
    return float(np.percentile((e @ e.T)[upper], pct))


def cxr_diversity(pipeline, enc: Encoded, k: int, diversify: bool, dup_cos: float) -> dict:
    from medseek.eval.bootstrap import bootstrap_ci

    rows = test_rows(enc)
    emb_of = {enc.records[i].id: enc.images[i] for i in range(len(enc.records))}
    t0 = time.perf_counter()
    results = pipeline.search("image", enc.images[rows], k=k, diversify=diversify,
                              explain=False)
    elapsed = time.perf_counter() - t0
    prec, dup, same_study, close, n_hits = [], [], [], [], []
    for i, res in zip(rows, results):
        q_labels = set(enc.records[i].labels)
        hits = res.hits
        prec.append(sum(bool(q_labels & set(h.record.labels)) for h in hits) / k)
        vecs = np.stack([emb_of[h.id] for h in hits])
        cos = vecs @ vecs.T  # (h, h)
        studies = [h.study_pseudonym for h in hits]
        by_study = [any(studies[a] == studies[b] for b in range(a)) for a in range(len(hits))]
        by_cos = [bool((cos[a, :a] >= dup_cos).any()) for a in range(len(hits))]
        dup.append(sum(x or y for x, y in zip(by_study, by_cos)) / len(hits))
        same_study.append(sum(by_study) / len(hits))
        close.append(sum(by_cos) / len(hits))
        n_hits.append(len(hits))
    return {"queries": len(rows), "diversify": diversify, "search_s": elapsed,
            "dup_cos": dup_cos,
            "precision_at_k": list(bootstrap_ci(np.array(prec), seed=0)),
            "near_dup_rate": list(bootstrap_ci(np.array(dup), seed=0)),
            "same_study_rate": list(bootstrap_ci(np.array(same_study), seed=0)),
            "cosine_dup_rate": list(bootstrap_ci(np.array(close), seed=0)),
            "mean_hits": float(np.mean(n_hits)), "per_query_precision": prec}


# -- tables ---------------------------------------------------------------------------------
def _ci(v: list, digits: int = 3) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def markdown(report: dict) -> str:
    """The result tables (Markdown), as they go into benchmarks/RESULTS.md."""
    lines = []
    wrist = {k: v for k, v in report.items() if k.startswith("wrist/")}
    if wrist:
        lines += ["| model | region embedding | alpha | macro F1 global | macro F1 region "
                  "rerank | Δ macro (paired) | micro F1 global | micro F1 region rerank "
                  "| Δ micro (paired) | macro AUROC global / region |",
                  "|---|---|---:|---|---|---|---|---|---|---|"]
        for key, r in wrist.items():
            _, model, mode, alpha = key.split("/")
            auc = r["macro_auroc"]
            lines.append(
                f"| {model} | {mode} | {alpha.removeprefix('alpha=')} | "
                f"{_ci(r['macro_f1_global'])} | {_ci(r['macro_f1_region'])} | "
                f"{_ci(r['macro_f1_diff'])} | {_ci(r['micro_f1_global'])} | "
                f"{_ci(r['micro_f1_region'])} | {_ci(r['micro_f1_diff'])} | "
                f"{auc['global']:.3f} / {auc['region']:.3f} |")
        first = next(iter(wrist.values()))
        lines.append(f"\n{first['queries']} test queries; positives per label "
                     f"{dict(zip(first['labels'], first['support']))}.")
    cxr = {k: v for k, v in report.items() if k.startswith("cxr/")}
    if cxr:
        lines += ["", "| model (t) | ranking | P@10 (label overlap) | Δ P@10 vs plain (paired) | "
                  "near-duplicate rate | same-study rate | cos >= t rate | hits per query |",
                  "|---|---|---|---|---|---|---|---:|"]
        for key, r in cxr.items():
            _, model, name = key.split("/", 2)
            lines.append(f"| {model} ({r['dup_cos']:.4f}) | {name} | "
                         f"{_ci(r['precision_at_k'])} | {_ci(r['precision_diff_vs_plain'])} | "
                         f"{_ci(r['near_dup_rate'])} | "
                         f"{_ci(r['same_study_rate'])} | {_ci(r['cosine_dup_rate'])} | "
                         f"{r['mean_hits']:.1f} |")
        lines.append(f"\n{next(iter(cxr.values()))['queries']} test queries.")
    return "\n".join(lines)


# -- driver --------------------------------------------------------------------------------
def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/retrieval_seeds"))
    p.add_argument("--wrist-n", type=int, default=400, help="synth-wrist studies")
    p.add_argument("--cxr-n", type=int, default=400, help="synth-cxr reports")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wrist-recipe", default="tiny-wrist-r128")
    p.add_argument("--cxr-recipe", default="tiny-cxr-seeds")
    p.add_argument("--steps", type=int, default=None, help="override both recipes' steps")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--k-prime", type=int, default=50)
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5, 1.0],
                   help="region rerank weights (SearchConfig.rerank_alpha) to report")
    p.add_argument("--lam", type=float, nargs="+", default=[0.7, 0.5],
                   help="MMR lambdas to report with diversification on")
    p.add_argument("--only", choices=("wrist", "cxr"), default=None)
    args = p.parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info}", flush=True)

    from medseek.eval.bootstrap import bootstrap_ci
    from medseek.search import SearchConfig, SearchPipeline

    report: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    tasks = [t for t in ("wrist", "cxr") if args.only in (None, t)]
    for task in tasks:
        kind, n, recipe = {"wrist": ("synth-wrist", args.wrist_n, args.wrist_recipe),
                           "cxr": ("synth-cxr", args.cxr_n, args.cxr_recipe)}[task]
        data = ensure_corpus(work, kind, n, args.seed)
        run = ensure_run(work, recipe, data, args.steps)
        for trained in (True, False):
            tag = f"{task}/{'trained' if trained else 'untrained'}"
            t0 = time.perf_counter()
            enc = encode_corpus(load_model(run, recipe, trained), data, regions=task == "wrist")
            print(f"{tag}: encoded {len(enc.records)} images in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            if task == "wrist":
                for mode in ("crop", "head"):
                    store, catalog = build_archive(work / "archive" / f"{tag}-{mode}", enc, mode)
                    for alpha in args.alpha:
                        cfg = SearchConfig(k_prime=args.k_prime, k=args.k, rerank_alpha=alpha)
                        with SearchPipeline(catalog, store, cfg) as pipe:
                            res = wrist_diagnosis(pipe, enc, mode, args.k, f"alpha={alpha}")
                        report[f"{tag}/{mode}/alpha={alpha}"] = res
                        print(f"{tag} {mode} alpha={alpha}: macro F1 global "
                              f"{res['macro_f1_global'][0]:.3f} -> region "
                              f"{res['macro_f1_region'][0]:.3f}", flush=True)
                    store.close()
            else:
                store, catalog = build_archive(work / "archive" / tag, enc, None)
                t = dup_threshold(enc)
                kp, k = args.k_prime, args.k
                variants = [("plain top-k", SearchConfig(k_prime=kp, k=k), False)]
                variants += [(f"MMR lam={lam}, caps, dup>=t", SearchConfig(
                    k_prime=kp, k=k, lam=lam, dup_threshold=t), True) for lam in args.lam]
                variants += [("MMR lam=1.0, no caps, dup>=t", SearchConfig(
                    k_prime=kp, k=k, lam=1.0, caps={}, dup_threshold=t), True)]
                variants += [("service default: MMR lam=0.7, caps, dup>=0.98",
                              SearchConfig(k_prime=kp, k=k), True)]
                plain = None
                for name, cfg, div in variants:
                    with SearchPipeline(catalog, store, cfg) as pipe:
                        res = cxr_diversity(pipe, enc, k, div, t)
                    mine = np.array(res["per_query_precision"])
                    plain = mine if plain is None else plain
                    res["precision_diff_vs_plain"] = list(bootstrap_ci(mine - plain, seed=0))
                    report[f"{tag}/{name}"] = res
                    print(f"{tag} {name}: P@{k} {res['precision_at_k'][0]:.3f}, "
                          f"near-dup {res['near_dup_rate'][0]:.3f} (t = {t:.5f})", flush=True)
                store.close()
    report["machine"]["load_end"] = os.getloadavg()
    slug = "+".join(f"{t}-{args.wrist_recipe if t == 'wrist' else args.cxr_recipe}"
                    for t in tasks)
    out = work / f"results_{slug}.json"
    out.write_text(json.dumps(report, indent=1))
    table = markdown(report)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

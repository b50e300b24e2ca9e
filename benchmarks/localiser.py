"""Regions found automatically (issue 15, part 3): the shipped wrist localiser's boxes vs
the corpus's, and WristMIR's kNN diagnosis with automatic vs given boxes.

Rerunnable: ``python benchmarks/localiser.py [--corpus DIR] [--out DIR]`` (default
``runs/localiser``; a missing corpus is rebuilt from the localiser card's corpus spec with
``build_release_corpus``: synth-wrist seed 1, 800 studies, 128 px, patient-disjoint
splits, the corpus the shipped wrist encoder and localiser were trained on). Results go
to ``<out>/results.{json,md}``.

1. IoU: the shipped localiser (``medseek/models/weights/localiser/wrist``) on the test
   split's images, per bone and mean, against the manifest's boxes; 95 % percentile
   bootstrap CIs over patients (each patient counts once: the mean of their films).
   The same for the chest localiser on the PA films of its corpus's test split
   (``--chest-corpus``: synth-cxr with anatomy boxes, the chest-xr encoder's spec).
2. kNN diagnosis (``medseek.eval.region_diagnosis``, the service's rerank formula): the
   shipped ``wrist`` encoder embeds every image with its region head over
   * ``given``: the manifest's boxes (archive = train split, queries = test split);
   * ``auto-query``: the localiser's boxes on the queries, the manifest's on the archive
     (a client that draws boxes on its archive, none on its query);
   * ``auto-all``: the localiser's boxes everywhere (``auto_regions`` ingest + query).
     The archive is the localiser's own train split here, so its boxes there are
     in-sample (better than on unseen films): this row flatters the archive side.
   Macro F1 of the region-reranked vote at the majority threshold (0.5) and at per-label
   thresholds fitted on val (each variant fits its own); the difference auto − given is
   paired (the same resampled patients), 1000 resamples.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _corpus(path: Path, spec: dict) -> Path:
    from medseek.train.release import build_release_corpus

    if (path / "manifest.parquet").is_file():
        return path
    print(f"building the corpus {spec} under {path} ...", flush=True)
    return build_release_corpus(spec, path, progress=True)


def _auto_dataset(ds, localiser):
    """``ds`` with each record's region boxes replaced by the localiser's on its image."""
    from medseek.data.manifest import Region
    from medseek.io import read_image
    from medseek.models.localiser import predict_boxes

    images = []
    for r in ds.records:
        px = read_image(ds.root / r.path).pixels
        images.append(px.astype(np.float32) / (255.0 if px.dtype == np.uint8 else 65535.0))
    boxes = np.concatenate([predict_boxes(localiser, images[s:s + 256])
                            for s in range(0, len(images), 256)])
    names = localiser.cfg.regions
    records = []
    for r, b in zip(ds.records, boxes):
        text = {g.name: g.text for g in r.regions}
        records.append(replace(r, regions=tuple(
            Region(name=n, box=tuple(float(v) for v in b[j]), text=text.get(n, ""))
            for j, n in enumerate(names))))
    return replace(ds, records=tuple(records))


def _iou_section(localiser, corpus: Path, n_boot: int) -> dict:
    from medseek.train.localiser import iou_report, load_box_set

    test = load_box_set(corpus, "test", localiser.cfg.regions, localiser.cfg.image_size)
    return iou_report(localiser, test, n_boot=n_boot)


def _chest_section(corpus: Path, n_boot: int) -> dict | None:
    """Test-split IoU of the shipped chest localiser (PA films), None when none ships."""
    from medseek.models.localiser import list_localisers, load_localiser, read_localiser_card

    if "chest" not in list_localisers():
        return None
    corpus = _corpus(corpus, read_localiser_card("chest")["corpus"])
    return _iou_section(load_localiser("chest"), corpus, n_boot)


def _diagnosis_section(localiser, corpus: Path, n_boot: int) -> dict:
    from medseek.eval.region_diagnosis import fit_vote_thresholds, knn_votes, summarise_votes
    from medseek.models.release import load_release
    from medseek.train.ablation import _patients, embed_images_and_regions
    from medseek.train.data import PairDataset

    model = load_release("wrist")
    regions = [r.replace("_", " ") for r in model.cfg.preprocess.regions]
    labels = [f"{r} fracture" for r in regions]
    ds = {s: PairDataset.from_manifest(corpus, model.cfg, s) for s in ("train", "val", "test")}
    auto = {s: _auto_dataset(d, localiser) for s, d in ds.items()}
    emb = {("given", s): embed_images_and_regions(model, d) for s, d in ds.items()}
    emb.update({("auto", s): embed_images_and_regions(model, d) for s, d in auto.items()})
    y = {s: np.array([[lab in r.labels for lab in labels] for r in d.records], bool)
         for s, d in ds.items()}
    variants = {"given": ("given", "given"), "auto-query": ("auto", "given"),
                "auto-all": ("auto", "auto")}

    def votes(query_boxes: str, archive_boxes: str, split: str) -> dict:
        qg, qr = emb[(query_boxes, split)]
        ag, ar = emb[(archive_boxes, "train")]
        return knn_votes(qg, qr, ag, ar, y["train"])

    test_votes = {v: votes(*qa, "test") for v, qa in variants.items()}
    val_votes = {v: votes(*qa, "val") for v, qa in variants.items()}
    patients = _patients(ds["test"])
    out: dict = {"labels": labels, "queries": len(ds["test"]), "archive": len(ds["train"])}
    for v in ("auto-query", "auto-all"):
        paired = {"global": test_votes["given"]["region"], "region": test_votes[v]["region"]}
        majority = summarise_votes(paired, y["test"], patients, labels, 0.5, n_boot)
        fitted = {"global": fit_vote_thresholds(val_votes["given"]["region"], y["val"]),
                  "region": fit_vote_thresholds(val_votes[v]["region"], y["val"])}
        calibrated = summarise_votes(paired, y["test"], patients, labels, fitted, n_boot)
        out[v] = {mode: {"macro_f1_given": s["macro_f1_global"], "macro_f1_auto": s["macro_f1_region"],
                         "macro_f1_delta": s["macro_f1_delta"],
                         "per_label_f1": {"given": s["per_label_f1"]["global"],
                                          "auto": s["per_label_f1"]["region"]}}
                  for mode, s in (("majority", majority), ("calibrated", calibrated))}
    # context: the global vote (no region rerank) on the same queries
    glob = summarise_votes({"global": test_votes["given"]["global"],
                            "region": test_votes["given"]["region"]}, y["test"], patients,
                           labels, 0.5, n_boot)
    out["global_majority_macro_f1"] = glob["macro_f1_global"]
    return out


def _fmt(ci: dict) -> str:
    return f"{ci['value']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]"


def _markdown(res: dict) -> str:
    iou, dx = res["iou"], res["diagnosis"]
    lines = ["| region | test IoU [95% CI] |", "|---|---|"]
    lines += [f"| {r} | {_fmt(iou[r])} |" for r in (*res["regions"], "mean")]
    lines += ["", f"test images {iou['images']}, patients {iou['mean']['n']}", "",
              "| boxes | threshold | macro F1 given | macro F1 auto | auto − given (paired) |",
              "|---|---|---|---|---|"]
    for v in ("auto-query", "auto-all"):
        for mode in ("majority", "calibrated"):
            s = dx[v][mode]
            lines.append(f"| {v} | {mode} | {_fmt(s['macro_f1_given'])} | "
                         f"{_fmt(s['macro_f1_auto'])} | {_fmt(s['macro_f1_delta'])} |")
    lines += ["", f"global vote (no rerank), majority: {_fmt(dx['global_majority_macro_f1'])}"]
    chest = res.get("chest_iou")
    if chest is not None:
        lines += ["", "| chest region (PA) | test IoU [95% CI] |", "|---|---|"]
        lines += [f"| {r} | {_fmt(chest[r])} |" for r in (*res["chest_regions"], "mean")]
        lines += ["", f"test PA films {chest['images']}, patients {chest['mean']['n']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from medseek.models.localiser import load_localiser, read_localiser_card

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=Path("/tmp/rel-wrist/corpus"),
                   help="the wrist corpus (rebuilt from the card's spec when missing)")
    p.add_argument("--chest-corpus", type=Path, default=Path("runs/localiser/chest-corpus"),
                   help="the synth-cxr corpus with anatomy boxes of the chest localiser's card "
                        "(rebuilt when missing; reads the IU reports of torchxrayvision)")
    p.add_argument("--out", type=Path, default=Path("runs/localiser"), help="results folder")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    card = read_localiser_card("wrist")
    corpus = _corpus(args.corpus, card["corpus"])
    localiser = load_localiser("wrist")
    res = {"regions": list(localiser.cfg.regions), "corpus": card["corpus"],
           "localiser_sha256": card["sha256"], "iou": _iou_section(localiser, corpus, args.n_boot)}
    res["diagnosis"] = _diagnosis_section(localiser, corpus, args.n_boot)
    from medseek.models.localiser import REGION_SETS

    res["chest_regions"] = list(REGION_SETS["chest"])
    res["chest_iou"] = _chest_section(args.chest_corpus, args.n_boot)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    md = _markdown(res)
    (args.out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

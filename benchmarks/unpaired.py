"""LGDEA unpaired evidence alignment vs paired-only vs fully paired (issue 17, part 3).

Each variant is trained and tested by :func:`medseek.train.ablation.run_variant` (same
seed, same corpus, patient-disjoint test split); ``--paired`` then reloads the
checkpoints and reports ``unpaired − paired-only`` and ``unpaired − fully-paired`` of
each metric on the same test patients (one patient bootstrap for both models)::

    nice -n 19 python benchmarks/unpaired.py --data /tmp/rel-cxr5k/corpus --out OUT --steps 400 \\
        --only unpaired-10,paired-only-10,fully-paired
    nice -n 19 python benchmarks/unpaired.py --data /tmp/rel-cxr5k/corpus --out OUT --paired-only-report

``--corpus wrist`` runs the same five variants on synth-wrist (recipes
``retrieval-wrist-unpaired`` / ``retrieval-wrist``: the region terms stay on, over the
pairs' regions only) and adds phrase grounding on the bone boxes
(:func:`medseek.eval.grounding.evaluate_grounding`: pointing accuracy with chance and
patient-bootstrap CIs, written to ``OUT/grounding/<variant>.json``; with
``--grounding-data DIR:SPLIT`` measured there instead, into ``OUT/grounding-<DIR name>-<SPLIT>/``
and ``OUT/paired-<DIR name>-<SPLIT>.json``) to every variant, the
kNN fracture macro-F1 of :func:`medseek.train.ablation.region_diagnosis` to the table,
and the grounding accuracies to the paired differences::

    nice -n 19 python benchmarks/unpaired.py --corpus wrist --data /tmp/rel-wrist/corpus --out OUT \\
        --steps 300 --only paired-only-10,unpaired-10,fully-paired
    nice -n 19 python benchmarks/unpaired.py --corpus wrist --data /tmp/rel-wrist/corpus --out OUT \\
        --paired-only-report --grounding-data /tmp/wristbig/corpus-s3-n1000:train

``--seed N`` (with its own ``--out``) is a replicate: another init, batch order and pairing
split. ``--release wrist`` trains nothing and grounds the shipped model (same sets).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

PAIRED_ONLY = {"unpaired": {"use_unpaired": False}, "loss": {"w_finding_unpaired": 0.0}}
# corpus -> (unpaired recipe, fully paired recipe, model config of its text tower)
CORPORA = {"cxr": ("retrieval-cxr-unpaired", "retrieval-cxr", "cxr-retrieval"),
           "wrist": ("retrieval-wrist-unpaired", "retrieval-wrist", "wrist-retrieval")}


def variants(corpus: str = "cxr") -> dict[str, tuple[str, dict]]:
    """The five variants of ``corpus``: name -> (recipe, overrides)."""
    recipe, full, _ = CORPORA[corpus]
    return {
        "unpaired-10": (recipe, {}),
        "paired-only-10": (recipe, PAIRED_ONLY),
        "fully-paired": (full, {}),
        "unpaired-25": (recipe, {"unpaired": {"pairs_kept": 0.25}}),
        "paired-only-25": (recipe, {"unpaired": {"pairs_kept": 0.25, "use_unpaired": False},
                                    "loss": {"w_finding_unpaired": 0.0}}),
    }


VARIANTS = variants("cxr")
CONTRASTS = (("unpaired-10", "paired-only-10"), ("unpaired-10", "fully-paired"),
             ("unpaired-25", "paired-only-25"), ("unpaired-25", "fully-paired"))


def _per_query(out: Path, name: str, data: Path, labels: dict, cache,
               ground: tuple[Path, str] | None = None) -> dict:
    """Per-query nDCG@10 and zero-shot scores of a trained variant on the test split."""
    from medseek.eval.classification import zero_shot_scores
    from medseek.eval.prompts import prompt_embeddings
    from medseek.train.ablation import load_variant_model, per_query_ndcg
    from medseek.train.data import PairDataset, load_tokenizer
    from medseek.train.loop import embed_dataset, encode_texts

    model, _ = load_variant_model(out, json.loads((out / f"{name}.json").read_text()))
    tok = load_tokenizer(model.cfg.text.max_length)
    test = PairDataset.from_manifest(data, model.cfg, "test")
    v, t = embed_dataset(model, test, tok, text_cache=cache)
    names = list(test.label_names)
    pe = prompt_embeddings(lambda xs: encode_texts(model, xs, tok, text_cache=cache), names)
    out = {**per_query_ndcg(v, test, t), "zs": zero_shot_scores(v, pe), "names": names}
    if model.cfg.preprocess.regions:  # phrase grounding on the boxes: per-query hits
        gdata, gsplit = ground or (data, "test")
        gds = test if ground is None else PairDataset.from_manifest(gdata, model.cfg, gsplit)
        out["grounding"] = _grounding_hits(model, gds, tok, cache)
    return out


def _grounding_hits(model, ds, tok, cache) -> dict:
    """Per-query pointing hits of ``model`` (``difference`` scoring) with each query's
    patient, ``{kind: (hits, patients)}``, and the region AUROC's ``(scores, truth,
    patients)``; the queries depend only on the labels, so two models' hits line up."""
    from medseek.eval.grounding import evaluate_grounding, grounding_queries, region_truth
    from medseek.train.ablation import _patients

    g = evaluate_grounding(model, ds, tok, text_cache=cache, n_boot=1)
    truth = region_truth([r.labels for r in ds.records], list(model.cfg.preprocess.regions), g["finding"])
    pid = _patients(ds)
    out = {kind: (g["difference"][kind]["hits"], pid[q["row"]]) for kind, q in grounding_queries(truth).items()}
    out["region_auroc"] = (g["region_auroc"]["scores"], truth, pid)
    return out


def paired_differences(out: Path, data: Path, cache, n_boot: int = 1000, seed: int = 0,
                       ground: tuple[Path, str] | None = None) -> dict:
    """``a − b`` for each contrast whose two variants were trained, same test patients."""
    from medseek.eval.classification import auroc
    from medseek.eval.grounding import mean_region_auroc
    from medseek.train.ablation import _cluster_mean_ci, _cluster_stat_ci

    have = {p.stem for p in out.glob("*.json") if (out / p.stem / "checkpoint.safetensors").is_file()}
    per: dict = {}
    res: dict = {}
    for a, b in CONTRASTS:
        if a not in have or b not in have:
            continue
        labels = json.loads((out / f"{a}.json").read_text())["labels"]
        for n in (a, b):
            if n not in per:
                per[n] = _per_query(out, n, data, labels, cache, ground)
        pa, pb = per[a], per[b]
        pid, first, y = pa["pid"], pa["first"], pa["y"]
        zl = [pa["names"].index(n) for n in labels["zero_shot"]]

        def mean_auc(zs: np.ndarray, rows: np.ndarray) -> float:
            vals = [auroc(zs[rows, j], y[rows, j]) for j in zl]
            vals = [x for x in vals if not math.isnan(x)]
            return float(np.mean(vals)) if vals else float("nan")

        res[f"{a} − {b}"] = {
            "i2i_ndcg@10": _cluster_stat_ci(lambda r: float(np.nanmean(pa["i2i"][r] - pb["i2i"][r])),
                                            pid, n_boot, seed),
            "t2i_ndcg@10": _cluster_stat_ci(lambda r: float(np.nanmean(pa["t2i"][r] - pb["t2i"][r])),
                                            pid[first], n_boot, seed),
            "zero_shot_auroc": _cluster_stat_ci(lambda r: mean_auc(pa["zs"], r) - mean_auc(pb["zs"], r),
                                                pid, n_boot, seed)}
        if "grounding" in pa:
            ga, gb = pa["grounding"], pb["grounding"]
            for kind in ("named", "finding_only"):
                (ha, qpid), (hb, _) = ga[kind], gb[kind]
                if len(ha):
                    res[f"{a} − {b}"][f"pointing_{kind}"] = _cluster_mean_ci(ha - hb, qpid, n_boot, seed)
            (sa, truth, gpid), (sb, _, _) = ga["region_auroc"], gb["region_auroc"]
            res[f"{a} − {b}"]["region_auroc"] = _cluster_stat_ci(
                lambda r: mean_region_auroc(sa, truth, r) - mean_region_auroc(sb, truth, r), gpid, n_boot, seed)
    return res


def _ground_tag(stem: str, ground: tuple[Path, str] | None) -> str:
    """``stem`` for ``--data``'s test split, ``stem-<corpus folder>-<split>`` otherwise."""
    return stem if ground is None else f"{stem}-{ground[0].name}-{ground[1]}"


def grounding_table(out: Path, data: Path, cache, order: list[str], n_boot: int = 1000,
                    ground: tuple[Path, str] | None = None) -> str:
    """Phrase grounding (on ``ground``'s corpus and split, default ``data``'s test split)
    and kNN fracture macro-F1 (``data``'s test split) of every trained variant in ``out``
    (``OUT/grounding/<variant>.json``); returns a markdown table."""
    from medseek.eval.grounding import evaluate_grounding, grounding_row
    from medseek.train.ablation import _fmt, load_variant_model
    from medseek.train.data import PairDataset, load_tokenizer

    folder = out / _ground_tag("grounding", ground)
    folder.mkdir(exist_ok=True)
    head = ["variant", "kNN fracture macro-F1 (region, calibrated)", "pointing, finding only",
            "chance / best constant", "− best constant", "pointing, named region", "chance / best constant",
            "region zero-shot AUROC", "pointing, finding only (plain cosine)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order:
        path = out / f"{name}.json"
        if not (out / name / "checkpoint.safetensors").is_file() or not path.is_file():
            continue
        row = json.loads(path.read_text())
        model, _ = load_variant_model(out, row)
        gdata, gsplit = ground or (data, "test")
        test = PairDataset.from_manifest(gdata, model.cfg, gsplit)
        g = grounding_row(evaluate_grounding(model, test, load_tokenizer(model.cfg.text.max_length),
                                             text_cache=cache, n_boot=n_boot))
        g["data"], g["split"] = str(gdata), gsplit
        (folder / f"{name}.json").write_text(json.dumps(g, indent=1, default=float))
        diag = (row["test"].get("region_diagnosis") or {}).get("calibrated", {})
        d, pos = g["difference"], g["positive"]
        f, nm = d["finding_only"], d["named"]
        lines.append(f"| {name} | {_fmt(diag.get('macro_f1_region'))} | {_fmt(f.get('accuracy'))} | "
                     f"{f['chance']:.3f} / {f.get('majority', float('nan')):.3f} | {_fmt(f.get('lift_majority'))} | "
                     f"{_fmt(nm.get('accuracy'))} | {nm['chance']:.3f} / {nm.get('majority', float('nan')):.3f} | "
                     f"{_fmt(g['region_auroc'])} | {_fmt(pos['finding_only'].get('accuracy'))} |")
    table = "\n".join(lines)
    (folder / "table.md").write_text(table + "\n")
    return table


def release_grounding(name: str, sets: list[tuple[Path, str]], cache, n_boot: int = 1000) -> dict:
    """Phrase grounding of the shipped release ``name`` (no training) on each
    ``(corpus, split)``: whether the shipped model grounds at all. Prints one row per
    set and scoring rule; returns ``{"corpus:split": grounding_row}``."""
    from medseek.eval.grounding import evaluate_grounding, grounding_row
    from medseek.models.release import load_release
    from medseek.train.ablation import _fmt
    from medseek.train.data import PairDataset, load_tokenizer

    model = load_release(name)
    tok = load_tokenizer(model.cfg.text.max_length)
    print("| set | scoring | images | named: queries, accuracy | chance / best constant | finding only: "
          "queries, accuracy | chance / best constant | − best constant | region zero-shot AUROC |")
    print("|" + "---|" * 9)
    res = {}
    for corpus, split in sets:
        ds = PairDataset.from_manifest(corpus, model.cfg, split)
        g = res[f"{corpus}:{split}"] = grounding_row(evaluate_grounding(model, ds, tok, text_cache=cache,
                                                                        n_boot=n_boot))
        for mode in ("positive", "difference"):
            nm, fo = g[mode]["named"], g[mode]["finding_only"]
            print(f"| {corpus.name}:{split} | {mode} | {len(ds)} | {nm['queries']}, {_fmt(nm['accuracy'])} | "
                  f"{nm['chance']:.3f} / {nm['majority']:.3f} | {fo['queries']}, {_fmt(fo['accuracy'])} | "
                  f"{fo['chance']:.3f} / {fo['majority']:.3f} | {_fmt(fo['lift_majority'])} | "
                  f"{_fmt(g['region_auroc'])} |", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    from medseek.models.factory import load_config
    from medseek.train.ablation import _fmt, run_variant, write_table
    from medseek.train.data import load_tokenizer
    from medseek.train.text_features import TextFeatureCache

    p = argparse.ArgumentParser(description="LGDEA unpaired evidence alignment measurement.")
    p.add_argument("--corpus", choices=sorted(CORPORA), default="cxr",
                   help="which recipes: synth-cxr / IU (cxr) or synth-wrist with grounding (wrist)")
    p.add_argument("--data", required=True, help="corpus with train, val and test splits")
    p.add_argument("--grounding-data", default="",
                   help="DIR:SPLIT to measure grounding on instead of --data's test split (e.g. a "
                        "fresh synth-wrist corpus of another seed, for more query patients)")
    p.add_argument("--out", required=True, help="folder for <variant>.json, table.md, paired.json")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every variant")
    p.add_argument("--only", default="", help=f"comma-separated variants of {list(VARIANTS)} (default: none)")
    p.add_argument("--seed", type=int, default=0,
                   help="recipe seed (init, batch order) and pairing seed (which patients stay paired); "
                        "a replicate goes into its own --out")
    p.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples")
    p.add_argument("--release", default="",
                   help="no training: phrase grounding of this shipped release (e.g. wrist) on --data's "
                        "test split and --grounding-data, into OUT/release-<name>.json")
    p.add_argument("--paired-only-report", action="store_true",
                   help="no training: paired differences of the variants already in OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, data = Path(args.out), Path(args.data)
    known = variants(args.corpus)
    ground = None
    if args.grounding_data:
        gdir, _, gsplit = args.grounding_data.rpartition(":")
        if not gdir or gsplit not in ("train", "val", "test"):
            raise SystemExit(f"--grounding-data must be DIR:SPLIT with SPLIT train, val or test, "
                             f"got {args.grounding_data!r}")
        ground = (Path(gdir), gsplit)
    cache = TextFeatureCache(load_tokenizer(load_config(CORPORA[args.corpus][2]).text.max_length))
    if args.release:
        sets = [(data, "test")] + ([ground] if ground else [])
        res = release_grounding(args.release, sets, cache, n_boot=args.n_boot)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"release-{args.release}.json").write_text(json.dumps(res, indent=1, default=float))
        return 0
    chosen = [v for v in args.only.split(",") if v]
    bad = sorted(set(chosen) - set(known))
    if bad:
        raise SystemExit(f"unknown variants {bad}; known: {list(known)}")
    for name in [] if args.paired_only_report else chosen:
        recipe, over = known[name]
        if args.seed:
            over = {**over, "seed": args.seed,
                    "unpaired": {**over.get("unpaired", {}), "seed": args.seed}}
        t0 = time.perf_counter()
        rows = run_variant(name, recipe, over, data, out, steps=args.steps, text_cache=cache,
                           n_boot=args.n_boot)
        te = rows[name]["test"]
        print(f"{name}: i2i {_fmt(te['i2i_ndcg@10'])}, t2i {_fmt(te['t2i_ndcg@10'])}, zero-shot "
              f"{_fmt(te['zero_shot_auroc'])}, {time.perf_counter() - t0:.0f} s", flush=True)
    print(write_table(out, order=list(known)))
    if args.corpus == "wrist":
        print(grounding_table(out, data, cache, list(known), n_boot=args.n_boot, ground=ground))
    diffs = paired_differences(out, data, cache, n_boot=args.n_boot, ground=ground)
    (out / f"{_ground_tag('paired', ground)}.json").write_text(json.dumps(diffs, indent=1))
    for contrast, metrics in diffs.items():
        print(contrast, ", ".join(f"{k} {_fmt(m)}" for k, m in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

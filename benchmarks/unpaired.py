"""LGDEA unpaired evidence alignment vs paired-only vs fully paired (issue 17, part 3).

Each variant is trained and tested by :func:`medseek.train.ablation.run_variant` (same
seed, same corpus, patient-disjoint test split); ``--paired`` then reloads the
checkpoints and reports ``unpaired − paired-only`` and ``unpaired − fully-paired`` of
each metric on the same test patients (one patient bootstrap for both models)::

    nice -n 19 python benchmarks/unpaired.py --data /tmp/rel-cxr5k/corpus --out OUT --steps 400 \\
        --only unpaired-10,paired-only-10,fully-paired
    nice -n 19 python benchmarks/unpaired.py --data /tmp/rel-cxr5k/corpus --out OUT --paired-only-report
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

RECIPE = "retrieval-cxr-unpaired"
PAIRED_ONLY = {"unpaired": {"use_unpaired": False}, "loss": {"w_finding_unpaired": 0.0}}
VARIANTS: dict[str, tuple[str, dict]] = {
    "unpaired-10": (RECIPE, {}),
    "paired-only-10": (RECIPE, PAIRED_ONLY),
    "fully-paired": ("retrieval-cxr", {}),
    "unpaired-25": (RECIPE, {"unpaired": {"pairs_kept": 0.25}}),
    "paired-only-25": (RECIPE, {"unpaired": {"pairs_kept": 0.25, "use_unpaired": False},
                                "loss": {"w_finding_unpaired": 0.0}}),
}
CONTRASTS = (("unpaired-10", "paired-only-10"), ("unpaired-10", "fully-paired"),
             ("unpaired-25", "paired-only-25"), ("unpaired-25", "fully-paired"))


def _per_query(out: Path, name: str, data: Path, labels: dict, cache) -> dict:
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
    return {**per_query_ndcg(v, test, t), "zs": zero_shot_scores(v, pe), "names": names}


def paired_differences(out: Path, data: Path, cache, n_boot: int = 1000, seed: int = 0) -> dict:
    """``a − b`` for each contrast whose two variants were trained, same test patients."""
    from medseek.eval.classification import auroc
    from medseek.train.ablation import _cluster_stat_ci

    have = {p.stem for p in out.glob("*.json") if (out / p.stem / "checkpoint.safetensors").is_file()}
    per: dict = {}
    res: dict = {}
    for a, b in CONTRASTS:
        if a not in have or b not in have:
            continue
        labels = json.loads((out / f"{a}.json").read_text())["labels"]
        for n in (a, b):
            if n not in per:
                per[n] = _per_query(out, n, data, labels, cache)
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
    return res


def main(argv: list[str] | None = None) -> int:
    from medseek.models.factory import load_config
    from medseek.train.ablation import _fmt, run_variant, write_table
    from medseek.train.data import load_tokenizer
    from medseek.train.text_features import TextFeatureCache

    p = argparse.ArgumentParser(description="LGDEA unpaired evidence alignment measurement.")
    p.add_argument("--data", required=True, help="corpus with train, val and test splits")
    p.add_argument("--out", required=True, help="folder for <variant>.json, table.md, paired.json")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every variant")
    p.add_argument("--only", default="", help=f"comma-separated variants of {list(VARIANTS)} (default: none)")
    p.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples")
    p.add_argument("--paired-only-report", action="store_true",
                   help="no training: paired differences of the variants already in OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, data = Path(args.out), Path(args.data)
    cache = TextFeatureCache(load_tokenizer(load_config("cxr-retrieval").text.max_length))
    chosen = [v for v in args.only.split(",") if v]
    bad = sorted(set(chosen) - set(VARIANTS))
    if bad:
        raise SystemExit(f"unknown variants {bad}; known: {list(VARIANTS)}")
    for name in [] if args.paired_only_report else chosen:
        recipe, over = VARIANTS[name]
        t0 = time.perf_counter()
        rows = run_variant(name, recipe, over, data, out, steps=args.steps, text_cache=cache,
                           n_boot=args.n_boot)
        te = rows[name]["test"]
        print(f"{name}: i2i {_fmt(te['i2i_ndcg@10'])}, t2i {_fmt(te['t2i_ndcg@10'])}, zero-shot "
              f"{_fmt(te['zero_shot_auroc'])}, {time.perf_counter() - t0:.0f} s", flush=True)
    print(write_table(out, order=list(VARIANTS)))
    diffs = paired_differences(out, data, cache, n_boot=args.n_boot)
    (out / "paired.json").write_text(json.dumps(diffs, indent=1))
    for contrast, metrics in diffs.items():
        print(contrast, ", ".join(f"{k} {_fmt(m)}" for k, m in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""PhenoLIP phenotype knowledge (issue 17, part 2): the same recipe with and without the
ontology-distillation term, trained on a corpus whose held-out phenotypes were masked
from the training text, then measured on the untouched patient-disjoint test split.

    nice -n 19 python benchmarks/pheno.py --data /tmp/rel-cxr5k/corpus --out runs/pheno-s0 \\
        --steps 500 --seed 0 --heldout "cardiomegaly,pleural effusion,atelectasis,calcified granuloma"

(``--only base`` / ``--only pheno`` train one variant, e.g. in two processes; copy one
variant's ``<name>.json`` and ``<name>/`` into the other's folder and run again to get
the joint table and ``paired.json``, the paired ``pheno − base`` differences.)

Rows: ``base`` = recipe ``retrieval-cxr``; ``pheno`` = ``retrieval-cxr-pheno`` (the same
plus ``w_pheno``). Both are trained by :func:`medseek.train.ablation.run_variant` (test
metrics, patient-bootstrap CIs); this script adds, per trained model:

* zero-shot AUROC on the held-out phenotypes, with prompts from the lexicon word and
  with prompts from the HPO term alone (name, synonyms, definition);
* synonym robustness: zero-shot AUROC on the seen labels whose HPO term has other names,
  prompted with those HPO synonyms instead of the label word (and, on the same labels,
  with the word, for comparison).

Results: ``OUT/pheno_table.md`` and ``OUT/pheno_table.json``; the stage-1 space is cached
as ``OUT/pheno_space.npz``, the masked corpus as ``OUT/corpus``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = (("base", "retrieval-cxr"), ("pheno", "retrieval-cxr-pheno"))


def _labels(data: Path, heldout_labels: list[str]) -> dict:
    """The ablation's label choice, with the held-out labels taken out of the seen set."""
    from medseek.models.factory import load_config
    from medseek.train.ablation import choose_labels
    from medseek.train.data import PairDataset
    from medseek.train.recipe import load_recipe

    cfg = load_config(load_recipe("retrieval-cxr").model)
    train = PairDataset.from_manifest(data, cfg, "train")
    test = PairDataset.from_manifest(data, cfg, "test")
    labels = choose_labels(train, test)
    labels["held_out"] = [lab for lab in heldout_labels if lab in labels["zero_shot"]]
    labels["zero_shot"] = [lab for lab in labels["zero_shot"] if lab not in heldout_labels]
    labels["zero_shot_rarer_half"] = [lab for lab in labels["zero_shot_rarer_half"] if lab not in heldout_labels]
    return labels


def _load_variant(out: Path, name: str, data: Path, cache):
    """The trained variant's test split, image and report embeddings, and a prompt encoder."""
    from medseek.train.ablation import load_variant_model
    from medseek.train.data import PairDataset, load_tokenizer
    from medseek.train.loop import embed_dataset, encode_texts

    model, _ = load_variant_model(out, json.loads((out / f"{name}.json").read_text()))
    tok = load_tokenizer(model.cfg.text.max_length)
    test = PairDataset.from_manifest(data, model.cfg, "test")
    v, t = embed_dataset(model, test, tok, text_cache=cache)

    def encode(texts):
        return encode_texts(model, list(texts), tok, text_cache=cache)

    return test, v, t, encode


def _extra_metrics(out: Path, name: str, data: Path, labels: dict, cache, n_boot: int) -> dict:
    """Held-out and synonym zero-shot of the trained variant ``name``."""
    from medseek.eval.prompts import report_prompts
    from medseek.train.pheno import hpo_prompt_sets, zero_shot_with

    test, v, _, encode = _load_variant(out, name, data, cache)
    held = labels["held_out"]
    res = {"held_out_word": zero_shot_with(encode, v, test, held, [report_prompts(lab) for lab in held], n_boot),
           "held_out_hpo": zero_shot_with(encode, v, test, held,
                                          [hpo_prompt_sets(lab, "name") for lab in held], n_boot)}
    syn = [lab for lab in labels["zero_shot"] if hpo_prompt_sets(lab, "synonyms")[0]]
    res["seen_synonym_labels"] = syn
    res["seen_word"] = zero_shot_with(encode, v, test, syn, [report_prompts(lab) for lab in syn], n_boot)
    res["seen_hpo_synonyms"] = zero_shot_with(encode, v, test, syn,
                                              [hpo_prompt_sets(lab, "synonyms") for lab in syn], n_boot)
    return res


def paired_differences(out: Path, data: Path, labels: dict, cache, n_boot: int, seed: int = 0) -> dict:
    """``pheno − base`` of each metric on the same test patients, with a bootstrap CI that
    resamples patients once for both models (paired: tighter than comparing two CIs)."""
    import math

    from medseek.eval.classification import auroc, zero_shot_scores
    from medseek.eval.prompts import report_prompts
    from medseek.train.ablation import _cluster_stat_ci, per_query_ndcg
    from medseek.train.pheno import hpo_prompt_sets, prompt_bank

    seen, held = labels["zero_shot"], labels["held_out"]
    syn = [lab for lab in seen if hpo_prompt_sets(lab, "synonyms")[0]]
    per: dict = {}
    for name, _ in VARIANTS:
        test, v, t, encode = _load_variant(out, name, data, cache)
        q = per_query_ndcg(v, test, t)
        y, pid, first = q["y"], q["pid"], q["first"]
        per[name] = {
            "i2i": q["i2i"], "t2i": q["t2i"],
            "seen": zero_shot_scores(v, prompt_bank(encode, [report_prompts(lab) for lab in seen])),
            "held_hpo": zero_shot_scores(v, prompt_bank(encode, [hpo_prompt_sets(lab, "name") for lab in held])),
            "syn": zero_shot_scores(v, prompt_bank(encode, [hpo_prompt_sets(lab, "synonyms") for lab in syn]))}
    col = {lab: j for j, lab in enumerate(test.label_names)}

    def mean_auc(zs: np.ndarray, names: list[str], rows: np.ndarray) -> float:
        vals = [auroc(zs[rows, k], y[rows, col[lab]]) for k, lab in enumerate(names)]
        vals = [a for a in vals if not math.isnan(a)]
        return float(np.mean(vals)) if vals else float("nan")

    b, p = per["base"], per["pheno"]
    res = {"i2i_ndcg@10": _cluster_stat_ci(lambda r: float(np.nanmean(p["i2i"][r] - b["i2i"][r])), pid, n_boot, seed),
           "t2i_ndcg@10": _cluster_stat_ci(lambda r: float(np.nanmean(p["t2i"][r] - b["t2i"][r])), pid[first],
                                           n_boot, seed)}
    for key, zs, names in (("zero_shot_seen", "seen", seen), ("held_out_hpo", "held_hpo", held),
                           ("seen_hpo_synonyms", "syn", syn)):
        res[key] = _cluster_stat_ci(lambda r, k=zs, n=names: mean_auc(p[k], n, r) - mean_auc(b[k], n, r),
                                    pid, n_boot, seed)
    return res


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def write_table(out: Path, info: dict) -> str:
    rows = {n: json.loads((out / f"{n}.json").read_text()) for n, _ in VARIANTS if (out / f"{n}.json").is_file()}
    head = ["variant", "recipe", "steps × batch", "i2i nDCG@10", "t2i nDCG@10", "zero-shot AUROC (seen)",
            "held-out, word prompts", "held-out, HPO prompts", "seen, word (syn. labels)",
            "seen, HPO synonyms", "train wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, recipe in VARIANTS:
        if n not in rows or "pheno_eval" not in rows[n]:
            continue
        r, te, pe = rows[n], rows[n]["test"], rows[n]["pheno_eval"]
        lines.append("| " + " | ".join([
            n, recipe, f"{r['steps']} × {r['recipe']['batch_size']}", _fmt(te["i2i_ndcg@10"]),
            _fmt(te["t2i_ndcg@10"]), _fmt(te["zero_shot_auroc"]), _fmt(pe["held_out_word"]),
            _fmt(pe["held_out_hpo"]), _fmt(pe["seen_word"]), _fmt(pe["seen_hpo_synonyms"]),
            f"{r.get('train_wall_s', 0.0):.0f}"]) + " |")
    diff_path = out / "paired.json"
    if diff_path.is_file():
        d = json.loads(diff_path.read_text())
        lines.append("| pheno − base (paired) | | | " + " | ".join(
            _fmt(d[k]) for k in ("i2i_ndcg@10", "t2i_ndcg@10", "zero_shot_seen")) + " | | "
            + _fmt(d["held_out_hpo"]) + " | | " + _fmt(d["seen_hpo_synonyms"]) + " | |")
    any_row = next(iter(rows.values()))
    pe = any_row.get("pheno_eval", {})
    lines += ["", f"Held out (masked from train/val text and labels): {', '.join(info['held_out'])} "
              f"({info['reports_masked']} reports lost sentences, {info['labels_dropped']} labels dropped); "
              f"evaluated held-out labels: {', '.join(any_row['labels']['held_out'])}.",
              f"Seen zero-shot labels: {len(any_row['labels']['zero_shot'])}; synonym test on "
              f"{len(pe.get('seen_synonym_labels', []))} of them: {', '.join(pe.get('seen_synonym_labels', []))}.",
              "Per held-out label AUROC (HPO prompts): " + "; ".join(
                  f"{n}: " + ", ".join(f"{lab} {a:.3f}" for lab, a in rows[n]["pheno_eval"]["held_out_hpo"].get(
                                        "per_label", {}).items()) for n in rows if "pheno_eval" in rows[n]),
              f"95 % CIs resample test patients ({any_row['test'].get('n_boot')} resamples)."]
    md = "\n".join(lines) + "\n"
    (out / "pheno_table.md").write_text(md)
    (out / "pheno_table.json").write_text(json.dumps(rows, indent=1))
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="PhenoLIP ontology distillation vs the same recipe without it.")
    p.add_argument("--data", required=True, help="source corpus (train/val/test splits)")
    p.add_argument("--out", required=True, help="run folder (masked corpus, space, variants, tables)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of each variant")
    p.add_argument("--heldout", default="cardiomegaly,pleural effusion,atelectasis,calcified granuloma",
                   help="comma-separated lexicon findings masked from the training text")
    p.add_argument("--only", default="", help="comma-separated variants to train (default: both)")
    p.add_argument("--seed", type=int, default=0, help="training seed of both variants (init and data order)")
    p.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from medseek.models.factory import load_config
    from medseek.train.ablation import run_variant
    from medseek.train.data import load_tokenizer
    from medseek.train.pheno import install_teacher, phenotype_space, write_holdout_corpus
    from medseek.train.recipe import load_recipe
    from medseek.train.text_features import TextFeatureCache

    out = Path(args.out)
    heldout = [h.strip() for h in args.heldout.split(",") if h.strip()]
    corpus = out / "corpus"
    if (corpus / "holdout.json").is_file():
        info = json.loads((corpus / "holdout.json").read_text())
        if info["held_out"] != sorted(heldout):
            raise SystemExit(f"{corpus} holds out {info['held_out']}, not {sorted(heldout)}: use another --out")
    else:
        info = write_holdout_corpus(args.data, corpus, heldout)
    install_teacher(phenotype_space(out))
    labels = _labels(corpus, heldout)
    cache = TextFeatureCache(load_tokenizer(load_config(load_recipe("retrieval-cxr").model).text.max_length))
    cache_path = out / "text_features.pt"
    if cache_path.is_file():
        cache.load(cache_path)
    chosen = [v for v in args.only.split(",") if v] or [n for n, _ in VARIANTS]
    for name, recipe in VARIANTS:
        if name in chosen and not (out / f"{name}.json").is_file():
            t0 = time.perf_counter()
            run_variant(name, recipe, {"seed": args.seed}, corpus, out, steps=args.steps, text_cache=cache,
                        labels=labels, n_boot=args.n_boot)
            cache.save(cache_path)
            print(f"{name}: trained and tested in {time.perf_counter() - t0:.0f} s", flush=True)
        path = out / f"{name}.json"
        if path.is_file():
            row = json.loads(path.read_text())
            if "pheno_eval" not in row:
                row["pheno_eval"] = _extra_metrics(out, name, corpus, labels, cache, args.n_boot)
                path.write_text(json.dumps(row, indent=1))
    if all((out / f"{n}.json").is_file() for n, _ in VARIANTS) and not (out / "paired.json").is_file():
        diff = paired_differences(out, corpus, labels, cache, args.n_boot)
        (out / "paired.json").write_text(json.dumps(diff, indent=1))
    print(write_table(out, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

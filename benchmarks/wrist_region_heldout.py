"""The shipped wrist model's fracture diagnosis, global vs region rerank, on many more
query patients than its card's 60: the archive of prior cases is the release corpus's
train split and the vote thresholds are fitted on its val split (as in the card), the
queries are a fresh synth-wrist corpus of another seed, which no training saw (each of its
splits is queried on its own; all are unseen). Scored by
:func:`medseek.train.ablation.region_diagnosis` (macro F1 over the three fracture labels,
patient-bootstrap CIs, the region - global difference paired)::

    python benchmarks/wrist_region_heldout.py --release-corpus DIR --n 1000 --seed 3 \\
        --out runs/wrist_heldout

``DIR``: the release's corpus (``medseek train --release wrist --out D`` builds it in
``D/corpus``; or ``medseek.train.release.build_release_corpus``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--release-corpus", type=Path, required=True)
    p.add_argument("--n", type=int, default=1000, help="studies of the fresh corpus")
    p.add_argument("--seed", type=int, default=3, help="its seed (the release used 1)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from medseek.data.synth.wrist import build_synth_wrist
    from medseek.models.release import load_release, read_card
    from medseek.train.ablation import region_diagnosis
    from medseek.train.data import PairDataset

    torch.set_num_threads(args.threads)
    if read_card("wrist")["corpus"]["seed"] == args.seed:
        raise SystemExit(f"--seed {args.seed} is the release corpus's own seed: pick another")
    corpus = args.out / f"corpus-seed{args.seed}-n{args.n}"
    t0 = time.perf_counter()
    if not (corpus / "manifest.parquet").is_file():
        build_synth_wrist(corpus, n=args.n, seed=args.seed, size=128, progress=False)
    model = load_release("wrist")
    archive = PairDataset.from_manifest(args.release_corpus, model.cfg, "train")
    val = PairDataset.from_manifest(args.release_corpus, model.cfg, "val")
    result = {}
    for split in ("train", "val", "test"):
        queries = PairDataset.from_manifest(corpus, model.cfg, split)
        result[split] = region_diagnosis(model, archive, queries, val, n_boot=1000)
        for vote in ("majority", "calibrated"):
            r = result[split][vote]
            cells = [f"{r[k]['value']:.3f} [{r[k]['lo']:.3f}, {r[k]['hi']:.3f}]"
                     for k in ("macro_f1_global", "macro_f1_region", "macro_f1_delta")]
            print(f"| {split} | {vote} | {r['queries']} | {r['patients']} | " + " | ".join(cells)
                  + " |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wrist_region_heldout.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

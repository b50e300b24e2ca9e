"""The shipped chest CT model's report→volume retrieval on many more queries than its
card's 100: a fresh synth-ct corpus of another seed, which no training saw, cut into
galleries of ``--gallery`` volumes (the card's test split has 100, so chance R@5 is the
same 5/100); each volume's report queries its own gallery. R@K is pooled over every
query, with a bootstrap CI over volumes (one patient each).

Organ sentence→volume likewise, per gallery: every abnormal organ sentence of a gallery
volume queries that gallery, and the relevant volumes are those holding every finding
the sentence names at its site (:func:`medseek.train.ablation.organ_sentence_queries`);
its chance level (a random ranking) is printed with it, and the old own-volume-only
recall beside it. ``--release`` scores another release (a card's ``.json`` path) than
the shipped one::

    python benchmarks/ct_heldout.py --n 500 --seed 3 --out runs/ct_heldout
    python benchmarks/ct_heldout.py --release /tmp/ct-new/chest-ct.json --out runs/ct_heldout
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="volumes of the fresh corpus")
    p.add_argument("--seed", type=int, default=3, help="its seed (the release used 1)")
    p.add_argument("--gallery", type=int, default=100)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--release", default="chest-ct",
                   help="release name or card path (the corpus spec is read from it)")
    args = p.parse_args(argv)

    import torch

    from medseek.data.synth.ct import build_synth_ct
    from medseek.eval.bootstrap import bootstrap_ci
    from medseek.eval.metrics import hits_at_k
    from medseek.models.release import load_release, read_card
    from medseek.train.ablation import _cluster_mean_ci, chance_hit_at_k, organ_sentence_queries
    from medseek.train.data import PairDataset, load_tokenizer
    from medseek.train.loop import embed_dataset, encode_texts
    from medseek.train.text_features import TextFeatureCache

    torch.set_num_threads(args.threads)
    spec = read_card(args.release)["corpus"]
    if spec["seed"] == args.seed:
        raise SystemExit(f"--seed {args.seed} is the release corpus's own seed: pick another")
    corpus = args.out / f"corpus-seed{args.seed}-n{args.n}"
    t0 = time.perf_counter()
    if not (corpus / "manifest.parquet").is_file():
        build_synth_ct(corpus, n=args.n, seed=args.seed, matrix=tuple(spec["matrix"]),
                       slices=tuple(spec["slices"]), progress=False)
    print(f"corpus {time.perf_counter() - t0:.0f} s", flush=True)
    model = load_release(args.release)
    tok = load_tokenizer(model.cfg.text.max_length)
    ds = PairDataset.from_manifest(corpus, model.cfg, None)  # every split: all unseen
    order = np.random.default_rng(0).permutation(len(ds))
    ks = (1, 5, 10)
    hits, organ, organ_own, organ_chance, organ_vol = [], [], [], [], []
    cache = TextFeatureCache(tok)
    for g in range(len(ds) // args.gallery):
        sub = ds.subset(order[g * args.gallery:(g + 1) * args.gallery])
        v, t = embed_dataset(model, sub, tok, text_cache=cache)
        study = np.array([r.study_id or r.id for r in sub.records])
        own = study[:, None] == study[None, :]
        hits.append(hits_at_k(t @ v.T, own, list(ks)))
        rows, texts, relevant = organ_sentence_queries(sub)
        if texts:
            so = encode_texts(model, texts, tok, text_cache=cache) @ v.T
            organ.append(hits_at_k(so, relevant, list(ks)))
            organ_own.append(hits_at_k(so, np.asarray(rows), list(ks)))
            organ_vol += [sub.records[i].id for i in rows]
            organ_chance.append(np.stack([chance_hit_at_k(relevant.sum(1), len(sub), k) for k in ks], 1))
        print(f"gallery {g}: R@5 {hits[-1][:, 1].mean():.3f}, organ R@5 "
              f"{organ[-1][:, 1].mean() if texts else float('nan'):.3f}", flush=True)
    hits = np.concatenate(hits).astype(np.float64)
    chance = {k: k / args.gallery for k in ks}
    result = {"release": str(args.release), "queries": int(len(hits)), "gallery": args.gallery,
              "seed": args.seed}
    for j, k in enumerate(ks):
        est, lo, hi = bootstrap_ci(hits[:, j], n_boot=1000, seed=0)
        result[f"recall@{k}"] = {"value": est, "lo": lo, "hi": hi, "chance": chance[k]}
        print(f"report->volume R@{k}: {est:.3f} [{lo:.3f}, {hi:.3f}] = {est / chance[k]:.1f}x "
              f"chance [{lo / chance[k]:.1f}, {hi / chance[k]:.1f}] ({len(hits)} queries)",
              flush=True)
    if organ:  # as the card: mean over volumes (= patients) of their queries' hits, CI over volumes
        organ, organ_own = np.concatenate(organ), np.concatenate(organ_own)
        organ_chance, vol = np.concatenate(organ_chance), np.array(organ_vol)
        for j, k in enumerate(ks):
            r = _cluster_mean_ci(organ[:, j], vol, 1000, 0)
            o = _cluster_mean_ci(organ_own[:, j], vol, 1000, 0)
            c = float(np.mean([organ_chance[vol == x, j].mean() for x in np.unique(vol)]))
            result[f"organ2v_recall@{k}"] = {**r, "chance": c}
            result[f"organ2v_own_recall@{k}"] = {**o, "chance": chance[k]}
            print(f"organ sentence->volume R@{k}: {r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}], "
                  f"chance {c:.3f}; own volume only {o['value']:.3f} [{o['lo']:.3f}, {o['hi']:.3f}] "
                  f"({len(organ)} queries, {r['n']} volumes)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ct_heldout.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Two weight files of one image release, paired on the same test queries: image→image
and report→image nDCG@10 of each (``medseek.train.ablation.per_query_ndcg``: Jaccard label
overlap, own patient excluded, one report query per study) and the per-query difference
``new − old`` with a patient-bootstrap CI, which is tighter than comparing two CIs.

``--old-vision`` builds the old weights' model with other vision settings than today's
config, e.g. a release made before ``pool`` became ``"mean"``::

    git show REV:python/medseek/models/weights/chest-xr.safetensors > /tmp/old.safetensors
    python benchmarks/release_paired.py --data /tmp/rel-cxr5k/corpus \\
        --old /tmp/old.safetensors --old-vision '{"pool": "cls"}'

``--new`` defaults to the shipped release's weights; the model config is the release
card's (``--release``, default ``chest-xr``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def load_weights(config: str, path: str, vision: dict):
    """The model of ``config`` with ``vision`` overrides and the weights in ``path``
    (a release file: the pretrained text tower may be left out of it)."""
    from safetensors.torch import load_file

    from medseek.models.factory import create_model

    model = create_model(config, pretrained_text=True, vision=vision)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text.")]
    if missing or unexpected:
        raise SystemExit(f"{path} does not fit {config} with vision {vision}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the release's corpus (its test split is scored)")
    p.add_argument("--release", default="chest-xr", help="release name or card path")
    p.add_argument("--new", default=None, help="weights (default: the release's own)")
    p.add_argument("--old", required=True, help="weights to compare against")
    p.add_argument("--old-vision", default="{}", help="JSON vision overrides for --old")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file of the results")
    args = p.parse_args(argv)

    import torch

    from medseek.models.release import _paths, read_card
    from medseek.train.ablation import _cluster_mean_ci, per_query_ndcg
    from medseek.train.data import PairDataset, load_tokenizer
    from medseek.train.loop import embed_dataset
    from medseek.train.text_features import TextFeatureCache

    torch.set_num_threads(args.threads)
    config = read_card(args.release)["model"]
    new_path = args.new or str(_paths(args.release)[0])
    models = {"new": load_weights(config, new_path, {}),
              "old": load_weights(config, args.old, json.loads(args.old_vision))}
    tokenizer = load_tokenizer(models["new"].cfg.text.max_length)
    cache = TextFeatureCache(tokenizer)
    per = {}
    for name, model in models.items():
        test = PairDataset.from_manifest(args.data, model.cfg, "test")
        with torch.inference_mode():
            v, t = embed_dataset(model, test, tokenizer, text_cache=cache)
        per[name] = per_query_ndcg(v, test, t)
    pid, first = per["new"]["pid"], per["new"]["first"]
    out = {}
    for key, clusters in (("i2i", pid), ("t2i", pid[first])):
        for name in ("new", "old"):
            out[f"{key}_ndcg@10_{name}"] = _cluster_mean_ci(per[name][key], clusters, args.n_boot, 0)
        out[f"{key}_ndcg@10_delta"] = _cluster_mean_ci(per["new"][key] - per["old"][key], clusters,
                                                       args.n_boot, 0)
    for key, m in out.items():
        print(f"{key:22s} {m['value']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}]  n={m['n']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: {kk: (float(vv) if isinstance(vv, (float, np.floating)) else vv)
                           for kk, vv in m.items()} for k, m in out.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

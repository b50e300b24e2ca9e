"""The small federated grid of medseek issue 17 (benchmarks/RESULTS.md, "Federated training").

    nice -n 19 python benchmarks/federated_grid.py --data /tmp/rel-cxr5k/corpus --out /tmp/fedgrid \
        [--clients 4 --rounds 3 --local-steps 10] [--only fedavg-iid,centralized]

FedAvg, FedProx and FedNova on IID, Dirichlet(0.2), Dirichlet(0.8) and site (patient-id
hash) partitions, and FedAvg-IID with two one-modality clients (``fedavg-iid-missing``:
client 2 radiographs only, client 3 reports only) and with those two clients' data left
out (``fedavg-iid-dropped``, the control), all on real Flower server and client
processes on 127.0.0.1; and the centralized recipe trained for the same total number of
optimizer steps (clients × rounds × local steps) with :func:`medseek.train.ablation.run_variant`.
Every run is evaluated on the patient-disjoint test split with
:func:`medseek.train.ablation.evaluate_split`; rows go to ``OUT/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def grid_recipe(out: Path, warmup: int) -> str:
    """retrieval-cxr with a warm-up that fits a short run (the shipped 50 steps would
    cover the whole of a 30-step federated schedule)."""
    from medseek.train.recipe import load_recipe

    raw = load_recipe("retrieval-cxr").to_dict()
    raw["optim"]["warmup_steps"] = warmup
    raw["eval_every"], raw["save_every"] = 0, 0
    raw.pop("name", None)
    path = out / "retrieval-cxr-fedgrid.json"
    path.write_text(json.dumps(raw, indent=1))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    import torch

    from medseek.train.federated import evaluate_federated, load_federated_config, run_federated

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="corpus directory (manifest.parquet)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--clients", type=int, default=4, help="number of clients")
    ap.add_argument("--rounds", type=int, default=3, help="federated rounds")
    ap.add_argument("--local-steps", type=int, default=10, help="local optimizer steps per round")
    ap.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight")
    ap.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples of the CIs")
    ap.add_argument("--only", default=None, help="comma-separated run names to do")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = grid_recipe(out, warmup=max(1, args.rounds * args.local_steps // 10))
    runs = {f"{s}-{p}": (s, p) for p in ("iid", "dir0.2", "dir0.8", "site")
            for s in ("fedavg", "fedprox", "fednova")}
    # missing modality: client 2 holds radiographs only, client 3 reports only; the
    # control leaves those two clients' data out
    runs["fedavg-iid-missing"] = ("fedavg", "iid")
    runs["fedavg-iid-dropped"] = ("fedavg", "iid")
    names = [*runs, "centralized", "untrained"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    total = args.clients * args.rounds * args.local_steps
    for name in names:
        t0 = time.perf_counter()
        if name == "untrained":  # the seed's initial model: what every run starts from
            fc = load_federated_config({"recipe": recipe, "data": args.data, "out": str(out / name)})
            row = {"name": name, "steps": 0, "bytes_per_round": 0,
                   "test": evaluate_federated(fc, n_boot=args.n_boot, initial=True)}
        elif name == "centralized":
            from medseek.train.ablation import run_variant

            rows = run_variant("centralized", recipe, {}, args.data, out / "centralized-run", steps=total,
                               n_boot=args.n_boot)
            row = {"name": name, "steps": total, "test": rows["centralized"]["test"],
                   "bytes_per_round": 0}
        else:
            strategy, part = runs[name]
            missing = {}
            if args.clients >= 4 and name.endswith("-missing"):
                missing = {"2": "image", "3": "report"}
            elif args.clients >= 4 and name.endswith("-dropped"):
                missing = {"2": "none", "3": "none"}
            fc = load_federated_config({
                "recipe": recipe, "data": args.data, "out": str(out / name), "clients": args.clients,
                "rounds": args.rounds, "local_steps": args.local_steps, "strategy": strategy, "mu": args.mu,
                "partition": "dirichlet" if part.startswith("dir") else part,
                "alpha": float(part[3:]) if part.startswith("dir") else 0.2, "missing": missing})
            summary = run_federated(fc, nice=19)
            row = {"name": name, "steps": total, "bytes_per_round": summary["bytes_per_round"],
                   "rounds": summary["rounds"], "test": evaluate_federated(fc, n_boot=args.n_boot)}
        row["wall_s"] = time.perf_counter() - t0
        (out / f"{name}.json").write_text(json.dumps(row, indent=1))
        t = row["test"]
        print(name, {k: t.get(k) for k in ("i2i_ndcg@10", "t2i_ndcg@10", "zero_shot_auroc")},
              f"{row['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

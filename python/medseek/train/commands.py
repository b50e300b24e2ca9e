"""``medseek train``: train a dual encoder from a recipe on a manifest corpus.

    medseek train --recipe tiny-wrist --data corpora/synth-wrist --out runs/wrist [--steps N] [--resume]
    medseek train --release chest-xr --out runs/release-chest-xr     # reproduce a shipped model
    medseek train --localiser wrist --out runs/localiser-wrist       # the region box localiser

Writes ``RUN_DIR/recipe.json`` (the resolved recipe), ``metrics.jsonl``,
``curation.json`` (when the recipe curates) and ``checkpoint.safetensors``. Under
``torchrun`` (``RANK``/``WORLD_SIZE`` set by torchrun, read here in the command, not in
the library) it joins a process group: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a dual encoder from a recipe",
                              description="Train a dual encoder (medseek.train) from a recipe.")
    p.add_argument("--recipe", help="recipe name (tiny-cxr, tiny-wrist, tiny-ct, demo, "
                   "small, base, retrieval-cxr, retrieval-wrist, retrieval-ct) or a JSON path")
    p.add_argument("--data", help="corpus directory holding manifest.parquet")
    p.add_argument("--release", default=None, help="reproduce a shipped model (chest-xr, wrist, chest-ct): "
                   "builds its corpus, trains its recipe, calibrates and evaluates it, writes "
                   "OUT/release/ and compares the test metrics with the shipped card")
    p.add_argument("--localiser", default=None, choices=("wrist", "chest"),
                   help="train the named-region box localiser instead (medseek.models.localiser; "
                        "wrist: distal radius, distal ulna, ulnar styloid; chest: lung zones, "
                        "costophrenic angles, cardiac silhouette on PA films) on --data, or on its "
                        "corpus rebuilt under OUT/corpus; writes OUT/localiser/<name>.safetensors "
                        "and its card with the test IoU")
    p.add_argument("--federated", default=None, metavar="CONFIG",
                   help="federated run (medseek.train.federated, needs the 'federated' extra): a JSON "
                        "config (recipe, data, clients, rounds, local_steps, partition, strategy, mu, "
                        "missing); starts a Flower server and client processes on 127.0.0.1, writes "
                        "OUT/global.npz, OUT/summary.json and the test metrics OUT/test.json")
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics.jsonl)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.safetensors")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def _init_distributed(device_type: str) -> bool:
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return True


def run_release(args: argparse.Namespace) -> int:
    from medseek.models.release import list_releases, read_card

    from .release import compare_to_card, reproduce

    card = reproduce(args.release, args.out, steps=args.steps)
    print(f"train: release written to {args.out}/release/{args.release}.safetensors "
          f"({card['bytes'] / 2**20:.1f} MB)")
    if args.release not in list_releases():
        return 0
    rows = compare_to_card(card, read_card(args.release))
    for r in rows:
        print(f"  {r['metric']:16s} shipped {r['shipped']:.3f}  new {r['new']:.3f}  "
              f"{'ok' if r['ok'] else 'DIFFERS'} (tolerance {r['tolerance']})")
    return 0 if all(r["ok"] for r in rows) else 1


def run_federated_cli(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .federated import evaluate_federated, load_federated_config, run_federated

    fc = load_federated_config(args.federated, recipe=args.recipe, data=args.data, out=args.out)
    summary = run_federated(fc)
    test = evaluate_federated(fc)
    (Path(fc.out) / "test.json").write_text(json.dumps(test, indent=1))
    print(f"train: federated {fc.strategy} on {fc.partition} partitions, {fc.clients} clients x "
          f"{fc.rounds} rounds, {summary['bytes_per_round'] / 2**20:.2f} MiB per round; "
          f"global weights {fc.out}/global.npz")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    import torch

    if args.federated is not None:
        return run_federated_cli(args)
    if args.localiser is not None:
        if args.recipe or args.release or args.resume:
            raise SystemExit("medseek train: --localiser takes its own recipe; leave out "
                             "--recipe, --release and --resume")
        from .localiser import reproduce_localiser

        card = reproduce_localiser(args.localiser, args.out, data=args.data, steps=args.steps)
        iou = card["test_iou"]
        print(f"train: localiser written to {args.out}/localiser/{args.localiser}.safetensors; "
              "test IoU " + ", ".join(f"{r} {iou[r]['value']:.3f} [{iou[r]['lo']:.3f}, "
                                      f"{iou[r]['hi']:.3f}]" for r in (*card['config']['regions'], 'mean')))
        return 0
    if args.release is not None:
        if args.recipe or args.data or args.resume:
            raise SystemExit("medseek train: --release takes its own recipe and corpus; "
                             "leave out --recipe, --data and --resume")
        return run_release(args)
    if not args.recipe or not args.data:
        raise SystemExit("medseek train: --recipe and --data are required (or --release NAME)")

    from medseek.models.factory import create_model

    from .curation import apply_curation
    from .data import PairDataset
    from .loop import Trainer
    from .optim import describe_split
    from .recipe import load_recipe

    overrides = {"steps": args.steps} if args.steps is not None else {}
    cfg = load_recipe(args.recipe, **overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)  # NCCL needs each rank on its own GPU, set before init
    ddp = _init_distributed(torch.device(device).type)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained_text=cfg.pretrained_text, **cfg.model_overrides)
    train = PairDataset.from_manifest(args.data, model.cfg, "train")
    try:
        val = PairDataset.from_manifest(args.data, model.cfg, "val")
    except ValueError:
        val = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, report = apply_curation(train, cfg.curation, model)
    if report is not None:
        (out / "curation.json").write_text(json.dumps(report, indent=1))
    from .unpaired import apply_unpaired

    train = apply_unpaired(train, cfg.unpaired)
    if cfg.loss.w_pheno > 0:  # PhenoLIP: the stage-1 phenotype space, cached in the run folder
        from .pheno import install_teacher, phenotype_space

        install_teacher(phenotype_space(out))
    trainer = Trainer(cfg, model, train, out, val=val, device=device, progress=not args.no_progress)
    if args.resume:
        trainer.resume()
    if trainer.rank == 0:
        (out / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        print(f"train: {len(train)} pairs, optimizer split {describe_split(trainer.split)}")
    last = trainer.fit()
    if trainer.rank == 0 and model.finding_head is not None and val is not None:
        from .calibrate import NEVER, calibrate_finding_thresholds
        from .data import load_tokenizer

        calibration = calibrate_finding_thresholds(
            model, val, load_tokenizer(model.cfg.text.max_length), device=device)
        (out / "calibration.json").write_text(json.dumps(calibration, indent=1))
        trainer.save()  # the thresholds are a model buffer: into the checkpoint with it
        shown = sum(c["threshold"] < NEVER for c in calibration.values())
        print(f"train: finding thresholds fitted on {len(val)} validation items: "
              f"{shown} of {len(calibration)} findings can be shown")
    if trainer.rank == 0:
        print(f"train: step {trainer.step}, loss {last.get('loss', float('nan')):.4f}, "
              f"{trainer.samples_seen} samples, {trainer.compute['wall_s']:.1f} s wall; "
              f"checkpoint {out / 'checkpoint.safetensors'}")
    if ddp:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0

"""``medseek eval``: metrics, intervals and figures for one embedding file.

See :mod:`medseek.eval.evaluate` for the ``.npz`` keys and what is measured.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` sub-command."""
    parser = subparsers.add_parser(
        "eval",
        help="retrieval / classification metrics of an embedding file",
        description=(
            "Evaluate embeddings stored in an .npz with keys image (N,D) [required], text (N,D), "
            "labels (N,L) bool, label_names (L,), patient_ids (N,), prompts (L,2,D) or (L,D). "
            "Writes metrics.json and PNG figures into --out."
        ),
    )
    parser.add_argument("embeddings", help="the .npz file")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--ks", type=int, nargs="+", default=[1, 5, 10, 50], help="Recall@K cut-offs (default 1 5 10 50)"
    )
    parser.add_argument("--k", type=int, default=10, help="cut-off of P@k, nDCG@k and the k-NN vote (default 10)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of the intervals (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the gap classifier")
    parser.add_argument("--threshold", type=float, default=0.5, help="k-NN vote threshold for F1 (default 0.5)")
    parser.add_argument("--weighted", action="store_true", help="similarity-weighted (softmax) k-NN vote")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> str | None:
    if any(k < 1 for k in args.ks):
        return f"--ks must be >= 1, got {args.ks}"
    if args.k < 1:
        return f"--k must be >= 1, got {args.k}"
    if args.n_boot < 1:
        return f"--n-boot must be >= 1, got {args.n_boot}"
    if not 0.0 < args.alpha < 1.0:
        return f"--alpha must be in (0, 1), got {args.alpha}"
    return None


def run(args: argparse.Namespace) -> int:
    """Handler of ``medseek eval``; returns the exit status."""
    import json
    import sys
    from pathlib import Path

    from medseek.eval.evaluate import EvalSettings, evaluate, load_embeddings, to_json

    problem = _check_args(args)
    if problem is None:
        try:
            inputs = load_embeddings(args.embeddings)
        except (OSError, ValueError) as exc:
            problem = str(exc)
    if problem is not None:
        print(f"medseek eval: error: {problem}", file=sys.stderr)
        return 2
    settings = EvalSettings(
        ks=tuple(args.ks), k=args.k, n_boot=args.n_boot, alpha=args.alpha, seed=args.seed,
        threshold=args.threshold, weighted=args.weighted, plots=not args.no_plots,
    )
    out = Path(args.out)
    result = evaluate(inputs, out, settings)
    (out / "metrics.json").write_text(json.dumps(to_json(result), indent=2, allow_nan=False) + "\n")
    print(format_table(result))
    print(f"wrote {out / 'metrics.json'}" + "".join(f"\nwrote {f}" for f in result["figures"]))
    return 0


def format_table(result: dict) -> str:
    """A short plain-text table of the headline numbers of :func:`evaluate`'s result."""
    rows: list[tuple[str, str]] = []

    def ci(name: str, block: dict) -> None:
        rows.append((name, f"{block['value']:.4f}  [{block['lo']:.4f}, {block['hi']:.4f}]"))

    for direction, block in result.get("crossmodal", {}).items():
        for metric, value in block.items():
            ci(f"{direction} {metric}", value)
    if "modality_gap" in result:
        gap = result["modality_gap"]
        rows.append(("modality gap: centroid distance", f"{gap['centroid_distance']:.4f}"))
        rows.append(("modality gap: pair cosine", f"{gap['mean_pair_cosine']:.4f}"))
        rows.append(("modality gap: separability", f"{gap['separability']:.4f}"))
    for metric, value in result.get("image_to_image", {}).items():
        if isinstance(value, dict):
            ci(f"image_to_image {metric}", value)
    if "diagnosis" in result:
        for metric, value in result["diagnosis"]["macro"].items():
            rows.append((f"diagnosis (k={result['diagnosis']['k']}) macro {metric}", f"{value:.4f}"))
    if "zero_shot" in result:
        for metric, value in result["zero_shot"]["macro"].items():
            rows.append((f"zero-shot macro {metric}", f"{value:.4f}"))
    width = max((len(name) for name, _ in rows), default=0)
    header = f"{'metric':<{width}}  value   [{round((1 - result['settings']['alpha']) * 100)}% CI]"
    return "\n".join([header] + [f"{name:<{width}}  {text}" for name, text in rows])

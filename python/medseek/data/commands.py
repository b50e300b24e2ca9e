"""``medseek data build {synth-cxr,synth-wrist,synth-ct} --out DIR [--n N] [--seed S]``.

Each builder writes images or volumes, ``manifest.parquet`` and ``contact_sheet.png``
into ``--out``; the same ``--seed`` gives byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
import time


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _build(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    progress = not args.quiet
    if args.corpus == "synth-cxr":
        from medseek.data.synth.cxr import build_synth_cxr

        reports = None
        if args.skip < 0:
            raise SystemExit(f"medseek data build: --skip must be >= 0, got {args.skip}")
        if args.skip:
            from medseek.data.iu import load_iu_reports

            reports = load_iu_reports()[args.skip:]
            if not reports:
                raise SystemExit(f"medseek data build: --skip {args.skip} leaves no IU report")
        records = build_synth_cxr(args.out, n=args.n, seed=args.seed, size=args.size or 256,
                                  workers=args.workers, progress=progress, reports=reports)
    elif args.corpus == "synth-wrist":
        from medseek.data.synth.wrist import build_synth_wrist

        records = build_synth_wrist(args.out, n=args.n or 200, seed=args.seed, size=args.size or 256,
                                    progress=progress)
    else:
        from medseek.data.synth.ct import build_synth_ct

        records = build_synth_ct(args.out, n=args.n or 24, seed=args.seed, progress=progress)
    kinds = {}
    for r in records:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    summary = ", ".join(f"{v} {k} rows" for k, v in sorted(kinds.items()))
    print(f"{args.corpus}: {summary} -> {args.out}/manifest.parquet "
          f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data build ...`` to the ``medseek`` command."""
    data = subparsers.add_parser("data", help="dataset manifests and benchmark corpora")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    build = data_sub.add_parser("build", help="build a synthetic benchmark corpus")
    build.add_argument("corpus", choices=("synth-cxr", "synth-wrist", "synth-ct"),
                       help="which corpus: chest radiographs from IU reports, wrist "
                            "radiographs, or chest CT volumes")
    build.add_argument("--out", required=True, help="output folder (created)")
    build.add_argument("--n", type=_positive, default=None,
                       help="cases: first N IU reports (synth-cxr, default all), "
                            "studies (synth-wrist, default 200), volumes (synth-ct, default 24)")
    build.add_argument("--skip", type=int, default=0,
                       help="synth-cxr: leave out the first SKIP IU reports (the shipped chest "
                            "model is trained on reports 1000 onwards, so that medseek demo's "
                            "corpus, the first reports, is unseen)")
    build.add_argument("--seed", type=int, default=0,
                       help="random seed (the same seed gives byte-identical files)")
    build.add_argument("--size", type=_positive, default=None, help="image side in pixels (2D corpora, default 256)")
    build.add_argument("--workers", type=_positive, default=1, help="rendering processes (synth-cxr)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

"""Reproduce a shipped model: corpus → training → calibration → test metrics → release.

Each shipped release (``medseek/models/weights/<name>.json``) names its recipe and the
corpus it was trained on; :data:`RELEASES` says how to rebuild that corpus.
:func:`reproduce` runs the whole path with the same code that made the release and
:func:`compare_to_card` says whether the new test metrics land near the card's::

    medseek train --release chest-xr --out runs/release-chest-xr

The corpus leaves out the first 1,000 IU reports: ``medseek demo`` renders its chest
corpus from the first reports, so its held-out queries are images the shipped model
has never seen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

RELEASES = {
    "chest-xr": {"recipe": "retrieval-cxr",
                 "corpus": {"kind": "synth-cxr", "n": 2000, "skip": 1000, "size": 128, "seed": 0}},
}
#: metrics a reproduction must land near, and how near (absolute)
TOLERANCE = {"i2i_ndcg@10": 0.05, "t2i_ndcg@10": 0.05, "zero_shot_auroc": 0.05}


def build_release_corpus(spec: dict, out: Path, progress: bool = False) -> Path:
    """The corpus of a :data:`RELEASES` entry under ``out`` (reused when complete)."""
    from medseek.data.iu import load_iu_reports
    from medseek.data.synth.cxr import build_synth_cxr

    if spec["kind"] != "synth-cxr":
        raise ValueError(f"no corpus builder for {spec['kind']!r}")
    if not (out / "manifest.parquet").is_file():
        reports = load_iu_reports()[spec["skip"]:]
        build_synth_cxr(out, n=spec["n"], seed=spec["seed"], size=spec["size"], reports=reports,
                        progress=progress)
    return out


def reproduce(name: str, out: str | Path, *, steps: int | None = None, n_boot: int = 1000,
              corpus_overrides: dict | None = None, log=print) -> dict:
    """Build the corpus, train the recipe, calibrate, evaluate on ``test``; write the
    release ``out/release/<name>.safetensors`` and its card. Returns the card.

    ``steps`` and ``corpus_overrides`` (e.g. ``{"n": 40}``) shrink the run for tests; the
    card records what was actually done."""
    import torch

    from medseek.models.factory import create_model
    from medseek.models.release import save_release

    from .ablation import run_variant
    from .checkpoint import load_model_weights
    from .recipe import load_recipe

    if name not in RELEASES:
        raise ValueError(f"release must be one of {sorted(RELEASES)}, got {name!r}")
    spec = dict(RELEASES[name])
    spec["corpus"] = {**spec["corpus"], **(corpus_overrides or {})}
    out = Path(out)
    t0 = time.perf_counter()
    corpus = build_release_corpus(spec["corpus"], out / "corpus")
    log(f"release {name}: corpus {corpus} ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    row = run_variant(name, spec["recipe"], {}, corpus, out / "runs", steps=steps, n_boot=n_boot)[name]
    log(f"release {name}: trained {row['steps']} steps in {row['train_wall_s']:.0f} s, "
        f"evaluated ({time.perf_counter() - t0:.0f} s in all)")
    recipe = load_recipe(spec["recipe"])
    model = create_model(recipe.model, pretrained_text=recipe.pretrained_text)
    load_model_weights(out / "runs" / name / "checkpoint.safetensors", model)
    keep = ("i2i_ndcg@10", "t2i_ndcg@10", "t2i_recall@5", "zero_shot_auroc")
    card = {"recipe": spec["recipe"], "recipe_resolved": row["recipe"],
            "corpus": spec["corpus"], "seed": recipe.seed, "steps": row["steps"],
            "train_wall_s": round(row["train_wall_s"], 1), "torch": torch.__version__,
            "test": {k: row["test"][k] for k in keep if isinstance(row["test"].get(k), dict)},
            "test_other": {k: v for k, v in row["test"].items() if k not in keep},
            "reproduce": f"medseek train --release {name} --out DIR"}
    return save_release(model.eval(), out / "release", name, json.loads(json.dumps(card)))


def compare_to_card(new: dict, shipped: dict) -> list[dict]:
    """Per :data:`TOLERANCE` metric: the shipped and the new value and whether they agree
    within the tolerance."""
    rows = []
    for metric, tol in TOLERANCE.items():
        a, b = shipped["test"].get(metric), new["test"].get(metric)
        if a is None or b is None or a["value"] is None or b["value"] is None:
            continue  # not measured (a test split too small to score it)
        rows.append({"metric": metric, "shipped": a["value"], "new": b["value"],
                     "tolerance": tol, "ok": abs(a["value"] - b["value"]) <= tol})
    return rows

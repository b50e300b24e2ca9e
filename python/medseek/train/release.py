"""Reproduce a shipped model: corpus → training → calibration → test metrics → release.

Each shipped release (``medseek/models/weights/<name>.json``) names its recipe and the
corpus it was trained on; :data:`RELEASES` says how to rebuild that corpus.
:func:`reproduce` runs the whole path with the same code that made the release and
:func:`compare_to_card` says whether the new test metrics land near the card's::

    medseek train --release chest-xr --out runs/release-chest-xr     # also: wrist, chest-ct

``medseek demo``'s corpora must be unseen by the shipped models: the chest corpus leaves
out the first 1,000 IU reports (the demo renders its chest corpus from the first
reports); the wrist and CT corpora are rendered with seed 1 (the demo's default is 0).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

RELEASES = {
    "chest-xr": {"recipe": "retrieval-cxr",
                 "corpus": {"kind": "synth-cxr", "n": 2000, "skip": 1000, "size": 128, "seed": 0}},
    # seed 1: other phantoms than medseek demo's corpora (seed 0 by default)
    "wrist": {"recipe": "retrieval-wrist",
              "corpus": {"kind": "synth-wrist", "n": 800, "size": 128, "seed": 1}},
    "chest-ct": {"recipe": "retrieval-ct",
                 "corpus": {"kind": "synth-ct", "n": 1000, "matrix": [96, 128], "slices": [40, 200],
                            "seed": 1}},
}
#: metrics a reproduction must land near, and how near (absolute); a release is compared
#: on those of them its card has
TOLERANCE = {"i2i_ndcg@10": 0.05, "t2i_ndcg@10": 0.05, "zero_shot_auroc": 0.05,
             "region_diagnosis.majority.macro_f1_global": 0.08,
             "region_diagnosis.majority.macro_f1_region": 0.08,
             "t2i_recall@5": 0.15, "organ2v_recall@5": 0.15}
#: test metrics a card carries, with their CIs (``a.b`` is ``test[a][b]``)
CARD_METRICS = ("i2i_ndcg@10", "t2i_ndcg@10", "t2i_recall@5", "zero_shot_auroc", "organ2v_recall@5",
                *(f"region_diagnosis.{v}.macro_f1_{m}" for v in ("majority", "calibrated")
                  for m in ("global", "region", "delta")))


def build_release_corpus(spec: dict, out: Path, progress: bool = False) -> Path:
    """The corpus of a :data:`RELEASES` entry under ``out`` (reused when complete)."""
    from medseek.data.iu import load_iu_reports
    from medseek.data.synth.ct import build_synth_ct
    from medseek.data.synth.cxr import build_synth_cxr
    from medseek.data.synth.wrist import build_synth_wrist

    if (out / "manifest.parquet").is_file():
        return out
    kind, n, seed = spec["kind"], spec["n"], spec["seed"]
    if kind == "synth-cxr":
        reports = load_iu_reports()[spec.get("skip", 0):]
        build_synth_cxr(out, n=n, seed=seed, size=spec["size"], reports=reports, progress=progress)
    elif kind == "synth-wrist":
        build_synth_wrist(out, n=n, seed=seed, size=spec["size"], progress=progress)
    elif kind == "synth-ct":
        build_synth_ct(out, n=n, seed=seed, matrix=tuple(spec["matrix"]), slices=tuple(spec["slices"]),
                       progress=progress)
    else:
        raise ValueError(f"no corpus builder for {kind!r}")
    return out


def card_metric(test: dict, key: str) -> dict | None:
    """``test[key]``, or ``test[a][b]`` for ``key = "a.b"``; None when not measured."""
    value = test
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, dict) and "value" in value else None


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
    test = {k: card_metric(row["test"], k) for k in CARD_METRICS}
    card = {"recipe": spec["recipe"], "recipe_resolved": row["recipe"],
            "corpus": spec["corpus"], "seed": recipe.seed, "steps": row["steps"],
            "train_wall_s": round(row["train_wall_s"], 1), "torch": torch.__version__,
            "test": {k: v for k, v in test.items() if v is not None},
            "test_other": {k: v for k, v in row["test"].items() if k not in CARD_METRICS},
            "reproduce": f"medseek train --release {name} --out DIR"}
    return save_release(model.eval(), out / "release", name, json.loads(json.dumps(card)))


def compare_to_card(new: dict, shipped: dict) -> list[dict]:
    """Per :data:`TOLERANCE` metric: the shipped and the new value and whether they agree
    within the tolerance."""
    rows = []
    for metric, tol in TOLERANCE.items():
        a, b = shipped["test"].get(metric), new["test"].get(metric)
        if a is None or b is None or a.get("value") is None or b.get("value") is None:
            continue  # not measured (a test split too small to score it)
        rows.append({"metric": metric, "shipped": a["value"], "new": b["value"],
                     "tolerance": tol, "ok": abs(a["value"] - b["value"]) <= tol})
    return rows

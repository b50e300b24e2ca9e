"""Train and measure a named-region localiser (:mod:`medseek.models.localiser`).

    medseek train --localiser wrist --out runs/localiser-wrist [--data CORPUS] [--steps N]

The recipe (:data:`LOCALISER_RECIPES`) names the corpus it trains on by the same spec as
the shipped wrist encoder's (``medseek.train.release.RELEASES``), so the localiser sees
the same patients' films in train / val / test (patient-disjoint splits); the corpus is
rebuilt under ``OUT/corpus`` when ``--data`` is not given or missing. Training regresses
the manifest's boxes (``regions[].box``) on the train split; the checkpoint kept is the
one with the best mean IoU on val; the test split's per-region IoU, with a 95 % bootstrap
CI over patients, goes into the card written beside the weights (``OUT/localiser/``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseek.models.localiser import (BoxLocaliser, LocaliserConfig, box_iou, localiser_loss,
                                      save_localiser)

LOCALISER_RECIPES = {
    # the shipped wrist encoder's corpus (RELEASES["wrist"]): seed 1, 800 studies, 128 px
    "wrist": {"corpus": {"kind": "synth-wrist", "n": 800, "size": 128, "seed": 1},
              "steps": 1500, "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4,
              "max_shift": 8, "seed": 0, "eval_every": 100, "threads": 1},
    # the shipped chest-xr encoder's corpus spec (RELEASES["chest-xr"]), rebuilt: synth-cxr
    # manifests carry the anatomy boxes since issue 15; PA films only (a lateral film has
    # the cardiac silhouette alone, so load_box_set leaves it out)
    "chest": {"corpus": {"kind": "synth-cxr", "n": 2000, "skip": 1000, "size": 128, "seed": 0},
              "steps": 1500, "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4,
              "max_shift": 8, "seed": 0, "eval_every": 100, "threads": 1},
}


@dataclass(frozen=True)
class BoxSet:
    """The images of one split with the boxes of the named regions.

    Attributes
    ----------
    images : (N, 1, S, S) float32 tensor in [0, 1]
    boxes : (N, R, 4) float32 tensor, ``[x0, y0, x1, y1]`` normalised to [0, 1]
    patients : (N,) patient ids (clusters for the bootstrap)
    ids : (N,) item ids
    """

    images: torch.Tensor
    boxes: torch.Tensor
    patients: np.ndarray
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


def load_box_set(corpus: str | Path, split: str | None, regions: tuple[str, ...],
                 size: int) -> BoxSet:
    """The ``split`` images (None: all) of the manifest under ``corpus`` that carry a box
    for every one of ``regions``, resized to ``size`` (boxes scaled with them)."""
    from medseek.data.manifest import read_manifest
    from medseek.io import read_image
    from medseek.models.localiser import to_input

    root = Path(corpus)
    path = root / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"localiser: no manifest at {path}")
    images, boxes, patients, ids = [], [], [], []
    for rec in read_manifest(path):
        if rec.kind != "image" or (split is not None and rec.split != split):
            continue
        by_name = {r.name: r.box for r in rec.regions if r.box is not None}
        if any(name not in by_name for name in regions):
            continue
        px = read_image(root / rec.path).pixels
        scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(px.dtype)
        unit = px.astype(np.float32) / scale if scale else px.astype(np.float32)
        h, w = unit.shape
        images.append(to_input(unit, size))
        boxes.append([[b[0] / w, b[1] / h, b[2] / w, b[3] / h] for b in (by_name[n] for n in regions)])
        patients.append(rec.patient_id or rec.study_id or rec.id)
        ids.append(rec.id)
    if not images:
        raise ValueError(f"localiser: manifest {path} has no {split!r} images with boxes for "
                         f"all of {list(regions)}")
    return BoxSet(torch.from_numpy(np.stack(images)), torch.tensor(boxes, dtype=torch.float32).clamp(0, 1),
                  np.asarray(patients), tuple(ids))


def augment(x: torch.Tensor, boxes: torch.Tensor, max_shift: int,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each image by up to ``max_shift`` pixels (zero fill, boxes moved with it) and
    jitter its contrast: positioning and exposure vary between films more than the
    corpus's own pose sampling may cover."""
    n, _, h, w = x.shape
    out = torch.zeros_like(x)
    b = boxes.clone()
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen) if max_shift else \
        torch.zeros((n, 2), dtype=torch.long)
    for i in range(n):
        dx, dy = int(shifts[i, 0]), int(shifts[i, 1])
        src = x[i, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        out[i, :, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
        b[i, :, 0::2] += dx / w
        b[i, :, 1::2] += dy / h
    gain = torch.empty((n, 1, 1, 1)).uniform_(0.8, 1.2, generator=gen)
    gamma = torch.empty((n, 1, 1, 1)).uniform_(0.8, 1.25, generator=gen)
    return (out.clamp(0, 1) ** gamma * gain).clamp(0, 1), b.clamp(0, 1)


@torch.no_grad()
def predict(model: BoxLocaliser, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``(N, R, 4)`` normalised boxes of ``(N, 1, S, S)`` images, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def mean_iou(model: BoxLocaliser, data: BoxSet) -> float:
    return float(box_iou(predict(model, data.images), data.boxes).mean())


def train_localiser(cfg: LocaliserConfig, train: BoxSet, val: BoxSet | None, *, steps: int,
                    batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4,
                    max_shift: int = 8, seed: int = 0, eval_every: int = 100,
                    log=None) -> tuple[BoxLocaliser, list[dict]]:
    """Train a :class:`BoxLocaliser` (AdamW, linear warm-up then cosine decay); returns the
    model at its best validation mean IoU (the last one without ``val``) and the history
    ``[{"step", "loss", "val_iou"}]`` of each evaluation."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = BoxLocaliser(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    best, best_iou, history, running = None, -1.0, [], []
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train), (min(batch_size, len(train)),), generator=gen)
        x, y = augment(train.images[idx], train.boxes[idx], max_shift, gen)
        loss = localiser_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            row = {"step": step, "loss": float(np.mean(running)),
                   "val_iou": mean_iou(model, val) if val is not None else None}
            running = []
            history.append(row)
            if log is not None:
                log(row)
            score = row["val_iou"] if val is not None else step
            if score > best_iou:
                best_iou, best = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    return model.eval(), history


def iou_report(model: BoxLocaliser, data: BoxSet, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-region and mean IoU on ``data``, each with a 95 % bootstrap CI over patients
    (each patient counts once: the mean of their films)."""
    from .ablation import _cluster_mean_ci

    iou = box_iou(predict(model, data.images), data.boxes).numpy().astype(np.float64)  # (N, R)
    out = {name: _cluster_mean_ci(iou[:, j], data.patients, n_boot, seed)
           for j, name in enumerate(model.cfg.regions)}
    out["mean"] = _cluster_mean_ci(iou.mean(1), data.patients, n_boot, seed)
    out["images"] = len(data)
    return out


def reproduce_localiser(name: str, out: str | Path, *, data: str | Path | None = None,
                        steps: int | None = None, n_boot: int = 1000, log=None) -> dict:
    """Run the recipe of localiser ``name``: corpus (``data`` or rebuilt under
    ``out/corpus``) → training with val selection → test IoU → ``out/localiser/<name>``
    weights and card. Returns the card."""
    from .release import build_release_corpus

    log = log or (lambda row: print(f"localiser: {row}", flush=True))
    if name not in LOCALISER_RECIPES:
        raise ValueError(f"localiser recipe must be one of {sorted(LOCALISER_RECIPES)}, got {name!r}")
    recipe = dict(LOCALISER_RECIPES[name])
    if steps is not None:
        recipe["steps"] = steps
    out = Path(out)
    corpus = Path(data) if data is not None and (Path(data) / "manifest.parquet").is_file() else \
        build_release_corpus(recipe["corpus"], out / "corpus", progress=True)
    cfg = LocaliserConfig.for_set(name, image_size=recipe["corpus"]["size"])
    sets = {s: load_box_set(corpus, s, cfg.regions, cfg.image_size) for s in ("train", "val", "test")}
    # one torch thread: on a shared 2-core machine two threads spin against each other
    # (a step took 10x longer, measured); the result does not depend on it
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["threads"])
    t0 = time.perf_counter()
    try:
        model, history = train_localiser(
            cfg, sets["train"], sets["val"], steps=recipe["steps"], batch_size=recipe["batch_size"],
            lr=recipe["lr"], weight_decay=recipe["weight_decay"], max_shift=recipe["max_shift"],
            seed=recipe["seed"], eval_every=recipe["eval_every"], log=log)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    card = {"recipe": recipe, "corpus": recipe["corpus"], "seed": recipe["seed"],
            "steps": recipe["steps"], "train_images": len(sets["train"]),
            "best_val_iou": max(h["val_iou"] for h in history),
            "selected_step": max(history, key=lambda h: h["val_iou"])["step"],
            "test_iou": iou_report(model, sets["test"], n_boot=n_boot),
            "train_wall_s": round(wall, 1), "torch": torch.__version__,
            "reproduce": f"medseek train --localiser {name} --out DIR"}
    return save_localiser(model, out / "localiser", card)

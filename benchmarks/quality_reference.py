"""The cheap references a retrieval tower must beat, scored exactly as the towers are.

* ``raw-pixels``: each test image resized to ``--pixels`` x ``--pixels``, centred,
  L2-normalised, compared by cosine;
* ``supervised-cnn``: a plain CNN (four stride-2 conv + BatchNorm + ReLU layers, global
  average pool, a linear label classifier; ~0.4 M parameters) trained with BCE on the
  corpus's multi-hot labels of the train split for ``--minutes`` of wall time (the same
  budget a tower gets); its embedding is the pooled feature, L2-normalised.

Both rows use :func:`medseek.train.ablation.image_to_image_ndcg` on the patient-disjoint
``test`` split (nDCG@10, Jaccard label overlap, own patient excluded, patient bootstrap).
The supervised model also reports its own mean label AUROC. This is a benchmark
reference, not part of the product::

    python benchmarks/quality_reference.py --data CORPUS --size 64 --minutes 10 --out ref.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


class SmallCNN(nn.Module):
    """(B, 1, H, W) → pooled feature (B, width); ``classify`` gives label logits."""

    def __init__(self, n_labels: int, channels=(32, 64, 128, 128)) -> None:
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))  # (B, C)


def _images(ds) -> torch.Tensor:
    return torch.from_numpy(np.stack([ds[i]["image"] for i in range(len(ds))]))  # (N, 1, H, W)


def raw_pixels(test_images: torch.Tensor, pixels: int) -> np.ndarray:
    x = nn.functional.interpolate(test_images, size=(pixels, pixels), mode="area").flatten(1)
    x = x - x.mean(1, keepdim=True)
    return nn.functional.normalize(x, dim=1).numpy()


def train_supervised(train_images: torch.Tensor, labels: torch.Tensor, minutes: float,
                     seed: int, batch_size: int = 64) -> tuple[SmallCNN, int]:
    """AdamW + cosine schedule over an estimated step count that fits ``minutes``; light
    augmentation (random shifts of up to 1/16 of the side, no flips: laterality matters)."""
    torch.manual_seed(seed)
    model = SmallCNN(labels.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    n, shift = train_images.shape[0], max(1, train_images.shape[-1] // 16)
    budget, t0, step, total = minutes * 60.0, time.perf_counter(), 0, None
    while True:
        elapsed = time.perf_counter() - t0
        if step == 20:  # the step count the budget affords, from the first 20 steps
            total = max(21, int(budget / (elapsed / 20)))
        if (total is not None and step >= total) or elapsed > budget:
            break
        frac = 0.0 if total is None else step / total
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x = train_images[idx]
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = nn.functional.binary_cross_entropy_with_logits(model.classifier(model(x)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    return model.eval(), step


@torch.no_grad()
def _embed(model: SmallCNN, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    feats = torch.cat([model(images[s:s + 256]) for s in range(0, len(images), 256)])
    logits = model.classifier(feats)
    return nn.functional.normalize(feats, dim=1).numpy(), torch.sigmoid(logits).numpy()


def main(argv: list[str] | None = None) -> int:
    from medseek.eval.classification import auroc
    from medseek.models.dual import PreprocessConfig
    from medseek.train.ablation import image_to_image_ndcg
    from medseek.train.data import PairDataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="corpus (synth-cxr or synth-wrist) with train/test")
    p.add_argument("--size", type=int, default=64, help="image side the CNN sees, px")
    p.add_argument("--pixels", type=int, default=32, help="side of the raw-pixel vectors")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-time budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", default=None, help="JSON with both rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    class _Cfg:  # what PairDataset reads of a model config
        modality = "image"
        preprocess = PreprocessConfig(image_size=(args.size, args.size))

    train = PairDataset.from_manifest(args.data, _Cfg, "train")
    test = PairDataset.from_manifest(args.data, _Cfg, "test")
    rows = {"raw-pixels": {"i2i_ndcg@10": image_to_image_ndcg(
        raw_pixels(_images(test), args.pixels), test, args.n_boot)}}
    y_train = torch.from_numpy(train.label_matrix().astype(np.float32))
    t0 = time.perf_counter()
    model, steps = train_supervised(_images(train), y_train, args.minutes, args.seed)
    wall = time.perf_counter() - t0
    emb, prob = _embed(model, _images(test))
    y = test.label_matrix()
    aucs = [auroc(prob[:, j], y[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    rows["supervised-cnn"] = {
        "i2i_ndcg@10": image_to_image_ndcg(emb, test, args.n_boot),
        "label_auroc_mean": float(np.nanmean(aucs)), "steps": steps, "train_wall_s": wall,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    for name, row in rows.items():
        m = row["i2i_ndcg@10"]
        extra = f", label AUROC {row['label_auroc_mean']:.3f}, {row['steps']} steps" \
            if "steps" in row else ""
        print(f"{name}: i2i nDCG@10 {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]{extra}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Trainer: seeded, resumable, data-parallel training of a DualEncoder.

Data order
----------
The sample stream is the concatenation of epoch permutations, epoch ``e`` being
``torch.randperm(N, generator=Generator().manual_seed(seed + e))``; ``position`` counts
the samples taken. An optimizer step takes ``batch_size`` consecutive samples, split into
``accum_steps`` micro-batches; with ``world`` ranks each micro-batch is cut into ``world``
contiguous slices, rank ``r`` taking slice ``r``. The stream depends only on the seed and
the position, so a resumed run (position read from the checkpoint) sees exactly the data
the uninterrupted run would. (This replaces ``DistributedSampler``, whose per-epoch
shuffle cannot resume mid-epoch and interleaves ranks, which would change the contrastive
batches.) With online curation (``train`` an :class:`~medseek.train.curation.OnlineSubset`)
the stream runs over the current subset; every ``curation.rescore_every`` steps the
whole pool is scored and the subset re-selected, and the chosen pool indices go into
the checkpoint with the position.

Data parallel
-------------
Every rank gathers the embeddings of the micro-batch from all ranks (:func:`gather_cat`,
differentiable) and computes the loss of the *whole* micro-batch, so negatives are the
same as in one process. Each rank's backward then yields ``world ×`` its share of the
true gradient (the gather's backward sums the gradient over ranks); averaging the
gradients over ranks (all-reduce / world) gives exactly the single-process gradient.
"""

from __future__ import annotations

import functools
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .curation import OnlineSubset
from .data import PairDataset, collate, load_tokenizer, tokenize
from .losses import combine_losses, encode_batch
from .optim import build_optimizer, describe_split, lr_factor
from .recipe import TrainConfig
from .text_features import TextFeatureCache, freeze_text_layers, text_tower_frozen

CHECKPOINT_NAME = "checkpoint.safetensors"


def shift_images(batch: dict, fraction: float, seed: int) -> None:
    """Shift each image of ``batch["images"]`` (B, C, H, W) in place by its own random
    ``(dy, dx)`` of up to ``fraction`` of the side (wrapping round), and its region boxes
    with it. Drawn from ``seed`` alone, so a resumed run shifts as the first one did."""
    images = batch["images"]
    h, w = images.shape[-2:]
    gen = torch.Generator().manual_seed(seed)
    my, mx = int(fraction * h), int(fraction * w)
    dy = torch.randint(-my, my + 1, (images.shape[0],), generator=gen)
    dx = torch.randint(-mx, mx + 1, (images.shape[0],), generator=gen)
    for b in range(images.shape[0]):
        images[b] = torch.roll(images[b], shifts=(int(dy[b]), int(dx[b])), dims=(-2, -1))
    if "boxes" in batch and batch["boxes"].numel():
        offset = torch.stack((dx, dy, dx, dy), dim=1).to(batch["boxes"].dtype)  # (B, 4)
        boxes = batch["boxes"] + offset[:, None, :]
        # kept inside the image with at least a pixel of area (the content wrapped round)
        x0, y0 = boxes[..., 0].clamp(0, w - 1), boxes[..., 1].clamp(0, h - 1)
        x1 = torch.maximum(boxes[..., 2].clamp(1, w), x0 + 1)
        y1 = torch.maximum(boxes[..., 3].clamp(1, h), y0 + 1)
        batch["boxes"] = torch.stack((x0, y0, x1, y1), dim=-1)


class _GatherCat(torch.autograd.Function):
    """all_gather along dim 0 with equal sizes; backward: sum the gradient over ranks
    (all_reduce, which gloo supports, unlike reduce_scatter) and keep this rank's slice."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` over ranks along dim 0 (sizes may differ: padded, then cut)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])]) if t.shape[0] < longest else t
    if t.is_floating_point() and t.requires_grad:
        full = _GatherCat.apply(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        full = torch.cat(parts)
    return torch.cat([full[r * longest:r * longest + n] for r, n in enumerate(sizes)])


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """``count`` items of the seeded stream of epoch permutations from ``start``."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        take = list(_epoch_permutation(n, seed, epoch)[offset:offset + count - len(out)])
        out += take
        pos += len(take)
    return out


class Trainer:
    """Train ``model`` on ``train`` with recipe ``cfg``, writing to ``out_dir``.

    ``out_dir`` receives ``metrics.jsonl`` (one line per logged step and per evaluation)
    and ``checkpoint.safetensors``. ``rank``/``world`` come from an initialised
    ``torch.distributed`` process group (world 1 when none).

    ``cfg.text_trainable_layers`` freezes (part of) the text tower before the optimizer is
    built; a wholly frozen tower's features come from ``text_cache`` (a
    :class:`~medseek.train.text_features.TextFeatureCache`, shared between trainers of
    the same frozen tower; a new one when None).
    """

    def __init__(self, cfg: TrainConfig, model, train: PairDataset, out_dir: str | Path, *,
                 val: PairDataset | None = None, device: str | torch.device = "cpu",
                 progress: bool = True, text_cache: TextFeatureCache | None = None) -> None:
        import torch.distributed as dist

        self.cfg, self.model, self.train, self.val = cfg, model, train, val
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.progress = progress
        ddp = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if ddp else 0
        self.world = dist.get_world_size() if ddp else 1
        micro = cfg.batch_size // cfg.accum_steps
        if micro % self.world:
            raise ValueError(f"micro-batch {micro} (batch_size / accum_steps) must be divisible "
                             f"by the world size {self.world}")
        self.model.to(self.device)
        freeze_text_layers(model, cfg.text_trainable_layers)
        self.optimizer, self.split = build_optimizer(model, cfg.optim)
        self.tokenizer = load_tokenizer(model.cfg.text.max_length)
        self.text_cache = None
        if text_tower_frozen(model):
            self.text_cache = text_cache if text_cache is not None else TextFeatureCache(self.tokenizer)
        self.step = 0
        self.position = 0
        self.samples_seen = 0
        self.compute = {"wall_s": 0.0, "cpu_s": 0.0}
        self._cache: dict[int, dict] = {}
        self.online = isinstance(train, OnlineSubset) and train.cfg.rescore_every > 0
        if self.text_cache is not None and cfg.loss.w_sentence_finding > 0:
            self._cache_sentences()

    def _cache_sentences(self) -> None:
        """Embed every report sentence of the training set in one batched pass, so no
        step (and not the first, whose FLOPs stand for all steps) pays for the tower."""
        from .data import report_sentences

        records = getattr(self.train, "records", None)
        if records is None:  # a pool wrapper: its full dataset
            records = getattr(getattr(self.train, "pool", None), "records", ())
        sentences = {s for r in records for s in report_sentences(r.report or "")}
        self.text_cache.features(self.model, sorted(sentences))

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        out = {"step": self.step, "position": self.position, "samples_seen": self.samples_seen,
               "compute": dict(self.compute), "recipe": self.cfg.to_dict(), "world": self.world}
        if self.online:
            out["curation"] = self.train.state()
        return out

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.out / CHECKPOINT_NAME
        if self.rank == 0:
            save_checkpoint(path, self.model, self.optimizer, self.state())
        return path

    def resume(self, path: str | Path | None = None) -> None:
        path = Path(path) if path is not None else self.out / CHECKPOINT_NAME
        state = load_checkpoint(path, self.model, self.optimizer)
        self.step, self.position = int(state["step"]), int(state["position"])
        self.samples_seen = int(state["samples_seen"])
        self.compute = dict(state["compute"])
        if self.online:
            if "curation" not in state:
                raise ValueError(f"resume: checkpoint {path} has no online-curation state, but the recipe "
                                 "re-selects (curation.rescore_every > 0)")
            self.train.restore(state["curation"])
            self._cache.clear()
        if self.text_cache is not None:
            self.text_cache.forget(self.model)  # the checkpoint may hold other text weights

    # ------------------------------------------------------------------ steps

    def _item(self, i: int) -> dict:
        if i not in self._cache:
            self._cache[i] = self.train[i]  # decoded once: PNG/NIfTI decoding dominates tiny runs
        return self._cache[i]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _lr_factor(self) -> float:
        return lr_factor(self.cfg.optim, self.step, self.cfg.steps)

    def train_step(self) -> dict:
        """One optimizer step; returns the logged numbers."""
        import torch.distributed as dist

        cfg = self.cfg
        micro = cfg.batch_size // cfg.accum_steps
        local = micro // self.world
        self.model.train()
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        gather = gather_cat if self.world > 1 else (lambda t: t)
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for _ in range(cfg.accum_steps):
            idx = stream_indices(len(self.train), cfg.seed, self.position, micro)
            self.position += micro
            mine = idx[self.rank * local:(self.rank + 1) * local]
            items = [self._item(i) for i in mine]
            batch = collate(items, self.tokenizer, self.train.text_ids)
            if cfg.augment_shift > 0 and "images" in batch:
                shift_images(batch, cfg.augment_shift, cfg.seed * 1_000_003 + self.position)
            if self.text_cache is not None:
                sentences = batch.get("sentence_texts") if cfg.loss.w_sentence_finding > 0 else None
                batch.update(cached_text_features(self.model, items, self.text_cache, sentences))
            batch = self._to_device(batch)
            with amp:
                emb = encode_batch(self.model, batch, cfg.loss)
                loss, parts = combine_losses(self.model, emb, batch, cfg.loss, gather)
            (loss / cfg.accum_steps).backward()
            loss_sum += float(loss.detach()) / cfg.accum_steps
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.accum_steps
        if self.world > 1:
            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.set_lr_factor(self._lr_factor())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += cfg.batch_size
        return {"loss": loss_sum, **{f"loss_{k}": v for k, v in totals.items()}}

    def _counted_step(self) -> dict:
        """A train step under ``FlopCounterMode``: forward, backward and optimizer FLOPs of
        this rank, measured once and reused as the per-step estimate (compute accounting
        for the curation comparison; volumes of other sizes cost more or less)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            out = self.train_step()
        self.compute["flops_per_step"] = float(counter.get_total_flops()) * self.world
        return out

    def fit(self, steps: int | None = None) -> dict:
        """Train until ``steps`` (default the recipe's) optimizer steps are done in total."""
        from tqdm import tqdm

        target = self.cfg.steps if steps is None else int(steps)
        self.out.mkdir(parents=True, exist_ok=True)
        log = (self.out / "metrics.jsonl").open("a") if self.rank == 0 else None
        bar = tqdm(total=target, initial=self.step, desc="train",
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        last: dict = {}
        try:
            if self.step == 0 and self.val is not None and self.cfg.eval_every:
                self._log_eval(log)  # the untrained baseline, for "beats an untrained tower"
            while self.step < target:
                t0, c0 = time.perf_counter(), time.process_time()
                if "flops_per_step" not in self.compute:
                    last = self._counted_step()
                else:
                    last = self.train_step()
                self.compute["flops"] = self.compute.get("flops", 0.0) + self.compute["flops_per_step"]
                dt = time.perf_counter() - t0
                self.compute["wall_s"] += dt
                self.compute["cpu_s"] += time.process_time() - c0
                rate = self.cfg.batch_size / max(dt, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", samples_s=f"{rate:.1f}")
                row = {"step": self.step, **last, "lr_factor": self._lr_factor(),
                       "samples_seen": self.samples_seen, "samples_per_s": rate, **self.compute}
                if log and (self.step % max(self.cfg.log_every, 1) == 0 or self.step == target):
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                every = self.cfg.curation.rescore_every
                if self.online and self.step % every == 0 and self.step < target:
                    self._reselect(log)
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save()
                if self.val is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    self._log_eval(log)
            if self.val is not None and not (self.cfg.eval_every and self.step % self.cfg.eval_every == 0):
                self._log_eval(log)
            self.save()
        finally:
            bar.close()
            if log:
                log.close()
        return last

    def _reselect(self, log) -> dict:
        """Online curation: score the whole pool with the current model, re-select the
        subset, and log what changed (a ``{"step", "curation"}`` row in metrics.jsonl).
        The scoring is compute of the run: its FLOPs (measured on the first round under
        ``FlopCounterMode``, then reused) and time go into ``compute`` (``flops``,
        ``wall_s``, ``cpu_s``), and separately into ``curation_flops`` / ``curation_wall_s``."""
        from torch.utils.flop_counter import FlopCounterMode

        t0, c0 = time.perf_counter(), time.process_time()
        if "flops_per_rescore" not in self.compute:
            counter = FlopCounterMode(display=False)
            with counter:
                losses = self.train.score(self.model, self.tokenizer, self.device, self.text_cache)
            self.compute["flops_per_rescore"] = float(counter.get_total_flops())
        else:
            losses = self.train.score(self.model, self.tokenizer, self.device, self.text_cache)
        info = self.train.reselect(losses)
        self._cache.clear()  # local indices now name other pairs (the pool keeps the decoding)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        flops = self.compute["flops_per_rescore"]
        for key, add in (("flops", flops), ("curation_flops", flops), ("wall_s", dt), ("cpu_s", dc),
                         ("curation_wall_s", dt)):
            self.compute[key] = self.compute.get(key, 0.0) + add
        if log:
            log.write(json.dumps({"step": self.step, "curation": info}) + "\n")
            log.flush()
        return info

    def _log_eval(self, log) -> None:
        if self.rank != 0:
            return
        metrics = evaluate(self.model, self.val, self.tokenizer, self.device, text_cache=self.text_cache)
        if log:
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
            log.write(json.dumps({"step": self.step, "eval": clean}) + "\n")
            log.flush()


def cached_text_features(model, items: list[dict], cache: TextFeatureCache,
                         sentences: list[str] | None = None) -> dict:
    """Batch entries ``text_features`` (reports), ``region_text_features`` (captions)
    and ``organ_text_features`` (organ sentences) from a frozen tower's cache, in the
    order :func:`~medseek.train.data.collate` tokenises those texts; with ``sentences``
    (the batch's ``sentence_texts``) also ``sentence_text_features``."""
    out = {"text_features": cache.features(model, [it["report"] for it in items])}
    if sentences is not None:
        out["sentence_text_features"] = cache.features(model, sentences)
    if "captions" in items[0]:
        out["region_text_features"] = cache.features(model, [c for it in items for c in it["captions"] if c])
    if "organs" in items[0]:
        out["organ_text_features"] = cache.features(model, [t for it in items for _, _, t in it["organs"]])
    return out


@torch.no_grad()
def embed_dataset(model, ds: PairDataset, tokenizer, device="cpu", batch_size: int = 16,
                  text_cache: TextFeatureCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Global visual and report embeddings of every item of ``ds``: ``(N, D)`` each."""
    was_training = model.training
    model.eval()
    vis, txt = [], []
    for s in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        batch = collate(items, tokenizer, ds.text_ids)
        if text_cache is not None and text_tower_frozen(model):
            batch["text_features"] = text_cache.features(model, [it["report"] for it in items])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        emb = encode_batch(model, batch, _EVAL_LOSS)
        vis.append(emb["visual"].float().cpu())
        txt.append(emb["text"].float().cpu())
    model.train(was_training)
    return torch.cat(vis).numpy(), torch.cat(txt).numpy()


@torch.no_grad()
def encode_texts(model, texts: list[str], tokenizer, device="cpu", batch_size: int = 64,
                 text_cache: TextFeatureCache | None = None) -> np.ndarray:
    """Projected text embeddings ``(len(texts), D)`` of arbitrary strings (prompts)."""
    if text_cache is not None and text_tower_frozen(model) and texts:
        feats = text_cache.features(model, list(texts)).to(device)
        return model.text_head(feats).float().cpu().numpy()
    out = []
    for s in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, texts[s:s + batch_size])
        out.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)


@torch.no_grad()
def evaluate(model, ds: PairDataset, tokenizer, device="cpu", batch_size: int = 16,
             text_cache: TextFeatureCache | None = None) -> dict:
    """Val metrics: image→image nDCG@10 (Jaccard label overlap; the query's own patient
    excluded), mean zero-shot AUROC from report-phrased prompt ensembles
    (:mod:`medseek.eval.prompts`), and the modality gap (centroid distance, pair/cross
    cosine) between image and report embeddings."""
    from medseek.eval.classification import per_label_auroc_auprc, zero_shot_scores
    from medseek.eval.metrics import label_overlap_relevance, ndcg_at_k
    from medseek.eval.prompts import prompt_embeddings

    model.eval()
    v, t = embed_dataset(model, ds, tokenizer, device, batch_size, text_cache)
    labels = ds.label_matrix()
    out: dict = {"n": len(ds)}
    scores = v @ v.T
    np.fill_diagonal(scores, -np.inf)
    patients = np.array([r.patient_id or r.id for r in ds.records])
    scores[patients[:, None] == patients[None, :]] = -np.inf
    nd = ndcg_at_k(scores, label_overlap_relevance(labels, labels, "jaccard"), 10)
    out["ndcg@10"] = float(np.nanmean(nd)) if np.isfinite(nd).any() else float("nan")
    pe = prompt_embeddings(lambda texts: encode_texts(model, texts, tokenizer, device, text_cache=text_cache),
                           ds.label_names)
    zs = zero_shot_scores(v, pe)
    aucs = [a for a, _ in per_label_auroc_auprc(zs, labels, list(ds.label_names)).values()]
    finite = [a for a in aucs if not math.isnan(a)]
    out["zero_shot_auroc"] = float(np.mean(finite)) if finite else float("nan")
    mv, mt = v.mean(0), t.mean(0)
    out["gap_centroid_distance"] = float(np.linalg.norm(mv - mt))
    out["gap_pair_cosine"] = float((v * t).sum(1).mean())
    out["gap_cross_cosine"] = float(mv @ mt)
    if len(ds) >= 10:  # a 5-fold classifier needs a few rows per fold
        from medseek.eval.gap import modality_gap

        out["gap_separability"] = modality_gap(v, t, folds=5).separability
    model.train()
    return out


class _EvalLoss:
    """Loss config for evaluation encoding: global embeddings only."""

    w_region = 0.0
    w_organ = 0.0


_EVAL_LOSS = _EvalLoss()

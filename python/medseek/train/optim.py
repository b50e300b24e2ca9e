"""Muon for matrix weights, AdamW for everything else, in one optimizer.

Muon (Jordan et al. 2024; SigVLP trains with it): for a 2-D weight ``W`` (rows × cols)
with gradient ``G``::

    m ← μ·m + G                       (momentum buffer, μ = 0.95)
    u ← G + μ·m   (Nesterov)   or m
    O ← newton_schulz(u)              (≈ the orthogonal factor U·Vᵀ of u = U·S·Vᵀ)
    W ← W·(1 − lr·wd) − lr · max(1, rows/cols)^0.5 · O

``newton_schulz`` is :func:`medseek.kernels.newton_schulz` (bf16 on CUDA, fp32 torch
reference on CPU). Embedding tables, norms, biases, tokens, the logit scale/bias and any
other non-matrix tensor go to AdamW (decoupled weight decay on matrices only: norms,
biases and scalars are not decayed). One optimizer object keeps checkpointing simple.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import nn

from medseek import kernels

OPTIMIZERS = ("muon", "adamw")
SCHEDULES = ("constant", "cosine")


def lr_factor(cfg: "OptimConfig", step: int, total_steps: int) -> float:
    """The multiplier of every group's base lr at optimizer step ``step`` (0-based) of
    ``total_steps``: linear warm-up, then constant or cosine down to ``min_lr_ratio``."""
    w = cfg.warmup_steps
    if w and step < w:
        return (step + 1) / w
    if cfg.schedule == "constant" or total_steps <= w + 1:
        return 1.0
    t = min(1.0, (step - w) / (total_steps - w - 1))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass(frozen=True)
class OptimConfig:
    name: str = "muon"  # "muon": Muon for matrices + AdamW for the rest; "adamw": AdamW only
    lr: float = 2e-2  # Muon learning rate
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    weight_decay: float = 0.01
    adam_lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    adam_weight_decay: float = 0.05  # on AdamW's matrix-shaped params (embedding tables)
    warmup_steps: int = 0  # linear warm-up of every group's lr
    # after warm-up: "constant", or "cosine" decay to min_lr_ratio x lr at the last step
    schedule: str = "constant"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim name must be one of {OPTIMIZERS}, got {self.name!r}")
        for n in ("lr", "adam_lr"):
            if not getattr(self, n) > 0:
                raise ValueError(f"{n} must be > 0, got {getattr(self, n)!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.ns_steps, int) or self.ns_steps < 1:
            raise ValueError(f"ns_steps must be an int >= 1, got {self.ns_steps!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))


class MuonWithAdamW(torch.optim.Optimizer):
    """Param groups with ``use_muon=True`` take Muon steps, the others AdamW steps."""

    def __init__(self, groups: list[dict], cfg: OptimConfig) -> None:
        defaults = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                        ns_steps=cfg.ns_steps, weight_decay=cfg.weight_decay,
                        betas=cfg.adam_betas, eps=cfg.adam_eps, use_muon=False)
        super().__init__(groups, defaults)
        for g in self.param_groups:
            if g["use_muon"] and any(p.dim() != 2 for p in g["params"]):
                raise ValueError("Muon groups may only hold 2-D weight matrices")
            g.setdefault("base_lr", g["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            if g["use_muon"]:
                self._muon(g)
            else:
                self._adamw(g)
        return loss

    def _muon(self, g: dict) -> None:
        for p in g["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf = state["momentum_buffer"]
            grad = p.grad.float()
            buf.mul_(g["momentum"]).add_(grad)
            update = grad.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
            ortho = kernels.newton_schulz(update, g["ns_steps"]).float()
            rows, cols = p.shape
            p.mul_(1.0 - g["lr"] * g["weight_decay"])
            p.add_(ortho.to(p.dtype), alpha=-g["lr"] * max(1.0, rows / cols) ** 0.5)

    def _adamw(self, g: dict) -> None:
        beta1, beta2 = g["betas"]
        for p in g["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            t = float(state["step"])
            grad = p.grad.float()
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(g["eps"])
            p.mul_(1.0 - g["lr"] * g["weight_decay"])
            p.addcdiv_((state["exp_avg"] / (1 - beta1**t)).to(p.dtype), denom.to(p.dtype), value=-g["lr"])

    def set_lr_factor(self, factor: float) -> None:
        """Scale every group's lr to ``factor × base_lr`` (warm-up / schedules)."""
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor


def split_parameters(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters Muon takes (2-D matrices of Linear layers) and the rest.

    Embedding tables (``nn.Embedding``) are looked up row by row, not multiplied as
    matrices, so they stay with AdamW, as do norms, biases, tokens and scalars.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    muon, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (muon if p.dim() == 2 and id(p) not in embedding_params else other).append(name)
    return muon, other


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> tuple[MuonWithAdamW, dict]:
    """The optimizer and a report of the split: ``{"muon": {...}, "adamw": {...}}`` with
    parameter-name lists and scalar counts per group."""
    muon_names, other_names = split_parameters(model)
    params = dict(model.named_parameters())
    if cfg.name == "adamw":
        other_names, muon_names = muon_names + other_names, []
    decay = [n for n in other_names if params[n].dim() >= 2]
    no_decay = [n for n in other_names if params[n].dim() < 2]
    groups = []
    if muon_names:
        groups.append(dict(params=[params[n] for n in muon_names], use_muon=True, lr=cfg.lr,
                           weight_decay=cfg.weight_decay, name="muon"))
    for names, wd, label in ((decay, cfg.adam_weight_decay, "adamw_decay"), (no_decay, 0.0, "adamw_no_decay")):
        if names:
            groups.append(dict(params=[params[n] for n in names], use_muon=False, lr=cfg.adam_lr,
                               weight_decay=wd, name=label))
    report = {
        g: {"names": names, "tensors": len(names), "scalars": int(sum(params[n].numel() for n in names))}
        for g, names in (("muon", muon_names), ("adamw_decay", decay), ("adamw_no_decay", no_decay))
    }
    return MuonWithAdamW(groups, cfg), report


def describe_split(report: dict) -> str:
    """One line per group: tensors and scalars."""
    return "; ".join(f"{g}: {r['tensors']} tensors, {r['scalars']:,} scalars" for g, r in report.items())

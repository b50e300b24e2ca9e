"""Muon + AdamW: the parameter split, orthogonalised matrix updates, AdamW for the rest."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseek.train.optim import OptimConfig, build_optimizer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 24)
        self.norm = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 6)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, ids):
        return self.fc2(self.norm(torch.relu(self.fc1(self.emb(ids))))) * self.scale


def loss_of(net):
    ids = torch.arange(10).repeat(3)
    target = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    return (net(ids) - target).pow(2).mean()


def test_split_sends_matrices_to_muon_and_the_rest_to_adamw():
    torch.manual_seed(0)
    _, report = build_optimizer(Net(), OptimConfig())
    assert report["muon"]["names"] == ["fc1.weight", "fc2.weight"]
    assert report["adamw_decay"]["names"] == ["emb.weight"]
    assert set(report["adamw_no_decay"]["names"]) == {"fc1.bias", "norm.weight", "norm.bias", "fc2.bias", "scale"}
    _, only_adam = build_optimizer(Net(), OptimConfig(name="adamw"))
    assert only_adam["muon"]["tensors"] == 0


def test_muon_update_is_orthogonalised_and_scaled():
    torch.manual_seed(0)
    net = Net()
    cfg = OptimConfig(lr=0.05, weight_decay=0.0)
    opt, _ = build_optimizer(net, cfg)
    loss_of(net).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    for name, (rows, cols) in (("fc1.weight", (24, 8)), ("fc2.weight", (6, 24))):
        delta = (before[name] - dict(net.named_parameters())[name].detach()) / (cfg.lr * max(1, rows / cols) ** 0.5)
        s = torch.linalg.svdvals(delta)
        g = torch.linalg.svdvals(grads[name])
        # the quintic Newton–Schulz maps every singular value into about [0.7, 1.2]
        assert 0.6 < float(s.min()) and float(s.max()) < 1.25, s
        assert g.max() / g.min() > 3 * (s.max() / s.min())  # the raw gradient was far from it


def test_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    ours = Net()
    ref = Net()
    ref.load_state_dict(ours.state_dict())
    for net in (ours, ref):  # matrices frozen: otherwise Muon's steps change later gradients
        net.fc1.weight.requires_grad_(False)
        net.fc2.weight.requires_grad_(False)
    cfg = OptimConfig(adam_lr=0.01, adam_weight_decay=0.1)
    opt, report = build_optimizer(ours, cfg)
    assert report["muon"]["tensors"] == 0
    adam_names = report["adamw_decay"]["names"] + report["adamw_no_decay"]["names"]
    params = dict(ref.named_parameters())
    torch_opt = torch.optim.AdamW(
        [{"params": [params[n] for n in report["adamw_decay"]["names"]], "weight_decay": 0.1},
         {"params": [params[n] for n in report["adamw_no_decay"]["names"]], "weight_decay": 0.0}],
        lr=0.01, betas=cfg.adam_betas, eps=cfg.adam_eps)
    initial = {k: v.clone() for k, v in ours.state_dict().items()}
    for _ in range(3):
        for net, o in ((ours, opt), (ref, torch_opt)):
            o.zero_grad()
            loss_of(net).backward()
            o.step()
    got = dict(ours.named_parameters())
    for n in adam_names:
        torch.testing.assert_close(got[n], params[n], rtol=1e-5, atol=1e-6)
        assert not torch.equal(got[n], initial[n]), n  # the step moved it


def test_optim_config_errors_name_the_field():
    with pytest.raises(ValueError, match="optim name"):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError, match="momentum"):
        OptimConfig(momentum=1.0)


def test_lr_schedule_warms_up_then_holds_or_decays():
    from medseek.train.optim import lr_factor

    const = OptimConfig(warmup_steps=4)
    assert [lr_factor(const, s, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(cos, s, 10) for s in range(12)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[9] == pytest.approx(0.1)  # first and last step
    assert f[10] == f[11] == pytest.approx(0.1)  # past the recipe's steps: stays at the floor
    assert all(a > b for a, b in zip(f[4:9], f[5:10]))
    assert f[6] + f[7] == pytest.approx(1.1)  # symmetric about the midpoint of the decay
    with pytest.raises(ValueError, match="schedule must be one of"):
        OptimConfig(schedule="step")
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        OptimConfig(min_lr_ratio=1.5)

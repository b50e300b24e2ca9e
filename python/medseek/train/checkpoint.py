"""safetensors checkpoints that resume training exactly.

One file holds every tensor the continuation depends on:

* ``model.<name>``: the model's state dict;
* ``optim.<param index>.<key>``: the optimizer state (momentum buffers, Adam moments);
* ``rng.torch``, ``rng.cuda.<i>``: the global torch RNG states;

and, as JSON strings in the safetensors metadata, the optimizer's param groups
(``optim_groups``) and the trainer state (``trainer``: step, sampler position, samples
seen, compute spent, ...). The file is written to a temporary name and renamed, so a
crash never leaves half a checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict) -> Path:
    """Write model, optimizer, RNG and ``trainer_state`` (JSON-serialisable) to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous().clone()
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {idx}.{key} is {type(value).__name__}, not a tensor")
            tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    metadata = {"optim_groups": json.dumps(opt["param_groups"]), "trainer": json.dumps(trainer_state),
                "format": "medseek-train-1"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict:
    """Load what :func:`save_checkpoint` wrote into ``model`` (and ``optimizer``); restore
    the RNG states; return the trainer state dict."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "medseek-train-1":
            raise ValueError(f"checkpoint {str(path)!r} is not a medseek training checkpoint")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    device = next(model.parameters()).device
    model_state = {k[len("model."):]: v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=True)
    if optimizer is not None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["optim_groups"])})
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("rng.cuda.")]))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return json.loads(meta["trainer"])


def load_model_weights(path: str | Path, model: nn.Module) -> dict:
    """Only the model weights of a training checkpoint (for eval / export); returns the
    trainer state."""
    return load_checkpoint(path, model, None, restore_rng=False)

"""Federated training of the dual encoder over Flower (Med-MMFL style, medseek issue 17).

The dual encoder and its losses are those of :mod:`medseek.train.losses`; only the data
and the aggregation are federated. A run is one :class:`FederatedConfig`:

* the corpus's ``train`` split is cut into ``clients`` partitions by *patient* (a
  patient's images never sit at two sites): ``iid`` (shuffled patients dealt round
  robin), ``site`` (a hash of the patient id picks the site, as a hospital would hold
  its own patients) or ``dirichlet`` (per primary label, the share of each client drawn
  from ``Dirichlet(alpha)``: alpha 0.2 is strongly non-IID, 0.8 mildly);
* ``missing`` names clients that hold one modality only (``"image"``: radiographs and
  their curated labels, no report text; ``"report"``: report text, no pixels). Such a
  client cannot form image↔report pairs, so it trains only the finding/evidence loss
  (``LossConfig.w_finding``) on the embedding it has; the recipe must turn it on.
  ``"none"`` leaves a client's data out (it answers every round with 0 examples): the
  control that says whether one-modality clients add anything;
* ``strategy``: ``fedavg`` (example-weighted mean), ``fedprox`` (the same mean; each
  client adds ``mu/2 · ||w - w_global||²`` to its loss) or ``fednova`` (each client runs
  a number of local steps proportional to its data, and the server normalises each
  update by its step count before averaging, so clients that ran longer do not drag the
  model towards their own optimum: Wang et al. 2020).

Processes: :func:`run_federated` starts a real Flower server process and one process
per client, all on ``127.0.0.1`` over gRPC (``flwr.server.start_server`` /
``flwr.client.start_client``; Flower marks these deprecated since 1.13 in favour of
SuperLink/SuperNode deployments, and logs so in the child processes). Only trainable
weights and BatchNorm running statistics travel (the frozen text tower is rebuilt from
the same seed everywhere); the bytes of those payloads, server→clients and
clients→server, are counted per round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

PARTITIONS = ("iid", "site", "dirichlet")
STRATEGIES = ("fedavg", "fedprox", "fednova")
MODALITIES = ("both", "image", "report")


@dataclass
class FederatedConfig:
    """One federated run (JSON keys are these fields)."""

    recipe: str
    data: str
    out: str = "runs/federated"
    clients: int = 4
    rounds: int = 5
    local_steps: int = 40
    partition: str = "iid"
    alpha: float = 0.5
    strategy: str = "fedavg"
    mu: float = 0.01
    missing: dict = field(default_factory=dict)  # client index (str or int) -> "image" | "report"
    seed: int = 0
    batch_size: int | None = None  # default: the recipe's
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise ValueError(f"federated: partition {self.partition!r} is not one of {PARTITIONS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"federated: strategy {self.strategy!r} is not one of {STRATEGIES}")
        for name in ("clients", "rounds", "local_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"federated: {name} must be >= 1, got {getattr(self, name)}")
        if self.partition == "dirichlet" and not self.alpha > 0:
            raise ValueError(f"federated: dirichlet alpha must be > 0, got {self.alpha}")
        if self.mu < 0:
            raise ValueError(f"federated: mu must be >= 0, got {self.mu}")
        self.missing = {int(k): v for k, v in self.missing.items()}
        for k, v in self.missing.items():
            if not 0 <= k < self.clients:
                raise ValueError(f"federated: missing names client {k}, but there are {self.clients} clients")
            if v not in ("image", "report", "none"):
                raise ValueError(f"federated: client {k} modality {v!r} must be 'image', 'report' "
                                 "or 'none'")

    def modality(self, client: int) -> str:
        """What client ``client`` holds: ``both``, ``image``, ``report`` or ``none`` (its
        data left out: it takes part in every round and sends the global weights back with
        0 examples, so aggregation ignores it; the control for one-modality clients)."""
        return self.missing.get(int(client), "both")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["missing"] = {str(k): v for k, v in self.missing.items()}
        return out


def load_federated_config(path_or_dict, **overrides) -> FederatedConfig:
    """A :class:`FederatedConfig` from a JSON file (or dict); unknown keys are an error."""
    raw = dict(path_or_dict) if isinstance(path_or_dict, dict) else json.loads(Path(path_or_dict).read_text())
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(FederatedConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"federated config: unknown keys {unknown}; known: {sorted(known)}")
    return FederatedConfig(**raw)


# ---------------------------------------------------------------------------- partitions


def _site_of(patient: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(patient.encode()).digest()[:8], "big") % n


def partition_patients(patients: np.ndarray, labels: np.ndarray, n_clients: int, scheme: str,
                       alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Item indices of each client. ``patients`` (N,) ids, ``labels`` (N, L) bool.

    Whole patients move together. ``dirichlet`` groups patients by their primary label
    (the label most items of the patient carry, rarest first on ties; ``-1`` when none)
    and splits each group over the clients with shares drawn from ``Dirichlet(alpha)``;
    it redraws (up to 50 times) until every client holds at least one patient."""
    if scheme not in PARTITIONS:
        raise ValueError(f"federated: partition {scheme!r} is not one of {PARTITIONS}")
    uniq, inverse = np.unique(patients, return_inverse=True)
    if len(uniq) < n_clients:
        raise ValueError(f"federated: {len(uniq)} patients cannot fill {n_clients} clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(uniq))
        owner = np.empty(len(uniq), dtype=int)
        owner[order] = np.arange(len(uniq)) % n_clients
    elif scheme == "site":
        owner = np.array([_site_of(str(p), n_clients) for p in uniq])
    else:
        freq = labels.sum(0)
        primary = np.full(len(uniq), -1)
        for j in range(len(uniq)):
            counts = labels[inverse == j].sum(0)
            if counts.any():  # most frequent label of the patient; ties to the rarer label
                best = np.flatnonzero(counts == counts.max())
                primary[j] = best[np.argmin(freq[best])]
        for _ in range(50):
            owner = np.empty(len(uniq), dtype=int)
            for c in np.unique(primary):
                members = rng.permutation(np.flatnonzero(primary == c))
                share = rng.dirichlet(np.full(n_clients, float(alpha)))
                cuts = (np.cumsum(share)[:-1] * len(members)).round().astype(int)
                for k, part in enumerate(np.split(members, cuts)):
                    owner[part] = k
            if len(np.unique(owner)) == n_clients:
                break
        else:
            raise ValueError(f"federated: dirichlet alpha {alpha} left a client empty in 50 draws; "
                             "use fewer clients or a larger alpha")
    item_owner = owner[inverse]
    return [np.flatnonzero(item_owner == k) for k in range(n_clients)]


def label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over clients of the total-variation distance between the client's label
    distribution (label counts normalised to sum 1) and the whole split's: 0 for
    identical mixes, up to 1. The non-IID measure of the partition tests and tables."""
    def dist(rows: np.ndarray) -> np.ndarray:
        c = rows.sum(0).astype(np.float64)
        return c / max(c.sum(), 1.0)

    whole = dist(labels)
    return float(np.mean([0.5 * np.abs(dist(labels[p]) - whole).sum() for p in parts]))


def client_item(ds, i: int, modality: str) -> dict:
    """Item ``i`` of ``ds`` as a client holding ``modality`` sees it. An image-only
    client has no report (empty text; finding targets from the curated labels alone); a
    report-only client never reads the pixels (no ``image`` key)."""
    from dataclasses import replace

    from .data import item_findings

    if modality not in MODALITIES:
        raise ValueError(f"federated: modality {modality!r} is not one of {MODALITIES}")
    rec = ds.records[i]
    if modality == "both":
        return ds[i]
    col = {n: j for j, n in enumerate(ds.label_names)}
    labels = np.zeros(len(ds.label_names), dtype=np.float32)
    labels[[col[lab] for lab in rec.labels]] = 1.0
    if modality == "report":
        return {"report": rec.report, "labels": labels, "id": rec.id,
                "findings": item_findings(rec.report, rec.labels)}
    item = {"report": "", "labels": labels, "id": rec.id, "findings": item_findings("", rec.labels)}
    item.update(ds._image(replace(rec, report="")))
    return item


# ---------------------------------------------------------------------------- strategy math


def fedavg(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """Weighted mean of each layer over clients (weights: example counts; a client with
    0 examples, whose data is left out, counts for nothing)."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"fedavg: {len(updates)} updates and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"fedavg: weights must be >= 0 with a positive sum, got {weights}")
    w = w / w.sum()
    return [sum(wk * u[j].astype(np.float64) for wk, u in zip(w, updates)).astype(updates[0][j].dtype)
            for j in range(len(updates[0]))]


def fednova(global_w: list[np.ndarray], updates: list[list[np.ndarray]], weights: list[float],
            taus: list[float]) -> list[np.ndarray]:
    """FedNova: ``w = w_g - tau_eff · Σ p_i (w_g - w_i) / tau_i`` with ``p_i`` the data
    shares and ``tau_eff = Σ p_i tau_i`` (local steps). Equal taus give FedAvg."""
    p = np.asarray(weights, dtype=np.float64)
    if (p < 0).any() or not p.sum() > 0:
        raise ValueError(f"fednova: weights must be >= 0 with a positive sum, got {weights}")
    p = p / p.sum()
    tau = np.asarray(taus, dtype=np.float64)
    if not (tau > 0).all():
        raise ValueError(f"fednova: local step counts must be > 0, got {taus}")
    eff = float((p * tau).sum())
    out = []
    for j, g in enumerate(global_w):
        g64 = g.astype(np.float64)
        d = sum(pk * (g64 - u[j].astype(np.float64)) / tk for pk, tk, u in zip(p, tau, updates))
        out.append((g64 - eff * d).astype(g.dtype))
    return out


def proximal_term(params: list[torch.Tensor], global_params: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu/2 · Σ ||w - w_global||²`` (its gradient pulls w toward w_global)."""
    return 0.5 * mu * sum(((p - g.detach()) ** 2).sum() for p, g in zip(params, global_params))


def payload_bytes(arrays: list[np.ndarray]) -> int:
    """Bytes of the weight arrays of one message (Flower's framing not counted)."""
    return int(sum(a.nbytes for a in arrays))


# ---------------------------------------------------------------------------- local training


def build_model(fc: FederatedConfig):
    """The recipe's model from its seed (identical in every process) and its trainable
    parameter names, in the order weights travel."""
    from medseek.models.factory import create_model

    from .recipe import load_recipe
    from .text_features import freeze_text_layers

    overrides = {"batch_size": fc.batch_size} if fc.batch_size else {}
    cfg = load_recipe(fc.recipe, **overrides)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained_text=cfg.pretrained_text, **cfg.model_overrides)
    freeze_text_layers(model, cfg.text_trainable_layers)
    return cfg, model, exchanged_names(model)


def exchanged_names(model) -> list[str]:
    """What travels: the trainable parameters, then the BatchNorm running statistics (the
    conv stem's), which are averaged too: a global model keeping its initial statistics
    embeds at chance however well the clients trained."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return names + [n for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]


def _tensors(model) -> dict:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def get_weights(model, names: list[str]) -> list[np.ndarray]:
    params = _tensors(model)
    return [params[n].detach().cpu().numpy().copy() for n in names]


def set_weights(model, names: list[str], arrays: list[np.ndarray]) -> None:
    params = _tensors(model)
    if len(arrays) != len(names):
        raise ValueError(f"federated: got {len(arrays)} weight arrays for {len(names)} parameters")
    with torch.no_grad():
        for n, a in zip(names, arrays):
            if tuple(a.shape) != tuple(params[n].shape):
                raise ValueError(f"federated: weight {n} has shape {a.shape}, model wants {tuple(params[n].shape)}")
            params[n].copy_(torch.from_numpy(np.asarray(a)))


def client_partition(fc: FederatedConfig, train) -> list[np.ndarray]:
    patients = np.array([r.patient_id or r.study_id or r.id for r in train.records])
    return partition_patients(patients, train.label_matrix(), fc.clients, fc.partition, fc.alpha, fc.seed)


def local_loss(model, items: list[dict], modality: str, cfg, tokenizer, text_ids: dict,
               text_cache=None, shift_seed: int | None = None) -> tuple[torch.Tensor, dict]:
    """The client's loss on a batch: the recipe's full loss for a client with both
    modalities; for a one-modality client only the finding loss on that embedding.
    With ``shift_seed`` the images get the recipe's random shift, as in the Trainer."""
    import torch.nn.functional as F

    from .data import collate
    from .loop import cached_text_features, shift_images
    from .losses import combine_losses, encode_batch

    if modality == "both":
        batch = collate(items, tokenizer, text_ids)
        if shift_seed is not None and cfg.augment_shift > 0:
            shift_images(batch, cfg.augment_shift, shift_seed)
        if text_cache is not None:
            batch.update(cached_text_features(model, items, text_cache))
        return combine_losses(model, encode_batch(model, batch, cfg.loss), batch, cfg.loss)
    if cfg.loss.w_finding <= 0 or model.finding_head is None:
        raise ValueError(f"federated: a {modality}-only client trains the finding loss, but the recipe "
                         "has loss.w_finding 0 or a model without finding_head")
    findings = torch.from_numpy(np.stack([it["findings"] for it in items]))
    if modality == "image":
        batch = {"images": torch.from_numpy(np.stack([it["image"] for it in items]))}
        if shift_seed is not None and cfg.augment_shift > 0:
            shift_images(batch, cfg.augment_shift, shift_seed)
        emb = model.encode_image(batch["images"])
    else:
        from .data import tokenize

        texts = [it["report"] for it in items]
        if text_cache is not None:
            emb = model.text_head(text_cache.features(model, texts))
        else:
            emb = model.encode_text(*tokenize(tokenizer, texts))
    loss = F.binary_cross_entropy_with_logits(model.finding_logits(emb), findings.to(emb.dtype))
    return cfg.loss.w_finding * loss, {"finding": float(loss.detach())}


def local_train(model, names, cfg, fc: FederatedConfig, ds, indices: np.ndarray, modality: str,
                steps: int, round_no: int, tokenizer, text_cache=None, cache: dict | None = None) -> dict:
    """``steps`` optimizer steps on the client's items from the current global weights;
    the optimizer is fresh each round, its lr schedule that of the whole run
    (``rounds × local_steps`` steps)."""
    from .optim import build_optimizer, lr_factor

    cache = {} if cache is None else cache
    opt, _ = build_optimizer(model, cfg.optim)
    params = dict(model.named_parameters())
    trainable = [params[n] for n in names if n in params and params[n].requires_grad]
    anchor = [p.detach().clone() for p in trainable]
    gen = np.random.default_rng([fc.seed, round_no, len(indices)])
    total = fc.rounds * fc.local_steps
    bs = min(cfg.batch_size, len(indices))
    model.train()
    last = {}
    for s in range(steps):
        chosen = gen.choice(indices, size=bs, replace=False)
        items = []
        for i in chosen:
            if int(i) not in cache:
                cache[int(i)] = client_item(ds, int(i), modality)
            items.append(cache[int(i)])
        loss, parts = local_loss(model, items, modality, cfg, tokenizer, ds.text_ids, text_cache,
                                 shift_seed=cfg.seed * 1_000_003 + round_no * 10_007 + s)
        if fc.strategy == "fedprox" and fc.mu > 0:
            loss = loss + proximal_term(trainable, anchor, fc.mu)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        step = (round_no - 1) * fc.local_steps + min(s, fc.local_steps - 1)
        opt.set_lr_factor(lr_factor(cfg.optim, min(step, total - 1), total))
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = {"loss": float(loss.detach()), **parts}
    return last


def client_steps(fc: FederatedConfig, sizes: list[int], client: int) -> int:
    """Local steps of ``client`` per round: ``local_steps`` for FedAvg/FedProx; for
    FedNova proportional to the client's data (mean ``local_steps``), at least 1."""
    if fc.strategy != "fednova":
        return fc.local_steps
    return max(1, int(round(fc.local_steps * sizes[client] * len(sizes) / sum(sizes))))


# ---------------------------------------------------------------------------- processes


def _server(fc: FederatedConfig, address: str) -> None:
    import flwr as fl
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    torch.set_num_threads(1)
    _, model, names = build_model(fc)
    init = get_weights(model, names)
    out = Path(fc.out)
    rounds_log: list[dict] = []

    class Strategy(FedAvg):
        """Flower's FedAvg plumbing with medseek's aggregation (fedavg / fednova) and
        payload accounting."""

        current = init

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"federated: round {server_round} had {len(failures)} failed clients")
            ups = [parameters_to_ndarrays(r.parameters) for _, r in results]
            ns = [r.num_examples for _, r in results]
            if fc.strategy == "fednova":
                new = fednova(self.current, ups, ns, [r.metrics["tau"] for _, r in results])
            else:
                new = fedavg(ups, ns)
            rounds_log.append({
                "round": server_round, "clients": len(results),
                "bytes_down": payload_bytes(self.current) * len(results),
                "bytes_up": sum(payload_bytes(u) for u in ups),
                "client_loss": {str(r.metrics["client"]): r.metrics["loss"] for _, r in results},
                "update_norm": float(np.sqrt(sum(((a.astype(np.float64) - b) ** 2).sum()
                                                 for a, b in zip(new, self.current))))})
            self.current = new
            np.savez(out / "global.npz", *new)
            np.savez(out / f"global_round{server_round}.npz", *new)  # rounds-to-target curves
            (out / "rounds.json").write_text(json.dumps(rounds_log, indent=1))
            return ndarrays_to_parameters(new), {}

    strategy = Strategy(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=fc.clients,
                        min_evaluate_clients=0, min_available_clients=fc.clients,
                        initial_parameters=ndarrays_to_parameters(init),
                        on_fit_config_fn=lambda r: {"round": r})
    fl.server.start_server(server_address=address, config=fl.server.ServerConfig(num_rounds=fc.rounds),
                           strategy=strategy)


def _client(fc: FederatedConfig, client: int, address: str) -> None:
    import flwr as fl

    from .data import PairDataset, load_tokenizer
    from .text_features import TextFeatureCache, text_tower_frozen

    torch.set_num_threads(1)
    cfg, model, names = build_model(fc)
    train = PairDataset.from_manifest(fc.data, model.cfg, "train")
    parts = client_partition(fc, train)
    mine, modality = parts[client], fc.modality(client)
    steps = client_steps(fc, [len(p) for p in parts], client)
    tokenizer = load_tokenizer(model.cfg.text.max_length)
    text_cache = TextFeatureCache(tokenizer) if text_tower_frozen(model) else None
    cache: dict = {}

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config):
            return get_weights(model, names)

        def fit(self, parameters, config):
            if modality == "none":  # data left out: weight 0 in every aggregation
                return parameters, 0, {"tau": 1, "loss": float("nan"), "client": client}
            set_weights(model, names, parameters)
            last = local_train(model, names, cfg, fc, train, mine, modality, steps, int(config["round"]),
                               tokenizer, text_cache, cache)
            return get_weights(model, names), len(mine), {"tau": steps, "loss": last["loss"], "client": client}

    fl.client.start_client(server_address=address, client=Client().to_client())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_federated(fc: FederatedConfig, *, nice: int = 0) -> dict:
    """Start the server and the client processes on 127.0.0.1, wait for the rounds, and
    return the run summary (also ``OUT/summary.json``); the final global weights are in
    ``OUT/global.npz``. A process that fails stops the run with its log's tail."""
    out = Path(fc.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "federated.json").write_text(json.dumps(fc.to_dict(), indent=1))
    address = f"127.0.0.1:{_free_port()}"
    prefix = ["nice", "-n", str(nice)] if nice else []
    base = [*prefix, sys.executable, "-m", "medseek.train.federated", "--config", str(out / "federated.json")]
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    t0 = time.perf_counter()
    try:
        logs["server"] = (out / "server.log").open("w")
        procs["server"] = subprocess.Popen([*base, "server", "--address", address],
                                           stdout=logs["server"], stderr=subprocess.STDOUT)
        _wait_listening(address, procs["server"], out / "server.log")
        for k in range(fc.clients):
            logs[f"client{k}"] = (out / f"client{k}.log").open("w")
            procs[f"client{k}"] = subprocess.Popen([*base, "client", "--client", str(k), "--address", address],
                                                   stdout=logs[f"client{k}"], stderr=subprocess.STDOUT)
        deadline = time.time() + fc.timeout_s
        while any(p.poll() is None for p in procs.values()):
            for name, p in procs.items():
                if p.poll() not in (None, 0):
                    raise RuntimeError(f"federated: {name} exited with {p.returncode}:\n"
                                       + _tail(out / f"{name}.log"))
            if time.time() > deadline:
                raise TimeoutError(f"federated: run did not finish in {fc.timeout_s} s")
            time.sleep(0.5)
        for name, p in procs.items():
            if p.returncode != 0:
                raise RuntimeError(f"federated: {name} exited with {p.returncode}:\n" + _tail(out / f"{name}.log"))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs.values():
            f.close()
    rounds = json.loads((out / "rounds.json").read_text())
    if len(rounds) != fc.rounds:
        raise RuntimeError(f"federated: {len(rounds)} of {fc.rounds} rounds finished; see {out}/server.log")
    summary = {"config": fc.to_dict(), "wall_s": time.perf_counter() - t0, "rounds": rounds,
               "bytes_per_round": float(np.mean([r["bytes_down"] + r["bytes_up"] for r in rounds]))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def _wait_listening(address: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"federated: server exited with {proc.returncode}:\n" + _tail(log))
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"federated: server did not listen on {address} in {timeout} s")


def load_global(fc: FederatedConfig, round_no: int | None = None):
    """The model with the run's final global weights (``OUT/global.npz``), or those after
    round ``round_no`` (``OUT/global_round<n>.npz``)."""
    cfg, model, names = build_model(fc)
    name = "global.npz" if round_no is None else f"global_round{round_no}.npz"
    with np.load(Path(fc.out) / name) as z:
        set_weights(model, names, [z[f"arr_{j}"] for j in range(len(names))])
    return cfg, model


def evaluate_federated(fc: FederatedConfig, n_boot: int = 1000, initial: bool = False,
                       round_no: int | None = None) -> dict:
    """Test metrics of the final global model (:func:`medseek.train.ablation.evaluate_split`),
    or of the global model after round ``round_no``; with ``initial`` those of the seed's
    untrained model, the baseline every run starts from."""
    from .ablation import choose_labels, evaluate_split
    from .data import PairDataset, load_tokenizer
    from .text_features import TextFeatureCache, text_tower_frozen

    model = build_model(fc)[1] if initial else load_global(fc, round_no)[1]
    train = PairDataset.from_manifest(fc.data, model.cfg, "train")
    test = PairDataset.from_manifest(fc.data, model.cfg, "test")
    tok = load_tokenizer(model.cfg.text.max_length)
    cache = TextFeatureCache(tok) if text_tower_frozen(model) else None
    return evaluate_split(model, test, tok, choose_labels(train, test), text_cache=cache, n_boot=n_boot)


def main(argv: list[str] | None = None) -> int:
    """Entry of the server and client processes (``python -m medseek.train.federated``)."""
    ap = argparse.ArgumentParser(prog="medseek.train.federated")
    ap.add_argument("--config", required=True, help="federated config JSON")
    ap.add_argument("role", choices=("server", "client"), help="which process this is")
    ap.add_argument("--address", required=True, help="host:port of the Flower server (127.0.0.1)")
    ap.add_argument("--client", type=int, default=0, help="client index (client role)")
    args = ap.parse_args(argv)
    fc = load_federated_config(args.config)
    if args.role == "server":
        _server(fc, args.address)
    else:
        _client(fc, args.client, args.address)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

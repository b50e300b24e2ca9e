"""``medseek demo``'s build cache: phantom corpora, trained demo models, Triton repositories.

Each artefact lives under ``<out>/cache/<name>-<key>/`` where ``key`` hashes everything
that decides its content: the build or training parameters, the resolved recipe and model
config, the seed, the key of its inputs, the installed torch/ONNX versions and the source
files of the medseek code that makes it. A folder counts only once its ``done.json`` is
written (last), so an interrupted build is rebuilt, and a changed config gets a new key
instead of a stale artefact. Older folders of the same name are removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import medseek

PACKAGE = Path(medseek.__file__).resolve().parent
DONE = "done.json"


def source_hash(*parts: str) -> str:
    """SHA-256 over the ``.py`` files under package ``parts`` (files or folders); recipes
    and model configs enter the keys resolved, not as files."""
    h = hashlib.sha256()
    for part in parts:
        root = PACKAGE / part
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*.py") if p.is_file())
        for p in files:
            h.update(p.relative_to(PACKAGE).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Cache:
    """Build-once folders under ``root``; ``hits`` / ``misses`` name what was reused or built."""

    root: Path
    hits: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)

    def get(self, name: str, spec: dict, build) -> Path:
        """The folder of ``name`` for ``spec``: reused if complete, else ``build(folder)``."""
        key = _key(spec)
        folder = self.root / f"{name}-{key}"
        if (folder / DONE).is_file():
            self.hits.append(name)
            return folder
        self.misses.append(name)
        for old in self.root.glob(f"{name}-*"):
            if old.is_dir() and len(old.name) == len(name) + 17:
                shutil.rmtree(old)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        build(folder)
        (folder / DONE).write_text(json.dumps(
            {"name": name, "key": key, "spec": spec, "build_s": time.perf_counter() - t0},
            indent=1, sort_keys=True, default=str))
        return folder


# --------------------------------------------------------------------------- corpora

CORPUS_CODE = ("data/synth", "data/manifest.py", "data/iu.py")


def corpus_spec(kind: str, n: int, seed: int) -> dict:
    params = {"n": n, "seed": seed}
    if kind == "synth-ct":  # small matrices and few slices keep the demo quick
        params.update(matrix=(96, 128), slices=(40, 120))
    return {"kind": kind, "params": params, "code": source_hash(*CORPUS_CODE)}


def build_corpus(kind: str, folder: Path, params: dict) -> None:
    from medseek.data.synth.ct import build_synth_ct
    from medseek.data.synth.cxr import build_synth_cxr
    from medseek.data.synth.wrist import build_synth_wrist

    build = {"synth-cxr": build_synth_cxr, "synth-wrist": build_synth_wrist,
             "synth-ct": build_synth_ct}[kind]
    build(folder, progress=False, **params)


# --------------------------------------------------------------------------- training

MODEL_CODE = ("models", "train", "kernels", "data/manifest.py", "volume", "io")


def train_spec(recipe_name: str, steps: int | None, corpus_key: str) -> dict:
    import torch

    from medseek.models.factory import load_config
    from medseek.train.recipe import load_recipe

    recipe = load_recipe(recipe_name, **({"steps": steps} if steps is not None else {}))
    model_cfg = load_config(recipe.model, **recipe.model_overrides)
    return {"recipe": recipe.to_dict(), "model": _jsonable(model_cfg), "corpus": corpus_key,
            "torch": torch.__version__, "code": source_hash(*MODEL_CODE)}


def _jsonable(cfg) -> object:
    from dataclasses import asdict, is_dataclass

    return asdict(cfg) if is_dataclass(cfg) else cfg


def train_model(recipe_name: str, steps: int | None, corpus: Path, folder: Path) -> None:
    """``medseek train`` in process (same code path as the command)."""
    import argparse

    from medseek.train.commands import run_train

    args = argparse.Namespace(recipe=recipe_name, data=str(corpus), out=str(folder), steps=steps,
                              resume=False, device="cpu", no_progress=True, release=None)
    rc = run_train(args)
    if rc != 0:
        raise RuntimeError(f"medseek train --recipe {recipe_name} failed with exit code {rc}")


# --------------------------------------------------------------------------- export

# what an exported repository is made of: the graphs, and the spec.json beside them
# (EncoderSpec with the model's concept bank)
EXPORT_CODE = ("export", "encoders/preprocess.py", "encoders/base.py", "models/dual.py",
               "search/explain.py")


def export_spec(train_key: str) -> dict:
    import onnx
    import onnxruntime

    from medseek.export.repository import committed_repository

    templates = committed_repository()
    h = hashlib.sha256()
    for p in sorted(templates.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".pbtxt"):
            h.update(p.relative_to(templates).as_posix().encode())
            h.update(p.read_bytes())
    return {"trained": train_key, "code": source_hash(*EXPORT_CODE), "templates": h.hexdigest(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_model(model_name: str, overrides: dict, checkpoint: Path, repo: Path) -> dict:
    """ONNX export (verified against torch) into a Triton repository: ``medseek export``."""
    from medseek.models.factory import create_model
    from medseek.train.checkpoint import load_model_weights

    model = create_model(model_name, **overrides)
    load_model_weights(checkpoint, model)
    return _write_repository(model, repo)


def export_release(release: str | Path, repo: Path) -> dict:
    """A shipped (or reproduced) release into a Triton repository."""
    from medseek.models.release import load_release

    return _write_repository(load_release(release), repo)


def _write_repository(model, repo: Path) -> dict:
    import warnings

    from medseek.export.repository import RepositoryConfig, write_repository

    with warnings.catch_warnings():  # the exporter's notes on constant folding, not errors
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        return write_repository([model.eval()], repo, RepositoryConfig())


@dataclass(frozen=True)
class DemoModel:
    """One trained, exported demo model: ``site`` (chest-xr, wrist, chest-ct)."""

    site: str
    corpus: Path
    run: Path
    repo: Path
    metrics: dict
    card: dict | None = None  # the shipped (or reproduced) release's model card


def load_demo_model(m: DemoModel):
    """The torch model behind a demo model: its release (``m.run`` holds the release's
    card and weights), or the demo-trained checkpoint of its recipe."""
    from medseek.models.factory import create_model
    from medseek.models.release import load_release
    from medseek.train.checkpoint import load_model_weights

    if m.card is not None:
        return load_release(m.run / f"{m.site}.json")
    recipe = json.loads((m.run / "recipe.json").read_text())
    model = create_model(recipe["model"], **recipe.get("model_overrides", {}))
    load_model_weights(m.run / "checkpoint.safetensors", model)
    return model


def last_eval(run: Path) -> dict:
    """The last ``eval`` record of a run's metrics.jsonl ({} when none)."""
    path = run / "metrics.jsonl"
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "eval" in row:
                out = dict(row["eval"], step=row.get("step"))
    return out


def last_loss(run: Path) -> tuple[float | None, float | None]:
    """(first, last) training loss of a run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    losses = []
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                losses.append(float(row["loss"]))
    return (losses[0], losses[-1]) if losses else (None, None)


def prepare_release(cache: Cache, site: str, corpus_kind: str, n: int, seed: int, retrain: bool,
                    log) -> DemoModel:
    """The demo corpus and the site's shipped model exported to a Triton repository; with
    ``retrain``, the model is first reproduced from scratch (``medseek train --release``)
    and its test metrics compared with the shipped card's."""
    from medseek.models.release import WEIGHTS_DIR, read_card
    from medseek.train.release import compare_to_card, reproduce

    corpus = _corpus(cache, corpus_kind, n, seed, log)
    card = read_card(site)
    release: Path = WEIGHTS_DIR / f"{site}.json"
    if retrain:
        t0 = time.perf_counter()
        spec = {"release": site, "card": card["sha256"], "code": source_hash(*MODEL_CODE),
                "data": source_hash(*CORPUS_CODE)}
        run = cache.get(f"retrain-{site}", spec, lambda d: reproduce(site, d, log=log))
        new = read_card(run / "release" / f"{site}.json")
        log(f"{site:11s} model  {_state(cache, f'retrain-{site}')} from scratch: recipe "
            f"{card['recipe']}, {new['steps']} steps ({time.perf_counter() - t0:.1f} s)")
        for r in compare_to_card(new, card):
            log(f"{'':11s} {r['metric']:16s} shipped {r['shipped']:.3f}, retrained "
                f"{r['new']:.3f}: {'within' if r['ok'] else 'OUTSIDE'} ±{r['tolerance']}")
        release, card = run / "release" / f"{site}.json", new
    else:
        log(f"{site:11s} model  shipped release {site} ({card['model']}, recipe "
            f"{card['recipe']}, {card['steps']} steps, sha256 {card['sha256'][:12]}…)")
    t0 = time.perf_counter()
    espec = dict(export_spec(card["sha256"]), release=str(release))
    repo = cache.get(f"repo-{site}", espec, lambda d: export_release(release, d / "models"))
    models = sorted(p.name for p in (repo / "models").iterdir() if p.is_dir())
    log(f"{site:11s} Triton repository {_state(cache, f'repo-{site}')} {repo / 'models'}: "
        f"{', '.join(models)} ({time.perf_counter() - t0:.1f} s)")
    return DemoModel(site, corpus, release.parent, repo / "models",
                     {k: v["value"] for k, v in card["test"].items()}, card)


def _corpus(cache: Cache, corpus_kind: str, n: int, seed: int, log) -> Path:
    cspec = corpus_spec(corpus_kind, n, seed)
    t0 = time.perf_counter()
    corpus = cache.get(corpus_kind, cspec,
                       lambda d: build_corpus(corpus_kind, d, cspec["params"]))
    log(f"{corpus_kind:11s} corpus {_state(cache, corpus_kind)} {corpus} "
        f"({time.perf_counter() - t0:.1f} s)")
    return corpus


def prepare(cache: Cache, site: str, corpus_kind: str, n: int, recipe: str, steps: int | None,
            seed: int, log) -> DemoModel:
    """Corpus -> trained checkpoint -> Triton repository, each from the cache when it can."""
    corpus = _corpus(cache, corpus_kind, n, seed, log)
    tspec = train_spec(recipe, steps, corpus.name)
    tspec["seed"] = seed
    t0 = time.perf_counter()
    run = cache.get(f"train-{site}", tspec, lambda d: train_model(recipe, steps, corpus, d))
    first, last = last_loss(run)
    loss = f"loss {first:.3f} -> {last:.3f}, " if first is not None else ""
    log(f"{site:11s} model  {_state(cache, f'train-{site}')} recipe {recipe} "
        f"({tspec['recipe']['model']}, {tspec['recipe']['steps']} steps, {loss}"
        f"{time.perf_counter() - t0:.1f} s)")
    espec = export_spec(run.name)
    t0 = time.perf_counter()
    repo = cache.get(f"repo-{site}", espec,
                     lambda d: export_model(tspec["recipe"]["model"], tspec["recipe"]["model_overrides"],
                                            run / "checkpoint.safetensors",
                                            d / "models"))
    models = sorted(p.name for p in (repo / "models").iterdir() if p.is_dir())
    log(f"{site:11s} Triton repository {_state(cache, f'repo-{site}')} {repo / 'models'}: "
        f"{', '.join(models)} ({time.perf_counter() - t0:.1f} s)")
    return DemoModel(site, corpus, run, repo / "models", last_eval(run))


def _state(cache: Cache, name: str) -> str:
    return "reused" if cache.hits and cache.hits[-1] == name else "built"

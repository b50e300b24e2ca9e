"""Fill a Triton model repository from the committed configs and freshly exported graphs.

The committed ``model_repository/`` holds the configs (``<model>/config.pbtxt``, and
``<model>/configs/tensorrt.pbtxt`` for GPU hosts) and the python-backend sources
(``onnx_runtime_model.py``, ``text_tokenizer_model.py``). :func:`write_repository`
copies the configs of the models it writes into ``repo_dir`` (nothing to copy when
``repo_dir`` *is* the committed folder) and fills their version folders, which are build
outputs and gitignored::

    image_encoder/1/   model.onnx  model.py  spec.json        (image models)
    image_region_encoder/1/  model.onnx  model.py  spec.json  (image models with a region head)
    volume_encoder/1/  model.onnx  model.py  spec.json        (volume models)
    volume_pool/1/     model.onnx  model.py  spec.json        (volume models)
    text_encoder/1/    model.onnx  model.py  spec.json
    text_tokenizer/1/  tokenizer.json  model.py  spec.json
    text_ensemble/1/   (empty: ensembles have no artifact, but need the folder)

Each config is rendered from its template (:mod:`medseek.export.model_config`): every dim
the exported ONNX graph fixes (image size, patch size, widths, embedding dim) is written
as a number, so Triton reports it and rejects other shapes; ``-1`` stays where the graph
varies (tokens per chunk, chunks per volume, boxes, text length). With
``RepositoryConfig(name_prefix="wrist_")`` every model is named ``wrist_<model>`` (folders,
config names, the ensemble's steps), so several models' repositories can be merged and
served by one ``tritonserver`` (``medseek triton start --repo A --repo B``); each
``spec.json`` records the prefix as ``model_prefix`` for the clients. Writing into the
committed folder itself leaves its template configs as they are (generic dims, no prefix).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .model_config import check_config, check_prefix, onnx_dims, render_config
from .onnx import ExportConfig, export_onnx

ONNX_RUNNER = "onnx_runtime_model.py"
TOKENIZER_RUNNER = "text_tokenizer_model.py"
# exported graph -> repository model
GRAPH_MODELS = {"image": "image_encoder", "image_regions": "image_region_encoder",
                "chunks": "volume_encoder", "pool": "volume_pool", "text": "text_encoder"}
# models that the ensemble names as its steps (renamed with the prefix)
ENSEMBLE_STEPS = ("text_tokenizer", "text_encoder")


def committed_repository() -> Path:
    """The committed ``model_repository/`` (configs and python-backend sources).

    A wheel ships it as ``medseek/model_repository``; an editable install reads the
    source tree's top-level ``model_repository/``.
    """
    import medseek

    package = Path(medseek.__file__).resolve().parent
    for path in (package / "model_repository", package.parents[1] / "model_repository"):
        if (path / ONNX_RUNNER).is_file():
            return path
    raise FileNotFoundError(
        f"model repository templates not found in {package} or its source tree; pass "
        "templates= the model_repository/ folder of a medseek source checkout"
    )


@dataclass(frozen=True)
class RepositoryConfig:
    """version : the version folder to fill; export : ONNX export options;
    templates : folder holding the committed configs (None: :func:`committed_repository`);
    name_prefix : put before every model name (``"wrist_"`` -> ``wrist_image_encoder``),
    so repositories of several models can share one tritonserver; "" keeps the bare names"""

    version: int = 1
    export: ExportConfig = field(default_factory=ExportConfig)
    templates: Path | None = None
    name_prefix: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"version must be an int >= 1, got {self.version!r}")
        check_prefix(self.name_prefix)


def _write_config(templates: Path, repo: Path, model: str, prefix: str,
                  dims: dict[str, list[int]] | None = None) -> None:
    """``<repo>/<prefix><model>/config.pbtxt`` (and ``configs/*.pbtxt``) rendered from the
    template of ``model`` with the given tensor ``dims`` (see :func:`render_config`)."""
    src, dst = templates / model, repo / f"{prefix}{model}"
    if not (src / "config.pbtxt").is_file():
        raise FileNotFoundError(f"{src / 'config.pbtxt'} missing from the committed repository")
    if src.resolve() == dst.resolve():
        return  # exporting into the committed folder: its templates stay as committed
    files = [Path("config.pbtxt")]
    if (src / "configs").is_dir():
        files += sorted(p.relative_to(src) for p in (src / "configs").iterdir() if p.is_file())
    steps = {m: f"{prefix}{m}" for m in ENSEMBLE_STEPS} if model == "text_ensemble" else None
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.suffix != ".pbtxt":
            shutil.copy2(src / rel, dst / rel)
            continue
        where = f"{model}/{rel.as_posix()}"
        text = render_config((src / rel).read_text(), f"{prefix}{model}", dims, steps, where)
        check_config(text, f"{prefix}{model}", dims, where)
        (dst / rel).write_text(text)


def _write_spec(src: Path, dst: Path, prefix: str) -> None:
    """The export's ``spec.json`` with the repository's ``model_prefix`` added (clients
    read it to find their models; :class:`~medseek.encoders.EncoderSpec` ignores it)."""
    raw = json.loads(src.read_text())
    raw["model_prefix"] = prefix
    dst.write_text(json.dumps(raw, indent=2))


def _fresh_version_dir(repo: Path, model: str, version: int) -> Path:
    out = repo / model / str(version)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def write_repository(models, repo_dir: str | Path, cfg: RepositoryConfig = RepositoryConfig(),
                     *, text_from=None) -> dict[str, Path]:
    """Export ``models`` and write them into the Triton repository ``repo_dir``.

    Parameters
    ----------
    models : a :class:`~medseek.models.DualEncoder` or a list of them, at most one image
        and one volume model
    repo_dir : the repository folder (created)
    cfg : :class:`RepositoryConfig`
    text_from : which of ``models`` provides text_encoder; None = the first

    Returns
    -------
    dict model name (with ``cfg.name_prefix``) -> its filled version folder
    """
    from medseek.models.text_tower import locate_minilm

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise ValueError("models must hold at least one DualEncoder, got none")
    modalities = [m.modality for m in models]
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"models must hold at most one image and one volume model, got {modalities}")
    text_model = models[0] if text_from is None else text_from
    if not any(text_model is m for m in models):
        raise ValueError("text_from must be one of models")
    tokenizer = locate_minilm() / "tokenizer.json"
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    if text_model.cfg.text.vocab_size != vocab:
        raise ValueError(f"text.vocab_size is {text_model.cfg.text.vocab_size} but the MiniLM "
                         f"tokenizer has {vocab} tokens")
    templates = Path(cfg.templates) if cfg.templates is not None else committed_repository()
    repo = Path(repo_dir)
    prefix = cfg.name_prefix
    if prefix and repo.resolve() == templates.resolve():
        raise ValueError(f"name_prefix {prefix!r} needs a repository folder other than the "
                         f"committed templates {templates}: export into a folder of its own")
    repo.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="medseek-export-") as tmp:
        for model in models:
            paths = export_onnx(model, Path(tmp) / model.modality, cfg.export)
            for graph, model_name in GRAPH_MODELS.items():
                if graph not in paths or (graph == "text" and model is not text_model):
                    continue
                dims = onnx_dims(paths[graph])
                _write_config(templates, repo, model_name, prefix, dims)
                out = _fresh_version_dir(repo, prefix + model_name, cfg.version)
                shutil.copy2(paths[graph], out / "model.onnx")
                _write_spec(paths["spec"], out / "spec.json", prefix)
                shutil.copy2(templates / ONNX_RUNNER, out / "model.py")
                written[prefix + model_name] = out
            stale = repo / (prefix + GRAPH_MODELS["image_regions"]) / str(cfg.version)
            if model.modality == "image" and "image_regions" not in paths and stale.is_dir():
                # another model's region graph: clients of this spec would never call it,
                # but Triton would serve it beside this model
                shutil.rmtree(stale)
            if model is text_model:
                _write_config(templates, repo, "text_tokenizer", prefix)
                out = _fresh_version_dir(repo, prefix + "text_tokenizer", cfg.version)
                shutil.copy2(tokenizer, out / "tokenizer.json")
                _write_spec(paths["spec"], out / "spec.json", prefix)
                shutil.copy2(templates / TOKENIZER_RUNNER, out / "model.py")
                written[prefix + "text_tokenizer"] = out
                # the ensemble's output is text_encoder's: same embedding width
                text_dims = onnx_dims(paths["text"])
                _write_config(templates, repo, "text_ensemble", prefix,
                              {"embeddings": text_dims["embeddings"]})
                written[prefix + "text_ensemble"] = _fresh_version_dir(
                    repo, prefix + "text_ensemble", cfg.version)
    return written

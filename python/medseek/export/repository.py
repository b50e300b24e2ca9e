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
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .onnx import ExportConfig, export_onnx

ONNX_RUNNER = "onnx_runtime_model.py"
TOKENIZER_RUNNER = "text_tokenizer_model.py"
# exported graph -> repository model
GRAPH_MODELS = {"image": "image_encoder", "image_regions": "image_region_encoder",
                "chunks": "volume_encoder", "pool": "volume_pool", "text": "text_encoder"}


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
    templates : folder holding the committed configs (None: :func:`committed_repository`)"""

    version: int = 1
    export: ExportConfig = field(default_factory=ExportConfig)
    templates: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"version must be an int >= 1, got {self.version!r}")


def _copy_config(templates: Path, repo: Path, model: str) -> None:
    src, dst = templates / model, repo / model
    if not (src / "config.pbtxt").is_file():
        raise FileNotFoundError(f"{src / 'config.pbtxt'} missing from the committed repository")
    if src.resolve() == dst.resolve():
        return
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "config.pbtxt", dst / "config.pbtxt")
    if (src / "configs").is_dir():
        shutil.copytree(src / "configs", dst / "configs", dirs_exist_ok=True)


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
    dict model name -> its filled version folder
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
    repo.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="medseek-export-") as tmp:
        for model in models:
            paths = export_onnx(model, Path(tmp) / model.modality, cfg.export)
            for graph, model_name in GRAPH_MODELS.items():
                if graph not in paths or (graph == "text" and model is not text_model):
                    continue
                _copy_config(templates, repo, model_name)
                out = _fresh_version_dir(repo, model_name, cfg.version)
                shutil.copy2(paths[graph], out / "model.onnx")
                shutil.copy2(paths["spec"], out / "spec.json")
                shutil.copy2(templates / ONNX_RUNNER, out / "model.py")
                written[model_name] = out
            stale = repo / GRAPH_MODELS["image_regions"] / str(cfg.version)
            if model.modality == "image" and "image_regions" not in paths and stale.is_dir():
                # another model's region graph: clients of this spec would never call it,
                # but Triton would serve it beside this model
                shutil.rmtree(stale)
            if model is text_model:
                _copy_config(templates, repo, "text_tokenizer")
                out = _fresh_version_dir(repo, "text_tokenizer", cfg.version)
                shutil.copy2(tokenizer, out / "tokenizer.json")
                shutil.copy2(paths["spec"], out / "spec.json")
                shutil.copy2(templates / TOKENIZER_RUNNER, out / "model.py")
                written["text_tokenizer"] = out
                _copy_config(templates, repo, "text_ensemble")
                written["text_ensemble"] = _fresh_version_dir(repo, "text_ensemble", cfg.version)
    return written

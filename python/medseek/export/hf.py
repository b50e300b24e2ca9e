"""Foundation-model encoders from a local Hugging Face checkpoint, exported like medseek's.

A hospital's pretrained encoder enters medseek here: ``medseek export --from-hf DIR --out
OUT`` reads a checkpoint folder saved by ``save_pretrained`` (``config.json``,
safetensors, ``preprocessor_config.json``, and ``tokenizer.json`` for image-text
models), wraps the model in medseek's input conventions, traces it through the same ONNX
path as medseek's towers (:func:`medseek.export.onnx.trace_onnx`, checked against torch
with :func:`~medseek.export.onnx.compare_to_torch`) and writes a Triton model repository
that :class:`~medseek.encoders.OnnxRuntimeEncoder` and the Triton client serve unchanged.
Nothing is downloaded: transformers loads with ``local_files_only=True``.

================  ==================  =================================================
``model_type``    class               embeddings (each L2-normalised)
================  ==================  =================================================
``dinov2``        ``Dinov2Model``     image only: the CLS token after the final layer
                                      norm (``pooler_output``), which RAD-DINO's model
                                      card uses as its global image embedding; or, with
                                      ``pooling="cls_mean"``, CLS concatenated with the
                                      mean of the patch tokens (DINOv2's linear-probe
                                      features; twice the width)
``clip``          ``CLIPModel``       image and text through the model's own projection
                                      heads (``get_image_features``/``get_text_features``;
                                      text pooled at the end-of-text token)
``siglip``        ``SiglipModel``     image (attention-pooling head) and text (head on
                                      the last position); texts are padded to
                                      ``max_length`` with the pad token, as SigLIP was
                                      trained, so the last position is the same one
================  ==================  =================================================

Input conventions. medseek hands encoders ``(B, 1, H, W)`` float32 radiographs in
[0, 1] at the spec's image size (the service resizes each upload to it, scaled by
:func:`medseek.io.unit_intensity`: 8-bit by 255, deeper images to their min and max).
The image graph replicates the channel three times and normalises with the checkpoint's
``image_mean``/``image_std`` (``preprocessor_config.json``): what the checkpoint's image
processor does after its ``1/255`` rescale. The image size is the vision config's
``image_size`` for CLIP/SigLIP (their position embeddings fix it) and the processor's
crop (or resize) size for DINOv2. The service's resize replaces the processor's
resize-then-centre-crop: the whole radiograph is kept, not its centre.

Texts are tokenised with the checkpoint's own ``tokenizer.json`` by the same code as
medseek's MiniLM tower (:func:`medseek.encoders.preprocess.load_tokenizer`, and the Triton
``text_tokenizer`` model), with the checkpoint's pad token and padding rule recorded in
``spec.json`` (``tokenizer``). An image-only model's spec says ``has_text: false``: no
text graph is written, its encoders refuse texts, and the service refuses text queries
and text items bound for it (INVALID_ARGUMENT naming the field).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .onnx import ExportConfig, compare_to_torch, trace_onnx

# config.json model_type -> the transformers class that checkpoint must load as
SUPPORTED = {"dinov2": "Dinov2Model", "clip": "CLIPModel", "siglip": "SiglipModel"}
POOLINGS = ("cls", "cls_mean")
# texts the text graph is traced and checked on: real tokens, so that CLIP finds its
# end-of-text token, and several lengths, so that a length baked into the trace fails
SAMPLE_TEXTS = ("no acute cardiopulmonary process", "left lower lobe pneumonia",
                "small right pleural effusion with adjacent atelectasis, heart size normal",
                "fracture")


class HFCheckpointError(ValueError):
    """The checkpoint folder is missing a file, or holds a model medseek cannot export."""


@dataclass(frozen=True)
class HFCheckpoint:
    """What :func:`read_checkpoint` learns from a checkpoint folder without loading weights.

    folder : the checkpoint folder
    model_type : ``"dinov2"``, ``"clip"`` or ``"siglip"``
    image_size : (H, W) the model takes
    image_mean, image_std : per-channel normalisation of the model's RGB input
    max_length : text token budget, special tokens included (0: no text tower)
    padding : the spec's ``tokenizer`` entry: ``pad_id``, ``pad_token``, ``to_max_length``
    """

    folder: Path
    model_type: str
    image_size: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_length: int = 0
    padding: dict | None = None

    @property
    def has_text(self) -> bool:
        return self.model_type != "dinov2"

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise HFCheckpointError(f"{path.name} missing from the checkpoint folder {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFCheckpointError(f"{path} is not valid JSON: {exc}") from None


def _three(name: str, value, path: Path) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise HFCheckpointError(f"{path.name}: {name} must be 3 numbers (R, G, B), got {value!r}")
    out = tuple(float(v) for v in value)
    if name == "image_std" and not all(v > 0 for v in out):
        raise HFCheckpointError(f"{path.name}: image_std must be > 0, got {value!r}")
    return out


def _size_of(entry, fallback: int) -> tuple[int, int]:
    """(H, W) of a processor's ``size``/``crop_size`` entry (an int, ``{"height", "width"}``
    or ``{"shortest_edge"}``: a square of that side)."""
    if isinstance(entry, int):
        return entry, entry
    if isinstance(entry, dict) and "height" in entry and "width" in entry:
        return int(entry["height"]), int(entry["width"])
    if isinstance(entry, dict) and "shortest_edge" in entry:
        return int(entry["shortest_edge"]), int(entry["shortest_edge"])
    return fallback, fallback


def _image_size(model_type: str, config: dict, proc: dict) -> tuple[int, int]:
    vision = config if model_type == "dinov2" else config.get("vision_config", {})
    native = int(vision.get("image_size", 224))
    if model_type != "dinov2":
        return native, native  # fixed position embeddings: the processor crops to this
    entry = proc.get("crop_size") if proc.get("do_center_crop", False) else proc.get("size")
    h, w = _size_of(entry, native)
    patch = int(config.get("patch_size", 14))
    if h % patch or w % patch:
        raise HFCheckpointError(f"preprocessor_config.json: image size {(h, w)} is not a "
                                f"multiple of the DINOv2 patch size {patch}")
    return h, w


def _pad_token(folder: Path, text_config: dict, tokenizer_json: dict) -> tuple[int, str]:
    """The pad id and token: tokenizer_config.json's ``pad_token``, else the padding that
    tokenizer.json records, else the text config's ``pad_token_id``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cfg_path = folder / "tokenizer_config.json"
    pad = _read_json(cfg_path).get("pad_token") if cfg_path.is_file() else None
    if isinstance(pad, dict):  # an AddedToken saved as a dict
        pad = pad.get("content")
    if isinstance(pad, str):
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise HFCheckpointError(f"tokenizer_config.json: pad_token {pad!r} is not in "
                                    "tokenizer.json's vocabulary")
        return pad_id, pad
    saved = tokenizer_json.get("padding") or {}
    if "pad_id" in saved:
        return int(saved["pad_id"]), str(saved.get("pad_token", ""))
    pad_id = int(text_config.get("pad_token_id", 0) or 0)
    return pad_id, tok.id_to_token(pad_id) or ""


def _text_rules(folder: Path, model_type: str, config: dict) -> tuple[int, dict]:
    """(max_length, padding) of an image-text checkpoint."""
    if not (folder / "tokenizer.json").is_file():
        raise HFCheckpointError(
            f"tokenizer.json missing from the checkpoint folder {folder}: the text side "
            "tokenises with it (in process and in Triton). A checkpoint with only a slow "
            "tokenizer (spiece.model, vocab.json + merges.txt) gets one from "
            "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    tokenizer_json = _read_json(folder / "tokenizer.json")
    text = config.get("text_config", {})
    max_length = int(text.get("max_position_embeddings", 64 if model_type == "siglip" else 77))
    cfg_path = folder / "tokenizer_config.json"
    declared = _read_json(cfg_path).get("model_max_length") if cfg_path.is_file() else None
    if isinstance(declared, int) and 2 <= declared < max_length:
        max_length = declared
    pad_id, pad_token = _pad_token(folder, text, tokenizer_json)
    return max_length, {"pad_id": pad_id, "pad_token": pad_token,
                        "to_max_length": model_type == "siglip"}


def read_checkpoint(folder: str | Path) -> HFCheckpoint:
    """Read a local checkpoint folder's configs (no weights, no network).

    Raises :class:`HFCheckpointError` naming the missing file, the unsupported
    ``model_type`` or the bad value.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HFCheckpointError(f"checkpoint folder not found: {folder}")
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise HFCheckpointError(
            f"config.json: model_type {model_type!r} is not supported; medseek exports "
            + ", ".join(f"{t!r} ({c})" for t, c in SUPPORTED.items()))
    if not any(folder.glob("*.safetensors")):
        raise HFCheckpointError(f"no *.safetensors weights in {folder}; save the model with "
                                "save_pretrained(safe_serialization=True)")
    proc_path = folder / "preprocessor_config.json"
    proc = _read_json(proc_path)
    mean = _three("image_mean", proc.get("image_mean"), proc_path)
    std = _three("image_std", proc.get("image_std"), proc_path)
    size = _image_size(model_type, config, proc)
    max_length, padding = 0, None
    if model_type != "dinov2":
        max_length, padding = _text_rules(folder, model_type, config)
    return HFCheckpoint(folder, model_type, size, mean, std, max_length, padding)


def load_model(ckpt: HFCheckpoint) -> nn.Module:
    """The checkpoint's transformers model, float32, eval mode, eager attention (traces
    into plain ONNX ops), from local files only."""
    import transformers

    cls = getattr(transformers, SUPPORTED[ckpt.model_type])
    try:
        model = cls.from_pretrained(str(ckpt.folder), local_files_only=True,
                                    attn_implementation="eager", dtype=torch.float32)
    except OSError as exc:
        raise HFCheckpointError(f"transformers could not load {ckpt.folder} as "
                                f"{cls.__name__}: {exc}") from None
    return model.eval()


def _pooled(out) -> torch.Tensor:
    """The feature tensor of a ``get_*_features`` result: transformers 5 returns a model
    output whose ``pooler_output`` holds the projected features; 4.x the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFImageGraph(nn.Module):
    """``images`` (B, 1, H, W) float32 in [0, 1] -> ``embeddings`` (B, dim), unit rows."""

    def __init__(self, model: nn.Module, ckpt: HFCheckpoint, pooling: str = "cls") -> None:
        super().__init__()
        self.model, self.model_type, self.pooling = model, ckpt.model_type, pooling
        self.register_buffer("mean", torch.tensor(ckpt.image_mean).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(ckpt.image_std).reshape(1, 3, 1, 1))

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """What the checkpoint's image processor would hand the model: RGB, normalised."""
        return (images.expand(-1, 3, -1, -1) - self.mean) / self.std  # (B, 3, H, W)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pixel_values(images)
        if self.model_type == "dinov2":
            tokens = self.model(pixel_values=x).last_hidden_state  # (B, 1 + N, width), normed
            feats = tokens[:, 0]
            if self.pooling == "cls_mean":
                feats = torch.cat((feats, tokens[:, 1:].mean(dim=1)), dim=-1)
        else:
            feats = _pooled(self.model.get_image_features(pixel_values=x))
        return F.normalize(feats, dim=-1)


class HFTextGraph(nn.Module):
    """``input_ids``, ``attention_mask`` (B, T) int64 -> ``embeddings`` (B, dim), unit rows.

    SigLIP ran without an attention mask in training (every text padded to the same
    length, the pad tokens attended to), and its pipeline passes none; the graph keeps
    the ``attention_mask`` input of medseek's text graphs but does not mask with it.
    """

    def __init__(self, model: nn.Module, ckpt: HFCheckpoint) -> None:
        super().__init__()
        self.model, self.model_type = model, ckpt.model_type

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.model_type == "siglip":
            # "+ 0 * mask" keeps the input in the traced graph (an unused input is dropped,
            # and clients feed it); it changes no id
            out = self.model.get_text_features(input_ids=input_ids + 0 * attention_mask)
        else:
            out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(_pooled(out), dim=-1)


@dataclass(frozen=True)
class HFExportConfig:
    """Options of :func:`export_hf`.

    pooling : DINOv2 image embedding: ``"cls"`` (the CLS token, RAD-DINO's global
        embedding) or ``"cls_mean"`` (CLS and the mean patch token, concatenated);
        CLIP/SigLIP use their own heads and refuse ``"cls_mean"``
    version : the version folder to fill
    export : ONNX options (opset, min_cosine, check_batches, seed)
    templates : the committed ``model_repository/`` (None: found from the package)
    name_prefix : put before every model name, as
        :class:`~medseek.export.repository.RepositoryConfig`'s (several models' repositories
        served by one tritonserver)
    """

    pooling: str = "cls"
    version: int = 1
    export: ExportConfig = field(default_factory=ExportConfig)
    templates: Path | None = None
    name_prefix: str = ""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"version must be an int >= 1, got {self.version!r}")
        if self.name_prefix != "":  # "" is always valid; skip the import at class definition
            from .model_config import check_prefix

            check_prefix(self.name_prefix)


def _image_inputs(ckpt: HFCheckpoint, batch: int, gen: torch.Generator) -> tuple[torch.Tensor]:
    return (torch.rand(batch, 1, *ckpt.image_size, generator=gen),)


def _text_inputs(ckpt: HFCheckpoint, texts) -> tuple[torch.Tensor, torch.Tensor]:
    from medseek.encoders.preprocess import load_tokenizer, tokenize

    tok = load_tokenizer(ckpt.tokenizer_path, ckpt.max_length, ckpt.padding)
    ids, mask = tokenize(tok, list(texts))
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _export_graphs(model: nn.Module, ckpt: HFCheckpoint, out: Path,
                   cfg: HFExportConfig) -> tuple[dict[str, Path], dict[str, float], int]:
    """Trace and check the image (and text) graph into ``out``: (paths, worst cosines, dim)."""
    ex = cfg.export
    gen = torch.Generator().manual_seed(ex.seed)
    image = HFImageGraph(model, ckpt, cfg.pooling).eval()
    paths = {"image": out / "image.onnx"}
    trace_onnx(image, _image_inputs(ckpt, 2, gen), paths["image"], ["images"], ["embeddings"],
               {"images": {0: "batch"}, "embeddings": {0: "batch"}}, ex.opset)
    cosines = {"image": compare_to_torch(
        paths["image"], image, [_image_inputs(ckpt, b, gen) for b in ex.check_batches],
        ["images"], ["embeddings"], ex.min_cosine)}
    with torch.inference_mode():
        dim = int(image(*_image_inputs(ckpt, 1, gen)).shape[1])
    if ckpt.has_text:
        text = HFTextGraph(model, ckpt).eval()
        paths["text"] = out / "text.onnx"
        names = ["input_ids", "attention_mask"]
        with warnings.catch_warnings():
            # CLIP pools with hidden[arange(B), eos_position]; the exporter warns that
            # negative indices would go wrong, and these are never negative (and the graph
            # is checked against torch below)
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message="Exporting aten::index operator of advanced indexing")
            trace_onnx(text, _text_inputs(ckpt, SAMPLE_TEXTS[:2]), paths["text"], names,
                       ["embeddings"], {"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "embeddings": {0: "batch"}}, ex.opset)
        checks = [_text_inputs(ckpt, SAMPLE_TEXTS[i:i + b])
                  for i, b in enumerate(ex.check_batches)]
        cosines["text"] = compare_to_torch(paths["text"], text, checks, names, ["embeddings"],
                                           ex.min_cosine)
        with torch.inference_mode():
            text_dim = int(text(*_text_inputs(ckpt, SAMPLE_TEXTS[:1])).shape[1])
        if text_dim != dim:
            raise HFCheckpointError(f"{ckpt.folder}: image embeddings have {dim} dims but text "
                                    f"embeddings {text_dim}; they must share one space")
    return paths, cosines, dim


def _spec(ckpt: HFCheckpoint, dim: int, cfg: HFExportConfig, cosines: dict) -> dict:
    from medseek.encoders.base import EncoderSpec

    spec = EncoderSpec(embed_dim=dim, modality="image", max_length=ckpt.max_length,
                       image_size=ckpt.image_size, in_chans=1,
                       name=f"hf-{ckpt.model_type}:{ckpt.folder.name}",
                       has_text=ckpt.has_text, tokenizer=ckpt.padding)
    source = {"model_type": ckpt.model_type, "folder": str(ckpt.folder.resolve()),
              "image_mean": list(ckpt.image_mean), "image_std": list(ckpt.image_std),
              "pooling": cfg.pooling if ckpt.model_type == "dinov2" else "projection head"}
    return {**spec.to_dict(), "hf": source, "opset": cfg.export.opset,
            "min_cosine_to_torch": cosines}


def _check_out(repo: Path, templates: Path, writes: set[str]) -> None:
    """Refuse a folder that would serve other models beside this one: the committed
    templates, or a repository holding model folders this export does not replace."""
    if repo.resolve() == templates.resolve():
        raise ValueError(f"--out {repo} is the committed model repository; export a Hugging "
                         "Face checkpoint into a folder of its own")
    others = sorted(p.parent.name for p in repo.glob("*/config.pbtxt")
                    if p.parent.name not in writes)
    if others:
        raise ValueError(f"{repo} already holds {others}, which this export would serve "
                         "beside the checkpoint's model; use an empty folder or remove them")


def export_hf(folder: str | Path, repo_dir: str | Path,
              cfg: HFExportConfig = HFExportConfig()) -> dict[str, Path]:
    """Export a local Hugging Face checkpoint into the Triton model repository ``repo_dir``.

    Writes ``image_encoder/<version>/`` and, for CLIP and SigLIP, ``text_encoder``,
    ``text_tokenizer`` (with the checkpoint's ``tokenizer.json``) and ``text_ensemble``:
    the layout :func:`medseek.export.write_repository` gives medseek's own models, with
    configs rendered the same way (the graphs' fixed dims, the name prefix) and the same
    python-backend sources.

    Returns
    -------
    dict repository model name (with ``cfg.name_prefix``) -> its filled version folder
    """
    from .model_config import onnx_dims
    from .repository import (GRAPH_MODELS, ONNX_RUNNER, TOKENIZER_RUNNER, _fresh_version_dir,
                             _write_config, _write_spec, committed_repository)

    ckpt = read_checkpoint(folder)
    if cfg.pooling != "cls" and ckpt.model_type != "dinov2":
        raise ValueError(f"pooling {cfg.pooling!r} is for DINOv2 checkpoints; a "
                         f"{ckpt.model_type} model embeds through its own projection head")
    templates = Path(cfg.templates) if cfg.templates is not None else committed_repository()
    repo, prefix = Path(repo_dir), cfg.name_prefix
    models = ["image_encoder"] + (["text_encoder", "text_tokenizer", "text_ensemble"]
                                  if ckpt.has_text else [])
    _check_out(repo, templates, {prefix + m for m in models})
    model = load_model(ckpt)
    repo.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="medseek-hf-export-") as tmp:
        paths, cosines, dim = _export_graphs(model, ckpt, Path(tmp), cfg)
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(_spec(ckpt, dim, cfg, cosines), indent=2))
        for graph, onnx_path in paths.items():
            name = GRAPH_MODELS[graph]
            _write_config(templates, repo, name, prefix, onnx_dims(onnx_path))
            out = _fresh_version_dir(repo, prefix + name, cfg.version)
            shutil.copy2(onnx_path, out / "model.onnx")
            _write_spec(spec_path, out / "spec.json", prefix)
            shutil.copy2(templates / ONNX_RUNNER, out / "model.py")
            written[prefix + name] = out
        if ckpt.has_text:
            _write_config(templates, repo, "text_tokenizer", prefix)
            out = _fresh_version_dir(repo, prefix + "text_tokenizer", cfg.version)
            shutil.copy2(ckpt.tokenizer_path, out / "tokenizer.json")
            _write_spec(spec_path, out / "spec.json", prefix)
            shutil.copy2(templates / TOKENIZER_RUNNER, out / "model.py")
            written[prefix + "text_tokenizer"] = out
            _write_config(templates, repo, "text_ensemble", prefix,
                          {"embeddings": onnx_dims(paths["text"])["embeddings"]})
            written[prefix + "text_ensemble"] = _fresh_version_dir(
                repo, prefix + "text_ensemble", cfg.version)
    return written

"""Triton ``config.pbtxt`` of one exported model: its name and its tensors' real dims.

The committed configs (``model_repository/<model>/config.pbtxt``) are templates: their
names are the bare model names and their dims are ``-1`` wherever *some* model may
differ (image size, embedding width, patch size). :func:`render_config` turns a template
into the config of one export: the model's name with the repository's prefix (so two
models' repositories can be served by one ``tritonserver``), the ensemble's steps renamed
the same way, and every dim the exported graph fixes written as a number. Triton then
reports the fixed dims in ``get_model_metadata`` and rejects a request of another shape
itself, before the model runs.

The template's comments are kept: the edits are textual, one match each, and the result
is parsed back into Triton's ``ModelConfig`` (:func:`check_config`) to prove it says
what was meant.
"""

from __future__ import annotations

import re
from pathlib import Path


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is "" or a valid model-name prefix (the clients' rule), else an
    error naming ``name_prefix``."""
    from medseek.encoders.onnxrt import check_model_prefix

    return check_model_prefix(prefix, "name_prefix")


def onnx_dims(path: str | Path) -> dict[str, list[int]]:
    """Per input and output of the ONNX graph ``path``: its dims after the batch axis,
    ``-1`` where the graph leaves the axis symbolic (Triton's "any size")."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        out[value.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
    return out


def _sub_once(pattern: str, repl, text: str, what: str, template: str) -> str:
    new, count = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if count != 1:
        raise ValueError(f"{template}: expected exactly one {what}, found {count}")
    return new


def render_config(text: str, name: str, dims: dict[str, list[int]] | None = None,
                  steps: dict[str, str] | None = None, template: str = "config.pbtxt") -> str:
    """The template ``text`` with its model name set to ``name``, the ``dims`` of the
    named input/output tensors replaced, and the ensemble steps ``steps`` (old model name
    -> new) renamed. ``template`` names the file in error messages."""
    text = _sub_once(r'^name:\s*"[^"]*"', f'name: "{name}"', text, "top-level name", template)
    for tensor, want in (dims or {}).items():
        shown = ", ".join(str(int(d)) for d in want)
        text = _sub_once(
            r'(\{\s*name:\s*"' + re.escape(tensor) + r'"\s+data_type:\s*\w+\s+dims:\s*\[)[^\]]*(\])',
            lambda m, shown=shown: f"{m.group(1)} {shown} {m.group(2)}", text,
            f"tensor {tensor!r} with dims", template)
    for old, new in (steps or {}).items():
        text = _sub_once(r'(model_name:\s*")' + re.escape(old) + '"',
                         lambda m, new=new: f'{m.group(1)}{new}"', text,
                         f"ensemble step {old!r}", template)
    return text


def check_config(text: str, name: str, dims: dict[str, list[int]] | None = None,
                 template: str = "config.pbtxt") -> None:
    """Parse ``text`` as Triton's ``ModelConfig`` and check its name and ``dims``.

    Needs ``tritonclient`` (the ``triton`` extra, which export needs anyway for ``onnx``);
    without it the check is skipped: the textual edits have already matched once each.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return
    try:
        cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"{template}: the rendered config does not parse: {exc}") from exc
    if cfg.name != name:
        raise ValueError(f"{template}: rendered name is {cfg.name!r}, expected {name!r}")
    tensors = {t.name: list(t.dims) for t in (*cfg.input, *cfg.output)}
    for tensor, want in (dims or {}).items():
        if tensors.get(tensor) != [int(d) for d in want]:
            raise ValueError(f"{template}: tensor {tensor!r} has dims {tensors.get(tensor)}, "
                             f"expected {list(want)}")

"""Export: ONNX graphs of the encoders, TensorRT engines, and the Triton model repository.

``export_onnx`` writes and verifies the ONNX files of one :class:`DualEncoder`;
``write_repository`` fills the version folders of a Triton model repository from the
committed configs in ``model_repository/``; ``build_engines`` turns the ONNX files into
TensorRT plans on GPU hosts. Submodules are imported lazily (torch is heavy).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "export_onnx": "onnx",
    "ExportConfig": "onnx",
    "ExportCheckError": "onnx",
    "write_repository": "repository",
    "RepositoryConfig": "repository",
    "build_engines": "tensorrt",
    "TensorRTUnavailable": "tensorrt",
    "TensorRTConfig": "tensorrt",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

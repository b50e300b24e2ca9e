"""``medseek serve --encoder onnx`` on a repository holding an image and a volume model
(``export.write_repository``): both are served in ONNX Runtime, each giving the rows its
torch model gives."""

import argparse

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from medseek.export.repository import write_repository  # noqa: E402
from medseek.serve.commands import encoder_from_args  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402


def test_a_repository_of_two_models_serves_both(tmp_path):
    torch_enc = LocalTorchEncoder(seed=0)
    write_repository([torch_enc._image, torch_enc._volume], tmp_path / "repo")
    enc = encoder_from_args(argparse.Namespace(encoder="onnx", model_repo=tmp_path / "repo",
                                               onnx_threads=1))
    assert enc.dim == torch_enc.dim
    rng = np.random.default_rng()
    images = rng.random((3, 1, *torch_enc.image_size), dtype=np.float32)
    got, want = enc.encode_images(images), torch_enc.encode_images(images)
    assert np.min(np.sum(got * want, axis=1)) > 0.9999
    d, h, w = 16, 32, 32  # a volume of whole patches
    volumes = [rng.normal(0.5, 0.2, size=(d, h, w)).astype(np.float32)]
    got, want = enc.encode_volumes(volumes), torch_enc.encode_volumes(volumes)
    assert np.min(np.sum(got * want, axis=1)) > 0.9999

"""A blended CT window (``PreprocessConfig.blend_window``): the mean of two windows in one
channel, the same in training (the fused op's chunks) and serving (the windowed volume).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from medseek import volume as mv
from medseek.encoders.base import EncoderSpec
from medseek.models.dual import PreprocessConfig
from medseek.models.factory import create_model, load_config
from medseek.serve.ingest import decode_volume
from medseek.serve.routed import volume_preprocessing
from medseek.serve.work_config import PreprocessSpec
from medseek.train.data import PairDataset

SOFT, LUNG = (40.0, 400.0), (-600.0, 1500.0)


def test_blend_is_the_mean_and_separates_what_the_first_window_clips():
    hu = np.array([[[-960.0, -850.0, -100.0, 40.0, 300.0]]], np.float32)  # emphysema .. bone
    soft, lung = mv.window(hu, *SOFT), mv.window(hu, *LUNG)
    got = mv.blend(soft, lung)
    np.testing.assert_array_equal(got, np.float32(0.5) * (soft + lung))
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert soft[0, 0, 0] == soft[0, 0, 1] == 0.0  # the soft-tissue window: both black
    assert 0 < got[0, 0, 0] < got[0, 0, 1] < got[0, 0, 2] < got[0, 0, 3] < got[0, 0, 4] <= 1
    with pytest.raises(ValueError, match="equal shapes"):
        mv.blend(soft, soft[:, :, :2])


def test_blend_window_is_checked():
    assert PreprocessConfig(window=SOFT, blend_window=[-600, 1500]).blend_window == LUNG
    with pytest.raises(ValueError, match="blend_window needs preprocess.window"):
        PreprocessConfig(blend_window=LUNG)
    with pytest.raises(ValueError, match="blend_window must be"):
        PreprocessConfig(window=SOFT, blend_window=(0.0, 0.0))
    with pytest.raises(ValueError, match="blend_window must be"):
        PreprocessSpec(blend_window=(1.0, -5.0))
    with pytest.raises(ValueError, match="blend_window must be"):
        EncoderSpec(embed_dim=8, modality="volume", max_length=8, patch_size=(4, 8, 8),
                    chunk_depth=16, window=SOFT, blend_window=(1.0,))


@pytest.fixture(scope="module")
def ct_corpus(tmp_path_factory):
    from medseek.data.synth.ct import build_synth_ct

    root = tmp_path_factory.mktemp("ct")
    build_synth_ct(root, n=3, seed=5, matrix=(40, 48), slices=(20, 36), progress=False)
    return root


@pytest.mark.parametrize("blend", [None, LUNG])
def test_training_and_serving_give_the_tower_the_same_tokens(ct_corpus, blend):
    """The served path (``decode_volume`` with the spec the model's encoder declares, then
    the encoder's chunk + patchify) gives the tokens the training loader gave."""
    overrides = {"preprocess": {"blend_window": blend}} if blend else {}
    cfg = load_config("ct-retrieval", **overrides)
    ds = PairDataset.from_manifest(ct_corpus, cfg, None)
    spec = EncoderSpec.from_model(create_model("ct-retrieval", device="meta", **overrides))
    assert spec.blend_window == blend
    assert EncoderSpec.from_dict(spec.to_dict()) == spec  # as Triton's spec.json carries it

    served = SimpleNamespace(spec=spec)  # what the server reads of an encoder
    v = cfg.vision
    # as the server does it: a configured blend window gives way to the spec's choice
    pre = replace(PreprocessSpec(blend_window=(0.0, 10.0),
                                 volume_multiple=tuple(v.patch_size[1:])),
                  **volume_preprocessing(served))
    assert pre.blend_window == blend and pre.window == SOFT
    for i, rec in enumerate(ds.records):
        dec = decode_volume((ct_corpus / rec.path).read_bytes(), "volume", pre, None, None)
        chunks, z_start, _ = mv.chunk(dec.payload, v.chunk_depth, v.chunk_overlap)
        tokens, positions = mv.patchify(chunks, z_start, v.patch_size)
        item = ds[i]
        np.testing.assert_array_equal(tokens, item["tokens"])
        np.testing.assert_array_equal(positions, item["positions"])

"""medseek.volume: bad inputs are refused with errors naming the argument, by the C++
engine's Python face, by the NumPy reference and by the raw binding alike."""

from __future__ import annotations

import numpy as np
import pytest

from medseek import _volume
from medseek import volume as V
from medseek.volume import reference as R

# --- bad inputs

def _vol(shape=(4, 5, 6), dtype=np.int16):
    return np.zeros(shape, dtype=dtype)


BAD_VOLUMES = [
    (np.zeros((4, 5), np.int16), ValueError, "vol must have 3 dimensions"),
    (np.zeros((2, 4, 5, 6), np.int16), ValueError, "vol must have 3 dimensions"),
    (np.zeros((4, 5, 6), np.float64), TypeError, "vol dtype"),
    (np.zeros((4, 5, 6), np.int32), TypeError, "vol dtype"),
    (np.zeros((4, 5, 6), bool), TypeError, "vol dtype"),
    (np.zeros((4, 5, 6), ">i2"), TypeError, "vol dtype"),  # non-native byte order
    (np.zeros((4, 5, 12), np.int16)[:, :, ::2], ValueError, "vol must be C-contiguous"),
    (np.zeros((0, 5, 6), np.int16), ValueError, "vol must not be empty"),
    ([[[1, 2]]], TypeError, "vol must be a numpy.ndarray"),
]


def _ops(mod):
    """Every volume op, with all arguments explicit so the raw binding takes them too."""
    return [
        lambda v: mod.resample(v, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)),
        lambda v: mod.window(v, 40.0, 400.0),
        lambda v: mod.chunk(v, 4, 0, 0.0),
        lambda v: mod.resample_window_chunk(v, (1.0,) * 3, (2.0,) * 3, 40.0, 400.0, 4, 0, 0.0),
    ]


@pytest.mark.parametrize("mod", [V, R, _volume], ids=["engine", "reference", "raw-binding"])
@pytest.mark.parametrize("vol, exc, match", BAD_VOLUMES)
def test_bad_volume_is_refused(mod, vol, exc, match):
    """The raw binding guards too: it refuses what the Python face refuses, never converts."""
    for op in _ops(mod):
        with pytest.raises(exc, match=match):
            op(vol)


@pytest.mark.parametrize("mod", [V, R], ids=["engine", "reference"])
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"spacing": (1.0, 0.0, 1.0)}, ValueError, r"spacing must be finite and > 0.*0\.0"),
        ({"spacing": (1.0, -0.5, 1.0)}, ValueError, r"spacing .*-0\.5"),
        ({"spacing": (float("nan"), 1.0, 1.0)}, ValueError, "spacing .*nan"),
        ({"spacing": (1.0, 1.0)}, ValueError, "spacing must have 3 entries"),
        ({"spacing": 1.0}, TypeError, "spacing must be a sequence"),
        ({"target_spacing": 0.0}, ValueError, "target_spacing must be finite and > 0"),
        ({"target_spacing": (1.0, float("inf"), 1.0)}, ValueError, "target_spacing .*inf"),
        ({"target_spacing": "1.5"}, TypeError, "target_spacing entries must be real"),
    ],
)
def test_bad_spacing_is_refused(mod, kwargs, exc, match):
    args = {"vol": _vol(), "spacing": (1.0, 1.0, 1.0), "target_spacing": 2.0} | kwargs
    with pytest.raises(exc, match=match):
        mod.resample(**args)
    with pytest.raises(exc, match=match):
        mod.resample_window_chunk(**args, center=0.0, width=1.0, depth=2)


def test_absurd_target_spacing_is_refused_before_allocating():
    with pytest.raises(ValueError, match="target_spacing 1e-12 would give 5e"):
        V.resample(_vol(), (1.0, 1.0, 1.0), (1.0, 1e-12, 1.0))


def test_cpp_guards_bad_spacing_too():
    with pytest.raises(ValueError, match="target_spacing must be finite and > 0"):
        _volume.resample(_vol(), (1.0, 1.0, 1.0), (1.0, float("nan"), 1.0))
    with pytest.raises(ValueError, match="spacing must be finite and > 0"):
        _volume.resample(_vol(), (1.0, -1.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="overlap"):
        _volume.chunk(_vol(), 4, 4, 0.0)
    with pytest.raises(ValueError, match="width"):
        _volume.window(_vol(), 0.0, 0.0)
    with pytest.raises(ValueError, match="z_start"):
        _volume.patchify(np.zeros((1, 4, 4, 4), np.float32), np.array([1], np.int32), (2, 2, 2))


@pytest.mark.parametrize("mod", [V, R], ids=["engine", "reference"])
@pytest.mark.parametrize(
    "op, args, exc, match",
    [
        ("window", (40.0, 0), ValueError, "width must be a finite number > 0, got 0"),
        ("window", (40.0, -5.0), ValueError, "width .*-5"),
        ("window", (float("nan"), 10.0), ValueError, "center .*nan"),
        ("chunk", (4, 4), ValueError, "overlap must satisfy 0 <= overlap < depth = 4, got 4"),
        ("chunk", (4, -1), ValueError, "overlap .*got -1"),
        ("chunk", (0,), ValueError, "depth must be >= 1, got 0"),
        ("chunk", (2.5,), TypeError, "depth must be an int, got 2.5"),
        ("chunk", (True,), TypeError, "depth must be an int, got True"),
        ("chunk", (2, 0, float("inf")), ValueError, "pad_value .*inf"),
    ],
)
def test_bad_window_and_chunk_arguments_are_refused(mod, op, args, exc, match):
    with pytest.raises(exc, match=match):
        getattr(mod, op)(_vol(), *args)


_C, _Z = np.zeros((2, 4, 6, 6), np.float32), np.array([0, 4], np.int32)


@pytest.mark.parametrize("mod", [V, R], ids=["engine", "reference"])
@pytest.mark.parametrize(
    "chunks, z_start, patch, exc, match",
    [
        (_C, _Z, (2, 4, 3), ValueError, r"patch \(2, 4, 3\) must divide .*axis 1"),
        (_C, _Z, (0, 2, 3), ValueError, "patch .*axis 0 has extent 4, patch 0"),
        (_C, _Z, (2, 2), TypeError, "patch must be a sequence of 3 ints"),
        (_C, np.array([2, 6], np.int32), (4, 2, 3), ValueError,
         r"z_start must be >= 0 and a multiple of patch\[0\] = 4, got z_start\[0\] = 2"),
        (_C, _Z.astype(np.int64), (2, 2, 3), TypeError, "z_start dtype"),
        (_C, _Z[:1].copy(), (2, 2, 3), ValueError, "z_start must have one entry per chunk"),
        (_C.astype(np.float64), _Z, (2, 2, 3), TypeError, "chunks dtype"),
        (_C[0], _Z, (2, 2, 3), ValueError, "chunks must have 4 dimensions"),
        (_C[:, :, :, ::2], _Z, (2, 2, 3), ValueError, "chunks must be C-contiguous"),
    ],
)
def test_bad_patchify_arguments_are_refused(mod, chunks, z_start, patch, exc, match):
    with pytest.raises(exc, match=match):
        mod.patchify(chunks, z_start, patch)

"""medseek.volume (C++ engine) against its NumPy reference, scipy, SimpleITK and hand-made cases.

Inputs are fresh random volumes every run (no fixed seed), of odd shapes. Both the engine
and the reference compute in float64 and round to float32 once, in the same order, so
they agree to float32 rounding: the tolerances below allow ~1 float32 ulp (rtol 1e-6)
plus an absolute slack scaled to the data range for results that cancel to ~0.
"""

from __future__ import annotations

import itertools
import multiprocessing
import sys
import threading

import numpy as np
import pytest
from scipy import ndimage

from medseek import _volume
from medseek import volume as V
from medseek.volume import reference as R

DTYPES = [np.int16, np.uint16, np.float32]
SHAPES = [(13, 17, 19), (1, 7, 5), (5, 1, 9), (6, 31, 4), (23, 11, 1)]


def random_volume(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Full-range integers, or float32 with a CT-like spread; C-contiguous."""
    if dtype == np.float32:
        return (rng.standard_normal(shape) * 800.0).astype(np.float32)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def random_spacing(rng: np.random.Generator) -> tuple[float, float, float]:
    return tuple(float(s) for s in rng.uniform(0.3, 3.0, size=3))


def assert_close(actual: np.ndarray, expected: np.ndarray, scale: float) -> None:
    """float32 results that may differ by rounding only: ~1 ulp, or ~1e-6 of the data range."""
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * max(scale, 1.0))


# --- resample

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_resample_matches_reference(dtype, shape):
    rng = np.random.default_rng()
    vol = random_volume(rng, shape, dtype)
    spacing = random_spacing(rng)
    for target in (float(rng.uniform(0.3, 3.0)), random_spacing(rng)):
        out = V.resample(vol, spacing, target)
        t3 = (target,) * 3 if np.isscalar(target) else target
        assert out.shape == V.resampled_shape(shape, spacing, t3)
        assert out.flags.c_contiguous
        assert_close(out, R.resample(vol, spacing, target), float(np.abs(vol).max()))


def test_large_volume_matches_reference():
    """Big enough that every op runs on the OpenMP team (small calls stay serial)."""
    rng = np.random.default_rng()
    vol = random_volume(rng, (131, 257, 263), np.int16)
    spacing, target = (1.25, 0.7, 0.65), (1.5, 1.1, 1.3)
    assert_close(V.resample(vol, spacing, target), R.resample(vol, spacing, target), 32768.0)
    np.testing.assert_allclose(V.window(vol, 40, 400), R.window(vol, 40, 400), rtol=1e-6, atol=1e-7)
    args = (vol, spacing, target, 40.0, 400.0, 16, 4, -1.0)
    for got, want in zip(V.resample_window_chunk(*args), R.resample_window_chunk(*args)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    chunks, z_start, valid = V.chunk(vol, 24, 8, 5.0)
    for got, want in zip((chunks, z_start, valid), R.chunk(vol, 24, 8, 5.0)):
        np.testing.assert_array_equal(got, want)
    sub = np.ascontiguousarray(chunks[:, :, :256, :256])
    patch = (8, 16, 16)
    for got, want in zip(V.patchify(sub, z_start, patch), R.patchify(sub, z_start, patch)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_resample_matches_scipy_map_coordinates(dtype):
    """Sample the contract's grid x_i = i * t / s with scipy; mode="nearest" = clamp to edge."""
    rng = np.random.default_rng()
    shape = tuple(int(n) for n in rng.integers(3, 12, size=3))
    vol = random_volume(rng, shape, dtype)
    spacing = random_spacing(rng)
    target = (spacing[0] * 0.45, spacing[1] * 1.7, spacing[2] * 0.8)  # up-, down-, upsampling
    out = V.resample(vol, spacing, target)
    axes = [np.arange(n) * t / s for n, s, t in zip(out.shape, spacing, target)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    expected = ndimage.map_coordinates(vol.astype(np.float64), coords, order=1, mode="nearest")
    assert_close(out, expected, float(np.abs(vol).max()))


def test_resample_matches_simpleitk_on_a_downsampling_grid():
    """ITK (equal origins, linear) samples the same grid; downsampling stays inside its buffer."""
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng()
    vol = random_volume(rng, (21, 34, 27), np.int16)
    spacing, target = (1.0, 0.7, 0.8), (1.5, 1.5, 1.5)
    out = V.resample(vol, spacing, target)
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing(spacing[::-1])  # ITK orders axes x, y, z
    ref = sitk.Resample(
        image, out.shape[::-1], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
        target[::-1], image.GetDirection(), 0.0, sitk.sitkFloat32,
    )
    np.testing.assert_allclose(out, sitk.GetArrayFromImage(ref), rtol=1e-5, atol=1e-5 * 32768)


def test_resample_known_shapes_and_alignment():
    rng = np.random.default_rng()
    vol = random_volume(rng, (10, 7, 5), np.float32)
    # 10*1/2 = 5; 7*1/2 = 3.5 -> 4; 5*1/2 = 2.5 -> 3 (halves round up, not to even)
    out = V.resample(vol, (1.0, 1.0, 1.0), 2.0)
    assert out.shape == (5, 4, 3)
    assert out[0, 0, 0] == vol[0, 0, 0]  # first voxel centres aligned
    assert out[2, 1, 1] == vol[4, 2, 2]  # integer coordinates hit voxels exactly
    assert V.resample(vol, (1.0, 1.0, 1.0), 100.0).shape == (1, 1, 1)  # never an empty axis
    assert V.resampled_shape((300, 512, 512), (1.0, 0.7, 0.7), (1.5, 1.5, 1.5)) == (200, 239, 239)
    assert V.resample(vol, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)).tobytes() == vol.tobytes()


def test_resample_reproduces_a_linear_ramp_and_clamps():
    """Trilinear interpolation is exact on a linear field; past the last voxel it holds the edge."""
    rng = np.random.default_rng()
    shape = tuple(int(n) for n in rng.integers(4, 15, size=3))
    a = rng.uniform(-5, 5, size=3)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    vol = sum(ai * g for ai, g in zip(a, grid)).astype(np.float32)
    spacing = random_spacing(rng)
    target = tuple(s * f for s, f in zip(spacing, rng.uniform(0.3, 2.0, size=3)))
    out = V.resample(vol, spacing, target)
    axes = [
        np.minimum(np.arange(m) * t / s, n - 1)
        for m, n, s, t in zip(out.shape, shape, spacing, target)
    ]
    g = np.meshgrid(*axes, indexing="ij")
    expected = vol[0, 0, 0] + sum(ai * gi for ai, gi in zip(a, g))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_and_avx2_kernels_agree_bit_for_bit(dtype):
    """x86-64 builds pick an AVX2 resample kernel at run time; the SSE2 one must match it."""
    rng = np.random.default_rng()
    vol = random_volume(rng, (29, 141, 133), dtype)
    args = (vol, random_spacing(rng), float(rng.uniform(0.4, 2.0)), 40.0, 400.0, 8, 2)
    fast = V.resample(*args[:3]), *V.resample_window_chunk(*args)
    previous = _volume._set_avx2_allowed(False)
    try:
        portable = V.resample(*args[:3]), *V.resample_window_chunk(*args)
    finally:
        _volume._set_avx2_allowed(previous)
    for a, b in zip(fast, portable):
        np.testing.assert_array_equal(a, b)


# --- window

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_window_matches_reference(dtype, shape):
    rng = np.random.default_rng()
    vol = random_volume(rng, shape, dtype)
    center, width = float(rng.uniform(-500, 500)), float(rng.uniform(1, 3000))
    out = V.window(vol, center, width)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, R.window(vol, center, width), rtol=1e-6, atol=1e-7)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_window_known_values():
    vol = np.array([[[-1000, -160, 40, 140, 240, 3000]]], dtype=np.int16)
    np.testing.assert_array_equal(V.window(vol, 40, 400), [[[0.0, 0.0, 0.5, 0.75, 1.0, 1.0]]])
    np.testing.assert_array_equal(V.window(vol, 40, 200), [[[0.0, 0.0, 0.5, 1.0, 1.0, 1.0]]])


# --- chunk

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 5, 7), (3, 4, 9), (32, 3, 3), (1, 6, 2)])
def test_chunk_matches_reference_and_covers_every_slice(dtype, shape):
    rng = np.random.default_rng()
    vol = random_volume(rng, shape, dtype)
    depth = int(rng.integers(1, 9))
    for overlap in sorted({0, depth // 2, depth - 1}):
        pad = float(rng.uniform(-10, 10))
        chunks, z_start, valid = V.chunk(vol, depth, overlap, pad)
        for got, want in zip((chunks, z_start, valid), R.chunk(vol, depth, overlap, pad)):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        assert chunks.shape == (V.chunk_count(shape[0], depth, overlap), depth) + shape[1:]
        np.testing.assert_array_equal(np.diff(z_start), depth - overlap)
        covered = np.zeros(shape[0], dtype=bool)
        for c, (z0, n) in enumerate(zip(z_start, valid)):
            assert n >= 1  # no chunk is padding only
            np.testing.assert_array_equal(chunks[c, :n], vol[z0 : z0 + n].astype(np.float32))
            assert np.all(chunks[c, n:] == np.float32(pad))
            covered[z0 : z0 + n] = True
        assert covered.all()
        assert np.all(valid[:-1] == depth)  # only the last chunk is padded


def test_chunk_known_layouts():
    vol = np.arange(10 * 2 * 3, dtype=np.int16).reshape(10, 2, 3)
    _, z_start, valid = V.chunk(vol, 4)
    assert z_start.tolist() == [0, 4, 8] and valid.tolist() == [4, 4, 2]
    _, z_start, valid = V.chunk(vol, 4, overlap=1)
    assert z_start.tolist() == [0, 3, 6] and valid.tolist() == [4, 4, 4]
    chunks, z_start, valid = V.chunk(vol[:3].copy(), 8, overlap=2, pad_value=-7.0)
    assert chunks.shape == (1, 8, 2, 3) and valid.tolist() == [3]
    assert np.all(chunks[0, 3:] == -7.0)


# --- patchify

def test_patchify_hand_built_example():
    chunks = np.arange(16, dtype=np.float32).reshape(1, 2, 2, 4)
    tokens, positions = V.patchify(chunks, np.array([6], dtype=np.int32), (1, 2, 2))
    assert tokens.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
    assert positions.tolist() == [[[6, 0, 0], [6, 0, 1], [7, 0, 0], [7, 0, 1]]]
    assert positions.dtype == np.int32 and tokens.dtype == np.float32


def test_patchify_order_and_absolute_positions():
    rng = np.random.default_rng()
    (pz, py, px), (d, h, w) = (2, 3, 5), (17, 9, 10)
    vol = rng.standard_normal((d, h, w)).astype(np.float32)
    chunks, z_start, _ = V.chunk(vol, 6, overlap=2)
    tokens, positions = V.patchify(chunks, z_start, (pz, py, px))
    assert tokens.shape == (len(z_start), 3 * 3 * 2, pz * py * px) and positions.shape[2] == 3
    for c in range(len(z_start)):
        grid = itertools.product(range(6 // pz), range(h // py), range(w // px))  # z, y, x order
        for n, (gz, gy, gx) in enumerate(grid):
            ys, xs = slice(gy * py, (gy + 1) * py), slice(gx * px, (gx + 1) * px)
            block = chunks[c, gz * pz : (gz + 1) * pz, ys, xs]
            np.testing.assert_array_equal(tokens[c, n], block.ravel())
            assert positions[c, n].tolist() == [z_start[c] // pz + gz, gy, gx]
            z_abs = positions[c, n, 0] * pz  # absolute: points back at the volume's slices
            real = vol[z_abs : z_abs + pz, ys, xs]
            np.testing.assert_array_equal(block[: len(real)], real)


@pytest.mark.parametrize("patch", [(1, 1, 1), (2, 4, 3), (4, 1, 6)])
def test_patchify_matches_reference(patch):
    rng = np.random.default_rng()
    n, pz = int(rng.integers(1, 5)), patch[0]
    chunks = rng.standard_normal((n, 4 * pz, 4 * patch[1], 2 * patch[2])).astype(np.float32)
    z_start = (rng.integers(0, 50, size=n) * pz).astype(np.int32)
    for got, want in zip(V.patchify(chunks, z_start, patch), R.patchify(chunks, z_start, patch)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# --- fused op

@pytest.mark.parametrize("dtype", DTYPES)
def test_resample_window_chunk_equals_composition(dtype):
    rng = np.random.default_rng()
    vol = random_volume(rng, tuple(int(n) for n in rng.integers(5, 40, size=3)), dtype)
    spacing, target = random_spacing(rng), float(rng.uniform(0.5, 2.5))
    center, width = float(rng.uniform(-200, 200)), float(rng.uniform(50, 3000))
    depth = int(rng.integers(1, 12))
    overlap = int(rng.integers(0, depth))
    args = (vol, spacing, target, center, width, depth, overlap, -3.0)
    fused = V.resample_window_chunk(*args)
    windowed = V.window(V.resample(vol, spacing, target), center, width)
    composed = V.chunk(windowed, depth, overlap, -3.0)
    for got, want, ref in zip(fused, composed, R.resample_window_chunk(*args)):
        np.testing.assert_array_equal(got, want)  # same kernels, same rounding
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_ops_do_not_write_into_their_input():
    rng = np.random.default_rng()
    vol = random_volume(rng, (9, 10, 11), np.int16)
    vol.setflags(write=False)  # a read-only input is fine: nothing writes into it
    before = vol.copy()
    V.resample(vol, (1.0, 1.0, 1.0), 0.7)
    V.window(vol, 0.0, 100.0)
    V.chunk(vol, 4, 1)
    V.resample_window_chunk(vol, (1.0, 1.0, 1.0), 1.3, 0.0, 100.0, 3)
    np.testing.assert_array_equal(vol, before)


# --- threading

def test_resample_releases_the_gil():
    """While one thread is inside the C++ op, another Python thread runs bytecode.

    No clock is read, so the verdict does not depend on how fast or loaded the machine
    is. The switch interval is set so long that the interpreter never takes the GIL from
    a thread by force: the only way the main thread can run while the worker is between
    ``inside`` and ``done`` is the op releasing the GIL. If it did not, the main thread
    would first run after the op returned and always see ``done``. A released GIL can
    still go unnoticed if the op ends before the main thread wakes up, so a trial that
    sees nothing is retried on a bigger volume; a held GIL can never pass.
    """
    rng = np.random.default_rng()
    shape = (8, 64, 64)
    seen_inside = False
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        for _ in range(12):
            vol = random_volume(rng, shape, np.int16)
            state = {"inside": False, "done": False}

            def work():
                state["inside"] = True
                V.resample(vol, (1.0, 1.0, 1.0), 0.6)
                state["done"] = True

            worker = threading.Thread(target=work)
            # start() waits for the worker to signal it started: it returns once the
            # worker gives up the GIL, by releasing it in the op or by finishing
            worker.start()
            seen_inside = state["inside"] and not state["done"]
            worker.join()
            if seen_inside:
                break
            shape = (shape[0] * 2, *shape[1:]) if shape[0] < 256 else shape
    finally:
        sys.setswitchinterval(old_interval)
    assert seen_inside, "the main thread never ran while resample was running"


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_child_forked_after_a_parallel_call_does_not_hang():
    """GNU OpenMP hangs in a child forked after the parent ran a team; the engine runs
    serially there instead (DataLoader workers, multiprocessing pools)."""
    rng = np.random.default_rng()
    vol = random_volume(rng, (64, 192, 192), np.int16)  # big enough to start the team
    expected = V.resample(vol, (1.0, 1.0, 1.0), 1.3)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(V.resample, (vol, (1.0, 1.0, 1.0), 1.3)).get(timeout=60)
    np.testing.assert_array_equal(got, expected)

// medseek volume engine: resample, window, chunk and patchify CT/MR volumes.
//
// Pure C++17 + OpenMP, no Python: bindings.cpp validates arguments, allocates the
// outputs, releases the GIL and calls these functions on raw buffers.
//
// Layout everywhere: a volume is a C-contiguous (D, H, W) = (z, y, x) array; element
// (z, y, x) sits at z*H*W + y*W + x. Inputs are read in place (int16, uint16 or float32);
// outputs are float32 buffers the caller allocated with the shapes computed here.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace medseek::volume {

using index_t = std::int64_t;

struct Dims {
  index_t d, h, w;  // z, y, x
  index_t slice() const { return h * w; }
  index_t size() const { return d * h * w; }
};

// Output length along one axis: max(1, floor(n * s / t + 0.5)) (round half up).
// Throws std::invalid_argument when the result would not fit an int32.
index_t resampled_length(index_t n, double spacing, double target);

// Where each output index samples one input axis: x_i = i * (t / s), clamped to the
// last voxel. Sample i is in[lo[i]] + frac[i] * (in[hi[i]] - in[lo[i]]).
struct AxisMap {
  std::vector<index_t> lo, hi;
  std::vector<double> frac;
};
AxisMap axis_map(index_t n_in, double spacing, double target, index_t n_out);

// Everything a trilinear resample needs, computed once before the GIL is released.
struct ResamplePlan {
  Dims in, out;
  AxisMap z, y, x;
};
ResamplePlan plan_resample(Dims in, const std::array<double, 3>& spacing,
                           const std::array<double, 3>& target);

// Intensity window: clip((v - (center - width / 2)) / width, 0, 1), evaluated in double.
struct Window {
  double lo, width;
  Window(double center, double width_) : lo(center - width_ / 2), width(width_) {}
  float operator()(double v) const {
    const double t = (v - lo) / width;
    return static_cast<float>(t < 0.0 ? 0.0 : (t > 1.0 ? 1.0 : t));
  }
};

// Chunks along z: stride = depth - overlap, C = max(1, ceil((D - overlap) / stride)),
// chunk c starts at c * stride and holds min(depth, D - start) real slices.
index_t chunk_count(index_t d, index_t depth, index_t overlap);

// vol (D, H, W) -> out (D', H', W') float32, trilinear.
template <class T>
void resample(const T* vol, const ResamplePlan& plan, float* out);

// vol (n,) -> out (n,) float32.
template <class T>
void window(const T* vol, index_t n, Window win, float* out);

// vol (D, H, W) -> chunks (C, depth, H, W) float32, z_start (C,), valid (C,).
template <class T>
void chunk(const T* vol, Dims dims, index_t depth, index_t overlap, float pad_value,
           float* chunks, std::int32_t* z_start, std::int32_t* valid);

// Fused resample -> window -> chunk: one pass over the input, written straight into the
// chunk layout (C, depth, H', W') of the resampled (D', H', W') grid. Equals
// chunk(window(resample(vol)), depth, overlap, pad_value) element for element.
template <class T>
void resample_window_chunk(const T* vol, const ResamplePlan& plan, Window win,
                           index_t depth, index_t overlap, float pad_value, float* chunks,
                           std::int32_t* z_start, std::int32_t* valid);

// chunks (C, depth, H, W) -> tokens (C, N, pz*py*px), positions (C, N, 3) int32 with
// N = (depth/pz)(H/py)(W/px); tokens and elements in z, y, x order; position z is
// z_start[c] / pz + local patch z (z_start[c] must be a multiple of pz).
void patchify(const float* chunks, index_t n_chunks, Dims chunk_dims,
              const std::int32_t* z_start, std::array<index_t, 3> patch, float* tokens,
              std::int32_t* positions);

// Lets tests run the portable (SSE2) resample kernel on an AVX2 machine; returns the
// previous setting. The AVX2 kernel is used only where the CPU has AVX2 anyway.
bool set_avx2_allowed(bool allowed);

}  // namespace medseek::volume

// Kernels of the medseek volume engine; see volume.hpp for the contracts.
//
// Trilinear resampling is separable: per output slice k we blend the two input slices
// z0, z1 row by row (double precision, contiguous, vectorisable), gather-lerp each
// blended row along x to the output width, and lerp pairs of those rows along y. The
// rows are visited in increasing y, so a two-row cache means every needed input row of
// a slice pair is read once. Work is split over output slices with OpenMP.
//
// Arithmetic is double throughout and rounded to float32 once at the end; the NumPy
// reference (python/medseek/volume/reference.py) does the same operations in the same
// order, so the two agree to the last float32 bit unless the compiler contracts a*b+c
// into an FMA (CMakeLists.txt passes -ffp-contract=off for that reason).
#include "volume.hpp"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

// Portable x86-64 builds target SSE2 only. The resample kernel, the hot loop, is also
// compiled for AVX2 and picked at run time; both variants perform the same IEEE double
// operations (no FMA, see above), so their results are bit-identical.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEDSEEK_AVX2_DISPATCH 1
#define MEDSEEK_FORCE_INLINE __attribute__((always_inline)) inline
#define MEDSEEK_LAMBDA_INLINE __attribute__((always_inline))
#else
#define MEDSEEK_LAMBDA_INLINE
#define MEDSEEK_AVX2_DISPATCH 0
#define MEDSEEK_FORCE_INLINE inline
#endif

namespace medseek::volume {

namespace {
std::atomic<bool> g_allow_avx2{true};
}  // namespace

bool set_avx2_allowed(bool allowed) { return g_allow_avx2.exchange(allowed); }

index_t resampled_length(index_t n, double spacing, double target) {
  const double q = std::floor(static_cast<double>(n) * spacing / target + 0.5);
  if (!(q < 2147483647.0)) {
    std::ostringstream msg;
    msg << "target_spacing " << target << " would give " << q << " voxels along an axis of "
        << n << " at spacing " << spacing;
    throw std::invalid_argument(msg.str());
  }
  return std::max<index_t>(1, static_cast<index_t>(q));
}

AxisMap axis_map(index_t n_in, double spacing, double target, index_t n_out) {
  AxisMap m;
  m.lo.resize(n_out);
  m.hi.resize(n_out);
  m.frac.resize(n_out);
  const double step = target / spacing;  // input voxels per output voxel
  for (index_t i = 0; i < n_out; ++i) {
    const double x = static_cast<double>(i) * step;
    const auto lo = static_cast<index_t>(std::floor(x));
    if (lo >= n_in - 1) {  // at or past the last voxel centre: clamp to the edge
      m.lo[i] = m.hi[i] = n_in - 1;
      m.frac[i] = 0.0;
    } else {
      m.lo[i] = lo;
      m.hi[i] = lo + 1;
      m.frac[i] = x - static_cast<double>(lo);
    }
  }
  return m;
}

ResamplePlan plan_resample(Dims in, const std::array<double, 3>& spacing,
                           const std::array<double, 3>& target) {
  ResamplePlan p;
  p.in = in;
  p.out = {resampled_length(in.d, spacing[0], target[0]),
           resampled_length(in.h, spacing[1], target[1]),
           resampled_length(in.w, spacing[2], target[2])};
  p.z = axis_map(in.d, spacing[0], target[0], p.out.d);
  p.y = axis_map(in.h, spacing[1], target[1], p.out.h);
  p.x = axis_map(in.w, spacing[2], target[2], p.out.w);
  return p;
}

index_t chunk_count(index_t d, index_t depth, index_t overlap) {
  const index_t stride = depth - overlap;
  const index_t rest = d - overlap;
  return rest <= 0 ? 1 : std::max<index_t>(1, (rest + stride - 1) / stride);
}

namespace {

// Below this many elements touched (read + written; ~1-2 ms of serial work) a call runs on
// the calling thread. Waking the OpenMP team costs little on idle cores, but on a shared,
// oversubscribed host a descheduled worker stalls the closing barrier for a scheduler
// time slice (measured: 16 ms instead of 1.3 ms for a 60x128x128 volume, load 9 on 2
// cores), so small volumes are not worth the gamble.
constexpr index_t kParallelMinWork = index_t{1} << 21;

// Elementwise loops are cut into blocks handed out dynamically, so a thread that the OS
// preempts does not hold up the others with a fixed half of the work.
constexpr index_t kBlock = index_t{1} << 16;

// Process that started an OpenMP team from this module (0 before the first one).
std::atomic<long> g_team_pid{0};

// GNU OpenMP cannot start a team in a child forked after the parent started one: the
// child waits forever for worker threads fork did not copy. Such a child runs serially.
bool team_allowed() {
  const long pid = static_cast<long>(::getpid());
  long owner = 0;
  return g_team_pid.compare_exchange_strong(owner, pid) || owner == pid;
}

// body(i) for i in [0, n): on the OpenMP team (dynamic, one index at a time) when the
// call touches at least kParallelMinWork elements, else on the calling thread. The only
// OpenMP construct in the engine.
template <class Body>
void parallel_for(index_t n, index_t work, const Body& body) {
  if (n > 1 && work >= kParallelMinWork && team_allowed()) {
#pragma omp parallel for schedule(dynamic, 1)
    for (index_t i = 0; i < n; ++i) body(i);
  } else {
    for (index_t i = 0; i < n; ++i) body(i);
  }
}

// tmp[x] = a[x] + w * (b[x] - a[x]) for one input row (read: 2n elements of T).
template <class T>
MEDSEEK_FORCE_INLINE void lerp_rows(const T* a, const T* b, double w, index_t n, double* tmp) {
  if (a == b) {  // clamped axis: nothing to blend
    for (index_t x = 0; x < n; ++x) tmp[x] = static_cast<double>(a[x]);
    return;
  }
  for (index_t x = 0; x < n; ++x) {
    const double va = static_cast<double>(a[x]);
    tmp[x] = va + w * (static_cast<double>(b[x]) - va);
  }
}

// row[i] = tmp[lo[i]] + frac[i] * (tmp[hi[i]] - tmp[lo[i]]): one row lerped along x.
MEDSEEK_FORCE_INLINE void gather_lerp(const double* tmp, const AxisMap& m, index_t n_out, double* row) {
  const index_t* lo = m.lo.data();
  const index_t* hi = m.hi.data();
  const double* frac = m.frac.data();
  for (index_t i = 0; i < n_out; ++i) {
    const double a = tmp[lo[i]];
    row[i] = a + frac[i] * (tmp[hi[i]] - a);
  }
}

// Output slice k of plan p into dst (H' * W' floats), each value passed through emit.
// scratch holds in.w + 2 * out.w doubles owned by the calling thread. Force-inlined into
// the ISA variants below, so that each is compiled whole for its instruction set.
template <class T, class Emit>
MEDSEEK_FORCE_INLINE void resample_slice_body(const T* vol, const ResamplePlan& p, index_t k,
                                              const Emit& emit, float* dst, double* scratch) {
  const index_t w_in = p.in.w, w_out = p.out.w;
  const T* s0 = vol + p.z.lo[k] * p.in.slice();
  const T* s1 = vol + p.z.hi[k] * p.in.slice();
  const double wz = p.z.frac[k];
  double* tmp = scratch;
  double* rows[2] = {scratch + w_in, scratch + w_in + w_out};
  index_t tag[2] = {-1, -1};  // input row y held by each cache slot
  auto fill = [&](index_t y, int slot) MEDSEEK_LAMBDA_INLINE {
    lerp_rows(s0 + y * w_in, s1 + y * w_in, wz, w_in, tmp);
    gather_lerp(tmp, p.x, w_out, rows[slot]);
    tag[slot] = y;
  };
  auto find = [&](index_t y) { return tag[0] == y ? 0 : (tag[1] == y ? 1 : -1); };

  for (index_t j = 0; j < p.out.h; ++j) {
    const index_t y0 = p.y.lo[j], y1 = p.y.hi[j];
    const double wy = p.y.frac[j];
    int a = find(y0);
    if (a < 0) {
      a = tag[0] == y1 ? 1 : 0;  // keep the slot that already holds y1
      fill(y0, a);
    }
    int b = find(y1);
    if (b < 0) {
      b = 1 - a;
      fill(y1, b);
    }
    const double* r0 = rows[a];
    const double* r1 = rows[b];
    float* out = dst + j * w_out;
    for (index_t i = 0; i < w_out; ++i) out[i] = emit(r0[i] + wy * (r1[i] - r0[i]));
  }
}

template <class T, class Emit>
void resample_slice_base(const T* vol, const ResamplePlan& p, index_t k, const Emit& emit,
                         float* dst, double* scratch) {
  resample_slice_body(vol, p, k, emit, dst, scratch);
}

#if MEDSEEK_AVX2_DISPATCH
template <class T, class Emit>
__attribute__((target("avx2"))) void resample_slice_avx2(const T* vol, const ResamplePlan& p,
                                                          index_t k, const Emit& emit,
                                                          float* dst, double* scratch) {
  resample_slice_body(vol, p, k, emit, dst, scratch);
}
#endif

bool use_avx2() {
#if MEDSEEK_AVX2_DISPATCH
  static const bool cpu_has_avx2 = __builtin_cpu_supports("avx2");
  return cpu_has_avx2 && g_allow_avx2.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

template <class T, class Emit>
void resample_slice(bool avx2, const T* vol, const ResamplePlan& p, index_t k,
                    const Emit& emit, float* dst, double* scratch) {
#if MEDSEEK_AVX2_DISPATCH
  if (avx2) return resample_slice_avx2(vol, p, k, emit, dst, scratch);
#endif
  (void)avx2;
  resample_slice_base(vol, p, k, emit, dst, scratch);
}

struct ToFloat {
  float operator()(double v) const { return static_cast<float>(v); }
};

// Window applied to the float32 value resample would have stored, so the fused op
// equals window(resample(vol)) exactly.
struct WindowAfterRound {
  Window win;
  float operator()(double v) const { return win(static_cast<double>(static_cast<float>(v))); }
};

// Drives the chunk layout: calls produce(k, dst) once for every slice k < d of the
// source grid, writing it into the last chunk that holds it, copies it into the
// earlier chunks that overlap it, and fills the tail of the last chunk with pad_value.
// work: elements the whole call touches, to decide whether to start threads.
template <class Produce>
void fill_chunks(index_t d, index_t slice, index_t depth, index_t overlap, float pad_value,
                 float* chunks, std::int32_t* z_start, std::int32_t* valid, index_t work,
                 const Produce& produce) {
  const index_t stride = depth - overlap;
  const index_t n = chunk_count(d, depth, overlap);
  for (index_t c = 0; c < n; ++c) {
    z_start[c] = static_cast<std::int32_t>(c * stride);
    valid[c] = static_cast<std::int32_t>(std::min(depth, d - c * stride));
  }
  const index_t end = (n - 1) * stride + depth;  // slices of the virtual padded grid
  const size_t bytes = static_cast<size_t>(slice) * sizeof(float);
  parallel_for(end, work, [&](index_t k) {
    const index_t c = std::min(n - 1, k / stride);
    float* dst = chunks + (c * depth + (k - c * stride)) * slice;
    if (k >= d) {
      std::fill(dst, dst + slice, pad_value);
      return;
    }
    produce(k, dst);
    for (index_t cc = c - 1; cc >= 0 && k - cc * stride < depth; --cc) {
      std::memcpy(chunks + (cc * depth + (k - cc * stride)) * slice, dst, bytes);
    }
  });
}

// One scratch buffer per OpenMP thread, allocated before the parallel region so that
// no allocation (and no exception) happens inside it.
struct Scratch {
  index_t len;
  std::vector<double> buf;
  explicit Scratch(index_t len_)
      : len(len_), buf(static_cast<size_t>(len_) * omp_get_max_threads()) {}
  double* mine() { return buf.data() + len * omp_get_thread_num(); }
};

}  // namespace

template <class T>
void resample(const T* vol, const ResamplePlan& p, float* out) {
  Scratch scratch(p.in.w + 2 * p.out.w);
  const index_t slice = p.out.slice();
  const index_t work = p.in.size() + p.out.size();
  const bool avx2 = use_avx2();
  parallel_for(p.out.d, work, [&](index_t k) {
    resample_slice(avx2, vol, p, k, ToFloat{}, out + k * slice, scratch.mine());
  });
}

template <class T>
void window(const T* vol, index_t n, Window win, float* out) {
  const index_t n_blocks = (n + kBlock - 1) / kBlock;
  parallel_for(n_blocks, 2 * n, [&](index_t b) {
    const index_t end = std::min(n, (b + 1) * kBlock);
    for (index_t i = b * kBlock; i < end; ++i) out[i] = win(static_cast<double>(vol[i]));
  });
}

template <class T>
void chunk(const T* vol, Dims dims, index_t depth, index_t overlap, float pad_value,
           float* chunks, std::int32_t* z_start, std::int32_t* valid) {
  const index_t slice = dims.slice();
  const index_t work = dims.size() + chunk_count(dims.d, depth, overlap) * depth * slice;
  fill_chunks(dims.d, slice, depth, overlap, pad_value, chunks, z_start, valid, work,
              [&](index_t k, float* dst) {
                const T* src = vol + k * slice;
                for (index_t e = 0; e < slice; ++e) dst[e] = static_cast<float>(src[e]);
              });
}

template <class T>
void resample_window_chunk(const T* vol, const ResamplePlan& p, Window win, index_t depth,
                           index_t overlap, float pad_value, float* chunks,
                           std::int32_t* z_start, std::int32_t* valid) {
  Scratch scratch(p.in.w + 2 * p.out.w);
  const WindowAfterRound emit{win};
  const index_t work = p.in.size() + chunk_count(p.out.d, depth, overlap) * depth * p.out.slice();
  fill_chunks(p.out.d, p.out.slice(), depth, overlap, pad_value, chunks, z_start, valid, work,
              [&, avx2 = use_avx2()](index_t k, float* dst) {
                resample_slice(avx2, vol, p, k, emit, dst, scratch.mine());
              });
}

void patchify(const float* chunks, index_t n_chunks, Dims cd, const std::int32_t* z_start,
              std::array<index_t, 3> patch, float* tokens, std::int32_t* positions) {
  const index_t pz = patch[0], py = patch[1], px = patch[2];
  const index_t gz = cd.d / pz, gy = cd.h / py, gx = cd.w / px;
  const index_t n_tok = gz * gy * gx, n_el = pz * py * px;
  const size_t row_bytes = static_cast<size_t>(px) * sizeof(float);
  // One task per (chunk, patch layer): reads pz * H * W floats, writes as many.
  parallel_for(n_chunks * gz, 2 * n_chunks * cd.size(), [&](index_t task) {
    const index_t c = task / gz, a = task % gz;
    const float* src = chunks + c * cd.size();
    float* tok = tokens + (c * n_tok + a * gy * gx) * n_el;
    for (index_t dz = 0; dz < pz; ++dz) {
      for (index_t b = 0; b < gy; ++b) {
        for (index_t dy = 0; dy < py; ++dy) {
          const float* row = src + ((a * pz + dz) * cd.h + b * py + dy) * cd.w;
          float* el = tok + b * gx * n_el + (dz * py + dy) * px;
          for (index_t g = 0; g < gx; ++g) std::memcpy(el + g * n_el, row + g * px, row_bytes);
        }
      }
    }
    std::int32_t* pos = positions + (c * n_tok + a * gy * gx) * 3;
    const auto z = static_cast<std::int32_t>(z_start[c] / pz + a);
    for (index_t b = 0; b < gy; ++b) {
      for (index_t g = 0; g < gx; ++g) {
        std::int32_t* q = pos + (b * gx + g) * 3;
        q[0] = z;
        q[1] = static_cast<std::int32_t>(b);
        q[2] = static_cast<std::int32_t>(g);
      }
    }
  });
}

#define MEDSEEK_INSTANTIATE(T)                                                          \
  template void resample<T>(const T*, const ResamplePlan&, float*);                     \
  template void window<T>(const T*, index_t, Window, float*);                           \
  template void chunk<T>(const T*, Dims, index_t, index_t, float, float*, std::int32_t*, \
                         std::int32_t*);                                                \
  template void resample_window_chunk<T>(const T*, const ResamplePlan&, Window, index_t, \
                                         index_t, float, float*, std::int32_t*,         \
                                         std::int32_t*);

MEDSEEK_INSTANTIATE(std::int16_t)
MEDSEEK_INSTANTIATE(std::uint16_t)
MEDSEEK_INSTANTIATE(float)
#undef MEDSEEK_INSTANTIATE

}  // namespace medseek::volume

// pybind11 face of the volume engine: medseek._volume.
//
// Every entry point guards its arguments again (the Python face in medseek.volume checks
// first, with friendlier messages): arrays are taken as plain objects and never
// converted, so a wrong dtype, rank, byte order or a non-contiguous view raises instead
// of being copied behind the caller's back. Outputs are allocated while the GIL is held;
// the compute runs with the GIL released, on OpenMP threads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <tuple>

#include "volume.hpp"

namespace py = pybind11;
namespace mv = medseek::volume;
using mv::index_t;

namespace {

enum class Kind { i16, u16, f32 };

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += (i ? ", " : "") + std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

py::array as_array(const py::object& obj, const std::string& name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(name + " must be a numpy.ndarray, got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  return py::reinterpret_borrow<py::array>(obj);
}

void require_layout(const py::array& a, const std::string& name, py::ssize_t ndim) {
  if (a.ndim() != ndim) {
    throw py::value_error(name + " must have " + std::to_string(ndim) +
                          " dimensions, got shape " + shape_of(a));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(name + " must be C-contiguous (np.ascontiguousarray), got strides " +
                          std::string(py::str(a.attr("strides"))));
  }
  if (a.size() == 0) throw py::value_error(name + " must not be empty, got shape " + shape_of(a));
}

template <class T>
bool has_dtype(const py::array& a) {
  return a.dtype().equal(py::dtype::of<T>());  // native byte order only
}

Kind volume_kind(const py::array& a, const std::string& name) {
  if (has_dtype<std::int16_t>(a)) return Kind::i16;
  if (has_dtype<std::uint16_t>(a)) return Kind::u16;
  if (has_dtype<float>(a)) return Kind::f32;
  throw py::type_error(name + " dtype must be int16, uint16 or float32, got " +
                       std::string(py::str(a.dtype())));
}

// Calls f(T{}) with T the C++ element type of kind.
template <class F>
void dispatch(Kind kind, F&& f) {
  switch (kind) {
    case Kind::i16: f(std::int16_t{}); break;
    case Kind::u16: f(std::uint16_t{}); break;
    case Kind::f32: f(float{}); break;
  }
}

py::array volume_arg(const py::object& obj, Kind* kind) {
  py::array vol = as_array(obj, "vol");
  require_layout(vol, "vol", 3);
  *kind = volume_kind(vol, "vol");
  return vol;
}

mv::Dims dims_of(const py::array& a) { return {a.shape(0), a.shape(1), a.shape(2)}; }

void check_spacing(const std::array<double, 3>& s, const std::string& name) {
  for (double v : s) {
    if (!(std::isfinite(v) && v > 0.0)) {
      throw py::value_error(name + " must be finite and > 0 on every axis, got (" +
                            std::to_string(s[0]) + ", " + std::to_string(s[1]) + ", " +
                            std::to_string(s[2]) + ")");
    }
  }
}

mv::Window window_arg(double center, double width) {
  if (!std::isfinite(center)) throw py::value_error("center must be finite, got " + std::to_string(center));
  if (!(std::isfinite(width) && width > 0.0)) {
    throw py::value_error("width must be finite and > 0, got " + std::to_string(width));
  }
  return mv::Window(center, width);
}

void check_chunking(index_t depth, index_t overlap, double pad_value) {
  if (depth < 1) throw py::value_error("depth must be >= 1, got " + std::to_string(depth));
  if (overlap < 0 || overlap >= depth) {
    throw py::value_error("overlap must satisfy 0 <= overlap < depth = " + std::to_string(depth) +
                          ", got " + std::to_string(overlap));
  }
  if (!std::isfinite(pad_value)) {
    throw py::value_error("pad_value must be finite, got " + std::to_string(pad_value));
  }
}

using ChunkResult = std::tuple<py::array_t<float>, py::array_t<std::int32_t>, py::array_t<std::int32_t>>;

ChunkResult alloc_chunks(index_t d, index_t depth, index_t overlap, index_t h, index_t w) {
  const index_t n = mv::chunk_count(d, depth, overlap);
  return {py::array_t<float>({n, depth, h, w}), py::array_t<std::int32_t>(n),
          py::array_t<std::int32_t>(n)};
}

py::array_t<float> resample(const py::object& vol_obj, const std::array<double, 3>& spacing,
                            const std::array<double, 3>& target_spacing) {
  Kind kind;
  const py::array vol = volume_arg(vol_obj, &kind);
  check_spacing(spacing, "spacing");
  check_spacing(target_spacing, "target_spacing");
  const mv::ResamplePlan plan = mv::plan_resample(dims_of(vol), spacing, target_spacing);
  py::array_t<float> out({plan.out.d, plan.out.h, plan.out.w});
  float* dst = out.mutable_data();
  const void* src = vol.data();
  {
    py::gil_scoped_release nogil;
    dispatch(kind, [&](auto tag) {
      using T = decltype(tag);
      mv::resample(static_cast<const T*>(src), plan, dst);
    });
  }
  return out;
}

py::array_t<float> window(const py::object& vol_obj, double center, double width) {
  Kind kind;
  const py::array vol = volume_arg(vol_obj, &kind);
  const mv::Window win = window_arg(center, width);
  py::array_t<float> out({vol.shape(0), vol.shape(1), vol.shape(2)});
  float* dst = out.mutable_data();
  const void* src = vol.data();
  const index_t n = vol.size();
  {
    py::gil_scoped_release nogil;
    dispatch(kind, [&](auto tag) {
      using T = decltype(tag);
      mv::window(static_cast<const T*>(src), n, win, dst);
    });
  }
  return out;
}

ChunkResult chunk(const py::object& vol_obj, index_t depth, index_t overlap, double pad_value) {
  Kind kind;
  const py::array vol = volume_arg(vol_obj, &kind);
  check_chunking(depth, overlap, pad_value);
  const mv::Dims dims = dims_of(vol);
  ChunkResult res = alloc_chunks(dims.d, depth, overlap, dims.h, dims.w);
  float* chunks = std::get<0>(res).mutable_data();
  std::int32_t* z_start = std::get<1>(res).mutable_data();
  std::int32_t* valid = std::get<2>(res).mutable_data();
  const void* src = vol.data();
  {
    py::gil_scoped_release nogil;
    dispatch(kind, [&](auto tag) {
      using T = decltype(tag);
      mv::chunk(static_cast<const T*>(src), dims, depth, overlap, static_cast<float>(pad_value),
                chunks, z_start, valid);
    });
  }
  return res;
}

ChunkResult resample_window_chunk(const py::object& vol_obj, const std::array<double, 3>& spacing,
                                  const std::array<double, 3>& target_spacing, double center,
                                  double width, index_t depth, index_t overlap, double pad_value) {
  Kind kind;
  const py::array vol = volume_arg(vol_obj, &kind);
  check_spacing(spacing, "spacing");
  check_spacing(target_spacing, "target_spacing");
  const mv::Window win = window_arg(center, width);
  check_chunking(depth, overlap, pad_value);
  const mv::ResamplePlan plan = mv::plan_resample(dims_of(vol), spacing, target_spacing);
  ChunkResult res = alloc_chunks(plan.out.d, depth, overlap, plan.out.h, plan.out.w);
  float* chunks = std::get<0>(res).mutable_data();
  std::int32_t* z_start = std::get<1>(res).mutable_data();
  std::int32_t* valid = std::get<2>(res).mutable_data();
  const void* src = vol.data();
  {
    py::gil_scoped_release nogil;
    dispatch(kind, [&](auto tag) {
      using T = decltype(tag);
      mv::resample_window_chunk(static_cast<const T*>(src), plan, win, depth, overlap,
                                static_cast<float>(pad_value), chunks, z_start, valid);
    });
  }
  return res;
}

std::tuple<py::array_t<float>, py::array_t<std::int32_t>> patchify(
    const py::object& chunks_obj, const py::object& z_start_obj, const std::array<index_t, 3>& patch) {
  const py::array chunks = as_array(chunks_obj, "chunks");
  require_layout(chunks, "chunks", 4);
  if (!has_dtype<float>(chunks)) {
    throw py::type_error("chunks dtype must be float32, got " + std::string(py::str(chunks.dtype())));
  }
  const py::array z_arr = as_array(z_start_obj, "z_start");
  require_layout(z_arr, "z_start", 1);
  if (!has_dtype<std::int32_t>(z_arr)) {
    throw py::type_error("z_start dtype must be int32, got " + std::string(py::str(z_arr.dtype())));
  }
  const index_t n = chunks.shape(0);
  if (z_arr.shape(0) != n) {
    throw py::value_error("z_start must have one entry per chunk (" + std::to_string(n) +
                          "), got shape " + shape_of(z_arr));
  }
  const mv::Dims cd{chunks.shape(1), chunks.shape(2), chunks.shape(3)};
  const index_t extent[3] = {cd.d, cd.h, cd.w};
  for (int a = 0; a < 3; ++a) {
    if (patch[a] < 1 || extent[a] % patch[a] != 0) {
      throw py::value_error("patch " + std::to_string(patch[a]) + " on axis " + std::to_string(a) +
                            " must be >= 1 and divide the chunk extent " + std::to_string(extent[a]));
    }
  }
  const auto* z_start = static_cast<const std::int32_t*>(z_arr.data());
  for (index_t c = 0; c < n; ++c) {
    if (z_start[c] < 0 || z_start[c] % patch[0] != 0) {
      throw py::value_error("z_start[" + std::to_string(c) + "] = " + std::to_string(z_start[c]) +
                            " must be >= 0 and a multiple of patch[0] = " + std::to_string(patch[0]));
    }
  }
  const index_t n_tok = (cd.d / patch[0]) * (cd.h / patch[1]) * (cd.w / patch[2]);
  py::array_t<float> tokens({n, n_tok, patch[0] * patch[1] * patch[2]});
  py::array_t<std::int32_t> positions({n, n_tok, index_t{3}});
  float* tok = tokens.mutable_data();
  std::int32_t* pos = positions.mutable_data();
  const auto* src = static_cast<const float*>(chunks.data());
  {
    py::gil_scoped_release nogil;
    mv::patchify(src, n, cd, z_start, patch, tok, pos);
  }
  return {tokens, positions};
}

}  // namespace

PYBIND11_MODULE(_volume, m) {
  m.doc() = "medseek volume engine (C++17, OpenMP). Use medseek.volume, which validates first.";
  m.attr("__version__") = MEDSEEK_VERSION;
  m.def("resample", &resample, py::arg("vol"), py::arg("spacing"), py::arg("target_spacing"),
        "Trilinear resample of a (D, H, W) volume to target_spacing; float32 out.");
  m.def("window", &window, py::arg("vol"), py::arg("center"), py::arg("width"),
        "clip((v - (center - width/2)) / width, 0, 1) as float32.");
  m.def("chunk", &chunk, py::arg("vol"), py::arg("depth"), py::arg("overlap"),
        py::arg("pad_value"), "Split along z into (C, depth, H, W) float32 chunks.");
  m.def("resample_window_chunk", &resample_window_chunk, py::arg("vol"), py::arg("spacing"),
        py::arg("target_spacing"), py::arg("center"), py::arg("width"), py::arg("depth"),
        py::arg("overlap"), py::arg("pad_value"),
        "chunk(window(resample(vol))) in one pass over the input.");
  m.def("_set_avx2_allowed", &mv::set_avx2_allowed, py::arg("allowed"),
        "Testing hook: allow (True) or forbid the AVX2 resample kernel; returns the old value.");
  m.def("patchify", &patchify, py::arg("chunks"), py::arg("z_start"), py::arg("patch"),
        "Non-overlapping 3D patches (tokens) and their absolute patch-grid positions.");
}

// Native module of vitx-fast: the C++ CPU kernels of the fused ops, plus how the module was built.
//
// The kernels take contiguous float32/float64 numpy arrays (torch tensors arrive as zero-copy `.numpy()` views, so the
// build stays torch-independent) and write into a caller-allocated `out`. Everything is validated here, at the
// binding boundary, with messages like "agcam_epilogue: v must have shape (B, L, H, T, d) = (2, 3, 4, ?, 7), got ...";
// the GIL is released while a kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "agcam_epilogue/agcam_epilogue.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "daam_block_maps/daam_block_maps.h"
#include "masked_variant_attention/masked_variant_attention.h"
#include "safe_divide/safe_divide.h"

namespace py = pybind11;
using vitx::check_contiguous;
using vitx::check_same_dtype;
using vitx::check_shape;

static py::dict build_info() {
  py::dict d;
  d["compiler"] = __VERSION__;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cuda"] = false;
  d["ops"] = py::make_tuple("masked_variant_attention", "agcam_epilogue", "daam_block_maps", "safe_divide");
  return d;
}

template <typename T>
static const T* cptr(const py::array& a) {
  return static_cast<const T*>(a.data());
}

template <typename T>
static T* mptr(py::array& a) {
  return static_cast<T*>(a.mutable_data());
}

static void masked_variant_attention(py::array q, py::array pk, py::array pv, py::array idx, py::array m,
                                     py::array valid, py::array log_nz, py::array bk, py::array bv, py::array out,
                                     int num_threads) {
  const char* op = "masked_variant_attention";
  check_shape(op, "q", q, "(B, N, H, d)", {-1, -1, -1, -1});
  const py::ssize_t B = q.shape(0), N = q.shape(1), H = q.shape(2), d = q.shape(3);
  check_shape(op, "pk", pk, "(B, T, H, d)", {B, -1, H, d});
  const py::ssize_t T = pk.shape(1);
  check_shape(op, "pv", pv, "(B, T, H, d)", {B, T, H, d});
  check_shape(op, "idx", idx, "(N, A)", {N, -1});
  const py::ssize_t A = idx.shape(1);
  check_shape(op, "m", m, "(N, A)", {N, A});
  check_shape(op, "valid", valid, "(N, A)", {N, A});
  check_shape(op, "log_nz", log_nz, "(N,)", {N});
  check_shape(op, "bk", bk, "(H, d)", {H, d});
  check_shape(op, "bv", bv, "(H, d)", {H, d});
  check_shape(op, "out", out, "(B, N, H, d)", {B, N, H, d});
  for (auto [name, arr] : {std::pair<const char*, py::array*>{"pk", &pk}, {"pv", &pv}, {"m", &m}, {"log_nz", &log_nz},
                           {"bk", &bk}, {"bv", &bv}, {"out", &out}})
    check_same_dtype(op, name, *arr, "q", q);
  VITX_CHECK(vitx::has_dtype<int64_t>(idx), std::string(op) + ": idx must be int64, got " + vitx::dtype_str(idx));
  VITX_CHECK(valid.dtype().kind() == 'b' && valid.dtype().itemsize() == 1,
             std::string(op) + ": valid must be bool, got " + vitx::dtype_str(valid));
  for (auto [name, arr] : {std::pair<const char*, py::array*>{"q", &q}, {"pk", &pk}, {"pv", &pv}, {"idx", &idx},
                           {"m", &m}, {"valid", &valid}, {"log_nz", &log_nz}, {"bk", &bk}, {"bv", &bv},
                           {"out", &out}})
    check_contiguous(op, name, *arr);
  vitx::check_writeable(op, "out", out);
  // padded slots are never read; valid ones index rows of pk/pv
  const int64_t* ix = cptr<int64_t>(idx);
  const bool* ok = cptr<bool>(valid);
  for (py::ssize_t i = 0; i < N * A; ++i)
    VITX_CHECK(!ok[i] || (ix[i] >= 0 && ix[i] < T),
               std::string(op) + ": valid entries of idx must lie in [0, T) = [0, " + std::to_string(T) + ")");
  VITX_DISPATCH_FLOAT(op, "q", q, [&] {
    py::gil_scoped_release release;
    vitx::masked_variant_attention_cpu<scalar_t>(cptr<scalar_t>(q), cptr<scalar_t>(pk), cptr<scalar_t>(pv), ix,
                                                 cptr<scalar_t>(m), ok, cptr<scalar_t>(log_nz), cptr<scalar_t>(bk),
                                                 cptr<scalar_t>(bv), mptr<scalar_t>(out), B, N, H, d, T, A,
                                                 num_threads);
  });
}

static void agcam_epilogue(py::array delta, py::array v, py::array s, py::array out, int num_threads) {
  const char* op = "agcam_epilogue";
  check_shape(op, "delta", delta, "(B, L, H, d)", {-1, -1, -1, -1});
  const py::ssize_t B = delta.shape(0), L = delta.shape(1), H = delta.shape(2), d = delta.shape(3);
  check_shape(op, "v", v, "(B, L, H, T, d)", {B, L, H, -1, d});
  const py::ssize_t T = v.shape(3);
  check_shape(op, "s", s, "(B, L, H, T)", {B, L, H, T});
  check_shape(op, "out", out, "(B, T)", {B, T});
  check_same_dtype(op, "v", v, "delta", delta);
  check_same_dtype(op, "s", s, "delta", delta);
  check_same_dtype(op, "out", out, "delta", delta);
  for (auto [name, arr] : {std::pair<const char*, py::array*>{"delta", &delta}, {"v", &v}, {"s", &s}, {"out", &out}})
    check_contiguous(op, name, *arr);
  vitx::check_writeable(op, "out", out);
  VITX_DISPATCH_FLOAT(op, "delta", delta, [&] {
    py::gil_scoped_release release;
    vitx::agcam_epilogue_cpu<scalar_t>(cptr<scalar_t>(delta), cptr<scalar_t>(v), cptr<scalar_t>(s),
                                       mptr<scalar_t>(out), B, L, H, T, d, num_threads);
  });
}

static void daam_block_maps(py::array a, py::array v, py::array g, py::array out, int num_threads) {
  const char* op = "daam_block_maps";
  check_shape(op, "a", a, "(B, L, H, T)", {-1, -1, -1, -1});
  const py::ssize_t B = a.shape(0), L = a.shape(1), H = a.shape(2), T = a.shape(3);
  check_shape(op, "v", v, "(B, L, H, T, d)", {B, L, H, T, -1});
  const py::ssize_t d = v.shape(4);
  check_shape(op, "g", g, "(B, L, H, d)", {B, L, H, d});
  check_shape(op, "out", out, "(B, L, T)", {B, L, T});
  check_same_dtype(op, "v", v, "a", a);
  check_same_dtype(op, "g", g, "a", a);
  check_same_dtype(op, "out", out, "a", a);
  for (auto [name, arr] : {std::pair<const char*, py::array*>{"a", &a}, {"v", &v}, {"g", &g}, {"out", &out}})
    check_contiguous(op, name, *arr);
  vitx::check_writeable(op, "out", out);
  VITX_DISPATCH_FLOAT(op, "a", a, [&] {
    py::gil_scoped_release release;
    vitx::daam_block_maps_cpu<scalar_t>(cptr<scalar_t>(a), cptr<scalar_t>(v), cptr<scalar_t>(g), mptr<scalar_t>(out),
                                        B, L, H, T, d, num_threads);
  });
}

// Whether two C-contiguous arrays share any byte.
static bool overlaps(const py::array& x, const py::array& y) {
  if (x.nbytes() == 0 || y.nbytes() == 0) return false;
  const char* x0 = static_cast<const char*>(x.data());
  const char* y0 = static_cast<const char*>(y.data());
  return x0 < y0 + y.nbytes() && y0 < x0 + x.nbytes();
}

static void safe_divide(py::array a, py::array b, py::array out, int num_threads) {
  const char* op = "safe_divide";
  check_shape(op, "a", a, "(P, K, Q)", {-1, -1, -1});
  const py::ssize_t P = a.shape(0), K = a.shape(1), Q = a.shape(2);
  check_shape(op, "b", b, "(P, Q)", {P, Q});
  check_shape(op, "out", out, "(P, K, Q)", {P, K, Q});
  check_same_dtype(op, "b", b, "a", a);
  check_same_dtype(op, "out", out, "a", a);
  for (auto [name, arr] : {std::pair<const char*, py::array*>{"a", &a}, {"b", &b}, {"out", &out}})
    check_contiguous(op, name, *arr);
  vitx::check_writeable(op, "out", out);
  // in place is fine (each element reads a only at its own index); writing into b (read for every k) or into a
  // shifted alias of a would change inputs not yet read
  VITX_CHECK(!overlaps(out, b), std::string(op) + ": out must not overlap b");
  VITX_CHECK(out.data() == a.data() || !overlaps(out, a),
             std::string(op) + ": out must be a itself or not overlap it");
  VITX_DISPATCH_FLOAT(op, "a", a, [&] {
    py::gil_scoped_release release;
    vitx::safe_divide_cpu<scalar_t>(cptr<scalar_t>(a), cptr<scalar_t>(b), mptr<scalar_t>(out), P, K, Q, num_threads);
  });
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "vitx-fast native kernels";
  m.def("build_info", &build_info, "How the native module was built.");
  m.def("masked_variant_attention", &masked_variant_attention, py::arg("q"), py::arg("pk"), py::arg("pv"),
        py::arg("idx"), py::arg("m"), py::arg("valid"), py::arg("log_nz"), py::arg("bk"), py::arg("bv"),
        py::arg("out"), py::arg("num_threads") = 0,
        "ReciproCAM collapsed attention per variant, written into out (B, N, H, d). float32/float64, C-contiguous.");
  m.def("agcam_epilogue", &agcam_epilogue, py::arg("delta"), py::arg("v"), py::arg("s"), py::arg("out"),
        py::arg("num_threads") = 0, "AGCAM epilogue sum_{l,h} ReLU(<delta, v_t>) sigmoid(s_t), written into out (B, T).");
  m.def("daam_block_maps", &daam_block_maps, py::arg("a"), py::arg("v"), py::arg("g"), py::arg("out"),
        py::arg("num_threads") = 0, "DAAM block maps ReLU(sum_h a_t <v_t, g>), written into out (B, L, T).");
  m.def("safe_divide", &safe_divide, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("num_threads") = 0,
        "LRP safe division a / (b + 1e-9) * (b != 0), b (P, Q) broadcast over K, written into out (P, K, Q); out may "
        "be a.");
}

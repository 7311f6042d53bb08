#pragma once
// Readable validation at the binding boundary: "op: what is wrong". std::invalid_argument becomes a Python ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#define VITX_CHECK(cond, msg)                                   \
  do {                                                          \
    if (!(cond)) throw std::invalid_argument(std::string(msg)); \
  } while (0)

namespace vitx {
namespace py = pybind11;

// Sizes of an expected shape; -1 means "any" (the caller reads it from the array).
inline std::string shape_str(const std::vector<py::ssize_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    out += (s[i] < 0 ? std::string("?") : std::to_string(s[i]));
    if (i + 1 < s.size()) out += ", ";
  }
  return out + (s.size() == 1 ? ",)" : ")");
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// CHECK_SHAPE: "op: name must have shape layout = (3, ?, 2), got (3, 5)".
inline void check_shape(const char* op, const char* name, const py::array& a, const char* layout,
                        std::initializer_list<py::ssize_t> expected) {
  std::vector<py::ssize_t> want(expected);
  std::vector<py::ssize_t> got(a.shape(), a.shape() + a.ndim());
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] < 0 || want[i] == got[i];
  VITX_CHECK(ok, std::string(op) + ": " + name + " must have shape " + layout + " = " + shape_str(want) + ", got " +
                     shape_str(got));
}

// CHECK_CONTIGUOUS: the kernels index raw row-major buffers.
inline void check_contiguous(const char* op, const char* name, const py::array& a) {
  VITX_CHECK(a.flags() & py::array::c_style, std::string(op) + ": " + name + " must be C-contiguous");
}

template <typename T>
inline bool has_dtype(const py::array& a) {
  return a.dtype().kind() == py::dtype::of<T>().kind() && a.dtype().itemsize() == static_cast<py::ssize_t>(sizeof(T));
}

// CHECK_DTYPE: the same float dtype as a reference argument.
inline void check_same_dtype(const char* op, const char* name, const py::array& a, const char* ref_name,
                             const py::array& ref) {
  VITX_CHECK(a.dtype().kind() == ref.dtype().kind() && a.dtype().itemsize() == ref.dtype().itemsize(),
             std::string(op) + ": " + name + " must have the dtype of " + ref_name + " (" + dtype_str(ref) + "), got " +
                 dtype_str(a));
}

inline void check_writeable(const char* op, const char* name, const py::array& a) {
  VITX_CHECK(a.writeable(), std::string(op) + ": " + name + " must be writeable");
}

}  // namespace vitx

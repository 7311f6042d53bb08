// Native module of vitx-fast. The kernels issue adds the CPU kernels here; for now it reports how it was built,
// so `vitx info` and the tests can tell whether the native build works on this machine.
#include <pybind11/pybind11.h>

#include "common/checks.h"

namespace py = pybind11;

static py::dict build_info() {
  py::dict d;
  d["compiler"] = __VERSION__;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cuda"] = false;
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "vitx-fast native kernels";
  m.def("build_info", &build_info, "How the native module was built.");
}

#include <pybind11/pybind11.h>
namespace py = pybind11;
namespace flashinfer { void bind_io(py::module_& m) { (void)m; } }

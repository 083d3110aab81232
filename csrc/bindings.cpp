// bindings.cpp: the _core module entry point. Registers the exception types and
// build_info(), then hands the module to the binding units (bind_io.cpp, bind_kernels.cpp).
// Binding code only converts and forwards; all logic lives in the flashcore library.
#include <pybind11/pybind11.h>

#include "bundle_format.h"
#include "common.h"
#include "kernels.h"

namespace py = pybind11;

namespace flashinfer {
void bind_io(py::module_& m);       // bind_io.cpp: direct files, bundle format, reader, cache
void bind_kernels(py::module_& m);  // bind_kernels.cpp: 16-bit matvec, sparse FFN
}  // namespace flashinfer

PYBIND11_MODULE(_core, m) {
  m.doc() = "flashinfer_py native core: direct I/O, bundle files, neuron cache, kernels";

  // FlashFormatError(ValueError): a file is not what it claims to be.
  // FlashIOError(OSError): the operating system failed a read.
  static py::exception<flashinfer::FormatError> format_error(m, "FlashFormatError",
                                                             PyExc_ValueError);
  static py::exception<flashinfer::IoError> io_error(m, "FlashIOError", PyExc_OSError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const flashinfer::FormatError& e) {
      py::set_error(format_error, e.what());
    } catch (const flashinfer::IoError& e) {
      // OSError(errno, message) sets .errno and .strerror like the OS's own errors; .path and
      // .offset are ours (.filename is left unset: OSError's str() would repeat the path).
      py::handle type = io_error;
      py::object exc = e.error_code() != 0 ? type(e.error_code(), e.what()) : type(e.what());
      exc.attr("path") = e.path().empty() ? py::object(py::none()) : py::str(e.path());
      exc.attr("offset") = e.offset() < 0 ? py::object(py::none()) : py::int_(e.offset());
      PyErr_SetObject(io_error.ptr(), exc.ptr());
    }
  });

  m.def("build_info", []() {
    py::dict d;
    d["version"] = FLASHINFER_VERSION;  // flashinfer_py/__init__.py's, through CMake
    d["compiler"] = FLASHINFER_COMPILER;
    d["build_type"] = FLASHINFER_BUILD_TYPE;
#if defined(__linux__)
    d["direct_io"] = "O_DIRECT";
#elif defined(__APPLE__)
    d["direct_io"] = "F_NOCACHE";
#else
    d["direct_io"] = "none";
#endif
#ifdef FLASHINFER_HAVE_IO_URING
    d["io_uring"] = true;
    d["io_uring_link"] = FLASHINFER_URING_LINK;  // "static": the wheel needs no liburing
#else
    d["io_uring"] = false;
    d["io_uring_link"] = py::none();
#endif
#ifdef FLASHINFER_FAILPOINTS
    d["failpoints"] = true;
#else
    d["failpoints"] = false;
#endif
#ifdef FLASHINFER_HAVE_OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#if defined(__AVX2__) || defined(__x86_64__)
    d["arch"] = "x86_64";
#elif defined(__aarch64__)
    d["arch"] = "aarch64";
#else
    d["arch"] = "other";
#endif
    // the kernel levels built in (chosen at run time by the CPU; no -march at build time)
    // and the one in use now
#if defined(__x86_64__) || defined(_M_X64)
    d["isa_dispatch"] = py::make_tuple("scalar", "avx2", "avx512");
#else
    d["isa_dispatch"] = py::make_tuple("scalar");
#endif
    d["simd"] = flashinfer::isa_name(flashinfer::kernel_isa());
    // what each kind of kernel runs on now: the block formats' integer dots use VNNI at the
    // avx512 level and their accumulation of one input 512-bit vectors; the float kernels
    // and the block formats' accumulation of several inputs run their AVX2 code there
    py::dict k;
    const flashinfer::Isa isa = flashinfer::kernel_isa();
    k["float"] = isa == flashinfer::Isa::Scalar ? "scalar" : "avx2";
    k["block_dot"] = isa == flashinfer::Isa::Avx512 ? "avx512_vnni"
                     : isa == flashinfer::Isa::Avx2 ? "avx2" : "scalar";
    k["block_accumulate"] = isa == flashinfer::Isa::Avx512 ? "avx512 (one input), avx2"
                            : isa == flashinfer::Isa::Avx2 ? "avx2" : "scalar";
    k["threads"] = "a spinning pool, the caller included (csrc/thread_pool.h)";
    d["kernels"] = k;
    py::list fmts;
    for (uint32_t i = 0; i < flashinfer::kNumDTypes; ++i)
      fmts.append(flashinfer::dtype_name(flashinfer::DType(i)));
    d["formats"] = fmts;
    d["cython"] = FLASHINFER_CYTHON;  // wrote the bookkeeping module (_bookkeeping.pyx)
    return d;
  }, "What this build of the native core has: version, compiler, direct I/O flavour, io_uring "
     "(and whether liburing is linked statically), OpenMP, the SIMD levels built in and the one "
     "the kernels use with what each kind of kernel runs on, storage formats, Cython.");

  flashinfer::bind_io(m);
  flashinfer::bind_kernels(m);
}

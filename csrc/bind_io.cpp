// bind_io.cpp: pybind11 bindings for the I/O half of the core (bundle format, writer,
// reader, neuron cache). Only conversion, validation and forwarding live here:
//   - every ndarray is checked (dtype, ndim, contiguity, shape, alignment) before use, with a
//     message that says how to fix the call;
//   - the GIL is released around all I/O and copying;
//   - cache views are zero-copy ndarrays whose base is the cache (keeps it alive).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "async_reads.h"
#include "bundle_format.h"
#include "bundle_reader.h"
#include "bundle_writer.h"
#include "failpoints.h"
#include "neuron_cache.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace flashinfer {

namespace {

// ---------------------------------------------------------------------------------------
// conversions
// ---------------------------------------------------------------------------------------

DownLayout parse_down_layout(const std::string& s) {
  if (s == "blocks") return DownLayout::Blocks;
  if (s == "codes") return DownLayout::Codes;
  throw std::invalid_argument("down_layout must be \"blocks\" or \"codes\", got \"" + s + "\"");
}

PartKind parse_part(const std::string& s) {
  if (s == "up") return PartKind::Up;
  if (s == "gate") return PartKind::Gate;
  if (s == "down") return PartKind::Down;
  throw std::invalid_argument("part kinds are \"up\", \"gate\", \"down\"; got \"" + s + "\"");
}

const char* part_name(uint32_t k) {
  switch (static_cast<PartKind>(k)) {
    case PartKind::Up: return "up";
    case PartKind::Gate: return "gate";
    case PartKind::Down: return "down";
    default: return "none";
  }
}

// numpy dtype the records are stored in (bfloat16 has no numpy dtype: raw uint16 bits;
// block formats are bytes).
py::dtype storage_dtype(const BundleHeader& h) {
  switch (static_cast<DType>(h.dtype)) {
    case DType::F32: return py::dtype("float32");
    case DType::F16: return py::dtype("float16");
    case DType::BF16: return py::dtype("uint16");
    default: return py::dtype("uint8");
  }
}

py::dict header_dict(const BundleHeader& h) {
  py::dict d;
  d["magic"] = std::string(h.magic, 8);
  d["version"] = h.version;
  d["header_bytes"] = h.header_bytes;
  d["n_layers"] = h.n_layers;
  d["d_model"] = h.d_model;
  d["d_ff"] = h.d_ff;
  d["dtype"] = dtype_name(static_cast<DType>(h.dtype));
  d["elem_bytes"] = h.elem_bytes;
  d["n_parts"] = h.n_parts;
  py::list parts;
  for (uint32_t i = 0; i < h.n_parts; ++i) parts.append(part_name(h.part_kinds[i]));
  d["parts"] = parts;
  py::list pbytes, poffs;
  for (uint32_t i = 0; i < h.n_parts; ++i) {
    pbytes.append(h.part_bytes[i]);
    poffs.append(h.part_offset[i]);
  }
  d["part_bytes"] = pbytes;
  d["part_offsets"] = poffs;
  d["payload_bytes"] = payload_bytes(h);
  d["down_layout"] = h.down_layout == uint32_t(DownLayout::Codes) ? "codes" : "blocks";
  d["alignment"] = h.alignment;
  // by value: the header is packed and these sit at misaligned offsets (no references)
  d["record_bytes"] = uint64_t(h.record_bytes);
  d["data_offset"] = uint64_t(h.data_offset);
  d["file_bytes"] = uint64_t(h.file_bytes);
  return d;
}

py::dict stats_dict(const ReadStats& s) {
  py::dict d;
  d["bytes_requested"] = s.bytes_requested;
  d["bytes_read"] = s.bytes_read;
  d["reads_issued"] = s.reads_issued;
  d["ns"] = s.ns;
  d["calls"] = s.calls;
  d["rounds"] = s.rounds;
  d["direct"] = s.direct;
  return d;
}

// ---------------------------------------------------------------------------------------
// boundary validation
// ---------------------------------------------------------------------------------------

// Any integer sequence / array -> contiguous 1-D int64 (range checks happen in C++).
py::array_t<int64_t> as_ids(const py::object& obj) {
  py::array a = py::array::ensure(obj);
  FI_CHECK(a, "ids must be a 1-D integer array or sequence");
  char kind = a.dtype().kind();
  FI_CHECK(a.size() == 0 || kind == 'i' || kind == 'u', "ids must be integers, got dtype ",
           std::string(py::str(a.dtype())), " (convert with ids.astype(np.int64))");
  FI_CHECK(a.ndim() == 1 || a.size() == 0, "ids must be 1-D, got ", a.ndim(), " dimensions");
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a.reshape({a.size()}));
}

// A read into the caller's array, the GIL released. If the reader abandoned one of the
// call's reads (a device that neither answered nor let it be cancelled: see
// BundleReader::abandoned), the kernel may still write into `out` at any time, so the array
// is leaked (one reference never released) before the error reaches Python: its memory is
// never freed or reused.
template <class Read>
ReadStats read_keeping(BundleReader& r, py::array& out, Read&& read) {
  const uint64_t abandoned = r.abandoned();
  std::exception_ptr err;
  ReadStats rs;
  {
    py::gil_scoped_release nogil;
    try {
      rs = read();
    } catch (...) {
      err = std::current_exception();
    }
  }
  if (err) {
    if (r.abandoned() != abandoned) out.inc_ref();
    std::rethrow_exception(err);
  }
  return rs;
}

// A writable 2-D destination with `n` rows of at least `row_bytes` contiguous bytes each.
// With `aligned`, start and row stride must be multiples of 4096 (O_DIRECT lands in place).
char* check_out(py::array& out, py::ssize_t n, uint64_t row_bytes, bool aligned,
                py::ssize_t* stride) {
  FI_CHECK(out.writeable(), "out must be writeable");
  FI_CHECK(out.ndim() == 2, "out must be 2-D (n_ids, row), got ", out.ndim(), " dimensions");
  FI_CHECK(out.shape(0) == n, "out has ", out.shape(0), " rows but ", n, " ids were given");
  FI_CHECK(out.shape(1) <= 1 || out.strides(1) == out.itemsize(),
           "out rows must be contiguous (C order); use np.ascontiguousarray or "
           "flashinfer_py.bundles.aligned_empty");
  uint64_t row = uint64_t(out.shape(1)) * out.itemsize();
  FI_CHECK(row >= row_bytes, "out rows hold ", row, " bytes but each needs ", row_bytes,
           " (record_bytes); allocate with flashinfer_py.bundles.aligned_empty((n, "
           "reader.record_elems), reader.storage_dtype)");
  *stride = n <= 1 ? py::ssize_t(row) : out.strides(0);
  FI_CHECK(*stride >= py::ssize_t(row), "out rows overlap or run backwards (row stride ",
           *stride, ")");
  char* p = static_cast<char*>(out.mutable_data());
  if (aligned && n > 0) {
    FI_CHECK(is_aligned(p, kIoAlignment), "out must be 4096-byte aligned for direct I/O: "
             "allocate it with flashinfer_py.bundles.aligned_empty");
    FI_CHECK(n == 1 || is_aligned(std::size_t(*stride), kIoAlignment), "out row stride ",
             *stride, " must be a multiple of 4096 for direct I/O: allocate it with "
             "flashinfer_py.bundles.aligned_empty((n, reader.record_elems), dtype)");
  }
  return p;
}

// Part `index` of a layer: a C-contiguous [d_ff, part elements] matrix in the storage
// format of `h` (float dtypes: d_model elements; block formats: part_bytes uint8).
const void* check_part(const py::array& a, const BundleHeader& h, std::size_t index) {
  const DType dt = static_cast<DType>(h.dtype);
  const char* want = dtype_name(dt);
  char kind = a.dtype().kind();
  std::string got = py::str(a.dtype());
  const bool blocks = is_quantized(dt);
  bool ok = a.itemsize() == h.elem_bytes &&
            (blocks ? kind == 'u' : dt == DType::BF16 ? (kind == 'u' || got == "bfloat16")
                                                      : kind == 'f');
  FI_CHECK(ok, "part ", index, " has dtype ", got, " but the bundle stores ", want,
           dt == DType::BF16 ? " (pass bfloat16 bits as uint16)"
                             : blocks ? " (pass its blocks as uint8 rows)" : "");
  const uint64_t cols = h.part_bytes[index] / h.elem_bytes;
  FI_CHECK(a.ndim() == 2 && uint64_t(a.shape(0)) == h.d_ff && uint64_t(a.shape(1)) == cols,
           "part ", index, " must have shape (d_ff, ", blocks ? "part bytes" : "d_model",
           ") = (", h.d_ff, ", ", cols, "), got ",
           std::string(py::str(py::tuple(py::cast(std::vector<py::ssize_t>(
               a.shape(), a.shape() + a.ndim()))))),
           " (down must be passed transposed: down_proj.weight.T)");
  FI_CHECK(a.flags() & py::array::c_style, "part ", index,
           " must be C-contiguous; pass np.ascontiguousarray(x) (down^T in particular)");
  return a.data();
}

std::vector<uint32_t> as_capacity(const py::object& cap, uint32_t n_layers) {
  if (py::isinstance<py::int_>(cap)) {
    long long c = cap.cast<long long>();
    FI_CHECK(c >= 0, "capacity must be >= 0, got ", c);
    return std::vector<uint32_t>(n_layers, uint32_t(c));
  }
  auto v = cap.cast<std::vector<long long>>();
  std::vector<uint32_t> out;
  for (long long c : v) {
    FI_CHECK(c >= 0 && c <= 0xffffffffLL, "capacity entries must be >= 0, got ", c);
    out.push_back(uint32_t(c));
  }
  return out;
}

// Zero-copy read-only view whose base object is `owner` (so the owner outlives the view).
py::array view(py::dtype dt, std::vector<py::ssize_t> shape, std::vector<py::ssize_t> strides,
               const void* ptr, const py::object& owner) {
  py::array a(dt, shape, strides, ptr, owner);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// module
// ---------------------------------------------------------------------------------------

void bind_io(py::module_& m) {
  m.def("read_header", [](const std::string& path) { return header_dict(read_header(path)); },
        py::arg("path"), "Read and validate a bundle file's header; returns a dict.");

  // ---- writer ----------------------------------------------------------------------
  py::class_<BundleWriter>(m, "BundleWriter")
      .def(py::init([](const std::string& path, uint32_t n_layers, uint32_t d_model,
                       uint32_t d_ff, const std::string& dtype,
                       const std::vector<std::string>& parts, uint32_t alignment,
                       const std::string& down_layout) {
             std::vector<PartKind> kinds;
             for (const auto& p : parts) kinds.push_back(parse_part(p));
             return new BundleWriter(path, n_layers, d_model, d_ff, parse_dtype(dtype), kinds,
                                     alignment, parse_down_layout(down_layout));
           }),
           py::arg("path"), py::arg("n_layers"), py::arg("d_model"), py::arg("d_ff"),
           py::arg("dtype"), py::arg("parts"), py::arg("alignment") = kIoAlignment,
           py::arg("down_layout") = "blocks")
      .def("write_layer",
           [](BundleWriter& w, uint32_t layer, const std::vector<py::array>& parts) {
             std::vector<const void*> ptrs;
             for (std::size_t i = 0; i < parts.size(); ++i)
               ptrs.push_back(check_part(parts[i], w.header(), i));
             py::gil_scoped_release nogil;
             w.write_layer(layer, ptrs.data(), ptrs.size());
           },
           py::arg("layer"), py::arg("parts"))
      .def("finish", &BundleWriter::finish, py::call_guard<py::gil_scoped_release>())
      .def("abort", &BundleWriter::abort, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("header", [](const BundleWriter& w) { return header_dict(w.header()); })
      .def_property_readonly("path", &BundleWriter::path)
      .def_property_readonly("finished", &BundleWriter::finished);

  // ---- reader ----------------------------------------------------------------------
  py::class_<ReaderParams>(m, "ReaderParams")
      .def(py::init([](const std::string& engine, int queue_depth, bool use_direct_io,
                       uint64_t coalesce_gap_bytes, uint64_t max_read_bytes,
                       int64_t read_timeout_ms, uint64_t max_scratch_bytes) {
             ReaderParams p;
             p.engine = engine;
             p.queue_depth = queue_depth;
             p.use_direct_io = use_direct_io;
             p.coalesce_gap_bytes = coalesce_gap_bytes;
             p.max_read_bytes = max_read_bytes;
             p.read_timeout_ms = read_timeout_ms;
             p.max_scratch_bytes = max_scratch_bytes;
             return p;
           }),
           py::kw_only(), py::arg("engine") = ReaderParams{}.engine,
           py::arg("queue_depth") = ReaderParams{}.queue_depth,
           py::arg("use_direct_io") = ReaderParams{}.use_direct_io,
           py::arg("coalesce_gap_bytes") = ReaderParams{}.coalesce_gap_bytes,
           py::arg("max_read_bytes") = ReaderParams{}.max_read_bytes,
           py::arg("read_timeout_ms") = ReaderParams{}.read_timeout_ms,
           py::arg("max_scratch_bytes") = ReaderParams{}.max_scratch_bytes)
      .def_readwrite("engine", &ReaderParams::engine)
      .def_readwrite("queue_depth", &ReaderParams::queue_depth)
      .def_readwrite("use_direct_io", &ReaderParams::use_direct_io)
      .def_readwrite("coalesce_gap_bytes", &ReaderParams::coalesce_gap_bytes)
      .def_readwrite("max_read_bytes", &ReaderParams::max_read_bytes)
      .def_readwrite("read_timeout_ms", &ReaderParams::read_timeout_ms)
      .def_readwrite("max_scratch_bytes", &ReaderParams::max_scratch_bytes)
      .def("__repr__", [](const ReaderParams& p) {
        return detail::concat("ReaderParams(engine='", p.engine, "', queue_depth=", p.queue_depth,
                              ", use_direct_io=", p.use_direct_io ? "True" : "False",
                              ", coalesce_gap_bytes=", p.coalesce_gap_bytes,
                              ", max_read_bytes=", p.max_read_bytes,
                              ", read_timeout_ms=", p.read_timeout_ms,
                              ", max_scratch_bytes=", p.max_scratch_bytes, ")");
      });

  // Registered before BundleReader so its signatures name the Python type.
  py::class_<ReadStats>(m, "ReadStats")
      .def_readonly("bytes_requested", &ReadStats::bytes_requested)
      .def_readonly("bytes_read", &ReadStats::bytes_read)
      .def_readonly("reads_issued", &ReadStats::reads_issued)
      .def_readonly("ns", &ReadStats::ns)
      .def_readonly("calls", &ReadStats::calls)
      .def_readonly("rounds", &ReadStats::rounds)
      .def_readonly("direct", &ReadStats::direct)
      .def("as_dict", &stats_dict)
      .def("__repr__", [](const ReadStats& s) { return std::string(py::repr(stats_dict(s))); });

  py::class_<BundleReader>(m, "BundleReader")
      .def(py::init<const std::string&, const ReaderParams&>(), py::arg("path"),
           py::arg("params") = ReaderParams{}, py::call_guard<py::gil_scoped_release>())
      .def("read",
           [](BundleReader& r, uint32_t layer, const py::object& ids_obj, py::array out) {
             auto ids = as_ids(ids_obj);
             py::ssize_t stride = 0;
             char* dst = check_out(out, ids.size(), r.record_bytes(), r.is_direct(), &stride);
             const int64_t* ip = ids.data();
             std::size_t n = std::size_t(ids.size());
             return read_keeping(r, out, [&] { return r.read(layer, ip, n, dst, std::size_t(stride)); });
           },
           py::arg("layer"), py::arg("ids"), py::arg("out"))
      .def("read_parts",
           [](BundleReader& r, uint32_t layer, const py::object& ids_obj,
              const std::vector<uint32_t>& parts, py::array out) {
             auto ids = as_ids(ids_obj);
             uint64_t need = 0;
             for (uint32_t p : parts) {
               FI_CHECK(p < r.header().n_parts, "part index ", p, " out of range [0, ",
                        r.header().n_parts, ")");
               need += r.part_bytes(p);
             }
             py::ssize_t stride = 0;
             char* dst = check_out(out, ids.size(), need, false, &stride);
             const int64_t* ip = ids.data();
             std::size_t n = std::size_t(ids.size());
             return read_keeping(r, out, [&] {
               return r.read_parts(layer, ip, n, parts.data(), parts.size(), dst,
                                   std::size_t(stride));
             });
           },
           py::arg("layer"), py::arg("ids"), py::arg("parts"), py::arg("out"))
      .def("read_ranges",
           [](BundleReader& r, const py::object& off_obj, std::size_t length, py::array out) {
             auto offs = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(
                 py::array::ensure(off_obj));
             FI_CHECK(offs && offs.ndim() == 1, "offsets must be a 1-D integer array");
             FI_CHECK(out.writeable() && (out.flags() & py::array::c_style),
                      "out must be a writeable C-contiguous array");
             std::size_t n = std::size_t(offs.size());
             std::size_t nbytes = std::size_t(out.nbytes());
             const uint64_t* op = offs.data();
             char* dst = static_cast<char*>(out.mutable_data());
             return read_keeping(r, out, [&] { return r.read_ranges(op, n, length, dst, nbytes); });
           },
           py::arg("offsets"), py::arg("length"), py::arg("out"),
           "n raw reads of `length` bytes at file offsets -> slices of out, reused "
           "round-robin when out holds fewer than n (disk benchmarks); same engine as read().")
      .def("offset", &BundleReader::offset, py::arg("layer"), py::arg("neuron"))
      .def_property_readonly("header", [](const BundleReader& r) { return header_dict(r.header()); })
      .def_property_readonly("is_direct", &BundleReader::is_direct)
      .def_property_readonly("engine", &BundleReader::engine)
      .def_property_readonly("path", &BundleReader::path)
      .def_property_readonly("params", &BundleReader::params)
      .def_property_readonly("scratch_cap", &BundleReader::scratch_cap)
      .def_property_readonly("scratch_bytes", &BundleReader::scratch_bytes)
      .def_property_readonly("abandoned", &BundleReader::abandoned)
      .def_property_readonly("record_bytes", &BundleReader::record_bytes)
      .def_property_readonly("payload_bytes", &BundleReader::payload_bytes)
      .def_property_readonly("record_elems", [](const BundleReader& r) {
        return r.record_bytes() / r.header().elem_bytes;
      })
      .def_property_readonly("storage_dtype",
                             [](const BundleReader& r) { return storage_dtype(r.header()); })
      .def("stats", &BundleReader::stats)
      .def("reset_stats", &BundleReader::reset_stats)
      .def("drop_page_cache", &BundleReader::drop_page_cache);

  // ---- reads ahead (issue 16) -----------------------------------------------------------
  py::class_<AsyncReads>(m, "AsyncReads")
      .def(py::init<const std::string&, const ReaderParams&, std::size_t, uint32_t>(),
           py::arg("path"), py::arg("params"), py::arg("max_records"),
           py::arg("n_slots") = 2, py::call_guard<py::gil_scoped_release>())
      .def("start",
           [](AsyncReads& a, uint32_t slot, uint32_t layer, const py::object& ids_obj) {
             auto ids = as_ids(ids_obj);
             const int64_t* ip = ids.data();
             std::size_t n = std::size_t(ids.size());
             py::gil_scoped_release nogil;
             a.start(slot, layer, ip, n);
           },
           py::arg("slot"), py::arg("layer"), py::arg("ids"))
      .def("wait", &AsyncReads::wait, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("release", &AsyncReads::release, py::arg("slot"),
           py::call_guard<py::gil_scoped_release>())
      .def("busy_ns", &AsyncReads::busy_ns, py::arg("slot"))
      .def("record",
           [](py::object self, uint32_t layer, int64_t id) -> py::object {
             const AsyncReads& a = self.cast<const AsyncReads&>();
             const char* p = a.find(layer, id);
             if (p == nullptr) return py::none();
             // a read-only copy: the slot's memory is reused by its next job
             return py::bytes(p, a.record_bytes());
           },
           py::arg("layer"), py::arg("id"))
      .def_property_readonly("n_slots", &AsyncReads::n_slots)
      .def_property_readonly("max_records", &AsyncReads::max_records)
      .def_property_readonly("record_bytes", &AsyncReads::record_bytes)
      .def_property_readonly("engine", [](const AsyncReads& a) { return a.reader().engine(); })
      .def_property_readonly("is_direct", [](const AsyncReads& a) { return a.reader().is_direct(); })
      .def("nbytes", &AsyncReads::nbytes);

  // ---- neuron cache ----------------------------------------------------------------
  py::class_<NeuronCache>(m, "NeuronCache")
      .def(py::init([](BundleReader& r, uint32_t n_layers, const py::object& capacity,
                       bool packed, uint64_t split_at) {
             return new NeuronCache(r, n_layers, as_capacity(capacity, n_layers), packed,
                                    split_at);
           }),
           py::arg("reader"), py::arg("n_layers"), py::arg("capacity"),
           py::arg("packed") = false, py::arg("split_at") = 0,
           py::keep_alive<1, 2>())  // the cache keeps its reader alive
      .def("insert",
           [](NeuronCache& c, uint32_t layer, const py::object& ids_obj, bool bundled) {
             auto ids = as_ids(ids_obj);
             const int64_t* ip = ids.data();
             std::size_t n = std::size_t(ids.size());
             py::gil_scoped_release nogil;
             c.insert(layer, ip, n, bundled);
           },
           py::arg("layer"), py::arg("ids"), py::arg("bundled") = true)
      .def("evict",
           [](NeuronCache& c, uint32_t layer, const py::object& ids_obj) {
             auto ids = as_ids(ids_obj);
             const int64_t* ip = ids.data();
             std::size_t n = std::size_t(ids.size());
             py::gil_scoped_release nogil;
             c.evict(layer, ip, n);
           },
           py::arg("layer"), py::arg("ids"))
      .def("replace",
           [](NeuronCache& c, uint32_t layer, const py::object& evict_obj,
              const py::object& load_obj, bool bundled) {
             auto ev = as_ids(evict_obj);
             auto ld = as_ids(load_obj);
             const int64_t* ep = ev.data();
             const int64_t* lp = ld.data();
             std::size_t ne = std::size_t(ev.size()), nl = std::size_t(ld.size());
             py::gil_scoped_release nogil;
             c.replace(layer, ep, ne, lp, nl, bundled);
           },
           py::arg("layer"), py::arg("evict"), py::arg("load"), py::arg("bundled") = true)
      .def("clear", &NeuronCache::clear, py::arg("layer"))
      .def("set_source",
           [](NeuronCache& c, py::object source) {
             c.set_source(source.is_none() ? nullptr : &source.cast<const AsyncReads&>());
           },
           py::arg("source"), py::keep_alive<1, 2>())  // the cache keeps its source alive
      // The C++ object for flashinfer_py._bookkeeping, which drives the cache through
      // neuron_cache.h (no pybind11 on its per-layer path); valid while this object lives.
      .def("_capsule",
           [](NeuronCache& c) { return py::capsule(&c, "flashinfer::NeuronCache"); })
      .def("set_layer_bias",
           [](NeuronCache& c, uint32_t layer, const py::array& bias) {
             uint32_t d_ff = c.reader().header().d_ff;
             FI_CHECK(bias.dtype().is(py::dtype("float32")), "bias must be float32, got ",
                      std::string(py::str(bias.dtype())), " (use bias.astype(np.float32))");
             FI_CHECK(bias.ndim() == 1 && bias.shape(0) == d_ff, "bias must have shape (d_ff,) = (",
                      d_ff, ",)");
             FI_CHECK(bias.flags() & py::array::c_style, "bias must be contiguous");
             c.set_layer_bias(layer, static_cast<const float*>(bias.data()));
           },
           py::arg("layer"), py::arg("bias"))
      .def("n_used", &NeuronCache::n_used, py::arg("layer"))
      .def("capacity", &NeuronCache::capacity, py::arg("layer"))
      .def("contains", &NeuronCache::contains, py::arg("layer"), py::arg("id"))
      .def("slot_of", &NeuronCache::slot_of, py::arg("layer"), py::arg("id"))
      .def("has_bias", &NeuronCache::has_bias, py::arg("layer"))
      .def("nbytes", &NeuronCache::nbytes)
      .def_property_readonly("poisoned", &NeuronCache::poisoned)
      .def_property_readonly("n_layers", &NeuronCache::n_layers)
      .def_property_readonly("record_bytes", &NeuronCache::record_bytes)
      .def_property_readonly("row_bytes", &NeuronCache::row_bytes)
      .def_property_readonly("split_at", &NeuronCache::split_at)
      .def_property_readonly("down_row_bytes", &NeuronCache::down_row_bytes)
      .def("down_rows",
           [](py::object self, uint32_t layer) -> py::object {
             NeuronCache& c = self.cast<NeuronCache&>();
             if (!c.split_at()) return py::none();
             const BundleHeader& h = c.reader().header();
             py::ssize_t rb = py::ssize_t(c.down_row_bytes());
             return view(storage_dtype(h), {c.n_used(layer), rb / h.elem_bytes},
                         {rb, h.elem_bytes}, c.down_rows(layer), self);
           },
           py::arg("layer"))
      .def("rows",
           [](py::object self, uint32_t layer) {
             NeuronCache& c = self.cast<NeuronCache&>();
             const BundleHeader& h = c.reader().header();
             py::ssize_t rb = py::ssize_t(c.row_bytes());
             return view(storage_dtype(h), {c.n_used(layer), rb / h.elem_bytes},
                         {rb, h.elem_bytes}, c.rows(layer), self);
           },
           py::arg("layer"))
      .def("ids",
           [](py::object self, uint32_t layer) {
             NeuronCache& c = self.cast<NeuronCache&>();
             return view(py::dtype("int32"), {c.n_used(layer)}, {4}, c.slot_ids(layer), self);
           },
           py::arg("layer"))
      .def("bias",
           [](py::object self, uint32_t layer) {
             NeuronCache& c = self.cast<NeuronCache&>();
             return view(py::dtype("float32"), {c.n_used(layer)}, {4}, c.bias(layer), self);
           },
           py::arg("layer"))
      .def("stats",
           [](const NeuronCache& c) {
             CacheStats s = c.stats();
             py::dict d;
             d["inserted"] = s.inserted;
             d["evicted"] = s.evicted;
             d["moved_bytes"] = s.moved_bytes;
             d["compaction_ns"] = s.compaction_ns;
             d["from_source"] = s.from_source;
             d["reads"] = stats_dict(s.reads);
             return d;
           })
      .def("reset_stats", &NeuronCache::reset_stats);

  // ---- internals for tests ---------------------------------------------------------
  py::module_ t = m.def_submodule("testing", "Internals exposed for the test-suite only.");
  t.def("parallel_for_fail",
        [](std::size_t n_threads, std::size_t n, std::size_t fail_at) {
          // Runs n items on a pool; item fail_at throws IoError. Returns items that ran.
          ThreadPool pool(n_threads);
          std::atomic<std::size_t> ran{0};
          py::gil_scoped_release nogil;
          pool.parallel_for(n, [&](std::size_t i) {
            if (i == fail_at) throw IoError(detail::concat("injected failure at item ", i));
            ++ran;
          });
          return ran.load();
        },
        py::arg("n_threads"), py::arg("n"), py::arg("fail_at"));

  // Failpoints (csrc/failpoints.h): only in builds with FLASHINFER_FAILPOINTS.
  t.def("failpoint_names", [] {
    py::list names;
    for (const char* name : failpoints::kNames) names.append(name);
    return names;
  });
  t.def("arm_failpoint",
        [](const std::string& name, long skip, long count, int value) {
#ifndef FLASHINFER_FAILPOINTS
          throw std::invalid_argument("this build has no failpoints: rebuild with "
                                      "-DFLASHINFER_FAILPOINTS=ON (make test does)");
#endif
          for (int p = 0; p < failpoints::kCount; ++p)
            if (name == failpoints::kNames[p]) return failpoints::arm(p, skip, count, value);
          throw std::invalid_argument(detail::concat("no failpoint named '", name, "'"));
        },
        py::arg("name"), py::arg("skip") = 0, py::arg("count") = 1, py::arg("value") = 0,
        "Arm a failpoint: let `skip` evaluations pass, then fire `count` times (-1: until "
        "disarmed) with `value`. count=0 disarms it.");
  t.def("_failpoint_states", [] {  // for _bookkeeping's copy of the read path (failpoints.h)
    return py::capsule(static_cast<void*>(failpoints::own_states()), failpoints::kCapsule);
  });
  t.def("late_writes",
        [](int byte) -> std::size_t {
          FI_CHECK(byte >= 0 && byte <= 255, "byte must be in [0, 255], got ", byte);
          return failpoints::play_late_writes(static_cast<unsigned char>(byte));
        },
        py::arg("byte"),
        "Write `byte` over every buffer an abandoned io_uring read could still land in (the "
        "late write of a device that ignored cancellation), then forget them; returns the "
        "bytes written. Failpoint builds record them; other builds none.");
  t.def("failpoint_fired", [](const std::string& name) -> long {
    for (int p = 0; p < failpoints::kCount; ++p)
      if (name == failpoints::kNames[p]) return failpoints::state(p).fired.load();
    throw std::invalid_argument(detail::concat("no failpoint named '", name, "'"));
  });
  t.def("compute_pool_fail",
        [](int threads, int64_t n, int64_t fail_at) {
          // Runs n items on the kernels' pool; item fail_at throws IoError on whichever
          // thread takes it. Returns (items that ran, distinct slots seen).
          std::atomic<int64_t> ran{0};
          std::vector<std::atomic<int>> slots(static_cast<size_t>(std::max(threads, 1)));
          py::gil_scoped_release nogil;
          ComputePool::instance().run(n, threads, [&](int64_t i, int slot) {
            slots.at(static_cast<size_t>(slot)).store(1);
            for (volatile int spin = 0; spin < 2000; ++spin) {
            }
            if (i == fail_at) throw IoError(detail::concat("injected failure at item ", i));
            ++ran;
          });
          int seen = 0;
          for (auto& v : slots) seen += v.load();
          return std::make_pair(ran.load(), seen);
        },
        py::arg("threads"), py::arg("n"), py::arg("fail_at"));
  t.def("compute_pool_stats", []() {
    const ComputePool::Stats s = ComputePool::instance().stats();
    py::dict d;
    d["shared"] = s.shared;
    d["solo"] = s.solo;
    d["stalls"] = s.stalls;
    d["workers"] = ComputePool::instance().workers();
    return d;
  }, "Calls the kernel pool shared with workers, ran alone after a stall, and stalls.");
}

}  // namespace flashinfer

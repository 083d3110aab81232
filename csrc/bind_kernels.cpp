// bind_kernels.cpp: Python bindings for kernels.h (linear, ffn_rows, dtype conversion) and
// the block formats (kernels_quant.h: quantize, dequantize; kernels_q4.h: the sketch).
// Only converts and validates: every numpy argument is checked for dtype, ndim,
// C-contiguity and shape here, with a message naming the argument, so the kernels never
// see a bad buffer. Compute runs with the GIL released. Weight arrays: float32, float16,
// uint16 holding bfloat16 bits (numpy has no bfloat16), or uint8 rows of blocks with the
// format named by `fmt` ("q8_0", "q4_0", "q4_1").
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "kernels_q4.h"
#include "kernels_quant.h"
#include "ops.h"

namespace py = pybind11;

namespace flashinfer {
namespace {

// ---- argument checks ------------------------------------------------------------------

std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) os << ",";
  os << ")";
  return os.str();
}

std::string shape_str(std::initializer_list<int64_t> dims) {
  std::ostringstream os;
  os << "(";
  size_t i = 0;
  for (int64_t v : dims) os << (i++ ? ", " : "") << v;
  if (dims.size() == 1) os << ",";
  os << ")";
  return os.str();
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

void check_contig(const py::array& a, const char* name) {
  FI_CHECK(a.flags() & py::array::c_style, name,
           " must be C-contiguous, use np.ascontiguousarray(", name, ")");
}

void check_ndim(const py::array& a, const char* name, int ndim) {
  FI_CHECK(a.ndim() == ndim, name, " must be ", ndim, "-D, got ", a.ndim(), "-D with shape ",
           shape_str(a));
}

void check_shape(const py::array& a, const char* name, std::initializer_list<int64_t> want) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(want.size());
  size_t i = 0;
  for (int64_t v : want) ok = ok && a.shape(i++) == v;
  FI_CHECK(ok, name, " has shape ", shape_str(a), ", expected ", shape_str(want));
}

// Storage dtype of a weight array: float32, float16, or uint16 (bfloat16 bits).
DType weight_dtype(const py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<float>())) return DType::F32;
  if (a.dtype().is(py::dtype("float16"))) return DType::F16;
  if (a.dtype().is(py::dtype::of<uint16_t>())) return DType::BF16;
  FI_CHECK(false, name, " must be float32, float16 or uint16 (bfloat16 bits), got ",
           dtype_str(a), a.dtype().is(py::dtype::of<uint8_t>())
                             ? " (uint8 rows of blocks need fmt='q8_0', 'q4_0' or 'q4_1')"
                             : "");
  return DType::F32;
}

// The format of a weight array: `fmt` when given (the array's numpy dtype must be the one
// that format is stored in: uint8 for block formats), else inferred from the numpy dtype.
DType weight_format(const py::array& a, const char* name, const py::object& fmt) {
  if (fmt.is_none()) return weight_dtype(a, name);
  const DType dt = parse_dtype(fmt.cast<std::string>());
  if (!is_quantized(dt)) {
    FI_CHECK(weight_dtype(a, name) == dt, name, " is ", dtype_str(a), " but fmt is '",
             dtype_name(dt), "'");
    return dt;
  }
  FI_CHECK(a.dtype().is(py::dtype::of<uint8_t>()), name, " must be uint8 rows of ",
           dtype_name(dt), " blocks, got ", dtype_str(a));
  return dt;
}

// A float32 C-contiguous array of exactly `shape`.
const float* f32_in(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  FI_CHECK(a.dtype().is(py::dtype::of<float>()), name, " must be float32, got ", dtype_str(a));
  check_shape(a, name, shape);
  check_contig(a, name);
  return static_cast<const float*>(a.data());
}

float* f32_out(py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  f32_in(a, name, shape);
  FI_CHECK(a.writeable(), name, " must be writeable");
  return static_cast<float*>(a.mutable_data());
}

// Output buffers must not alias inputs: the kernels write out while reading x.
void check_no_overlap(const py::array& out, const char* oname, const py::array& in,
                      const char* iname) {
  const char* o0 = static_cast<const char*>(out.data());
  const char* o1 = o0 + out.nbytes();
  const char* i0 = static_cast<const char*>(in.data());
  const char* i1 = i0 + in.nbytes();
  FI_CHECK(o1 <= i0 || i1 <= o0, oname, " must not share memory with ", iname);
}

py::dtype numpy_dtype(DType dt) {
  switch (dt) {
    case DType::F32: return py::dtype::of<float>();
    case DType::F16: return py::dtype("float16");
    case DType::BF16: return py::dtype::of<uint16_t>();
    default: return py::dtype::of<uint8_t>();
  }
}

std::vector<py::ssize_t> shape_of(const py::array& a) {
  return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
}

// ---- bound functions ------------------------------------------------------------------

// The output (n, m) of a product on x (allocated when `out` is None; it must not share memory
// with x) and its optional bias (m,): both kept alive in `o` / `b` while the GIL is released.
struct ProductIO {
  py::array o, b;
  float* out = nullptr;
  const float* bias = nullptr;
};
ProductIO product_io(const py::array& x, int64_t n, int64_t m, const py::object& bias,
                     const py::object& out) {
  ProductIO io;
  if (!bias.is_none()) {
    io.b = bias.cast<py::array>();
    io.bias = f32_in(io.b, "bias", {m});
  }
  io.o = out.is_none() ? py::array(py::dtype::of<float>(), std::vector<py::ssize_t>{n, m})
                       : out.cast<py::array>();
  io.out = f32_out(io.o, "out", {n, m});
  check_no_overlap(io.o, "out", x, "x");
  return io;
}

py::array linear_py(const py::array& x, const py::array& w, const py::object& bias,
                    py::object out, int threads, const py::object& fmt) {
  check_ndim(x, "x", 2);
  check_ndim(w, "w", 2);
  const DType wdt = weight_format(w, "w", fmt);
  check_contig(w, "w");
  const int64_t n = x.shape(0), k = x.shape(1), m = w.shape(0);
  if (is_quantized(wdt)) {
    const int64_t rb = int64_t(row_bytes(wdt, k));
    FI_CHECK(w.shape(1) == rb, "w has shape ", shape_str(w), " but x has shape ", shape_str(x),
             ": ", dtype_name(wdt), " rows of ", k, " values are ", rb, " bytes, so w must be (m, ",
             rb, ")");
  } else {
    FI_CHECK(w.shape(1) == k, "w has shape ", shape_str(w), " but x has shape ", shape_str(x),
             ": w must be (m, ", k, ")");
  }
  const float* xp = f32_in(x, "x", {n, k});
  ProductIO io = product_io(x, n, m, bias, out);
  const void* wp = w.data();
  {
    py::gil_scoped_release release;
    linear(xp, n, k, wp, wdt, m, io.bias, io.out, threads);
  }
  return io.o;
}

py::array ffn_rows_py(const py::array& x, const py::array& rows, int64_t d_model,
                      int64_t up_off, int64_t gate_off, int64_t down_off,
                      const std::string& activation, float act_param, const py::object& up_bias,
                      py::object out, py::object act_out, const py::object& row_select,
                      int threads, const py::object& fmt, const py::object& down_scales,
                      const py::object& row_ids, const py::object& down_rows) {
  FfnRowsArgs a;
  a.act = parse_activation(activation);
  a.act_param = act_param;
  a.threads = threads;

  check_ndim(rows, "rows", 2);
  a.dtype = weight_format(rows, "rows", fmt);
  check_contig(rows, "rows");
  a.n_rows = rows.shape(0);
  a.row_elems = rows.shape(1);
  a.rows = rows.data();
  const bool blocks = is_quantized(a.dtype);
  FI_CHECK(blocks || down_scales.is_none(), "down_scales belong to block formats (fmt='q8_0', "
           "'q4_0' or 'q4_1'); rows are ", dtype_name(a.dtype));

  FI_CHECK(d_model > 0, "d_model must be positive, got ", d_model);
  a.d_model = d_model;
  // a part's length in row elements: d_model values, or the bytes of its blocks / codes
  const int64_t part_len = blocks ? int64_t(row_bytes(a.dtype, d_model)) : d_model;
  const int64_t down_len = down_scales.is_none() ? part_len : int64_t(code_bytes(a.dtype, d_model));
  auto check_part = [&](const char* name, int64_t off, int64_t len) {
    FI_CHECK(off >= 0 && off + len <= a.row_elems, name, "=", off, " with d_model=",
             d_model, " does not fit in a row of ", a.row_elems, " elements (the part takes ",
             len, "; rows has shape ", shape_str(rows), ")");
  };
  check_part("up_off", up_off, part_len);
  py::array drows;
  if (!down_rows.is_none()) {  // the down parts in a matrix of their own (a split cache)
    drows = down_rows.cast<py::array>();
    check_ndim(drows, "down_rows", 2);
    FI_CHECK(weight_format(drows, "down_rows", fmt) == a.dtype, "down_rows must hold the same "
             "format as rows (", dtype_name(a.dtype), ")");
    check_contig(drows, "down_rows");
    FI_CHECK(drows.shape(0) == a.n_rows, "down_rows has ", drows.shape(0), " rows but rows has ",
             a.n_rows, "; row r's down part is down_rows[r]");
    a.down_rows = drows.data();
    a.down_row_elems = drows.shape(1);
    FI_CHECK(down_off >= 0 && down_off + down_len <= a.down_row_elems, "down_off=", down_off,
             " with d_model=", d_model, " does not fit in a row of down_rows (",
             a.down_row_elems, " elements; the part takes ", down_len, ")");
  } else {
    check_part("down_off", down_off, down_len);
  }
  FI_CHECK(gate_off >= -1, "gate_off must be -1 (not gated) or an offset, got ", gate_off);
  if (gate_off >= 0) check_part("gate_off", gate_off, part_len);
  a.up_off = up_off;
  a.gate_off = gate_off;
  a.down_off = down_off;

  check_ndim(x, "x", 2);
  a.n = x.shape(0);
  a.x = f32_in(x, "x", {a.n, d_model});

  py::array sel;
  if (!row_select.is_none()) {
    sel = row_select.cast<py::array>();
    FI_CHECK(sel.dtype().is(py::dtype::of<int32_t>()), "row_select must be int32, got ",
             dtype_str(sel));
    check_ndim(sel, "row_select", 1);
    check_contig(sel, "row_select");
    a.row_select = static_cast<const int32_t*>(sel.data());
    a.n_select = sel.shape(0);
    for (int64_t i = 0; i < a.n_select; ++i)
      FI_CHECK(a.row_select[i] >= 0 && a.row_select[i] < a.n_rows, "row_select[", i,
               "]=", a.row_select[i], " is out of range for rows with ", a.n_rows, " rows");
  }
  const int64_t n_used = a.row_select ? a.n_select : a.n_rows;

  // The codes layout: the layer's scale table, and which neuron each row holds.
  py::array sc_arr, id_arr;
  if (!down_scales.is_none()) {
    sc_arr = down_scales.cast<py::array>();
    FI_CHECK(sc_arr.dtype().is(py::dtype("float16")), "down_scales must be float16, got ",
             dtype_str(sc_arr));
    check_ndim(sc_arr, "down_scales", 3);
    check_contig(sc_arr, "down_scales");
    const int sr = quant_kernels(a.dtype).scale_rows;
    FI_CHECK(sc_arr.shape(1) == sr && sc_arr.shape(2) == d_model, "down_scales has shape ",
             shape_str(sc_arr), ", expected (d_ff / 32, ", sr, ", ", d_model, ") for ",
             dtype_name(a.dtype));
    a.down_scales = static_cast<const uint16_t*>(sc_arr.data());
    a.n_scale_blocks = sc_arr.shape(0);
    const int64_t n_ids = a.n_scale_blocks * 32;
    if (!row_ids.is_none()) {
      id_arr = row_ids.cast<py::array>();
      FI_CHECK(id_arr.dtype().is(py::dtype::of<int32_t>()), "row_ids must be int32, got ",
               dtype_str(id_arr));
      check_shape(id_arr, "row_ids", {a.n_rows});
      check_contig(id_arr, "row_ids");
      a.row_ids = static_cast<const int32_t*>(id_arr.data());
      for (int64_t i = 0; i < a.n_rows; ++i)
        FI_CHECK(a.row_ids[i] >= 0 && a.row_ids[i] < n_ids, "row_ids[", i, "]=", a.row_ids[i],
                 " is out of range for down_scales of ", n_ids, " neurons");
    } else {
      FI_CHECK(a.n_rows <= n_ids, "rows has ", a.n_rows, " rows but down_scales covers ", n_ids,
               " neurons; pass row_ids (the neuron id of each row)");
    }
  } else {
    FI_CHECK(row_ids.is_none(), "row_ids are only used with down_scales");
  }

  py::array bias_arr;
  if (!up_bias.is_none()) {
    bias_arr = up_bias.cast<py::array>();
    a.up_bias = f32_in(bias_arr, "up_bias", {a.n_rows});
  }

  py::array o = out.is_none()
                    ? py::array(py::dtype::of<float>(), std::vector<py::ssize_t>{a.n, d_model})
                    : out.cast<py::array>();
  a.out = f32_out(o, "out", {a.n, d_model});
  check_no_overlap(o, "out", x, "x");
  check_no_overlap(o, "out", rows, "rows");
  if (a.down_rows) check_no_overlap(o, "out", drows, "down_rows");

  py::array ao;
  if (!act_out.is_none()) {
    ao = act_out.cast<py::array>();
    a.act_out = f32_out(ao, "act_out", {a.n, n_used});
    check_no_overlap(ao, "act_out", o, "out");
    check_no_overlap(ao, "act_out", x, "x");
  }
  {
    py::gil_scoped_release release;
    ffn_rows(a);
  }
  return o;
}

py::array to_float32_py(const py::array& a, py::object out, int threads) {
  const DType dt = weight_dtype(a, "a");
  check_contig(a, "a");
  py::array o = out.is_none() ? py::array(py::dtype::of<float>(), shape_of(a))
                              : out.cast<py::array>();
  FI_CHECK(o.dtype().is(py::dtype::of<float>()), "out must be float32, got ", dtype_str(o));
  FI_CHECK(shape_of(o) == shape_of(a), "out has shape ", shape_str(o), ", expected ",
           shape_str(a));
  check_contig(o, "out");
  FI_CHECK(o.writeable(), "out must be writeable");
  const void* src = a.data();
  float* dst = static_cast<float*>(o.mutable_data());
  const int64_t count = a.size();
  {
    py::gil_scoped_release release;
    to_float32(src, dt, count, dst, threads);
  }
  return o;
}

py::array from_float32_py(const py::array& a, const std::string& dtype, py::object out,
                          int threads) {
  const DType dt = parse_dtype(dtype);
  FI_CHECK(!is_quantized(dt), "from_float32 converts to float formats; use quantize(a, '",
           dtype, "') for block formats");
  FI_CHECK(a.dtype().is(py::dtype::of<float>()), "a must be float32, got ", dtype_str(a));
  check_contig(a, "a");
  py::array o = out.is_none() ? py::array(numpy_dtype(dt), shape_of(a)) : out.cast<py::array>();
  FI_CHECK(o.dtype().is(numpy_dtype(dt)), "out must be ",
           py::str(numpy_dtype(dt)).cast<std::string>(), " for dtype '", dtype, "', got ",
           dtype_str(o));
  FI_CHECK(shape_of(o) == shape_of(a), "out has shape ", shape_str(o), ", expected ",
           shape_str(a));
  check_contig(o, "out");
  FI_CHECK(o.writeable(), "out must be writeable");
  const float* src = static_cast<const float*>(a.data());
  void* dst = o.mutable_data();
  const int64_t count = a.size();
  {
    py::gil_scoped_release release;
    from_float32(src, count, dt, dst, threads);
  }
  return o;
}

// ---- decode-step ops (ops.h) -----------------------------------------------------------

float* f32_rows_inout(py::array& a, const char* name, int64_t* n, int64_t d) {
  FI_CHECK(a.dtype().is(py::dtype::of<float>()), name, " must be float32, got ", dtype_str(a));
  check_contig(a, name);
  FI_CHECK(a.writeable(), name, " must be writeable");
  FI_CHECK(a.ndim() >= 1 && a.shape(a.ndim() - 1) == d, name, " has shape ", shape_str(a),
           ": its last axis must be ", d);
  *n = d ? a.size() / d : 0;
  return static_cast<float*>(a.mutable_data());
}

py::array rms_norm_py(const py::array& x, const py::array& w, float eps, py::object out) {
  check_ndim(w, "w", 1);
  const int64_t d = w.shape(0);
  const float* wp = f32_in(w, "w", {d});
  FI_CHECK(x.dtype().is(py::dtype::of<float>()), "x must be float32, got ", dtype_str(x));
  check_contig(x, "x");
  FI_CHECK(x.ndim() >= 1 && x.shape(x.ndim() - 1) == d, "x has shape ", shape_str(x),
           ": its last axis must be ", d, " (the size of w)");
  py::array o = out.is_none() ? py::array(py::dtype::of<float>(), shape_of(x))
                              : out.cast<py::array>();
  int64_t n = 0;
  float* op = f32_rows_inout(o, "out", &n, d);
  FI_CHECK(shape_of(o) == shape_of(x), "out has shape ", shape_str(o), ", expected ",
           shape_str(x));
  if (o.data() != x.data()) check_no_overlap(o, "out", x, "x");  // x itself is fine
  const float* xp = static_cast<const float*>(x.data());
  {
    py::gil_scoped_release release;  // a prompt's norms: a few ms
    rms_norm(xp, n, d, wp, eps, op);
  }
  return o;
}

void rope_py(py::array& x, const py::array& cos, const py::array& sin) {
  check_ndim(cos, "cos", 1);
  const int64_t r = cos.shape(0);
  FI_CHECK(r % 2 == 0 && r > 0, "cos must hold an even number of values, got ", r);
  const float* cp = f32_in(cos, "cos", {r});
  const float* sp = f32_in(sin, "sin", {r});
  FI_CHECK(x.ndim() >= 1 && x.shape(x.ndim() - 1) >= r, "x has shape ", shape_str(x),
           ": its last axis must hold at least ", r, " values");
  const int64_t ld = x.shape(x.ndim() - 1);
  int64_t n = 0;
  float* xp = f32_rows_inout(x, "x", &n, ld);
  rope_rows(xp, n, ld, r / 2, cp, sp);
}

py::array attend1_py(const py::array& q, const py::array& keys, const py::array& values,
                     int64_t first, int64_t end, float scale, float softcap, py::object out) {
  check_ndim(q, "q", 2);
  check_ndim(keys, "keys", 3);
  const int64_t h = q.shape(0), hd = q.shape(1), n_kv = keys.shape(0), cap = keys.shape(1);
  const float* qp = f32_in(q, "q", {h, hd});
  const float* kp = f32_in(keys, "keys", {n_kv, cap, hd});
  const float* vp = f32_in(values, "values", {n_kv, cap, hd});
  FI_CHECK(n_kv > 0 && h % n_kv == 0, "q has ", h, " heads, not a multiple of the ", n_kv,
           " key/value heads");
  FI_CHECK(0 <= first && first < end && end <= cap, "keys [", first, ", ", end,
           ") are not within the cache's ", cap, " positions");
  py::array o = out.is_none() ? py::array(py::dtype::of<float>(), std::vector<py::ssize_t>{h, hd})
                              : out.cast<py::array>();
  float* op = f32_out(o, "out", {h, hd});
  check_no_overlap(o, "out", q, "q");
  {
    py::gil_scoped_release release;  // long contexts: milliseconds
    attend1(qp, h, hd, kp, vp, n_kv, cap, first, end, scale, softcap, op);
  }
  return o;
}

double stream_sum_py(const py::array& a, int threads) {
  FI_CHECK(a.dtype().is(py::dtype::of<float>()), "a must be float32, got ", dtype_str(a));
  check_contig(a, "a");
  const float* p = static_cast<const float*>(a.data());
  const int64_t count = a.size();
  py::gil_scoped_release release;
  return stream_sum(p, count, threads);
}

// ---- 4-bit sketches (kernels_q4.h) -----------------------------------------------------

// A C-contiguous 1-D int64 array of indices, each in [0, bound).
const int64_t* index_in(const py::array& a, const char* name, int64_t bound) {
  FI_CHECK(a.dtype().is(py::dtype::of<int64_t>()), name, " must be int64, got ", dtype_str(a));
  check_ndim(a, name, 1);
  check_contig(a, name);
  const int64_t* p = static_cast<const int64_t*>(a.data());
  for (py::ssize_t i = 0; i < a.shape(0); ++i)
    FI_CHECK(p[i] >= 0 && p[i] < bound, name, "[", i, "]=", p[i], " is out of range [0, ",
             bound, ")");
  return p;
}

// 2-D uint8 C-contiguous records whose rows hold at least `need` bytes.
void check_records(const py::array& a, const char* name, int64_t need) {
  FI_CHECK(a.dtype().is(py::dtype::of<uint8_t>()), name, " must be uint8, got ", dtype_str(a));
  check_ndim(a, name, 2);
  check_contig(a, name);
  FI_CHECK(a.shape(1) >= need, name, " has shape ", shape_str(a), ": records of at least ",
           need, " bytes are needed");
}

void quantize_q4_py(const py::array& rows, const py::array& part_offsets, int64_t length,
                    const py::array& src_rows, py::array& out, const py::array& dst_rows,
                    int threads, const py::object& fmt) {
  check_ndim(rows, "rows", 2);
  const DType dt = weight_format(rows, "rows", fmt);
  check_contig(rows, "rows");
  FI_CHECK(length > 0, "length must be positive, got ", length);
  const int64_t span = is_quantized(dt) ? int64_t(row_bytes(dt, length)) : length;
  const int64_t* offs = index_in(part_offsets, "part_offsets", rows.shape(1) - span + 1);
  const int n_parts = static_cast<int>(part_offsets.shape(0));
  FI_CHECK(n_parts >= 1 && n_parts <= 3, "part_offsets must list 1 to 3 parts, got ", n_parts);
  check_records(out, "out", n_parts * q4_part_bytes(length));
  FI_CHECK(out.writeable(), "out must be writeable");
  const int64_t* sr = index_in(src_rows, "src_rows", rows.shape(0));
  const int64_t* dr = index_in(dst_rows, "dst_rows", out.shape(0));
  FI_CHECK(src_rows.shape(0) == dst_rows.shape(0), "src_rows and dst_rows differ in length (",
           src_rows.shape(0), " vs ", dst_rows.shape(0), ")");
  check_no_overlap(out, "out", rows, "rows");
  const void* src = rows.data();
  uint8_t* dst = static_cast<uint8_t*>(out.mutable_data());
  const int64_t n = src_rows.shape(0), src_ld = rows.shape(1), dst_ld = out.shape(1);
  {
    py::gil_scoped_release release;
    quantize_q4_parts(src, dt, src_ld, sr, n, offs, n_parts, length, dst, dst_ld, dr, threads);
  }
}

py::array dequantize_q4_py(const py::array& record, int n_parts, int64_t length) {
  FI_CHECK(length > 0 && n_parts >= 1 && n_parts <= 3, "need length > 0 and 1 to 3 parts");
  FI_CHECK(record.dtype().is(py::dtype::of<uint8_t>()), "record must be uint8, got ",
           dtype_str(record));
  check_ndim(record, "record", 1);
  check_contig(record, "record");
  FI_CHECK(record.shape(0) >= n_parts * q4_part_bytes(length), "record has ",
           record.shape(0), " bytes; ", n_parts * q4_part_bytes(length), " are needed");
  py::array o(py::dtype::of<float>(), std::vector<py::ssize_t>{n_parts * length});
  dequantize_q4_record(static_cast<const uint8_t*>(record.data()), n_parts, length,
                       static_cast<float*>(o.mutable_data()));
  return o;
}

py::array q4_scores_py(const py::array& x, const py::array& sketch, int64_t length, bool gated,
                       const std::string& activation, float act_param, const py::object& scale,
                       py::object out, int threads) {
  const Activation act = parse_activation(activation);
  check_ndim(x, "x", 2);
  const int64_t n_tok = x.shape(0);
  const float* xp = f32_in(x, "x", {n_tok, length});
  check_records(sketch, "sketch", (gated ? 2 : 1) * q4_part_bytes(length));
  const int64_t n_rec = sketch.shape(0);
  const float* sp = nullptr;
  py::array s;
  if (!scale.is_none()) {
    s = scale.cast<py::array>();
    sp = f32_in(s, "scale", {n_rec});
  }
  py::array o = out.is_none() ? py::array(py::dtype::of<float>(), std::vector<py::ssize_t>{n_rec})
                              : out.cast<py::array>();
  float* op = f32_out(o, "out", {n_rec});
  const uint8_t* sk = static_cast<const uint8_t*>(sketch.data());
  const int64_t ld = sketch.shape(1);
  {
    py::gil_scoped_release release;
    q4_scores(xp, n_tok, length, sk, n_rec, ld, gated, act, act_param, sp, op, threads);
  }
  return o;
}

// ---- block formats (kernels_quant.h) --------------------------------------------------

py::array quantize_py(const py::array& a, const std::string& fmt, int threads) {
  const DType dt = parse_dtype(fmt);
  FI_CHECK(is_quantized(dt), "quantize makes block formats (q8_0, q4_0, q4_1); for '", fmt,
           "' use from_float32");
  check_ndim(a, "a", 2);
  const int64_t n = a.shape(0), len = a.shape(1);
  const float* src = f32_in(a, "a", {n, len});
  FI_CHECK(len > 0, "a must have at least one column");
  const int64_t rb = int64_t(row_bytes(dt, len));
  py::array o(py::dtype::of<uint8_t>(), std::vector<py::ssize_t>{n, rb});
  uint8_t* dst = static_cast<uint8_t*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    quantize_rows(src, n, len, len, dt, dst, rb, threads);
  }
  return o;
}

py::array dequantize_py(const py::array& a, const std::string& fmt, int64_t length,
                        int threads) {
  const DType dt = parse_dtype(fmt);
  FI_CHECK(is_quantized(dt), "dequantize reads block formats (q8_0, q4_0, q4_1); for '", fmt,
           "' use to_float32");
  FI_CHECK(a.dtype().is(py::dtype::of<uint8_t>()), "a must be uint8 rows of ", fmt,
           " blocks, got ", dtype_str(a));
  check_ndim(a, "a", 2);
  check_contig(a, "a");
  FI_CHECK(length > 0, "length must be positive, got ", length);
  const int64_t rb = int64_t(row_bytes(dt, length)), n = a.shape(0);
  FI_CHECK(a.shape(1) >= rb, "a has shape ", shape_str(a), ": ", length, " values of ", fmt,
           " need rows of at least ", rb, " bytes");
  py::array o(py::dtype::of<float>(), std::vector<py::ssize_t>{n, length});
  const uint8_t* src = static_cast<const uint8_t*>(a.data());
  float* dst = static_cast<float*>(o.mutable_data());
  const int64_t ld = a.shape(1);
  {
    py::gil_scoped_release release;
    dequantize_rows(src, n, length, ld, dt, dst, length, threads);
  }
  return o;
}

// ---- 16 rows interleaved (kernels_x16.cpp) ----------------------------------------------

DType x16_dtype(const std::string& fmt) {
  const DType dt = parse_dtype(fmt);
  FI_CHECK(x16_supported(dt), "interleaved rows exist for q4_0 and q4_1, not '", fmt, "'");
  return dt;
}

// The interleaved bytes of an (m, x16 bytes) matrix of k values a row: a 1-D uint8 array.
const uint8_t* x16_in(const py::array& w16, const char* name, DType dt, int64_t m, int64_t k) {
  FI_CHECK(w16.dtype().is(py::dtype::of<uint8_t>()), name, " must be uint8, got ",
           dtype_str(w16));
  check_ndim(w16, name, 1);
  check_contig(w16, name);
  FI_CHECK(m >= 0 && k > 0, "m must be >= 0 and k > 0, got m=", m, ", k=", k);
  const int64_t want = x16_bytes(dt, m, k);
  FI_CHECK(w16.shape(0) == want, name, " has ", w16.shape(0), " bytes; ", m, " interleaved ",
           dtype_name(dt), " rows of ", k, " values are ", want);
  return static_cast<const uint8_t*>(w16.data());
}

// (m, row bytes) uint8 rows of k values in an interleavable format: the format and m.
std::pair<DType, int64_t> x16_rows_in(const py::array& w, const std::string& fmt, int64_t k) {
  const DType dt = x16_dtype(fmt);
  FI_CHECK(w.dtype().is(py::dtype::of<uint8_t>()), "w must be uint8 rows of ", fmt,
           " blocks, got ", dtype_str(w));
  check_ndim(w, "w", 2);
  check_contig(w, "w");
  FI_CHECK(k > 0, "k must be positive, got ", k);
  const int64_t rb = int64_t(row_bytes(dt, k));
  FI_CHECK(w.shape(1) == rb, "w has shape ", shape_str(w), ": rows of ", k, " ", fmt,
           " values are ", rb, " bytes");
  return {dt, int64_t(w.shape(0))};
}

void interleave16_in_place_py(py::array& w, const std::string& fmt, int64_t k) {
  const auto [dt, m] = x16_rows_in(w, fmt, k);
  FI_CHECK(w.writeable(), "w must be writeable");
  uint8_t* p = static_cast<uint8_t*>(w.mutable_data());
  py::gil_scoped_release release;
  interleave16_in_place(p, m, k, dt);
}

py::array interleave16_py(const py::array& w, const std::string& fmt, int64_t k) {
  const auto [dt, m] = x16_rows_in(w, fmt, k);
  py::array o(py::dtype::of<uint8_t>(), std::vector<py::ssize_t>{x16_bytes(dt, m, k)});
  const uint8_t* src = static_cast<const uint8_t*>(w.data());
  uint8_t* dst = static_cast<uint8_t*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    interleave16(src, m, k, dt, dst);
  }
  return o;
}

py::array deinterleave16_py(const py::array& w16, const std::string& fmt, int64_t m, int64_t k,
                            int64_t r0, int64_t r1) {
  const DType dt = x16_dtype(fmt);
  const uint8_t* src = x16_in(w16, "w16", dt, m, k);
  FI_CHECK(0 <= r0 && r0 <= r1 && r1 <= m, "rows [", r0, ", ", r1, ") are not within [0, ", m,
           ")");
  const int64_t rb = int64_t(row_bytes(dt, k));
  py::array o(py::dtype::of<uint8_t>(), std::vector<py::ssize_t>{r1 - r0, rb});
  uint8_t* dst = static_cast<uint8_t*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    deinterleave16(src, m, k, dt, r0, r1, dst);
  }
  return o;
}

py::array linear_x16_py(const py::array& x, const py::array& w16, const std::string& fmt,
                        int64_t m, const py::object& bias, py::object out, int threads) {
  const DType dt = x16_dtype(fmt);
  check_ndim(x, "x", 2);
  const int64_t n = x.shape(0), k = x.shape(1);
  const uint8_t* wp = x16_in(w16, "w16", dt, m, k);
  const float* xp = f32_in(x, "x", {n, k});
  ProductIO io = product_io(x, n, m, bias, out);
  {
    py::gil_scoped_release release;
    linear_x16(xp, n, k, wp, dt, m, io.bias, io.out, threads);
  }
  return io.o;
}

// A dense FFN's matrix of `rows` x k values: interleaved bytes (x16), or float / block rows
// of format dt (the ug matrix's, from weight_format).
const void* ffn_matrix(const py::array& w, const char* name, DType dt, bool x16, int64_t rows,
                       int64_t k) {
  if (x16) return x16_in(w, name, dt, rows, k);
  check_ndim(w, name, 2);
  check_contig(w, name);
  weight_format(w, name, py::str(dtype_name(dt)));  // its dtype is dt's (or uint8 blocks)
  const int64_t width = is_quantized(dt) ? int64_t(row_bytes(dt, k)) : k;
  FI_CHECK(w.shape(0) == rows && w.shape(1) == width, name, " has shape ", shape_str(w),
           ", expected (", rows, ", ", width, ")");
  return w.data();
}

py::array ffn_dense_py(const py::array& x, const py::array& ug, const py::array& down,
                       const py::object& fmt, int64_t f, bool gated, const std::string& activation,
                       float act_param, py::object out, py::object act_out, int threads, bool x16) {
  FI_CHECK(!x16 || !fmt.is_none(), "interleaved matrices need their fmt");
  const DType dt = x16 ? x16_dtype(fmt.cast<std::string>()) : weight_format(ug, "ug", fmt);
  check_ndim(x, "x", 2);
  const int64_t n = x.shape(0), d = x.shape(1);
  FI_CHECK(f > 0, "f must be positive, got ", f);
  const void* up = ffn_matrix(ug, "ug", dt, x16, gated ? 2 * f : f, d);
  const void* dp = ffn_matrix(down, "down", dt, x16, d, f);
  const float* xp = f32_in(x, "x", {n, d});
  const Activation act = parse_activation(activation);
  ProductIO io = product_io(x, n, d, py::none(), out);
  float* hp = nullptr;
  py::array h;
  if (!act_out.is_none()) {
    h = act_out.cast<py::array>();
    hp = f32_out(h, "act_out", {n, f});
    check_no_overlap(h, "act_out", x, "x");
    check_no_overlap(h, "act_out", io.o, "out");
  }
  {
    py::gil_scoped_release release;
    ffn_dense(xp, n, d, f, up, dp, dt, x16, gated, act, act_param, io.out, hp, threads);
  }
  return io.o;
}

py::list storage_formats_py() {
  py::list out;
  for (uint32_t i = 0; i < kNumDTypes; ++i) {
    const DTypeInfo& f = dtype_info(DType(i));
    py::dict d;
    d["name"] = f.name;
    d["code"] = i;
    d["block_elems"] = f.block_elems;
    d["block_bytes"] = f.block_bytes;
    d["elem_bytes"] = f.elem_bytes;
    d["code_bits"] = f.code_bits;
    d["quantized"] = f.quantized;
    out.append(d);
  }
  return out;
}

}  // namespace

void bind_kernels(py::module_& m) {
  m.def("linear", &linear_py, py::arg("x"), py::arg("w"), py::arg("bias") = py::none(),
        py::arg("out") = py::none(), py::arg("threads") = 0, py::arg("fmt") = py::none(),
        "y = x @ w.T + bias. x (n, k) f32; w (m, k) float32/float16/uint16(bf16 bits), or "
        "(m, row bytes) uint8 blocks with fmt 'q8_0'/'q4_0'/'q4_1'; bias (m,) f32 or None; "
        "out (n, m) f32 or None. threads<=0: all OpenMP threads.");
  m.def("ffn_rows", &ffn_rows_py, py::arg("x"), py::arg("rows"), py::arg("d_model"),
        py::arg("up_off"), py::arg("gate_off"), py::arg("down_off"),
        py::arg("activation") = "relu", py::arg("act_param") = 0.0f,
        py::arg("up_bias") = py::none(), py::arg("out") = py::none(),
        py::arg("act_out") = py::none(), py::arg("row_select") = py::none(),
        py::arg("threads") = 0, py::arg("fmt") = py::none(), py::arg("down_scales") = py::none(),
        py::arg("row_ids") = py::none(), py::arg("down_rows") = py::none(),
        "FFN from neuron-cache rows: out[t] = sum_j h[t, j] * down_j with h = act(up_j.x_t "
        "(+up_bias[j])) or act(gate_j.x_t) * (up_j.x_t) when gate_off >= 0. rows "
        "(r, record_elems); row_select int32 subset; act_out (n, n_used) receives h. Block "
        "formats: fmt names it, offsets are bytes; down_scales (d_ff/32, 1|2, d_model) fp16 "
        "when the down part holds codes, row_ids (r,) int32 the neuron of each row. down_rows "
        "(r, elems): the down parts in a matrix of their own (down_off is then an offset in "
        "its rows).");
  m.def("to_float32", &to_float32_py, py::arg("a"), py::arg("out") = py::none(),
        py::arg("threads") = 0, "float32 copy of a float32/float16/uint16(bf16 bits) array.");
  m.def("from_float32", &from_float32_py, py::arg("a"), py::arg("dtype"),
        py::arg("out") = py::none(), py::arg("threads") = 0,
        "Convert float32 to 'float32', 'float16' (IEEE RNE) or 'bfloat16' (RNE, returned "
        "as uint16 bits).");
  m.def("quantize", &quantize_py, py::arg("a"), py::arg("fmt"), py::arg("threads") = 0,
        "Rows of float32 a (n, len) -> (n, row bytes) uint8 blocks of 'q8_0', 'q4_0' or 'q4_1' "
        "(llama.cpp's reference rounding; the last block zero padded).");
  m.def("dequantize", &dequantize_py, py::arg("a"), py::arg("fmt"), py::arg("length"),
        py::arg("threads") = 0, "float32 (n, length) values of uint8 rows of blocks.");
  m.def("interleave16", &interleave16_py, py::arg("w"), py::arg("fmt"), py::arg("k"),
        "(m, row bytes) uint8 q4_0/q4_1 rows of k values -> their 16-row interleaved bytes "
        "(1-D uint8; csrc/kernels_quant.h).");
  m.def("interleave16_in_place", &interleave16_in_place_py, py::arg("w"), py::arg("fmt"),
        py::arg("k"),
        "interleave16 in w's own memory (m a multiple of 16); w's bytes become the layout.");
  m.def("deinterleave16", &deinterleave16_py, py::arg("w16"), py::arg("fmt"), py::arg("m"),
        py::arg("k"), py::arg("r0"), py::arg("r1"),
        "Rows [r0, r1) of an interleaved (m x k) matrix as row-major uint8 blocks.");
  m.def("linear_x16", &linear_x16_py, py::arg("x"), py::arg("w16"), py::arg("fmt"),
        py::arg("m"), py::arg("bias") = py::none(), py::arg("out") = py::none(),
        py::arg("threads") = 0,
        "y = x @ W.T + bias with W (m x k) given as interleave16's bytes; x (n, k) f32.");
  m.def("ffn_dense", &ffn_dense_py, py::arg("x"), py::arg("ug"), py::arg("down"),
        py::arg("fmt"), py::arg("f"), py::arg("gated"), py::arg("activation"),
        py::arg("act_param") = 0.0f, py::arg("out") = py::none(), py::arg("act_out") = py::none(),
        py::arg("threads") = 0, py::arg("x16") = false,
        "Dense FFN as two products: ug the up rows (then the gate rows) f x d, down down_proj "
        "d x f (float rows, blocks, or with x16 interleaved bytes); out (n, d), act_out (n, f).");
  m.def("storage_formats", &storage_formats_py,
        "The storage formats of csrc/bundle_format.h: name, code, block_elems, block_bytes, "
        "elem_bytes, code_bits, quantized.");
  m.def("quantize_q4", &quantize_q4_py, py::arg("rows"), py::arg("part_offsets"),
        py::arg("length"), py::arg("src_rows"), py::arg("out"), py::arg("dst_rows"),
        py::arg("threads") = 0, py::arg("fmt") = py::none(),
        "4-bit blocks (fp16 scale + 32 nibbles, Q4_0 layout) of `length` elements at each "
        "part offset of rows[src_rows[i]] into out[dst_rows[i]] (uint8 records); rows of a "
        "block format (fmt) are expanded block by block first.");
  m.def("dequantize_q4", &dequantize_q4_py, py::arg("record"), py::arg("n_parts"),
        py::arg("length"), "float32 values of one 4-bit record (n_parts * length,).");
  m.def("q4_scores", &q4_scores_py, py::arg("x"), py::arg("sketch"), py::arg("length"),
        py::arg("gated"), py::arg("activation"), py::arg("act_param") = 0.0f,
        py::arg("scale") = py::none(), py::arg("out") = py::none(), py::arg("threads") = 0,
        "Estimated |FFN activation| of every 4-bit sketch record, max over the rows of x, "
        "times scale: records hold up (and gate) parts.");
  m.def("rms_norm", &rms_norm_py, py::arg("x"), py::arg("w"), py::arg("eps"),
        py::arg("out") = py::none(),
        "RMSNorm over the last axis of float32 x: x / sqrt(mean(x^2) + eps) * w; out may be x.");
  m.def("rope", &rope_py, py::arg("x"), py::arg("cos"), py::arg("sin"),
        "Rotate-half RoPE in place on the first len(cos) values of every row (last axis) of "
        "float32 x; cos, sin hold the table's values for one position.");
  m.def("attend1", &attend1_py, py::arg("q"), py::arg("keys"), py::arg("values"),
        py::arg("first"), py::arg("end"), py::arg("scale"), py::arg("softcap") = 0.0f,
        py::arg("out") = py::none(),
        "Attention of one token: q (heads, hd) over the cache's keys/values (kv_heads, cap, "
        "hd) at positions [first, end); softcap <= 0: none. Returns (heads, hd) float32.");
  m.def("stream_sum", &stream_sum_py, py::arg("a"), py::arg("threads") = 0,
        "Sum of a float32 array, read once on the kernels' threads (AVX2 loads where the CPU "
        "has them): the memory read bandwidth a kernel can reach (benchmarks).");
  m.def("kernel_isa", []() { return std::string(isa_name(kernel_isa())); },
        "The instruction set the kernels use now: 'avx512', 'avx2' or 'scalar'.");
  m.def("set_kernel_isa", &set_kernel_isa, py::arg("name"),
        "Force the kernels' instruction set: 'auto', 'scalar', 'avx2' or 'avx512' (tests, "
        "ablations).");
}

}  // namespace flashinfer

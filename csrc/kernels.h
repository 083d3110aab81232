// kernels.h: CPU compute kernels for weights kept in their storage format: f32, f16, bf16,
// and the block formats q8_0, q4_0, q4_1 (bundle_format.h; their kernels: kernels_quant.h).
//
// Why these exist: numpy has no fast float16 / bfloat16 matmul (f16 matvec runs ~45x
// slower than f32) and no quantized one, so the model keeps weights as stored and every
// product goes through here. Activations, inputs and outputs are always float32;
// accumulation is float32 (block formats: integer dots inside a block, see kernels_quant.h).
//
// Every kernel has a portable scalar path and an AVX2+FMA+F16C path picked at runtime
// (the library is built without -march so wheels run on any x86_64 / arm64); the block
// formats' dot products also have an AVX-512 VNNI path, and their decode accumulation a
// 512-bit one. One input (decode) runs each weight row whole, one after the other (a
// contiguous matrix is then one sequential stream for the prefetchers). Threading: the
// kernel pool (thread_pool.h: the caller takes work items too, workers spin briefly between
// calls); no kernel throws once compute has started, so callers validate arguments first
// (bind_kernels.cpp does) and may release the GIL around the call.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "bundle_format.h"  // DType

namespace flashinfer {

// ---- runtime ISA selection -----------------------------------------------------------

// Ordered: each level has everything below it. Avx512 = AVX-512 F/BW/VL + VNNI (the block
// formats' integer dots); the float kernels run their AVX2 code there.
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The ISA the kernels use now: the best one the CPU supports unless overridden.
Isa kernel_isa();
const char* isa_name(Isa isa);  // "scalar", "avx2", "avx512"
// Override for tests and ablations: "auto", "scalar", "avx2" or "avx512" (only if the CPU
// has it). Throws std::invalid_argument on an unknown name or an unsupported ISA.
void set_kernel_isa(const std::string& name);

// ---- activations ----------------------------------------------------------------------

enum class Activation { Relu, FatRelu, Silu, Gelu, GeluTanh };
// "relu", "fatrelu", "silu", "gelu" (exact erf), "gelu_tanh"; throws std::invalid_argument.
Activation parse_activation(const std::string& name);
// The activation of one pre-activation value (param: the fatrelu threshold). Inline: the
// decode FFN calls it once a neuron.
inline float activate(Activation act, float v, float param) {
  switch (act) {
    case Activation::Relu: return v > 0.f ? v : 0.f;
    case Activation::FatRelu: return v > param ? v : 0.f;
    case Activation::Silu: return v / (1.f + std::exp(-v));
    case Activation::Gelu: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case Activation::GeluTanh: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * v * (1.f + std::tanh(c * (v + 0.044715f * v * v * v)));
    }
  }
  return v;
}

// Software prefetch of [p, p + bytes) a cache line at a time, for data the hardware
// prefetchers do not follow: rows picked out of a neuron cache, one part of each record (the
// other parts between), records whose parts are read in turn. Measured, with the chunked
// block dots (one thread): the sparse FFN on 4-bit cache rows 2.2-2.8x, the fused 4-bit FFN
// 2x (benchmarks/RESULTS.md section 13). Every line the range touches, from the line of p.
// always_inline: a call left out of line is a function without side effects to the compiler,
// which then deletes it (GCC 12 dropped every prefetch of the float fused FFN that way).
__attribute__((always_inline)) inline void prefetch_bytes(const void* p, int64_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), end = a + static_cast<uintptr_t>(bytes);
  for (uintptr_t c = a & ~uintptr_t(63); c < end; c += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(c), 0, 3);
}

// A contiguous stream [begin, end) read front to back (a work item's rows of a resident
// matrix), `cur` the next `bytes` about to be read: at the stream's start its first
// kStreamAhead bytes at once, then the bytes kStreamAhead ahead of cur. A decode step's
// matrices come from DRAM one after the other, many of them small, and the hardware
// prefetchers start each stream late (RESULTS.md section 13, "read ahead": the interleaved
// 4-bit groups +5-20%, q8_0 rows +7-26%). 8 KiB: 4 gave 5-12% less on one thread. Steps
// longer than a page (float16 rows of 4096 values) only get the start: prefetching each 8 KiB
// row whole cost a 7B-shaped float16 GEMV 26% on one thread, where the prefetchers follow.
constexpr int64_t kStreamAhead = 8192;
__attribute__((always_inline)) inline void prefetch_stream(const void* begin, const void* cur,
                                                           const void* end, int64_t bytes) {
  const char* b = static_cast<const char*>(begin);
  const char* c = static_cast<const char*>(cur);
  const char* e = static_cast<const char*>(end);
  if (c == b) prefetch_bytes(b, std::min<int64_t>(kStreamAhead, e - b));
  if (bytes > 4096) return;
  const char* q = c + kStreamAhead;
  if (q < e) prefetch_bytes(q, std::min<int64_t>(bytes, e - q));
}

// Records a fused FFN loop reads ahead: the next one on a contiguous layer (two measured 5-10%
// slower on a 1B q4_1 decode), picked records (rows out of a neuron cache) at least 4 KiB ahead
// (one of SmolLM2's 1 KiB q4_1 records ahead: 6.3 GB/s on one thread; 4 KiB: 9.8).
inline int64_t records_ahead(int64_t record_bytes, bool picked) {
  return picked ? std::max<int64_t>(1, (4096 + record_bytes - 1) / std::max<int64_t>(1, record_bytes))
                : 1;
}

// The read-ahead of a fused FFN loop over records [r0, r1) (record_bytes apart from `rows`;
// record j is rows[sel[j]] when sel is given), at record j: at the range's first record the
// `ahead` after it, then record j + ahead (ahead = records_ahead(...), taken once per loop).
__attribute__((always_inline)) inline void prefetch_records(const void* rows, int64_t record_bytes,
                                                            const int32_t* sel, int64_t j,
                                                            int64_t r0, int64_t r1,
                                                            int64_t ahead) {
  const char* base = static_cast<const char*>(rows);
  if (j == r0)
    for (int64_t k = 1; k < ahead && j + k < r1; ++k)
      prefetch_bytes(base + (sel ? sel[j + k] : j + k) * record_bytes, record_bytes);
  if (j + ahead < r1)
    prefetch_bytes(base + (sel ? sel[j + ahead] : j + ahead) * record_bytes, record_bytes);
}

// Threads for a call of `work` multiply-adds: `threads` (<= 0: OpenMP's count, all cores
// unless OMP_NUM_THREADS says otherwise), or 1 when the work is too small to share.
int resolve_threads(int threads, double work);
// The same for a product with one input (decode), which streams `weight_bytes` once: 1 below
// kSoloDecodeBytes, where the second thread's start and join cost more than its half of the
// reads saves (one-input GEMVs on the dev VM, microseconds a call one / two threads: q4_1
// interleaved 576 x 576, 207 KB, 8.7 / 10.4; q8_0 256 x 576, 157 KB, 7.4 / 9.0; float16
// 256 x 576, 295 KB, 10.5 / 10.3; q8_0 576 x 576, 353 KB, 15.1 / 14.0).
constexpr double kSoloDecodeBytes = 256 << 10;
int resolve_decode_threads(int threads, double work, double weight_bytes);

// ---- linear: y = x @ w.T + bias -------------------------------------------------------

// x    (n, k) f32, C-contiguous
// w    (m, k) dtype, C-contiguous; a block format: (m, row_bytes(dtype, k)) bytes
// bias (m,)   f32 or nullptr
// out  (n, m) f32, overwritten
// threads <= 0 means omp_get_max_threads().
void linear(const float* x, int64_t n, int64_t k, const void* w, DType wdt, int64_t m,
            const float* bias, float* out, int threads);

// ---- ffn_dense: a dense FFN as two products ---------------------------------------------

// ug: the up rows (f x d), then for a gated FFN the gate rows (f x d); down: down_proj (d x f,
// a block format's blocks along f). out (n, d) = down @ h, h = act(gate . x) * (up . x) or
// act(up . x); act_out (n, f) receives h when not null. Both matrices are `dt`: float rows,
// row-major blocks, or with x16 interleaved 4-bit rows (kernels_quant.h). A block format
// quantizes h to 16 bits per block of 32 for the down product, as x for every product.
void ffn_dense(const float* x, int64_t n, int64_t d, int64_t f, const void* ug,
               const void* down, DType dt, bool x16, bool gated, Activation act, float act_param,
               float* out, float* act_out, int threads);

// ---- ffn_rows: FFN straight from neuron-cache rows ------------------------------------

// For each input t and used row j (all rows, or row_select[i]):
//   u = up_j . x_t (+ up_bias[j]);  gated: h = act(gate_j . x_t) * u, else h = act(u)
//   out_t = sum_j h * down_j                  (out overwritten)
// Rows whose h is exactly 0 cost no down traffic (ReLU models: 90-97% of them).
// Block formats: rows are bytes (element = byte), parts are rows of blocks; with
// down_scales the down part holds codes only (DownLayout::Codes) and row_ids say which
// 32-neuron block of the scale table each row belongs to.
struct FfnRowsArgs {
  const float* x = nullptr;      // (n, d_model) f32
  int64_t n = 0;
  int64_t d_model = 0;
  const void* rows = nullptr;    // (n_rows, row_elems) dtype, one record per row
  DType dtype = DType::F32;
  int64_t n_rows = 0;
  int64_t row_elems = 0;         // row stride in elements (>= used parts, padding allowed)
  int64_t up_off = 0;            // element offset of the up part inside a row
  int64_t gate_off = -1;         // -1: not gated
  int64_t down_off = 0;           // element offset of the down part in a row (of down_rows
                                 // when given)
  // The down parts in a matrix of their own (a split neuron cache, neuron_cache.h): row r's
  // down part at down_rows + r * down_row_elems + down_off; nullptr: in `rows`, as the others.
  const void* down_rows = nullptr;
  int64_t down_row_elems = 0;
  const uint16_t* down_scales = nullptr;  // (n_scale_blocks, scale_rows, d_model) fp16, or
                                          // nullptr: the down part is whole blocks
  int64_t n_scale_blocks = 0;    // d_ff / 32
  const int32_t* row_ids = nullptr;  // (n_rows,) neuron id of each row; nullptr: the row index
  Activation act = Activation::Relu;
  float act_param = 0.f;         // fatrelu threshold: h = u if u > t else 0
  const float* up_bias = nullptr;     // (n_rows,) f32, indexed by row, or nullptr
  const int32_t* row_select = nullptr;  // (n_select,) indices into rows, or nullptr = all
  int64_t n_select = 0;
  float* out = nullptr;          // (n, d_model) f32, overwritten
  float* act_out = nullptr;      // (n, n_used) f32 h values, or nullptr; n_used = n_select
                                 // when row_select is given, else n_rows
  int threads = 0;
};
void ffn_rows(const FfnRowsArgs& a);

// ---- memory read reference -------------------------------------------------------------

// Sum of count float32 values, read once, on the kernels' threads and pool in blocks of
// 256 KiB (AVX2 loads where the CPU has them, else scalar). The benchmarks' measure of this
// machine's memory read bandwidth as a kernel can see it: nothing but loads and adds, so
// any kernel's GB/s compares with it directly.
double stream_sum(const float* p, int64_t count, int threads);

// ---- dtype conversion -----------------------------------------------------------------

// dst[i] = float(src[i]) for count elements.
void to_float32(const void* src, DType dt, int64_t count, float* dst, int threads);
// dst[i] = dt(src[i]): IEEE round-to-nearest-even for f16 (overflow -> inf), round to
// nearest even for bf16 (NaN stays a quiet NaN, like torch).
void from_float32(const float* src, int64_t count, DType dt, void* dst, int threads);

}  // namespace flashinfer

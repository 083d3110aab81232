// kernels.cpp: linear, ffn_rows and dtype conversion for f32 / f16 / bf16 weights, and the
// drivers of the block formats (q8_0, q4_0, q4_1; their tiles: kernels_quant.h).
//
// Layout of this file:
//   1. scalar dtype conversion (bit exact, portable)
//   2. Rows: a view of weight rows (strided, optionally indexed) and the per-ISA kernel table
//   3. scalar kernels (portable fallback; the compiler may vectorize them, e.g. NEON)
//   4. AVX2+FMA+F16C kernels (x86_64 only, compiled with a target attribute, picked at runtime)
//   5. ISA selection, and the one dispatcher of the block formats' kernels
//   6. drivers: threading (the kernel pool, thread_pool.h) and blocking, shared by every ISA
//      and format
//
// Three inner kernels do all the work:
//   dot_block:   out[t, j] (+)= sum_i x[t, i] * w_j[i]       ("NT" GEMM, several inputs)
//                register tile of T<=4 inputs x R<=3 rows: each weight vector is loaded and
//                converted once and used T times; each x vector is used R times.
//   dot1:        out[j] = x . w_j, one input (decode): rows whole, one after the other.
//   accum_block: out[t, c] += sum_{j in list} h[t, j] * w_j[c]  (sparse "NN" GEMM)
//                R rows per pass so each out vector is loaded/stored once per R rows.
// Both read weights in their storage dtype and convert in registers: no f32 copy of the
// weights is ever written, so n=1 streams each weight byte exactly once (bandwidth bound).
#include "kernels.h"

#include "half.h"
#include "kernels_quant.h"
#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

namespace flashinfer {
namespace {

// =======================================================================================
// 1. Scalar dtype conversion
// =======================================================================================

// Storage element types. Distinct types so templates can tell f16 from bf16 bits.
struct F16 { uint16_t bits; };
struct BF16 { uint16_t bits; };

inline float to_f(const float& v) { return v; }
inline float to_f(const F16& v) { return half_to_float(v.bits); }
inline float to_f(const BF16& v) { return bf16_to_float(v.bits); }

// =======================================================================================
// 2. Weight-row views and the per-ISA kernel table
// =======================================================================================

// Row j of a set of weight rows: data + (idx ? idx[j] : j) * stride + off, in elements.
// Covers a dense (m, k) matrix (stride k, off 0, no idx) and one part of neuron-cache
// records selected by row_select (stride record_elems, off part offset, idx row_select).
struct Rows {
  const void* data;
  DType dt;
  int64_t stride;
  int64_t off;
  const int32_t* idx;
};

template <typename E>
inline const E* row_ptr(const Rows& w, int64_t j) {
  return static_cast<const E*>(w.data) + (w.idx ? w.idx[j] : j) * w.stride + w.off;
}

// One input's FFN over float records (KernelTable::ffn1): offsets in elements.
struct Ffn1 {
  const float* x;
  int64_t d;
  const void* rows;
  DType dt;
  int64_t row_elems;
  const int32_t* sel;
  int64_t up_off, gate_off, down_off;
  Activation act;
  float act_param;
  const float* up_bias;
  float* H;
  float* out;
  const void* down_rows;   // the down parts' matrix: rows itself, or a split cache's own
  int64_t down_row_elems;
};

// Ffn1 loops prefetch records whole (prefetch_records, kernels.h): the three parts of a record
// are read in turn, and picked records (sel) are scattered.
struct KernelTable {
  // out[t*ldo + j] (+)= sum_{i in [k0,k1)} x[t*ldx + i] * w_j[i], t < n, j in [j0, j1)
  void (*dot_block)(const float* x, int64_t ldx, int64_t n, const Rows& w, int64_t j0,
                    int64_t j1, int64_t k0, int64_t k1, float* out, int64_t ldo,
                    bool accumulate);
  // out[t*ldo + c] += sum_{q < nj} h[t*ldh + js[q]] * w_{js[q]}[c], t < nt (<= 4),
  // c in [c0, c1)
  void (*accum_block)(const float* h, int64_t ldh, int64_t nt, const int32_t* js,
                      int64_t nj, const Rows& w, int64_t c0, int64_t c1, float* out,
                      int64_t ldo);
  // out[j] = x . w_j for j in [j0, j1), one input (decode): whole rows one after the other,
  // so a contiguous matrix is read as one sequential stream (the 3-row tile of dot_block
  // reads three short streams at once, which the hardware prefetchers follow poorly: k=576
  // rows streamed at half the rate).
  void (*dot1)(const float* x, int64_t k, const Rows& w, int64_t j0, int64_t j1, float* out);
  // The FFN of one input on used rows [r0, r1), fused per neuron (Ffn1: every record read
  // once, front to back; see QFfn1Args for the block formats' twin).
  void (*ffn1)(const struct Ffn1& a, int64_t r0, int64_t r1);
  void (*to_f32)(const void* src, DType dt, int64_t count, float* dst);
  void (*from_f32)(const float* src, int64_t count, DType dt, void* dst);
};

constexpr int kTileT = 4;  // inputs per register tile (both kernels)
constexpr int kDotR = 3;   // weight rows per dot tile: 4x3 = 12 accumulators + 3 w + 1 x

// Tile-function lookup: tiles[T-1][R-1]; built once per (ISA, dtype) from a template.
template <typename Fn, template <int, int> class Make, int NT, int NR>
struct TileTable {
  Fn fn[NT][NR];
  TileTable() { fill<1, 1>(); }
  template <int T, int R>
  void fill() {
    fn[T - 1][R - 1] = Make<T, R>::get();
    if constexpr (R < NR) fill<T, R + 1>();
    else if constexpr (T < NT) fill<T + 1, 1>();
  }
};

// =======================================================================================
// 3. Scalar kernels
// =======================================================================================

using DotTileFn = void (*)(const float*, int64_t, const void* const*, int64_t, float*,
                           int64_t, bool);
using AccumTileFn = void (*)(const float*, const void* const*, int64_t, int64_t, float*,
                             int64_t);

// T inputs x R rows over len elements. 8 independent lanes per accumulator so the
// compiler can vectorize without reassociating (no -ffast-math).
template <typename E, int T, int R>
void scalar_dot_tile(const float* x, int64_t ldx, const void* const* wv, int64_t len,
                     float* out, int64_t ldo, bool accumulate) {
  constexpr int L = 8;
  const E* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const E*>(wv[r]);
  float acc[T][R][L] = {};
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    float wf[R][L];
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < L; ++l) wf[r][l] = to_f(w[r][i + l]);
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < L; ++l) acc[t][r][l] += x[t * ldx + i + l] * wf[r][l];
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int l = 0; l < L; ++l) s += acc[t][r][l];
      for (int64_t q = i; q < len; ++q) s += x[t * ldx + q] * to_f(w[r][q]);
      out[t * ldo + r] = accumulate ? out[t * ldo + r] + s : s;
    }
}

// out[t, c] += sum_r coef[t*R + r] * w_r[c] for T inputs, R rows, c in [c0, c1).
template <typename E, int T, int R>
void scalar_accum_tile(const float* coef, const void* const* wv, int64_t c0, int64_t c1,
                       float* out, int64_t ldo) {
  const E* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const E*>(wv[r]);
  for (int64_t c = c0; c < c1; ++c) {
    float wf[R];
    for (int r = 0; r < R; ++r) wf[r] = to_f(w[r][c]);
    for (int t = 0; t < T; ++t) {
      float o = out[t * ldo + c];
      for (int r = 0; r < R; ++r) o += coef[t * R + r] * wf[r];
      out[t * ldo + c] = o;
    }
  }
}

template <typename E>
struct ScalarDot {
  template <int T, int R>
  struct Make { static DotTileFn get() { return &scalar_dot_tile<E, T, R>; } };
};
template <typename E>
struct ScalarAccum {
  template <int T, int R>
  struct Make { static AccumTileFn get() { return &scalar_accum_tile<E, T, R>; } };
};

// ---- generic block loops over tiles (shared by the ISAs; only the tiles differ) ----

// Loop over R-row tiles, then T-input tiles: the R weight rows (<= 3 x kc elements) stay
// in L1 while every input tile streams past them; x (n x kc) stays in L2.
template <typename E, typename Table>
void dot_block_loop(const Table& tiles, const float* x, int64_t ldx, int64_t n,
                    const Rows& w, int64_t j0, int64_t j1, int64_t k0, int64_t k1, float* out,
                    int64_t ldo, bool accumulate) {
  const int64_t len = k1 - k0;
  for (int64_t j = j0; j < j1; j += kDotR) {
    const int R = static_cast<int>(std::min<int64_t>(kDotR, j1 - j));
    const void* wp[kDotR];
    for (int r = 0; r < R; ++r) wp[r] = row_ptr<E>(w, j + r) + k0;
    for (int64_t t = 0; t < n; t += kTileT) {
      const int T = static_cast<int>(std::min<int64_t>(kTileT, n - t));
      tiles.fn[T - 1][R - 1](x + t * ldx + k0, ldx, wp, len, out + t * ldo + j, ldo,
                             accumulate);
    }
  }
}

// Walk the row list in groups of R (4 for <= 2 inputs, else 2 to stay within 16 vector
// registers), tails one row at a time.
template <typename E, typename Table>
void accum_block_loop(const Table& tiles, const float* h, int64_t ldh, int64_t nt,
                      const int32_t* js, int64_t nj, const Rows& w, int64_t c0, int64_t c1,
                      float* out, int64_t ldo) {
  const int T = static_cast<int>(nt);
  const int R = T <= 2 ? 4 : 2;
  float coef[kTileT * 4];
  const void* wp[4];
  // The rows are scattered (the active ones of a sparse layer): the next group's parts are
  // prefetched while this one is added (the prefetchers do not follow short streams).
  const int64_t c_first = is_quantized(w.dt) ? c0 / 32 * 32 : c0;
  const int64_t bytes = static_cast<int64_t>(row_bytes(w.dt, static_cast<uint64_t>(c1 - c_first)));
  const int64_t skip = static_cast<int64_t>(row_bytes(w.dt, static_cast<uint64_t>(c_first)));
  int64_t q = 0;
  for (; q < nj; q += R) {
    for (int64_t p = q + R; p < std::min<int64_t>(nj, q + 2 * R); ++p)
      prefetch_bytes(reinterpret_cast<const char*>(row_ptr<E>(w, js[p])) + skip, bytes);
    const int r_here = static_cast<int>(std::min<int64_t>(R, nj - q));
    const int rr = r_here == R ? R : 1;
    for (int s = 0; s < r_here; s += rr) {
      for (int r = 0; r < rr; ++r) {
        const int32_t j = js[q + s + r];
        wp[r] = row_ptr<E>(w, j);
        for (int t = 0; t < T; ++t) coef[t * rr + r] = h[t * ldh + j];
      }
      // table index: R in {1, 2, 4} -> column 0, 1, 2
      tiles.fn[T - 1][rr == 4 ? 2 : rr - 1](coef, wp, c0, c1, out, ldo);
    }
  }
}

// Accum tables are indexed by R in {1, 2, 4}; map the table's column to that R.
template <template <int, int> class Make>
struct AccumMake {
  template <int T, int C>
  struct M { static AccumTileFn get() { return Make<T, C == 3 ? 4 : C>::get(); } };
};

template <typename E>
void scalar_dot_block(const float* x, int64_t ldx, int64_t n, const Rows& w, int64_t j0,
                      int64_t j1, int64_t k0, int64_t k1, float* out, int64_t ldo,
                      bool accumulate) {
  static const TileTable<DotTileFn, ScalarDot<E>::template Make, kTileT, kDotR> tiles;
  dot_block_loop<E>(tiles, x, ldx, n, w, j0, j1, k0, k1, out, ldo, accumulate);
}

template <typename E>
void scalar_accum_block(const float* h, int64_t ldh, int64_t nt, const int32_t* js,
                        int64_t nj, const Rows& w, int64_t c0, int64_t c1, float* out,
                        int64_t ldo) {
  static const TileTable<AccumTileFn,
                         AccumMake<ScalarAccum<E>::template Make>::template M, kTileT, 3>
      tiles;
  accum_block_loop<E>(tiles, h, ldh, nt, js, nj, w, c0, c1, out, ldo);
}

// Dispatch a templated-on-E function by runtime dtype.
#define FI_DISPATCH_DTYPE(dt, FN, ...)                      \
  switch (dt) {                                             \
    case DType::F32: return FN<float>(__VA_ARGS__);         \
    case DType::F16: return FN<F16>(__VA_ARGS__);           \
    case DType::BF16: return FN<BF16>(__VA_ARGS__);         \
    default: break; /* block formats: never reach here */  \
  }

void scalar_dot(const float* x, int64_t ldx, int64_t n, const Rows& w, int64_t j0, int64_t j1,
                int64_t k0, int64_t k1, float* out, int64_t ldo, bool accumulate) {
  FI_DISPATCH_DTYPE(w.dt, scalar_dot_block, x, ldx, n, w, j0, j1, k0, k1, out, ldo,
                    accumulate);
}

void scalar_accum(const float* h, int64_t ldh, int64_t nt, const int32_t* js, int64_t nj,
                  const Rows& w, int64_t c0, int64_t c1, float* out, int64_t ldo) {
  FI_DISPATCH_DTYPE(w.dt, scalar_accum_block, h, ldh, nt, js, nj, w, c0, c1, out, ldo);
}

template <typename E>
void scalar_dot1_rows(const float* x, int64_t k, const Rows& w, int64_t j0, int64_t j1,
                      float* out) {
  for (int64_t j = j0; j < j1; ++j) {
    const void* wp = row_ptr<E>(w, j);
    scalar_dot_tile<E, 1, 1>(x, k, &wp, k, out + j, 1, false);
  }
}

void scalar_dot1(const float* x, int64_t k, const Rows& w, int64_t j0, int64_t j1, float* out) {
  FI_DISPATCH_DTYPE(w.dt, scalar_dot1_rows, x, k, w, j0, j1, out);
}

template <typename E>
void scalar_ffn1_rows(const Ffn1& a, int64_t r0, int64_t r1) {
  const int64_t rb = a.row_elems * static_cast<int64_t>(sizeof(E));
  const int64_t drb = a.down_row_elems * static_cast<int64_t>(sizeof(E));
  const int64_t ahead = records_ahead(rb, a.sel != nullptr);
  for (int64_t j = r0; j < r1; ++j) {
    const int64_t row = a.sel ? a.sel[j] : j;
    const E* rec = static_cast<const E*>(a.rows) + row * a.row_elems;
    prefetch_records(a.rows, rb, a.sel, j, r0, r1, ahead);
    if (a.down_rows != a.rows) prefetch_records(a.down_rows, drb, a.sel, j, r0, r1, ahead);
    const void* up = rec + a.up_off;
    float u, g = 0.f;
    scalar_dot_tile<E, 1, 1>(a.x, a.d, &up, a.d, &u, 1, false);
    if (a.up_bias) u += a.up_bias[row];
    if (a.gate_off >= 0) {
      const void* gp = rec + a.gate_off;
      scalar_dot_tile<E, 1, 1>(a.x, a.d, &gp, a.d, &g, 1, false);
    }
    const float h = a.gate_off >= 0 ? activate(a.act, g, a.act_param) * u
                                    : activate(a.act, u, a.act_param);
    a.H[j] = h;
    if (h != 0.f) {
      const void* dp = static_cast<const E*>(a.down_rows) + row * a.down_row_elems + a.down_off;
      scalar_accum_tile<E, 1, 1>(&h, &dp, 0, a.d, a.out, a.d);
    }
  }
}

void scalar_ffn1(const Ffn1& a, int64_t r0, int64_t r1) {
  FI_DISPATCH_DTYPE(a.dt, scalar_ffn1_rows, a, r0, r1);
}

void scalar_to_f32(const void* src, DType dt, int64_t count, float* dst) {
  switch (dt) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(count) * 4);
      return;
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = half_to_float(s[i]);
      return;
    }
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_float(s[i]);
      return;
    }
    default:  // block formats go through dequantize_rows (the bindings check)
      return;
  }
}

void scalar_from_f32(const float* src, int64_t count, DType dt, void* dst) {
  switch (dt) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(count) * 4);
      return;
    case DType::F16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < count; ++i) d[i] = float_to_half(src[i]);
      return;
    }
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < count; ++i) d[i] = float_to_bf16(src[i]);
      return;
    }
    default:  // block formats go through quantize_rows (the bindings check)
      return;
  }
}

const KernelTable kScalarTable = {&scalar_dot, &scalar_accum, &scalar_dot1, &scalar_ffn1,
                                  &scalar_to_f32, &scalar_from_f32};

// =======================================================================================
// 4. AVX2 + FMA + F16C kernels
// =======================================================================================
#ifdef FI_HAVE_X86

// 8 storage elements -> 8 floats in a ymm register.
FI_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FI_AVX2 inline __m256 load8(const F16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FI_AVX2 inline __m256 load8(const BF16* p) {
  // bf16 is the top half of an f32: zero-extend to 32 bits and shift up.
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

// The hot loop for decode (T=1) and prompt processing (T=4): per 8 elements, R weight
// loads+converts, T x loads, T*R FMAs. Conversions run on other ports than the FMAs.
template <typename E, int T, int R>
FI_AVX2 void avx2_dot_tile(const float* x, int64_t ldx, const void* const* wv, int64_t len,
                           float* out, int64_t ldo, bool accumulate) {
  const E* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const E*>(wv[r]);
  __m256 acc[T][R];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 wf[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wf[r] = load8(w[r] + i);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * ldx + i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_fmadd_ps(xv, wf[r], acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      float s = fi_hsum8(acc[t][r]);
      for (int64_t q = i; q < len; ++q) s += x[t * ldx + q] * to_f(w[r][q]);
      out[t * ldo + r] = accumulate ? out[t * ldo + r] + s : s;
    }
}

// out[t, c0:c1] += sum_r coef[t, r] * w_r[c0:c1]: each out vector loaded and stored once
// per R rows, the R converted weight vectors reused by all T inputs.
template <typename E, int T, int R>
FI_AVX2 void avx2_accum_tile(const float* coef, const void* const* wv, int64_t c0,
                             int64_t c1, float* out, int64_t ldo) {
  const E* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const E*>(wv[r]);
  __m256 cb[T][R];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) cb[t][r] = _mm256_set1_ps(coef[t * R + r]);
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    __m256 wf[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wf[r] = load8(w[r] + c);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      __m256 o = _mm256_loadu_ps(out + t * ldo + c);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) o = _mm256_fmadd_ps(cb[t][r], wf[r], o);
      _mm256_storeu_ps(out + t * ldo + c, o);
    }
  }
  for (; c < c1; ++c)
    for (int t = 0; t < T; ++t) {
      float o = out[t * ldo + c];
      for (int r = 0; r < R; ++r) o += coef[t * R + r] * to_f(w[r][c]);
      out[t * ldo + c] = o;
    }
}

template <typename E>
struct Avx2Dot {
  template <int T, int R>
  struct Make { static DotTileFn get() { return &avx2_dot_tile<E, T, R>; } };
};
template <typename E>
struct Avx2Accum {
  template <int T, int R>
  struct Make { static AccumTileFn get() { return &avx2_accum_tile<E, T, R>; } };
};

template <typename E>
void avx2_dot_block(const float* x, int64_t ldx, int64_t n, const Rows& w, int64_t j0,
                    int64_t j1, int64_t k0, int64_t k1, float* out, int64_t ldo,
                    bool accumulate) {
  static const TileTable<DotTileFn, Avx2Dot<E>::template Make, kTileT, kDotR> tiles;
  dot_block_loop<E>(tiles, x, ldx, n, w, j0, j1, k0, k1, out, ldo, accumulate);
}

template <typename E>
void avx2_accum_block(const float* h, int64_t ldh, int64_t nt, const int32_t* js,
                      int64_t nj, const Rows& w, int64_t c0, int64_t c1, float* out,
                      int64_t ldo) {
  static const TileTable<AccumTileFn,
                         AccumMake<Avx2Accum<E>::template Make>::template M, kTileT, 3>
      tiles;
  accum_block_loop<E>(tiles, h, ldh, nt, js, nj, w, c0, c1, out, ldo);
}

// One row at a time, four independent accumulators (32 elements a step) to cover the FMA
// latency; measured on the dev VM at k=576, f16, one thread: 13-23 GB/s vs 7-9 GB/s for
// the 3-row tile. (512-bit vectors gave no more: this is memory bound.)
// float32 rows: one accumulator, the dot tile's order, so a token alone gets exactly what it
// gets among others (the tests compare token-by-token with whole prompts to 1e-5; 8 bytes a
// cycle is memory speed for f32 anyway). 16-bit rows: four accumulators, as one chain of
// FMAs would cap them at ~4 bytes a cycle, below what one core can stream.
template <typename E>
FI_AVX2 inline float avx2_row_dot(const float* x, const E* wr, int64_t k) {
  if constexpr (std::is_same_v<E, float>) {
    const void* wp = wr;
    float s;
    avx2_dot_tile<float, 1, 1>(x, k, &wp, k, &s, 1, false);
    return s;
  }
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(wr + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load8(wr + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), load8(wr + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), load8(wr + i + 24), a3);
  }
  for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(wr + i), a0);
  float s = fi_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < k; ++i) s += x[i] * to_f(wr[i]);
  return s;
}

template <typename E>
FI_AVX2 void avx2_dot1_rows(const float* x, int64_t k, const Rows& w, int64_t j0, int64_t j1,
                            float* out) {
  const int64_t rb = k * static_cast<int64_t>(sizeof(E));
  const bool stream = !w.idx && w.stride == k;  // a resident matrix's rows, back to back
  const E *const begin = row_ptr<E>(w, j0), *const end = begin + (j1 - j0) * k;
  for (int64_t j = j0; j < j1; ++j) {
    // picked rows (a split cache's predicted ones) are scattered: the row after next ahead
    if (w.idx && j + 2 < j1) prefetch_bytes(row_ptr<E>(w, j + 2), rb);
    if (stream) prefetch_stream(begin, row_ptr<E>(w, j), end, rb);
    out[j] = avx2_row_dot(x, row_ptr<E>(w, j), k);
  }
}

// Ffn1 (one input, per neuron): up and gate dots, activation, out += h * down (in order,
// each out vector rounded once per row, as the accumulate tile does). Active rows wait in
// groups of four and go through the accumulate tile together (out loaded and stored once a
// vector for the group, the same FMAs in the same order: bit-identical to one at a time).
template <typename E>
FI_AVX2 void avx2_ffn1_rows(const Ffn1& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  const int64_t rb = a.row_elems * static_cast<int64_t>(sizeof(E));
  const int64_t drb = a.down_row_elems * static_cast<int64_t>(sizeof(E));
  const int64_t ahead = records_ahead(rb, a.sel != nullptr);
  float gh[4];
  const void* gw[4];
  int ng = 0;
  auto flush = [&] {
    int i = 0;
    if (ng == 4) avx2_accum_tile<E, 1, 4>(gh, gw, 0, d, a.out, d), i = 4;
    if (ng - i >= 2) avx2_accum_tile<E, 1, 2>(gh + i, gw + i, 0, d, a.out, d), i += 2;
    if (ng - i == 1) avx2_accum_tile<E, 1, 1>(gh + i, gw + i, 0, d, a.out, d);
    ng = 0;
  };
  for (int64_t j = r0; j < r1; ++j) {
    const int64_t row = a.sel ? a.sel[j] : j;
    const E* rec = static_cast<const E*>(a.rows) + row * a.row_elems;
    prefetch_records(a.rows, rb, a.sel, j, r0, r1, ahead);
    if (a.down_rows != a.rows) prefetch_records(a.down_rows, drb, a.sel, j, r0, r1, ahead);
    float u = avx2_row_dot(a.x, rec + a.up_off, d);
    if (a.up_bias) u += a.up_bias[row];
    const float h = a.gate_off >= 0
                        ? activate(a.act, avx2_row_dot(a.x, rec + a.gate_off, d), a.act_param) * u
                        : activate(a.act, u, a.act_param);
    a.H[j] = h;
    if (h == 0.f) continue;
    gh[ng] = h;
    gw[ng++] = static_cast<const E*>(a.down_rows) + row * a.down_row_elems + a.down_off;
    if (ng == 4) flush();
  }
  flush();
}

void avx2_ffn1(const Ffn1& a, int64_t r0, int64_t r1) {
  FI_DISPATCH_DTYPE(a.dt, avx2_ffn1_rows, a, r0, r1);
}

void avx2_dot1(const float* x, int64_t k, const Rows& w, int64_t j0, int64_t j1, float* out) {
  FI_DISPATCH_DTYPE(w.dt, avx2_dot1_rows, x, k, w, j0, j1, out);
}

void avx2_dot(const float* x, int64_t ldx, int64_t n, const Rows& w, int64_t j0, int64_t j1,
              int64_t k0, int64_t k1, float* out, int64_t ldo, bool accumulate) {
  FI_DISPATCH_DTYPE(w.dt, avx2_dot_block, x, ldx, n, w, j0, j1, k0, k1, out, ldo,
                    accumulate);
}

void avx2_accum(const float* h, int64_t ldh, int64_t nt, const int32_t* js, int64_t nj,
                const Rows& w, int64_t c0, int64_t c1, float* out, int64_t ldo) {
  FI_DISPATCH_DTYPE(w.dt, avx2_accum_block, h, ldh, nt, js, nj, w, c0, c1, out, ldo);
}

FI_AVX2 void avx2_to_f32(const void* src, DType dt, int64_t count, float* dst) {
  int64_t i = 0;
  if (dt == DType::F16) {
    const F16* s = static_cast<const F16*>(src);
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, load8(s + i));
  } else if (dt == DType::BF16) {
    const BF16* s = static_cast<const BF16*>(src);
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, load8(s + i));
  }
  const size_t eb = dtype_bytes(dt);
  scalar_to_f32(static_cast<const char*>(src) + i * eb, dt, count - i, dst + i);
}

// 8 floats -> 8 bf16, round to nearest even, NaN -> quiet NaN (matches float_to_bf16).
FI_AVX2 inline __m128i f32_to_bf16x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
  // pack 8 x u32 (each < 2^16) to u16; packus works per 128-bit lane, so fix the order.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  return _mm256_castsi256_si128(packed);
}

FI_AVX2 void avx2_from_f32(const float* src, int64_t count, DType dt, void* dst) {
  int64_t i = 0;
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (dt == DType::F16) {
    for (; i + 8 <= count; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  } else if (dt == DType::BF16) {
    for (; i + 8 <= count; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       f32_to_bf16x8(_mm256_loadu_ps(src + i)));
  }
  const size_t eb = dtype_bytes(dt);
  scalar_from_f32(src + i, count - i, dt, static_cast<char*>(dst) + i * eb);
}

const KernelTable kAvx2Table = {&avx2_dot, &avx2_accum, &avx2_dot1, &avx2_ffn1, &avx2_to_f32,
                                &avx2_from_f32};

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
// The block formats' VNNI dots use 256-bit EVEX forms: F, BW, VL and VNNI (and the OS must
// save zmm state, which __builtin_cpu_supports checks for the AVX-512 features).
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif  // FI_HAVE_X86

// =======================================================================================
// 5. ISA selection
// =======================================================================================

Isa best_isa() {
  return cpu_has_avx512() ? Isa::Avx512 : cpu_has_avx2() ? Isa::Avx2 : Isa::Scalar;
}

std::atomic<int>& isa_state() {
  static std::atomic<int> state{static_cast<int>(best_isa())};
  return state;
}

const KernelTable& table() {
#ifdef FI_HAVE_X86
  if (isa_state().load(std::memory_order_relaxed) >= static_cast<int>(Isa::Avx2))
    return kAvx2Table;  // Avx512: the float kernels have nothing wider
#endif
  return kScalarTable;
}

// =======================================================================================
// 6. Drivers
// =======================================================================================

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// [begin, end) of part `i` of `parts` over [0, total), boundaries rounded to `align`.
inline void split_range(int64_t total, int parts, int i, int64_t align, int64_t* b,
                        int64_t* e) {
  auto at = [&](int p) {
    if (p >= parts) return total;
    const int64_t v = total * p / parts / align * align;
    return std::min(v, total);
  };
  *b = at(i);
  *e = at(i + 1);
}

// k-chunk so that an (n x kc) f32 slab of x stays in L2 (~512 KiB) across row tiles.
inline int64_t choose_kc(int64_t n, int64_t k) {
  const int64_t budget = 512 * 1024 / 4;  // floats
  if (n * k <= budget) return k;
  return std::max<int64_t>(256, budget / n / 64 * 64);
}

constexpr int64_t kRowBlock = 64;  // rows per (k-chunk sweep) block

// Rows per dynamically scheduled block: ~8 blocks per thread for load balance, at most
// kRowBlock, a multiple of the dot tile height.
inline int64_t row_block(int64_t rows, int nt) {
  const int64_t want = (rows + 8 * nt - 1) / (8 * nt);
  return std::min<int64_t>(kRowBlock, std::max<int64_t>(kDotR, (want + kDotR - 1) / kDotR * kDotR));
}

// Rows per block for one input (decode): ~256 KiB of weights, at least 4 blocks per thread
// when the matrix allows. A thread streams each block front to back; every new block is a new
// stream for the prefetchers to find (~1-2 us), so blocks of 32 KiB (~2 us of reading) lost a
// good part of their time to it (SmolLM2's 576 x 576 o projection, two threads: 15-16 GB/s
// with 32 KiB blocks, 20-22 with 256 KiB, same run).
inline int64_t decode_rows(int64_t rows, int64_t row_bytes, int nt) {
  const int64_t by_bytes = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, row_bytes));
  const int64_t by_threads = std::max<int64_t>(1, rows / (4 * int64_t(nt)));
  return std::min(by_bytes, by_threads);
}

// Phase-1 style sweep shared by linear and ffn_rows: rows [r0, r1) of `w` dotted with
// every input, written into out[t*ldo + j].
void dot_rows(const KernelTable& kt, const float* x, int64_t n, int64_t k, const Rows& w,
              int64_t r0, int64_t r1, float* out, int64_t ldo) {
  const int64_t kc = choose_kc(n, k);
  for (int64_t jb = r0; jb < r1; jb += kRowBlock) {
    const int64_t je = std::min(r1, jb + kRowBlock);
    for (int64_t k0 = 0; k0 < k; k0 += kc)
      kt.dot_block(x, k, n, w, jb, je, k0, std::min(k, k0 + kc), out, ldo, k0 > 0);
  }
}

// ---- block formats -----------------------------------------------------------------

// Rows [r0, r1) (<= kRowBlock) of a block-format matrix dotted with every quantized input:
// token tiles outside, row pairs inside, so a tile's x (T x k bytes) stays in L1 while the
// block's rows (<= 64 rows) come from L2.
void qdot_rows(const QuantKernels& qk, const QuantizedX& x, int64_t n, const Rows& w,
               int64_t r0, int64_t r1, float* out, int64_t ldo) {
  const uint8_t* wp[kQTileR];
  for (int64_t t = 0; t < n; t += kQTileT) {
    const int T = static_cast<int>(std::min<int64_t>(kQTileT, n - t));
    for (int64_t j = r0; j < r1; j += kQTileR) {
      const int R = static_cast<int>(std::min<int64_t>(kQTileR, r1 - j));
      for (int r = 0; r < R; ++r) wp[r] = row_ptr<uint8_t>(w, j + r);
      qk.dot[T - 1][R - 1](x, t, wp, x.nb, out + t * ldo + j, ldo);
    }
  }
}

// The accumulate tiles of a block format, in the shape accum_block_loop takes.
struct QAccumTable {
  const QAccumTileFn (&fn)[kQTileT][3];
};

// Down parts in the codes layout: the rows js[0, nj) of the tile (all in one 32-neuron block
// `blk` of the resident scale table) add h * code into S (T x (c1 - c0)), then the block's
// scales are applied once. R rows per codes tile as in accum_block_loop.
void codes_block(const QuantKernels& qk, const float* h, int64_t ldh, int64_t nt,
                 const int32_t* js, int64_t nj, const Rows& down, const uint16_t* scales,
                 int64_t d_model, int64_t c0, int64_t c1, float* S, float* out, int64_t ldo) {
  const int T = static_cast<int>(nt);
  const int64_t lds = c1 - c0;
  std::fill(S, S + nt * lds, 0.f);
  float hsum[kQTileT] = {};
  for (int64_t q = 0; q < nj; ++q)
    for (int t = 0; t < T; ++t) hsum[t] += h[t * ldh + js[q]];
  const int R = T <= 2 ? 4 : 2;
  float coef[kQTileT * 4];
  const uint8_t* cp[4];
  for (int64_t q = 0; q < nj;) {
    const int rr = nj - q >= R ? R : 1;
    for (int r = 0; r < rr; ++r) {
      cp[r] = row_ptr<uint8_t>(down, js[q + r]);
      for (int t = 0; t < T; ++t) coef[t * rr + r] = h[t * ldh + js[q + r]];
    }
    qk.codes[T - 1][rr == 4 ? 2 : rr - 1](coef, cp, c0, c1, S, lds);
    q += rr;
  }
  qk.codes_finish(S, lds, hsum, nt, scales, d_model, c0, c1, out, ldo);
}

}  // namespace

// ---- helpers shared with the other kernel files (kernels.h) -------------------------

int resolve_threads(int threads, double work) {
#ifdef _OPENMP
  int t = threads > 0 ? threads : omp_get_max_threads();
#else
  int t = 1;
  (void)threads;
#endif
  // Below ~64k multiply-adds a fork/join costs more than it saves.
  if (work < 65536.0) t = 1;
  return std::max(1, t);
}

int resolve_decode_threads(int threads, double work, double weight_bytes) {
  return weight_bytes < kSoloDecodeBytes ? 1 : resolve_threads(threads, work);
}


// ---- ISA API --------------------------------------------------------------------------

Isa kernel_isa() { return static_cast<Isa>(isa_state().load()); }

const char* isa_name(Isa isa) {
  return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "scalar";
}

// The block formats' kernel tables for the ISA in use (the one dispatcher).
const QuantKernels& quant_kernels(DType dt) {
  const Isa isa = kernel_isa();
  switch (dt) {
    case DType::Q8_0: return q8_0_kernels(isa);
    case DType::Q4_0: return q4_0_kernels(isa);
    case DType::Q4_1: return q4_1_kernels(isa);
    default: break;
  }
  FI_CHECK(false, "no block-format kernels for dtype ", dtype_name(dt));
  return q8_0_kernels(isa);
}

void set_kernel_isa(const std::string& name) {
  Isa isa;
  if (name == "auto") {
    isa = best_isa();
  } else if (name == "scalar") {
    isa = Isa::Scalar;
  } else if (name == "avx2") {
    FI_CHECK(cpu_has_avx2(), "isa 'avx2' is not supported by this CPU (needs AVX2+FMA+F16C)");
    isa = Isa::Avx2;
  } else if (name == "avx512") {
    FI_CHECK(cpu_has_avx512(), "isa 'avx512' is not supported by this CPU (needs AVX-512 "
             "F, BW, VL and VNNI)");
    isa = Isa::Avx512;
  } else {
    FI_CHECK(false, "isa must be 'auto', 'scalar', 'avx2' or 'avx512', got '", name, "'");
  }
  isa_state().store(static_cast<int>(isa));
}

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::Relu;
  if (name == "fatrelu") return Activation::FatRelu;
  if (name == "silu") return Activation::Silu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  FI_CHECK(false, "activation must be one of relu, fatrelu, silu, gelu, gelu_tanh; got '",
           name, "'");
  return Activation::Relu;
}

// ---- linear ---------------------------------------------------------------------------

void linear(const float* x, int64_t n, int64_t k, const void* w, DType wdt, int64_t m,
            const float* bias, float* out, int threads) {
  if (n == 0 || m == 0) return;
  if (k == 0) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < m; ++j) out[t * m + j] = bias ? bias[j] : 0.f;
    return;
  }
  const bool blocks = is_quantized(wdt);
  const KernelTable& kt = table();
  const QuantKernels* qk = blocks ? &quant_kernels(wdt) : nullptr;
  // Block formats: x in 16 bits once for every row (a reference: the workers share it).
  thread_local QuantizedX qx_scratch;
  if (blocks) quantize_x(x, n, k, k, qx_scratch);
  const QuantizedX& qx = qx_scratch;
  const int64_t rbytes = blocks ? int64_t(row_bytes(wdt, k)) : k * int64_t(dtype_bytes(wdt));
  const Rows rows{w, wdt, blocks ? rbytes : k, 0, nullptr};
  const double work = double(n) * double(m) * double(k);
  const int nt = n == 1 ? resolve_decode_threads(threads, work, double(m) * double(rbytes))
                        : resolve_threads(threads, work);
  // Row blocks handed out one at a time: each weight byte is read by one thread, once, and a
  // thread that loses its core (shared machine) does not hold the others back. One input
  // (decode): blocks of ~32 KiB of weights, rows streamed whole one after the other.
  const int64_t rb = n == 1 ? decode_rows(m, rbytes, nt) : row_block(m, nt);
  const int64_t n_blocks = (m + rb - 1) / rb;
  ComputePool::instance().run(n_blocks, nt, [&](int64_t b, int) {
    const int64_t r0 = b * rb, r1 = std::min(m, r0 + rb);
    if (n == 1 && blocks)
      qk->dot1(qx, 0, static_cast<const uint8_t*>(w), rbytes, nullptr, r0, r1, out);
    else if (n == 1)
      kt.dot1(x, k, rows, r0, r1, out);
    else if (blocks)
      qdot_rows(*qk, qx, n, rows, r0, r1, out, m);
    else
      dot_rows(kt, x, n, k, rows, r0, r1, out, m);
    if (bias)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = r0; j < r1; ++j) out[t * m + j] += bias[j];
  });
}

// ---- ffn_rows -------------------------------------------------------------------------

namespace {

// The used rows sorted: sel[i] = the row, order[i] = its position in the caller's order.
// by_neuron (codes layout): in neuron-id order, so the rows of one 32-neuron block become
// adjacent and its resident scales are applied once per block and tile rather than once per
// row. Else in row order: picked rows are read in address order (a gated layer's predicted
// neurons, a quarter of the 1B's rows in random order: 1.2-1.25x one thread, 1.1-1.25x two, in
// float16, q8_0 and q4_1; bench_kernels "picked").
void sort_rows(const FfnRowsArgs& a, int64_t n_used, bool by_neuron, std::vector<int32_t>& sel,
               std::vector<int32_t>& order) {
  auto row_of = [&](int64_t i) { return a.row_select ? a.row_select[i] : int32_t(i); };
  auto key = [&](int32_t row) { return by_neuron && a.row_ids ? a.row_ids[row] : row; };
  order.resize(static_cast<size_t>(n_used));
  for (int64_t i = 0; i < n_used; ++i) order[i] = int32_t(i);
  // std::sort with the position as tie-break: stable_sort's order without its buffer (no
  // allocation in the decode loop)
  std::sort(order.begin(), order.end(), [&](int32_t p, int32_t q) {
    const int32_t kp = key(row_of(p)), kq = key(row_of(q));
    return kp < kq || (kp == kq && p < q);
  });
  sel.resize(static_cast<size_t>(n_used));
  for (int64_t i = 0; i < n_used; ++i) sel[i] = row_of(order[i]);
}

}  // namespace

void ffn_rows(const FfnRowsArgs& args) {
  const int64_t n = args.n, d = args.d_model;
  const int64_t n_used = args.row_select ? args.n_select : args.n_rows;
  if (n == 0 || d == 0) return;
  std::fill(args.out, args.out + n * d, 0.f);
  if (n_used == 0) return;

  FfnRowsArgs a = args;
  const bool blocks = is_quantized(a.dtype);
  const bool codes = blocks && a.down_scales != nullptr;
  thread_local std::vector<int32_t> sorted_sel, order;
  // in_order: the used rows' neuron ids (codes layout) or rows (picked rows) never decrease,
  // as a dense layer's rows and the cached rows of a window step do
  bool in_order = true;
  if (codes || args.row_select) {
    int32_t prev = -1;
    for (int64_t i = 0; i < n_used && in_order; ++i) {
      const int32_t row = args.row_select ? args.row_select[i] : int32_t(i);
      const int32_t key = codes && args.row_ids ? args.row_ids[row] : row;
      in_order = key >= prev;
      prev = key;
    }
  }
  if (!in_order) {  // run on the rows sorted; act_out reordered at the end
    sort_rows(args, n_used, codes, sorted_sel, order);
    a.row_select = sorted_sel.data();
    a.n_select = n_used;
    a.act_out = nullptr;
  }
  const int32_t* sel = a.row_select;
  auto neuron_of = [&](int64_t j) {  // neuron id of used row j (codes layout)
    const int32_t row = sel ? sel[j] : int32_t(j);
    return a.row_ids ? a.row_ids[row] : row;
  };

  const KernelTable& kt = table();
  const QuantKernels* qk = blocks ? &quant_kernels(a.dtype) : nullptr;
  const bool gated = a.gate_off >= 0;
  // A split cache's layer without a gate: the up parts are a matrix of their own, which the
  // one-row kernel streams at the matrix rate (float16, d 4096, 10% active, one thread: 17.6
  // GB/s through the register tiles, 25.5 through it). Rows picked out of it (the OPT shape's
  // predicted rows) go the same way with the row after next read ahead: FFN 37-39 ms a token
  // against the tiles' 36-38 (without the read-ahead 44-46), so one input of such a layer
  // always sums its rows alike. On whole records, whose up parts lie a record apart, the
  // one-row kernel is the slower (16.3 against 11.8): they keep the tiles. For 16-bit rows
  // the two sum a row in another order (four partial sums against one), so a split layer's h
  // for one input differs, within float rounding, from its h in a prompt (float32 rows: the
  // one-row kernel keeps the tiles' order, bit-identical).
  const bool up_matrix = !gated && a.down_rows != nullptr;
  // where the down parts are, for every path: their own matrix, or the records
  const void* down_base = a.down_rows ? a.down_rows : a.rows;
  const int64_t down_stride = a.down_rows ? a.down_row_elems : a.row_elems;
  const Rows up{a.rows, a.dtype, a.row_elems, a.up_off, a.row_select};
  const Rows gate{a.rows, a.dtype, a.row_elems, gated ? a.gate_off : 0, a.row_select};
  const Rows down{down_base, a.dtype, down_stride, a.down_off, a.row_select};
  // Block formats: x in 16 bits once for all rows (shared by reference with the workers).
  thread_local QuantizedX qx_scratch;
  if (blocks) quantize_x(a.x, n, d, d, qx_scratch);
  const QuantizedX& qx = qx_scratch;

  // H (n, n_used): u, then h in place. Caller's act_out when given, else scratch owned by
  // the calling thread (reused across calls: no allocation in the decode loop).
  thread_local std::vector<float> h_scratch, g_scratch;
  float* H = a.act_out;
  if (!H) {
    h_scratch.resize(static_cast<size_t>(n * n_used));
    H = h_scratch.data();
  }
  float* G = nullptr;
  if (gated) {
    g_scratch.resize(static_cast<size_t>(n * n_used));
    G = g_scratch.data();
  }

  const double work = double(n) * double(n_used) * double(d) * (gated ? 3 : 2);
  const int nt = resolve_threads(a.threads, work);
  // The used rows in n_ranges contiguous ranges, each summed into its own partial output
  // (n, d) (range 0 into out), the partials added in range order after the call. The ranges
  // depend on n_used only, so the sums are grouped the same whatever the threads did and
  // however many inputs there are (a token alone gets what it gets in a prompt, and a call
  // gives the same result every time: rows handed out one block at a time made the sums vary
  // with the split, enough to move a 7-layer model's logits by 3e-6 between runs). Ranges
  // are taken one at a time (up to 8 for load balance) and each is streamed front to back.
  // No barrier inside: a barrier between an "all h" phase and a "down" phase stalls badly
  // when a thread loses its core on a loaded machine (0.6 vs 7.9 GB/s, 2 busy cores).
  const int64_t n_ranges = std::clamp<int64_t>(n_used / 64, 1, 8);
  thread_local std::vector<float> partial;
  partial.resize(static_cast<size_t>((n_ranges - 1) * n * d));
  float* P = partial.data();

  // Rows per block inside a range: one input (decode) runs a range in one pass, record
  // after record; several inputs in blocks of up to 64 rows (the GEMM tiles' unit). Neither
  // depends on the thread count: the same sums.
  // One input with an activation that is not zero by design (SiLU, GELU: every down part is
  // read) runs fused per neuron; with ReLU / FATReLU (most down parts skipped: the sparse
  // FFN on cache rows) the block passes stay: up (and gate) dots of a block of rows, then the
  // active rows' down parts. Same quiet machine, one thread, the sparse case of bench_kernels
  // (d 4096, 10% active): 15.1 GB/s with the passes, 9.4 fused; the dense SmolLM2 layer: 9.9
  // with the passes, 25.2 fused. The block formats' dots of one input go through the one-row
  // kernel, which prefetches the rows ahead (the up parts of records are short streams with
  // the other parts between them): 4-bit 5-6 -> 13-15 GB/s on one thread (quant_tiles.h).
  const bool fused = n == 1 && a.act != Activation::Relu && a.act != Activation::FatRelu;
  const int64_t rb = fused ? n_used : row_block(n_used, 1);
  // Column chunk of the down accumulation: one input tile takes whole down parts (each
  // record is then read front to back); several input tiles reuse a 256-column chunk of the
  // block's active down rows from L1 across tiles.
  const int64_t dc = n <= kTileT ? d : 256;
  const QAccumTable qacc{qk ? qk->accum : quant_kernels(DType::Q8_0).accum};
  const uint8_t* rows_b = static_cast<const uint8_t*>(a.rows);

  // Each block is fused: up (and gate) dots for the block's rows, bias + activation into H,
  // then the down parts of its active rows, added into po.
  auto process = [&](int64_t r0, int64_t r1, float* po) {
    thread_local std::vector<int32_t> active;  // rows of the block with any h != 0
    thread_local std::vector<float> S;         // codes sums
    if (codes) S.resize(static_cast<size_t>(kTileT * dc));
    if (fused) {  // decode: fused per neuron, each record read once front to back
      if (blocks) {
        QFfn1Args f;
        f.x = &qx;
        f.d = d;
        f.rows = rows_b;
        f.row_bytes = a.row_elems;
        f.sel = sel;
        f.row_ids = a.row_ids;
        f.up_off = a.up_off;
        f.gate_off = a.gate_off;
        f.down_off = a.down_off;
        f.down_rows = static_cast<const uint8_t*>(down_base);
        f.down_row_bytes = down_stride;
        f.act = a.act;
        f.act_param = a.act_param;
        f.up_bias = a.up_bias;
        f.down_scales = a.down_scales;
        f.H = H;
        f.out = po;
        f.S = S.data();
        qk->ffn1(f, r0, r1);
      } else {
        const Ffn1 f{a.x, d, a.rows, a.dtype, a.row_elems, sel, a.up_off, a.gate_off,
                     a.down_off, a.act, a.act_param, a.up_bias, H, po, down_base,
                     down_stride};
        kt.ffn1(f, r0, r1);
      }
      return;
    }
    if (blocks && n == 1) {  // one input: the one-row kernel, record after record
      qk->dot1(qx, 0, rows_b + a.up_off, a.row_elems, sel, r0, r1, H);
      if (gated) qk->dot1(qx, 0, rows_b + a.gate_off, a.row_elems, sel, r0, r1, G);
    } else if (blocks) {
      qdot_rows(*qk, qx, n, up, r0, r1, H, n_used);
      if (gated) qdot_rows(*qk, qx, n, gate, r0, r1, G, n_used);
    } else if (n == 1 && up_matrix) {  // float up rows of their own: the one-row kernel
      kt.dot1(a.x, d, up, r0, r1, H);
    } else {
      dot_rows(kt, a.x, n, d, up, r0, r1, H, n_used);
      if (gated) dot_rows(kt, a.x, n, d, gate, r0, r1, G, n_used);
    }
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = r0; j < r1; ++j) {
        float u = H[t * n_used + j];
        if (a.up_bias) u += a.up_bias[sel ? sel[j] : j];
        H[t * n_used + j] = gated ? activate(a.act, G[t * n_used + j], a.act_param) * u
                                  : activate(a.act, u, a.act_param);
      }
    for (int64_t c0 = 0; c0 < d; c0 += dc) {
      const int64_t c1 = std::min(d, c0 + dc);
      for (int64_t t = 0; t < n; t += kTileT) {
        const int64_t tn = std::min<int64_t>(kTileT, n - t);
        // active rows of the tile; in the codes layout one 32-neuron block at a time
        for (int64_t g0 = r0; g0 < r1;) {
          int64_t g1 = r1;
          if (codes) {
            const int32_t blk = neuron_of(g0) / 32;
            for (g1 = g0 + 1; g1 < r1 && neuron_of(g1) / 32 == blk;) ++g1;
          }
          active.clear();
          for (int64_t j = g0; j < g1; ++j) {
            bool any = false;
            for (int64_t q = 0; q < tn; ++q) any |= H[(t + q) * n_used + j] != 0.f;
            if (any) active.push_back(static_cast<int32_t>(j));
          }
          const int64_t na = static_cast<int64_t>(active.size());
          if (na && codes) {
            const int64_t blk = neuron_of(g0) / 32;
            const uint16_t* sc = a.down_scales + blk * qk->scale_rows * d;
            codes_block(*qk, H + t * n_used, n_used, tn, active.data(), na, down, sc, d, c0,
                        c1, S.data(), po + t * d, d);
          } else if (na && blocks) {
            accum_block_loop<uint8_t>(qacc, H + t * n_used, n_used, tn, active.data(), na,
                                      down, c0, c1, po + t * d, d);
          } else if (na) {
            kt.accum_block(H + t * n_used, n_used, tn, active.data(), na, down, c0, c1,
                           po + t * d, d);
          }
          g0 = g1;
        }
      }
    }
  };
  ComputePool::instance().run(n_ranges, nt, [&](int64_t r, int) {
    const int64_t lo = n_used * r / n_ranges, hi = n_used * (r + 1) / n_ranges;
    float* po = r == 0 ? a.out : P + (r - 1) * n * d;
    if (r > 0) std::fill(po, po + n * d, 0.f);
    for (int64_t r0 = lo; r0 < hi; r0 += rb) process(r0, std::min(hi, r0 + rb), po);
  });
  // Reduce the partial outputs in range order (n * d adds a range: 576 for decode).
  for (int64_t i = 1; i < n_ranges; ++i) {
    const float* p = P + (i - 1) * n * d;
    for (int64_t q = 0; q < n * d; ++q) a.out[q] += p[q];
  }
  // h back into the caller's row order.
  if (!in_order && args.act_out)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < n_used; ++i)
        args.act_out[t * n_used + order[i]] = H[t * n_used + i];
}

// ---- memory read reference ---------------------------------------------------------------

namespace {

#ifdef FI_HAVE_X86
// 256-bit loads: a core issues two a cycle, far above what DRAM gives it, so 512-bit ones
// read no faster (Zen 4 splits them in two anyway).
FI_AVX2 double avx2_sum(const float* p, int64_t count) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  double s = fi_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < count; ++i) s += p[i];
  return s;
}
#endif

double scalar_sum(const float* p, int64_t count) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += p[i + l];
  double s = 0;
  for (float v : acc) s += v;
  for (; i < count; ++i) s += p[i];
  return s;
}

}  // namespace

double stream_sum(const float* p, int64_t count, int threads) {
  if (count <= 0) return 0.0;
  double (*sum)(const float*, int64_t) = &scalar_sum;
#ifdef FI_HAVE_X86
  if (kernel_isa() >= Isa::Avx2) sum = &avx2_sum;
#endif
  const int64_t chunk = 64 << 10;  // floats: 256 KiB
  const int64_t n_chunks = (count + chunk - 1) / chunk;
  const int nt = resolve_threads(threads, double(count));
  std::vector<double> part(static_cast<size_t>(n_chunks));
  ComputePool::instance().run(n_chunks, nt, [&](int64_t c, int) {
    const int64_t b = c * chunk;
    part[c] = sum(p + b, std::min(chunk, count - b));
  });
  double s = 0;
  for (double v : part) s += v;
  return s;
}

// ---- block formats: whole arrays ------------------------------------------------------

void quantize_rows(const float* x, int64_t n, int64_t len, int64_t ldx, DType dt, uint8_t* out,
                   int64_t ldo, int threads) {
  const QuantKernels& qk = quant_kernels(dt);
  const int nt = resolve_threads(threads, double(n) * double(len) * 4);
  (void)nt;  // unused without OpenMP
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) qk.quantize_row(x + i * ldx, len, out + i * ldo);
}

void dequantize_rows(const uint8_t* rows, int64_t n, int64_t len, int64_t ldr, DType dt,
                     float* out, int64_t ldo, int threads) {
  const QuantKernels& qk = quant_kernels(dt);
  const int nt = resolve_threads(threads, double(n) * double(len));
  (void)nt;  // unused without OpenMP
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) qk.dequantize_row(rows + i * ldr, len, out + i * ldo);
}

// ---- conversion -----------------------------------------------------------------------

void to_float32(const void* src, DType dt, int64_t count, float* dst, int threads) {
  const KernelTable& kt = table();
  const int nt = resolve_threads(threads, double(count) / 4);
  (void)nt;  // unused without OpenMP
  const size_t eb = dtype_bytes(dt);
#pragma omp parallel num_threads(nt)
  {
    int64_t b, e;
    split_range(count, thread_count(), thread_id(), 64, &b, &e);
    if (e > b) kt.to_f32(static_cast<const char*>(src) + b * eb, dt, e - b, dst + b);
  }
}

void from_float32(const float* src, int64_t count, DType dt, void* dst, int threads) {
  const KernelTable& kt = table();
  const int nt = resolve_threads(threads, double(count) / 4);
  (void)nt;  // unused without OpenMP
  const size_t eb = dtype_bytes(dt);
#pragma omp parallel num_threads(nt)
  {
    int64_t b, e;
    split_range(count, thread_count(), thread_id(), 64, &b, &e);
    if (e > b) kt.from_f32(src + b, e - b, dt, static_cast<char*>(dst) + b * eb);
  }
}

}  // namespace flashinfer

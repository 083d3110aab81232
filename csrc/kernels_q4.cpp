// kernels_q4.cpp: 4-bit block quantization and the contribution-estimate kernel (see the
// header for the block layout).
//
// Layout of this file:
//   1. quantization (scalar: it runs on evicted rows and at sketch-building time, not per
//      score)
//   2. x -> 8-bit blocks, and the Q4 x Q8 block dot product (scalar and AVX2)
//   3. q4_scores: the driver, threaded over records
#include "kernels_q4.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "half.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FI_HAVE_X86 1
#define FI_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace flashinfer {
namespace {

// =======================================================================================
// 1. Quantization
// =======================================================================================

// n elements of dtype dt -> float32 (the storage types are few: branch once per block)
void load_block(const void* src, DType dt, int64_t i0, int64_t n, float* v) {
  if (dt == DType::F32) {
    const float* s = static_cast<const float*>(src) + i0;
    for (int64_t i = 0; i < n; ++i) v[i] = s[i];
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src) + i0;
    if (dt == DType::F16)
      for (int64_t i = 0; i < n; ++i) v[i] = half_to_float(s[i]);
    else
      for (int64_t i = 0; i < n; ++i) v[i] = bf16_to_float(s[i]);
  }
  for (int64_t i = n; i < kQ4Block; ++i) v[i] = 0.f;
}

// One part of `len` elements (dtype dt, starting at src) -> q4_blocks(len) blocks at dst.
void quantize_part(const void* src, DType dt, int64_t len, uint8_t* dst) {
  float v[kQ4Block];
  for (int64_t b = 0; b < q4_blocks(len); ++b) {
    const int64_t i0 = b * kQ4Block, n = std::min<int64_t>(kQ4Block, len - i0);
    load_block(src, dt, i0, n, v);
    float amax = 0.f;
    for (int64_t i = 0; i < kQ4Block; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / 7.f;
    const float inv = d > 0.f ? 1.f / d : 0.f;
    uint8_t* blk = dst + b * kQ4BlockBytes;
    const uint16_t dh = float_to_half(d);
    std::memcpy(blk, &dh, 2);
    for (int i = 0; i < 16; ++i) {
      // |v * inv| <= 7: v * inv + 8.5 lies in [1.5, 15.5], so truncating rounds half up to
      // q in [1, 15] (8 is zero) without a libm call
      const int lo = std::clamp(static_cast<int>(v[i] * inv + 8.5f), 1, 15);
      const int hi = std::clamp(static_cast<int>(v[i + 16] * inv + 8.5f), 1, 15);
      blk[2 + i] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

#ifdef FI_HAVE_X86
// 8 storage elements -> 8 floats (F16C for halves, a shift for bfloat16)
FI_AVX2 inline __m256 load8_any(const void* src, DType dt, int64_t i) {
  if (dt == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(src) + i);
  const __m128i h =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + i));
  if (dt == DType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// quantize_part with the same arithmetic (max|v| / 7, v * inv + 8.5 truncated, clamped to
// [1, 15]): identical bytes, ~8x fewer instructions for whole blocks.
FI_AVX2 void avx2_quantize_part(const void* src, DType dt, int64_t len, uint8_t* dst) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 half8 = _mm256_set1_ps(8.5f);
  const __m256i one = _mm256_set1_epi32(1), fifteen = _mm256_set1_epi32(15);
  const int64_t full = len / kQ4Block;
  for (int64_t b = 0; b < full; ++b) {
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = load8_any(src, dt, b * kQ4Block + 8 * k);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask),
                                                 _mm256_and_ps(v[1], absmask)),
                                   _mm256_max_ps(_mm256_and_ps(v[2], absmask),
                                                 _mm256_and_ps(v[3], absmask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float d = _mm_cvtss_f32(m4) / 7.f;
    const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
    __m256i q[4];
    for (int k = 0; k < 4; ++k)  // mul then add, as the scalar code rounds them
      q[k] = _mm256_min_epi32(_mm256_max_epi32(
          _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v[k], inv), half8)), one), fifteen);
    // byte i = q[i] | q[i + 16] << 4
    const __m256i c0 = _mm256_or_si256(q[0], _mm256_slli_epi32(q[2], 4));
    const __m256i c1 = _mm256_or_si256(q[1], _mm256_slli_epi32(q[3], 4));
    const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(c0, c1), 0xD8);
    const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(p16),
                                           _mm256_extracti128_si256(p16, 1));
    uint8_t* blk = dst + b * kQ4BlockBytes;
    const uint16_t dh = float_to_half(d);
    std::memcpy(blk, &dh, 2);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 2), bytes);
  }
  if (full * kQ4Block < len) {  // the zero-padded tail block
    const size_t eb = dtype_bytes(dt);
    quantize_part(static_cast<const char*>(src) + full * kQ4Block * eb, dt,
                  len - full * kQ4Block, dst + full * kQ4BlockBytes);
  }
}
#endif

using QuantizePartFn = void (*)(const void*, DType, int64_t, uint8_t*);

QuantizePartFn quantize_part_fn() {
#ifdef FI_HAVE_X86
  if (kernel_isa() == Isa::Avx2) return &avx2_quantize_part;
#endif
  return &quantize_part;
}

// =======================================================================================
// 2. Block dot products: sum_b d4_b * dx_b * sum_i (q_i - 8) * xq_i
// =======================================================================================

// x rows -> int8 blocks (xq: n_tok x nb*32) and their scales (dx: n_tok x nb).
void quantize_x(const float* x, int64_t n_tok, int64_t len, int8_t* xq, float* dx) {
  const int64_t nb = q4_blocks(len);
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i0 = b * kQ4Block, n = std::min<int64_t>(kQ4Block, len - i0);
      const float* xs = x + t * len + i0;
      float amax = 0.f;
      for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xs[i]));
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = xq + (t * nb + b) * kQ4Block;
      // |xs * inv| <= 127: shift to [0.5, 254.5] and truncate (round half up, no libm call)
      for (int64_t i = 0; i < kQ4Block; ++i)
        q[i] = i < n ? static_cast<int8_t>(static_cast<int>(xs[i] * inv + 127.5f) - 127) : 0;
      dx[t * nb + b] = d;
    }
}

float scalar_dot_q4(const uint8_t* part, const int8_t* xq, const float* dx, int64_t nb) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = part + b * kQ4BlockBytes;
    uint16_t dh;
    std::memcpy(&dh, blk, 2);
    const int8_t* y = xq + b * kQ4Block;
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) {
      s += (static_cast<int>(blk[2 + i] & 0xF) - 8) * y[i];
      s += (static_cast<int>(blk[2 + i] >> 4) - 8) * y[i + 16];
    }
    acc += half_to_float(dh) * dx[b] * static_cast<float>(s);
  }
  return acc;
}

#ifdef FI_HAVE_X86
FI_AVX2 float avx2_dot_q4(const uint8_t* part, const int8_t* xq, const float* dx, int64_t nb) {
  const __m256i low = _mm256_set1_epi8(0xF);
  const __m256i eight = _mm256_set1_epi8(8);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = part + b * kQ4BlockBytes;
    uint16_t dh;
    std::memcpy(&dh, blk, 2);
    const float d = _cvtsh_ss(dh) * dx[b];
    // 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0..15), then high (16..31)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    __m256i q = _mm256_insertf128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1);
    q = _mm256_sub_epi8(_mm256_and_si256(q, low), eight);  // -7..7
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kQ4Block));
    // maddubs wants one unsigned operand: |q| times y carrying q's sign (<= 2 * 8 * 127 per pair)
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
    const __m256i p32 = _mm256_madd_epi16(p16, ones);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p32), acc);
  }
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#endif

using DotQ4Fn = float (*)(const uint8_t*, const int8_t*, const float*, int64_t);

DotQ4Fn dot_q4_fn() {
#ifdef FI_HAVE_X86
  if (kernel_isa() == Isa::Avx2) return &avx2_dot_q4;
#endif
  return &scalar_dot_q4;
}

}  // namespace

// =======================================================================================
// 3. Drivers
// =======================================================================================

void quantize_q4_parts(const void* src, DType dt, int64_t src_ld, const int64_t* src_rows,
                       int64_t n, const int64_t* part_off, int n_parts, int64_t len,
                       uint8_t* dst, int64_t dst_ld, const int64_t* dst_rows, int threads) {
  const size_t eb = dtype_bytes(dt);
  const QuantizePartFn quant = quantize_part_fn();
  // The runtime quantizes a few hundred evicted rows per layer (~50 us on one core): a
  // fork/join costs more than that on a busy machine, so threads only for whole files.
  const int nt = n < 4096 ? 1 : resolve_threads(threads, double(n) * double(n_parts) * double(len));
  (void)nt;  // unused without OpenMP
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) {
    const char* row = static_cast<const char*>(src) + src_rows[i] * src_ld * eb;
    uint8_t* rec = dst + dst_rows[i] * dst_ld;
    for (int p = 0; p < n_parts; ++p)
      quant(row + part_off[p] * eb, dt, len, rec + p * q4_part_bytes(len));
  }
}

void dequantize_q4_record(const uint8_t* rec, int n_parts, int64_t len, float* out) {
  for (int p = 0; p < n_parts; ++p)
    for (int64_t b = 0; b < q4_blocks(len); ++b) {
      const uint8_t* blk = rec + p * q4_part_bytes(len) + b * kQ4BlockBytes;
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const float d = half_to_float(dh);
      for (int64_t i = 0; i < kQ4Block; ++i) {
        const int64_t e = b * kQ4Block + i;
        if (e >= len) break;
        const int q = i < 16 ? (blk[2 + i] & 0xF) : (blk[2 + i - 16] >> 4);
        out[p * len + e] = static_cast<float>(q - 8) * d;
      }
    }
}

void q4_scores(const float* x, int64_t n_tok, int64_t len, const uint8_t* sk, int64_t n_rec,
               int64_t ld, bool gated, Activation act, float act_param, const float* scale,
               float* out, int threads) {
  if (n_rec == 0) return;
  const int64_t nb = q4_blocks(len), pb = q4_part_bytes(len);
  // x in 8 bits: reused by every record (n_tok * nb * 32 bytes; a few KiB for decode)
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> dx;
  xq.resize(static_cast<size_t>(n_tok * nb * kQ4Block));
  dx.resize(static_cast<size_t>(n_tok * nb));
  quantize_x(x, n_tok, len, xq.data(), dx.data());
  const int8_t* xqp = xq.data();
  const float* dxp = dx.data();
  const DotQ4Fn dot = dot_q4_fn();
  // int8 dots run ~20 multiply-adds per ns on one core: a decode step's scores (~1M) take
  // 60 us, less than waking a second thread on a loaded machine (measured 0.06 vs 0.11 ms
  // for 900 SmolLM2 records); prefill chunks are worth splitting.
  const double work = double(n_rec) * double(n_tok) * double(len) * (gated ? 2 : 1);
  const int nt = work < 16e6 ? 1 : resolve_threads(threads, work);
  (void)nt;  // unused without OpenMP
#pragma omp parallel for schedule(dynamic, 64) num_threads(nt)
  for (int64_t j = 0; j < n_rec; ++j) {
    const uint8_t* rec = sk + j * ld;
    float best = 0.f;
    for (int64_t t = 0; t < n_tok; ++t) {
      const int8_t* xt = xqp + t * nb * kQ4Block;
      const float* dt = dxp + t * nb;
      const float u = dot(rec, xt, dt, nb);
      const float h = gated ? activate(act, dot(rec + pb, xt, dt, nb), act_param) * u
                            : activate(act, u, act_param);
      best = std::max(best, std::fabs(h));
    }
    out[j] = scale ? best * scale[j] : best;
  }
}

}  // namespace flashinfer

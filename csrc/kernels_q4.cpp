// kernels_q4.cpp: the 4-bit formats q4_0 and q4_1, the sketch quantizer, and the
// contribution-estimate kernel (see the header for the block layouts).
//
// Layout of this file:
//   1. sketch quantization (scalar and AVX2, identical bytes: it runs on evicted rows and at
//      sketch-building time, not per score)
//   2. q4_0 and q4_1: traits for the shared tiles (quant_tiles.h), llama.cpp's reference
//      quantizers, the kernel tables per instruction set
//   3. q4_scores: the driver, threaded over records, on the q4_0 dot tiles
#include "kernels_q4.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "half.h"
#include "quant_tiles.h"

#include "simd.h"

namespace flashinfer {
namespace {

// =======================================================================================
// 1. Sketch quantization
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
  if (kernel_isa() >= Isa::Avx2) return &avx2_quantize_part;
#endif
  return &quantize_part;
}

// A part in a block format: expanded to float32 first (scalar, so the same floats on every
// ISA), then quantized as a float32 part, so the bytes do not depend on the ISA either.
void quantize_block_part(const void* src, DType dt, int64_t len, uint8_t* dst,
                         QuantizePartFn quant) {
  thread_local std::vector<float> tmp;
  tmp.resize(static_cast<size_t>(len));
  quant_kernels(dt).dequantize_row(static_cast<const uint8_t*>(src), len, tmp.data());
  quant(tmp.data(), DType::F32, len, dst);
}

// =======================================================================================
// 2. q4_0 and q4_1
// =======================================================================================

// Shared by both: 16 bytes of nibbles, byte i = value i (low) | value i + 16 (high).
struct Q4Codes {
  static constexpr int kCodeBytes = 16;
  static int code(const uint8_t* qs, int i) { return i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4; }
#ifdef FI_HAVE_X86
  // the 32 codes as int16 in value order: low nibbles (values 0..15), then high (16..31)
  FI_AVX2 static void avx2_codes16(const uint8_t* qs, __m256i* lo, __m256i* hi) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i low = _mm_set1_epi8(0xF);
    *lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
    *hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
  }
  // values 8k..8k+7: k = 0, 1 low nibbles of bytes 0-7, 8-15; k = 2, 3 their high nibbles
  FI_AVX2 static __m256 avx2_codes8(const uint8_t* qs, int k) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * (k & 1)));
    if (k >= 2) b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0xF));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  }
#endif
};

struct FmtQ4_0 : Q4Codes {
  static constexpr DType kType = DType::Q4_0;
  static constexpr int kBytes = sizeof(BlockQ4_0);
  static constexpr int kCodesOff = offsetof(BlockQ4_0, qs);
  static constexpr int kCodeShift = -8;
  static constexpr bool kHasMin = false;
  static float d(const uint8_t* b) { return qtiles::f16(b); }
  static float m(const uint8_t*) { return 0.f; }
};

struct FmtQ4_1 : Q4Codes {
  static constexpr DType kType = DType::Q4_1;
  static constexpr int kBytes = sizeof(BlockQ4_1);
  static constexpr int kCodesOff = offsetof(BlockQ4_1, qs);
  static constexpr int kCodeShift = 0;
  static constexpr bool kHasMin = true;
  static float d(const uint8_t* b) { return qtiles::f16(b); }
  static float m(const uint8_t* b) { return qtiles::f16(b + 2); }
};

// One block of (up to) 32 values, zero padded.
inline void load_padded(const float* x, int64_t c, int64_t len, float* v) {
  const int64_t n = std::min<int64_t>(kQBlock, len - c);
  std::fill(v, v + kQBlock, 0.f);
  std::memcpy(v, x + c, sizeof(float) * n);
}

inline void pack_nibbles(const int* q, uint8_t* qs) {
  for (int i = 0; i < 16; ++i) qs[i] = static_cast<uint8_t>(q[i] | (q[i + 16] << 4));
}

// llama.cpp's quantize_row_q4_0_ref: w* the value of largest magnitude (the first such),
// d = w* / -8, q = min(15, trunc(w / d + 8.5)).
void quantize_row_q4_0(const float* x, int64_t len, uint8_t* row) {
  float v[kQBlock];
  int q[kQBlock];
  for (int64_t c = 0; c < len; c += kQBlock) {
    load_padded(x, c, len, v);
    float amax = 0.f, max = 0.f;
    for (float f : v)
      if (amax < std::fabs(f)) {
        amax = std::fabs(f);
        max = f;
      }
    const float d = max / -8.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    for (int i = 0; i < kQBlock; ++i)
      q[i] = std::min(15, static_cast<int>(static_cast<int8_t>(v[i] * id + 8.5f)));
    BlockQ4_0 blk;
    blk.d = float_to_half(d);
    pack_nibbles(q, blk.qs);
    std::memcpy(row + c / kQBlock * sizeof(BlockQ4_0), &blk, sizeof(blk));
  }
}

// llama.cpp's quantize_row_q4_1_ref: d = (max - min) / 15, m = min,
// q = min(15, trunc((w - min) / d + 0.5)).
void quantize_row_q4_1(const float* x, int64_t len, uint8_t* row) {
  float v[kQBlock];
  int q[kQBlock];
  for (int64_t c = 0; c < len; c += kQBlock) {
    load_padded(x, c, len, v);
    float mn = v[0], mx = v[0];
    for (float f : v) {
      mn = std::min(mn, f);
      mx = std::max(mx, f);
    }
    const float d = (mx - mn) / 15.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    for (int i = 0; i < kQBlock; ++i)
      q[i] = std::min(15, static_cast<int>(static_cast<int8_t>((v[i] - mn) * id + 0.5f)));
    BlockQ4_1 blk;
    blk.d = float_to_half(d);
    blk.m = float_to_half(mn);
    pack_nibbles(q, blk.qs);
    std::memcpy(row + c / kQBlock * sizeof(BlockQ4_1), &blk, sizeof(blk));
  }
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
  const bool blocks = is_quantized(dt);
  // The runtime quantizes a few hundred evicted rows per layer (~50 us on one core): a
  // fork/join costs more than that on a busy machine, so threads only for whole files.
  const int nt = n < 4096 ? 1 : resolve_threads(threads, double(n) * double(n_parts) * double(len));
  (void)nt;  // unused without OpenMP
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) {
    const char* row = static_cast<const char*>(src) + src_rows[i] * src_ld * eb;
    uint8_t* rec = dst + dst_rows[i] * dst_ld;
    for (int p = 0; p < n_parts; ++p) {
      uint8_t* out = rec + p * q4_part_bytes(len);
      if (blocks)
        quantize_block_part(row + part_off[p] * eb, dt, len, out, quant);
      else
        quant(row + part_off[p] * eb, dt, len, out);
    }
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
  // x in 16 bits: reused by every record (n_tok * nb * 64 bytes; a few KiB for decode)
  thread_local QuantizedX qx;
  quantize_x(x, n_tok, len, len, qx);
  const QuantizedX& xq = qx;
  // a record's parts are two q4_0 rows (the sketch uses the q4_0 block): one R = 2 tile
  const QuantKernels& qk = quant_kernels(DType::Q4_0);
  const int R = gated ? 2 : 1;
  // int8 dots run ~20 multiply-adds per ns on one core: a decode step's scores (~1M) take
  // 60 us, less than waking a second thread on a loaded machine (measured 0.06 vs 0.11 ms
  // for 900 SmolLM2 records); prefill chunks are worth splitting.
  const double work = double(n_rec) * double(n_tok) * double(len) * (gated ? 2 : 1);
  const int nt = work < 16e6 ? 1 : resolve_threads(threads, work);
  (void)nt;  // unused without OpenMP
#pragma omp parallel for schedule(dynamic, 64) num_threads(nt)
  for (int64_t j = 0; j < n_rec; ++j) {
    const uint8_t* parts[2] = {sk + j * ld, sk + j * ld + pb};
    float best = 0.f;
    for (int64_t t0 = 0; t0 < n_tok; t0 += kQTileT) {
      const int T = static_cast<int>(std::min<int64_t>(kQTileT, n_tok - t0));
      float ug[kQTileT * 2];  // [t][up, gate]
      qk.dot[T - 1][R - 1](xq, t0, parts, nb, ug, 2);
      for (int t = 0; t < T; ++t) {
        const float u = ug[2 * t];
        const float h = gated ? activate(act, ug[2 * t + 1], act_param) * u
                              : activate(act, u, act_param);
        best = std::max(best, std::fabs(h));
      }
    }
    out[j] = scale ? best * scale[j] : best;
  }
}

const QuantKernels& q4_0_kernels(Isa isa) {
  return qtiles::table_for<FmtQ4_0>(isa, &quantize_row_q4_0, &qtiles::dequantize_row<FmtQ4_0>);
}

const QuantKernels& q4_1_kernels(Isa isa) {
  return qtiles::table_for<FmtQ4_1>(isa, &quantize_row_q4_1, &qtiles::dequantize_row<FmtQ4_1>);
}

}  // namespace flashinfer

// kernels_q8.cpp: the q8_0 format (kernels_q8.h) and the 16-bit quantization of activations
// that every block format's dot products use (kernels_quant.h).
//
// Layout of this file:
//   1. activations -> QuantizedX (scalar and AVX2, the same rounding)
//   2. q8_0: traits for the shared tiles (quant_tiles.h), llama.cpp's reference quantizer,
//      the kernel table per instruction set
#include "kernels_q8.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "half.h"
#include "quant_tiles.h"

namespace flashinfer {
namespace {

// =======================================================================================
// 1. Activations: 16 bits per block of 32, d = max|x| / 32767, q = round(x / d) half away
//    from zero, s = d * sum(q)
// =======================================================================================

// round(v) half away from zero for |v| <= 32767: add 0.5 minus one ulp with v's sign and
// truncate (adding exactly 0.5 would round 0.49999997 up). Equal to roundf on that range.
constexpr float kHalfDown = 0.49999997f;

void scalar_quantize_block(const float* x, int64_t n, int16_t* q, float* d_out, float* s_out) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / kXLevels;
  const float id = d > 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
  for (int64_t i = 0; i < kQBlock; ++i) {
    const float v = i < n ? x[i] * id : 0.f;
    const int qi = static_cast<int>(v + std::copysign(kHalfDown, v));
    q[i] = static_cast<int16_t>(qi);
    sum += qi;
  }
  *d_out = d;
  *s_out = d * static_cast<float>(sum);
}

#ifdef FI_HAVE_X86
// Whole blocks with the scalar arithmetic (mul, then add of +-kHalfDown, truncate).
FI_AVX2 void avx2_quantize_block(const float* x, int16_t* q, float* d_out, float* s_out) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 signmask = _mm256_castsi256_ps(_mm256_set1_epi32(int(0x80000000u)));
  __m256 v[4];
  for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(x + 8 * k);
  __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                           _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float d = _mm_cvtss_f32(m4) / kXLevels;
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  const __m256 half = _mm256_set1_ps(kHalfDown);
  __m256i qi[4];
  for (int k = 0; k < 4; ++k) {
    const __m256 s = _mm256_mul_ps(v[k], id);
    const __m256 h = _mm256_or_ps(half, _mm256_and_ps(s, signmask));  // copysign
    qi[k] = _mm256_cvttps_epi32(_mm256_add_ps(s, h));
  }
  const __m256i s01 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s01), _mm256_extracti128_si256(s01, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  // 2 x 8 int32 -> 16 int16 in order (packs work per 128-bit lane: fix with a permute)
  for (int k = 0; k < 2; ++k) {
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[2 * k], qi[2 * k + 1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16 * k), p);
  }
  *d_out = d;
  *s_out = d * static_cast<float>(_mm_cvtsi128_si32(s4));
}
#endif

// =======================================================================================
// 2. q8_0
// =======================================================================================

struct FmtQ8_0 {
  static constexpr DType kType = DType::Q8_0;
  static constexpr int kBytes = sizeof(BlockQ8_0);
  static constexpr int kCodesOff = offsetof(BlockQ8_0, qs);
  static constexpr int kCodeBytes = 32;
  static constexpr int kCodeShift = 0;
  static constexpr bool kHasMin = false;
  static float d(const uint8_t* b) { return qtiles::f16(b); }
  static float m(const uint8_t*) { return 0.f; }
  static int code(const uint8_t* qs, int i) { return static_cast<int8_t>(qs[i]); }
#ifdef FI_HAVE_X86
  // the 32 codes as int16: values 0..15, then 16..31
  FI_AVX2 static void avx2_codes16(const uint8_t* qs, __m256i* lo, __m256i* hi) {
    *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16)));
  }
  FI_AVX2 static __m256 avx2_codes8(const uint8_t* qs, int k) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
#endif
};

// llama.cpp's quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x / d).
void quantize_row_q8_0(const float* x, int64_t len, uint8_t* row) {
  float v[kQBlock];
  for (int64_t c = 0; c < len; c += kQBlock) {
    const int64_t n = std::min<int64_t>(kQBlock, len - c);
    std::fill(v, v + kQBlock, 0.f);
    std::memcpy(v, x + c, sizeof(float) * n);
    float amax = 0.f;
    for (float f : v) amax = std::max(amax, std::fabs(f));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    BlockQ8_0 blk;
    blk.d = float_to_half(d);
    for (int i = 0; i < kQBlock; ++i) blk.qs[i] = static_cast<int8_t>(std::round(v[i] * id));
    std::memcpy(row + c / kQBlock * sizeof(BlockQ8_0), &blk, sizeof(blk));
  }
}

}  // namespace

void quantize_x(const float* x, int64_t n, int64_t len, int64_t ldx, QuantizedX& qx) {
  qx.n = n;
  qx.nb = q_blocks(len);
  qx.q.resize(static_cast<size_t>(n * qx.nb * kQBlock));
  qx.qp.resize(qx.q.size());
  qx.d.resize(static_cast<size_t>(n * qx.nb));
  qx.s.resize(static_cast<size_t>(n * qx.nb));
#ifdef FI_HAVE_X86
  const bool simd = kernel_isa() != Isa::Scalar;
#endif
  for (int64_t t = 0; t < n; ++t)
    for (int64_t b = 0; b < qx.nb; ++b) {
      const float* xs = x + t * ldx + b * kQBlock;
      int16_t* q = qx.q.data() + (t * qx.nb + b) * kQBlock;
      float* d = qx.d.data() + t * qx.nb + b;
      float* s = qx.s.data() + t * qx.nb + b;
      const int64_t m = std::min<int64_t>(kQBlock, len - b * kQBlock);
#ifdef FI_HAVE_X86
      if (simd && m == kQBlock) {
        avx2_quantize_block(xs, q, d, s);
        continue;
      }
#endif
      scalar_quantize_block(xs, m, q, d, s);
    }
  // the 4-bit VNNI kernels' order (kernels_quant.h)
  for (int64_t b = 0; b < n * qx.nb; ++b) {
    const int16_t* q = qx.q.data() + b * kQBlock;
    int16_t* qp = qx.qp.data() + b * kQBlock;
    for (int k = 0; k < 8; ++k) {
      qp[k] = q[2 * k];
      qp[8 + k] = q[16 + 2 * k];
      qp[16 + k] = q[2 * k + 1];
      qp[24 + k] = q[17 + 2 * k];
    }
  }
}

const QuantKernels& q8_0_kernels(Isa isa) {
  return qtiles::table_for<FmtQ8_0>(isa, &quantize_row_q8_0, &qtiles::dequantize_row<FmtQ8_0>);
}

}  // namespace flashinfer

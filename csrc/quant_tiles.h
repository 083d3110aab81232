// quant_tiles.h: the register tiles of the block formats, written once as templates over a
// format's traits and instantiated by each format's file (kernels_q8.cpp, kernels_q4.cpp).
// Included only by those files (they are compiled with -ffp-contract=off: the quantizers
// must round exactly as llama.cpp's reference does; the tiles use explicit FMAs).
//
// A format's traits (struct F) give:
//   kType, kBytes (block bytes), kCodesOff (offset of the 32 codes in a block), kCodeBytes
//   (bytes of 32 codes: 16 nibble bytes or 32 int8),
//   kCodeShift (q4_0: -8, else 0: the value is d * (code + kCodeShift) [+ m]), kHasMin (q4_1),
//   d(blk), m(blk), code(qs, i) scalar; avx2_codes16(qs, &lo, &hi) the 32 codes as int16 in
//   value order; avx2_codes8(qs, k) values 8k..8k+7 as floats.
// Sections: 1. scalar tiles  2. AVX2 tiles  3. AVX-512 VNNI dot tile  4. table builders.
#pragma once

#include <algorithm>
#include <cstring>

#include "half.h"
#include "kernels_quant.h"

#include "simd.h"

namespace flashinfer {
namespace qtiles {

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// The per-block offset per unit of code sum: value = d * code + e.
template <class F>
inline float block_e(const uint8_t* blk, float d) {
  if constexpr (F::kHasMin) return F::m(blk);
  return float(F::kCodeShift) * d;
}

// =======================================================================================
// 1. Scalar tiles (portable; also the reference the SIMD ones are tested against)
// =======================================================================================

template <class F, int T, int R>
void scalar_dot(const QuantizedX& x, int64_t t0, const uint8_t* const* rows, int64_t nb,
                float* out, int64_t ldo) {
  float acc[T][R] = {};
  for (int64_t b = 0; b < nb; ++b)
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows[r] + b * F::kBytes;
      const float dw = F::d(blk), ew = block_e<F>(blk, dw);
      const uint8_t* qs = blk + F::kCodesOff;
      for (int t = 0; t < T; ++t) {
        const int16_t* y = x.qrow(t0 + t) + b * kQBlock;
        int32_t p = 0;
        for (int i = 0; i < kQBlock; ++i) p += F::code(qs, i) * y[i];
        acc[t][r] += dw * x.drow(t0 + t)[b] * float(p) + ew * x.srow(t0 + t)[b];
      }
    }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) out[t * ldo + r] = acc[t][r];
}

// The one-row kernel (decode, kernels_quant.h's QDot1Fn) from a level's T = 1, R = 1 dot tile,
// with the row after next prefetched whole while this one is summed. Rows picked out of a
// neuron cache (idx), or records whose other parts lie between the rows (the sparse FFN's up
// parts), are short streams the hardware prefetchers do not follow: without it the sparse FFN
// on 4-bit cache rows read 5-6 GB/s on one thread, with it 10-11 (bench_kernels, d 4096, 10%
// active, the per-block kernel of the time).
constexpr int kPrefetchRows = 2;

// Prefetch row j + kPrefetchRows of a one-row loop over [j0, j1), row_len bytes; rows that
// are one contiguous stream (a resident matrix) as a stream (prefetch_stream, kernels.h).
__attribute__((always_inline)) inline void prefetch_row_ahead(
    const uint8_t* base, int64_t stride, const int32_t* idx, int64_t j0, int64_t j, int64_t j1,
    int64_t row_len) {
  if (!idx && stride == row_len) {
    prefetch_stream(base + j0 * stride, base + j * stride, base + j1 * stride, row_len);
    return;
  }
  if (j + kPrefetchRows >= j1) return;
  const int64_t jn = j + kPrefetchRows;
  prefetch_bytes(base + (idx ? idx[jn] : jn) * stride, row_len);
}

template <class F, QDotTileFn Tile>
void rows_dot1(const QuantizedX& x, int64_t t, const uint8_t* base, int64_t stride,
               const int32_t* idx, int64_t j0, int64_t j1, float* out) {
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = base + (idx ? idx[j] : j) * stride;
    prefetch_row_ahead(base, stride, idx, j0, j, j1, x.nb * F::kBytes);
    Tile(x, t, &row, x.nb, out + j, 1);
  }
}

// 32 values of a block (d * code + e) as floats.
template <class F>
inline void expand_block(const uint8_t* blk, float* w) {
  const float d = F::d(blk), e = block_e<F>(blk, d);
  for (int i = 0; i < kQBlock; ++i) w[i] = d * float(F::code(blk + F::kCodesOff, i)) + e;
}

template <class F, int T, int R>
void scalar_accum(const float* coef, const void* const* rv, int64_t c0, int64_t c1, float* out,
                  int64_t ldo) {
  float w[R][kQBlock];
  for (int64_t c = c0; c < c1; c += kQBlock) {
    const int64_t n = std::min<int64_t>(kQBlock, c1 - c);
    for (int r = 0; r < R; ++r)
      expand_block<F>(static_cast<const uint8_t*>(rv[r]) + c / kQBlock * F::kBytes, w[r]);
    for (int t = 0; t < T; ++t)
      for (int64_t i = 0; i < n; ++i) {
        float o = out[t * ldo + c + i];
        for (int r = 0; r < R; ++r) o += coef[t * R + r] * w[r][i];
        out[t * ldo + c + i] = o;
      }
  }
}

template <class F, int T, int R>
void scalar_codes(const float* coef, const uint8_t* const* codes, int64_t c0, int64_t c1,
                  float* S, int64_t lds) {
  for (int64_t c = c0; c < c1; c += kQBlock) {
    const int64_t n = std::min<int64_t>(kQBlock, c1 - c);
    for (int t = 0; t < T; ++t)
      for (int64_t i = 0; i < n; ++i) {
        float s = S[t * lds + c - c0 + i];
        for (int r = 0; r < R; ++r)
          s += coef[t * R + r] * float(F::code(codes[r] + c / kQBlock * F::kCodeBytes, int(i)));
        S[t * lds + c - c0 + i] = s;
      }
  }
}

template <class F>
void scalar_codes_finish(const float* S, int64_t lds, const float* hsum, int64_t nt,
                         const uint16_t* sc, int64_t d_model, int64_t c0, int64_t c1,
                         float* out, int64_t ldo) {
  for (int64_t c = c0; c < c1; ++c) {
    const float d = half_to_float(sc[c]);
    const float e = F::kHasMin ? half_to_float(sc[d_model + c]) : float(F::kCodeShift) * d;
    for (int64_t t = 0; t < nt; ++t)
      out[t * ldo + c] += d * S[t * lds + c - c0] + e * hsum[t];
  }
}

#ifdef FI_HAVE_X86
// =======================================================================================
// 2. AVX2 tiles
// =======================================================================================

// A block's fp16 scale (offset 0) and q4_1's min (offset 2) with one F16C instruction each
// (half_to_float's portable bit twiddling was a third of a decode block's instructions).
FI_AVX2 inline float f16c(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
template <class F>
FI_AVX2 inline float f16c_e(const uint8_t* blk, float d) {
  if constexpr (F::kHasMin) return f16c(blk + 2);
  return float(F::kCodeShift) * d;
}

// The dot tiles and the one-row kernels of the AVX2 and VNNI levels take the blocks in chunks
// of 8 (avx2_rows, vnni_rows). Per block only the integer dot: 8 lanes of partial sums (the
// unpacked codes times x's 16-bit values, pmaddwd pairs). The chunk's 8 such vectors are
// reduced to one vector of 8 block sums (a tree of horizontal adds, exact in int32; a sum can
// pass 2^24 and is rounded once to float), converted once and multiplied by the 8 blocks'
// d_w d_x in one FMA; the scales are read with scalar loads (the VNNI level's 4-bit formats:
// one word permute, vnni_scales8) and converted 8 at a time, and the
// offset term e_w s_x is summed in 8 lanes. Before, every block converted its own scales and
// its 8 lanes and broadcast one product. Measured (one thread; RESULTS.md section 13, "Rows
// read ahead"): q8_0 +5-17% and, under AVX2, every format +5-20%; under VNNI 4-bit rows in L2
// 7-22% slower (20-21 GB/s before, 16.5-19.5 now, SmolLM2's 18-block rows the most), yet
// faster where this code reads them from DRAM (the sparse and the fused FFN on cache rows:
// 13.6-14.5 against 12.2-12.4 GB/s for the per-block kernel with the same read-ahead).
// Resident 4-bit matrices are interleaved on both ISAs (kernels_x16.cpp). The tile and the one-row kernel of a level share the loop, so a token
// alone gets exactly the sums it gets in a GEMM (tested).

// Eight vectors p[0..8) of 8 int32 lanes -> one vector whose lane i is the sum of p[i]'s lanes.
FI_AVX2 inline __m256i fi_sum8x8(const __m256i* p) {
  const __m256i h01 = _mm256_hadd_epi32(p[0], p[1]), h23 = _mm256_hadd_epi32(p[2], p[3]);
  const __m256i h45 = _mm256_hadd_epi32(p[4], p[5]), h67 = _mm256_hadd_epi32(p[6], p[7]);
  // a: lanes 0-3 the sums of p0..p3's low 128-bit halves, lanes 4-7 of their high halves
  const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                          _mm256_permute2x128_si256(a, b, 0x31));
}

// The first n of 8 lanes set (a mask for the masked loads).
FI_AVX2 inline __m256i fi_lanes8(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// d_w of blocks [b0, b0 + n) of a row and e_w, the value per unit of code offset (q4_1: the
// min m; q4_0: -8 d_w; q8_0: 0); lanes >= n are 0. A block starts with fp16 d (q4_1: then
// fp16 m), so a 32-bit load at its start reads both (or d and two code bytes). Scalar loads
// built into one vector: a gather instruction measured no faster (and slower on SmolLM2's
// 18-block rows).
template <class F>
FI_AVX2 inline void fi_scales8(const uint8_t* row, int64_t b0, int n, __m256* dw, __m256* ew) {
  uint32_t w[8];
  const uint8_t* c = row + b0 * F::kBytes;
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    if (i < n) std::memcpy(&w[i], c + i * F::kBytes, 4);
    else w[i] = 0;
  }
  const __m256i v = _mm256_setr_epi32(int(w[0]), int(w[1]), int(w[2]), int(w[3]), int(w[4]),
                                      int(w[5]), int(w[6]), int(w[7]));
  // the low (d) and high (m) halves of the 8 words, each 8 halves in one 128-bit lane
  const __m256i pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                        0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const __m256i dm = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, pick), 0xD8);
  *dw = _mm256_cvtph_ps(_mm256_castsi256_si128(dm));
  if constexpr (F::kHasMin)
    *ew = _mm256_cvtph_ps(_mm256_extracti128_si256(dm, 1));
  else
    *ew = _mm256_mul_ps(_mm256_set1_ps(float(F::kCodeShift)), *dw);
}

// The chunk's scales for every (input, row), given each row's d_w and e_w (the level's
// fi_scales8 or vnni_scales8): acc += (sum of each block) * d_w d_x, and accm += e_w s_x
// (q4_0, q4_1).
template <class F, int T, int R>
FI_AVX2 inline void fi_scale_chunk(const QuantizedX& x, int64_t t0, int64_t b0, int n,
                                   const __m256i (&p)[T][R][8], const __m256 (&dw)[R],
                                   const __m256 (&ew)[R], __m256 (&acc)[T][R],
                                   __m256 (&accm)[T][R]) {
  const __m256i lanes = fi_lanes8(n);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const __m256 dx = _mm256_maskload_ps(x.drow(t0 + t) + b0, lanes);
      acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fi_sum8x8(p[t][r])),
                                  _mm256_mul_ps(dw[r], dx), acc[t][r]);
      if constexpr (F::kHasMin || F::kCodeShift != 0)
        accm[t][r] = _mm256_fmadd_ps(ew[r], _mm256_maskload_ps(x.srow(t0 + t) + b0, lanes),
                                     accm[t][r]);
    }
  }
}

template <class F, int T, int R>
FI_AVX2 inline void fi_rows_out(const __m256 (&acc)[T][R], const __m256 (&accm)[T][R],
                                float* out, int64_t ldo) {
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r)
      out[t * ldo + r] = fi_hsum8(F::kHasMin || F::kCodeShift != 0
                                      ? _mm256_add_ps(acc[t][r], accm[t][r]) : acc[t][r]);
}

// The AVX2 level: a block's codes as int16 in value order (x.qrow), two pmaddwd and an add.
template <class F, int T, int R>
FI_AVX2 __attribute__((always_inline)) inline void avx2_rows(const QuantizedX& x, int64_t t0, const uint8_t* const* rows, int64_t nb,
                       float* out, int64_t ldo) {
  __m256 acc[T][R], accm[T][R];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[t][r] = accm[t][r] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, nb - b0));
    __m256i p[T][R][8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) p[t][r][i] = _mm256_setzero_si256();
      if (i >= n) continue;
      const int64_t b = b0 + i;
      __m256i wlo[R], whi[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        F::avx2_codes16(rows[r] + b * F::kBytes + F::kCodesOff, &wlo[r], &whi[r]);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const int16_t* yp = x.qrow(t0 + t) + b * kQBlock;
        const __m256i ylo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(yp));
        const __m256i yhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(yp + 16));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          p[t][r][i] = _mm256_add_epi32(_mm256_madd_epi16(wlo[r], ylo),
                                        _mm256_madd_epi16(whi[r], yhi));
      }
    }
    __m256 dw[R], ew[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) fi_scales8<F>(rows[r], b0, n, &dw[r], &ew[r]);
    fi_scale_chunk<F, T, R>(x, t0, b0, n, p, dw, ew, acc, accm);
  }
  fi_rows_out<F, T, R>(acc, accm, out, ldo);
}

template <class F, int T, int R>
FI_AVX2 void avx2_dot(const QuantizedX& x, int64_t t0, const uint8_t* const* rows, int64_t nb,
                      float* out, int64_t ldo) {
  avx2_rows<F, T, R>(x, t0, rows, nb, out, ldo);
}

// The one-row kernel, the T = R = 1 loop inlined (a call a row cost ~10% on rows in L2).
template <class F>
FI_AVX2 void avx2_dot1(const QuantizedX& x, int64_t t, const uint8_t* base, int64_t stride,
                       const int32_t* idx, int64_t j0, int64_t j1, float* out) {
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = base + (idx ? idx[j] : j) * stride;
    prefetch_row_ahead(base, stride, idx, j0, j, j1, x.nb * F::kBytes);
    avx2_rows<F, 1, 1>(x, t, &row, x.nb, out + j, 1);
  }
}

// out[t, c] += sum_r coef[t, r] * (d_r * code + e_r) block by block: for each 8 values the
// R expanded weight vectors are reused by all T inputs, each out vector loaded once.
template <class F, int T, int R>
FI_AVX2 void avx2_accum(const float* coef, const void* const* rv, int64_t c0, int64_t c1,
                         float* out, int64_t ldo) {
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = static_cast<const uint8_t*>(rv[r]);
  __m256 cb[T][R];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) cb[t][r] = _mm256_set1_ps(coef[t * R + r]);
  int64_t c = c0;
  for (; c + kQBlock <= c1; c += kQBlock) {
    __m256 d[R], e[R];
    const uint8_t* qs[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows[r] + c / kQBlock * F::kBytes;
      const float dr = f16c(blk);
      d[r] = _mm256_set1_ps(dr);
      e[r] = _mm256_set1_ps(f16c_e<F>(blk, dr));
      qs[r] = blk + F::kCodesOff;
    }
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      __m256 wf[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wf[r] = _mm256_fmadd_ps(d[r], F::avx2_codes8(qs[r], k), e[r]);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        float* o = out + t * ldo + c + 8 * k;
        __m256 v = _mm256_loadu_ps(o);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) v = _mm256_fmadd_ps(cb[t][r], wf[r], v);
        _mm256_storeu_ps(o, v);
      }
    }
  }
  if (c < c1) scalar_accum<F, T, R>(coef, rv, c, c1, out, ldo);  // the partial last block
}

template <class F, int T, int R>
FI_AVX2 void avx2_codes(const float* coef, const uint8_t* const* codes, int64_t c0, int64_t c1,
                         float* S, int64_t lds) {
  __m256 cb[T][R];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) cb[t][r] = _mm256_set1_ps(coef[t * R + r]);
  int64_t c = c0;
  for (; c + kQBlock <= c1; c += kQBlock) {
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      __m256 q[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) q[r] = F::avx2_codes8(codes[r] + c / kQBlock * F::kCodeBytes, k);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        float* s = S + t * lds + c - c0 + 8 * k;
        __m256 v = _mm256_loadu_ps(s);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) v = _mm256_fmadd_ps(cb[t][r], q[r], v);
        _mm256_storeu_ps(s, v);
      }
    }
  }
  if (c < c1) {  // the partial last block, S's offset kept
    for (int t = 0; t < T; ++t)
      for (int64_t i = c; i < c1; ++i) {
        float s = S[t * lds + i - c0];
        for (int r = 0; r < R; ++r)
          s += coef[t * R + r] *
               float(F::code(codes[r] + c / kQBlock * F::kCodeBytes, int(i - c)));
        S[t * lds + i - c0] = s;
      }
  }
}

template <class F>
FI_AVX2 void avx2_codes_finish(const float* S, int64_t lds, const float* hsum, int64_t nt,
                                const uint16_t* sc, int64_t d_model, int64_t c0, int64_t c1,
                                float* out, int64_t ldo) {
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + c)));
    __m256 e;
    if constexpr (F::kHasMin)
      e = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + d_model + c)));
    else
      e = _mm256_mul_ps(_mm256_set1_ps(float(F::kCodeShift)), d);
    for (int64_t t = 0; t < nt; ++t) {
      float* o = out + t * ldo + c;
      __m256 v = _mm256_fmadd_ps(d, _mm256_loadu_ps(S + t * lds + c - c0), _mm256_loadu_ps(o));
      _mm256_storeu_ps(o, _mm256_fmadd_ps(e, _mm256_set1_ps(hsum[t]), v));
    }
  }
  if (c < c1) scalar_codes_finish<F>(S + (c - c0), lds, hsum, nt, sc, d_model, c, c1, out, ldo);
}

// =======================================================================================
// 3. AVX-512 VNNI: vpdpwssd accumulates the pairs' products straight into int32 (two per
//    block instead of two pmaddwd and an add; 256-bit vectors: Zen 4 splits 512-bit ones)
// =======================================================================================

// A block's 32 codes as int16 in the order this level's x rows use: the 4-bit formats
// unpack their 16 bytes as 8 words with two variable shifts and two ands (no widening),
// giving values 0, 2, .., 30 and 1, 3, .., 31 in QuantizedX::qp's order; q8_0 in value
// order. Both the tiles and the one-row kernel use it, so a token alone gets exactly the
// sums it gets among others.
template <class F>
FI_AVX512VNNI inline void vnni_codes16(const uint8_t* qs, __m256i* c1, __m256i* c2) {
  if constexpr (F::kCodeBytes == 16) {
    const __m256i sh1 = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
    const __m256i sh2 = _mm256_setr_epi16(8, 8, 8, 8, 8, 8, 8, 8, 12, 12, 12, 12, 12, 12, 12, 12);
    const __m256i mask = _mm256_set1_epi16(0xF);
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    *c1 = _mm256_and_si256(_mm256_srlv_epi16(raw, sh1), mask);
    *c2 = _mm256_and_si256(_mm256_srlv_epi16(raw, sh2), mask);
  } else {
    F::avx2_codes16(qs, c1, c2);
  }
}
template <class F>
inline const int16_t* vnni_xrow(const QuantizedX& x, int64_t t) {
  return F::kCodeBytes == 16 ? x.qprow(t) : x.qrow(t);
}

// fi_scales8 at this level: the blocks' fields gathered by word permutes of the chunk's
// bytes (a block is 18, 20 or 34 bytes, an even number: its d, and q4_1's m, are 16-bit words
// at word W i, W i + 1) instead of 8 scalar loads built into a vector: the same values, so the
// same sums. 4-bit: one permute of the first 128 bytes, q4_1's block 7 (past byte 128)
// inserted alone; q8_0: two permutes of 128 bytes each. The last chunk of a row (n < 8) loads
// only its n blocks' bytes (masked: nothing past the row is touched) and leaves lanes >= n
// zero.
// Measured (one thread, a standalone loop on 4096-wide q4_0 rows): 20.3 -> 25.6 GB/s from
// DRAM, 21 -> 27 GB/s in L2.
// The bytes [off, off + 64) of a chunk whose first v bytes are the row's: a plain load when
// they all are, else masked (zeros past the row; nothing past it is touched).
FI_AVX512VNNI inline __m512i fi_chunk64(const uint8_t* c, int off, int v) {
  const int k = v - off;
  if (k >= 64) return _mm512_loadu_si512(c + off);
  if (k <= 0) return _mm512_setzero_si512();
  return _mm512_maskz_loadu_epi8((__mmask64(1) << k) - 1, c + off);
}

template <class F>
FI_AVX512VNNI inline void vnni_scales8(const uint8_t* row, int64_t b0, int n, __m256* dw,
                                       __m256* ew) {
  if constexpr (F::kCodeBytes != 16) {
    // q8_0 (34-byte blocks, d at word 17 i): blocks 0-3 from the chunk's bytes [0, 128),
    // blocks 4-7 from [136, 264), one permute each, their lanes disjoint
    static_assert(F::kBytes == 34 && !F::kHasMin && F::kCodeShift == 0, "q8_0's blocks");
    const uint8_t* c = row + b0 * F::kBytes;
    const int v = n * F::kBytes;
    const __m512i idx = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 51, 34, 17, 0, 51, 34, 17, 0);
    const __m512i lo = _mm512_maskz_permutex2var_epi16(0x0F, fi_chunk64(c, 0, v), idx,
                                                       fi_chunk64(c, 64, v));
    const __m512i hi = _mm512_maskz_permutex2var_epi16(0xF0, fi_chunk64(c, 136, v), idx,
                                                       fi_chunk64(c, 200, v));
    *dw = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_or_si512(lo, hi)));
    *ew = _mm256_setzero_ps();  // q8_0 has no offset term
  } else {
    constexpr int W = F::kBytes / 2;
    constexpr int kFields = F::kHasMin ? 4 : 2;  // d (and m): bytes at a block's start
    // blocks whose fields lie in the chunk's first 128 bytes (q4_0: 8, q4_1: 7)
    constexpr int kIn = F::kBytes * 7 + kFields <= 128 ? 8 : 7;
    static_assert(F::kBytes % 2 == 0 && F::kBytes * (kIn - 1) + kFields <= 128,
                  "the 4-bit blocks' fields are words in the chunk's first 128 bytes");
    const uint8_t* c = row + b0 * F::kBytes;
    const int v = n * F::kBytes;  // the row's bytes from c (8 blocks: at least 144)
    const __m512i lo = fi_chunk64(c, 0, v), hi = fi_chunk64(c, 64, v);
    // word lane i < 8: block i's d; lane 8 + i: its m (q4_1)
    const __m512i idx = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        7 * W + 1, 6 * W + 1, 5 * W + 1, 4 * W + 1, 3 * W + 1, 2 * W + 1, W + 1, 1,
        7 * W, 6 * W, 5 * W, 4 * W, 3 * W, 2 * W, W, 0);
    constexpr __mmask32 keep = !F::kHasMin ? 0xFF  // d only
                               : kIn == 8 ? 0xFFFF : 0xFFFF & ~((1u << 7) | (1u << 15));
    const __m512i g = _mm512_maskz_permutex2var_epi16(keep, lo, idx, hi);
    __m128i d = _mm512_castsi512_si128(g);
    __m128i m = _mm512_extracti32x4_epi32(g, 1);
    if constexpr (kIn < 8) {
      if (n == 8) {
        uint32_t w7;
        std::memcpy(&w7, c + 7 * F::kBytes, 4);
        d = _mm_insert_epi16(d, int(w7 & 0xFFFF), 7);
        m = _mm_insert_epi16(m, int(w7 >> 16), 7);
      }
    }
    *dw = _mm256_cvtph_ps(d);
    if constexpr (F::kHasMin)
      *ew = _mm256_cvtph_ps(m);
    else
      *ew = _mm256_mul_ps(_mm256_set1_ps(float(F::kCodeShift)), *dw);
  }
}

// The VNNI level: a block's codes in QuantizedX::qp's order (4-bit) and vpdpwssd.
template <class F, int T, int R>
FI_AVX512VNNI __attribute__((always_inline)) inline void vnni_rows(const QuantizedX& x, int64_t t0, const uint8_t* const* rows,
                                    int64_t nb, float* out, int64_t ldo) {
  __m256 acc[T][R], accm[T][R];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[t][r] = accm[t][r] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, nb - b0));
    __m256i p[T][R][8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) p[t][r][i] = _mm256_setzero_si256();
      if (i >= n) continue;
      const int64_t b = b0 + i;
      __m256i wlo[R], whi[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        vnni_codes16<F>(rows[r] + b * F::kBytes + F::kCodesOff, &wlo[r], &whi[r]);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const int16_t* yp = vnni_xrow<F>(x, t0 + t) + b * kQBlock;
        const __m256i ylo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(yp));
        const __m256i yhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(yp + 16));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          p[t][r][i] = _mm256_dpwssd_epi32(_mm256_madd_epi16(wlo[r], ylo), whi[r], yhi);
      }
    }
    __m256 dw[R], ew[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) vnni_scales8<F>(rows[r], b0, n, &dw[r], &ew[r]);
    fi_scale_chunk<F, T, R>(x, t0, b0, n, p, dw, ew, acc, accm);
  }
  fi_rows_out<F, T, R>(acc, accm, out, ldo);
}

template <class F, int T, int R>
FI_AVX512VNNI void vnni_dot(const QuantizedX& x, int64_t t0, const uint8_t* const* rows, int64_t nb,
                            float* out, int64_t ldo) {
  vnni_rows<F, T, R>(x, t0, rows, nb, out, ldo);
}

template <class F>
FI_AVX512VNNI void vnni_dot1(const QuantizedX& x, int64_t t, const uint8_t* base,
                             int64_t stride, const int32_t* idx, int64_t j0, int64_t j1,
                             float* out) {
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = base + (idx ? idx[j] : j) * stride;
    prefetch_row_ahead(base, stride, idx, j0, j, j1, x.nb * F::kBytes);
    vnni_rows<F, 1, 1>(x, t, &row, x.nb, out + j, 1);
  }
}

// The accumulate and codes tiles for one input (decode) at this level. A block's 32 codes
// are widened once, 16 bytes to 16 dwords in one zmm (a 4-bit byte's low nibble is value i,
// its high one value i + 16: an and and a shift give both halves; q8_0: two sign
// extensions), converted, and multiplied into out with h folded into the scales:
// out += sum_r (h_r d_r) q_r + sum_r h_r e_r, one FMA per 16 values and row, the offsets
// added once per block. The AVX2 tiles expand every 8 values to d q + e first, then
// multiply by h: about twice the instructions.
template <class F>
FI_AVX512VNNI inline void vnni_codes32(const uint8_t* qs, __m512* lo, __m512* hi) {
  if constexpr (F::kCodeBytes == 16) {
    const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(z, _mm512_set1_epi32(0xF)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(z, 4));
  } else {
    *lo = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))));
    *hi = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16))));
  }
}

template <class F, int R>
FI_AVX512VNNI void vnni_accum1(const float* coef, const void* const* rv, int64_t c0, int64_t c1,
                               float* out, int64_t ldo) {
  const uint8_t* rows[R];
  __m128 cv[R];  // (h, the factor of lane 1): (d, m) * (h, h) = (h d, h m) for q4_1;
                 // (d, d) * (h, -8 h) for q4_0; (d, d) * (h, 0) for q8_0
  for (int r = 0; r < R; ++r) {
    rows[r] = static_cast<const uint8_t*>(rv[r]);
    const float e = F::kHasMin ? coef[r] : float(F::kCodeShift) * coef[r];
    cv[r] = _mm_setr_ps(coef[r], e, 0.f, 0.f);
  }
  int64_t c = c0;
  // block pointers advance with c (c0 is a multiple of 32: no division in the loop)
  for (int r = 0; r < R; ++r) rows[r] += c0 / kQBlock * F::kBytes;
  for (; c + kQBlock <= c1; c += kQBlock) {
    __m512 o0 = _mm512_loadu_ps(out + c), o1 = _mm512_loadu_ps(out + c + 16);
    __m128 esum = _mm_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows[r];
      rows[r] += F::kBytes;
      uint32_t dm;
      if constexpr (F::kHasMin) {
        std::memcpy(&dm, blk, 4);
      } else {
        uint16_t d16;
        std::memcpy(&d16, blk, 2);
        dm = uint32_t(d16) * 0x10001u;
      }
      const __m128 f = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(int(dm))), cv[r]);
      __m512 lo, hi;
      vnni_codes32<F>(blk + F::kCodesOff, &lo, &hi);
      const __m512 hd = _mm512_broadcastss_ps(f);
      o0 = _mm512_fmadd_ps(lo, hd, o0);
      o1 = _mm512_fmadd_ps(hi, hd, o1);
      esum = _mm_add_ps(esum, f);
    }
    if constexpr (F::kHasMin || F::kCodeShift != 0) {
      const __m512 e = _mm512_broadcastss_ps(_mm_movehdup_ps(esum));
      o0 = _mm512_add_ps(o0, e);
      o1 = _mm512_add_ps(o1, e);
    }
    _mm512_storeu_ps(out + c, o0);
    _mm512_storeu_ps(out + c + 16, o1);
  }
  if (c < c1) scalar_accum<F, 1, R>(coef, rv, c, c1, out, ldo);  // the partial last block
  (void)ldo;
}

template <class F, int R>
FI_AVX512VNNI void vnni_codes1(const float* coef, const uint8_t* const* codes, int64_t c0,
                               int64_t c1, float* S, int64_t lds) {
  __m512 cb[R];
  for (int r = 0; r < R; ++r) cb[r] = _mm512_set1_ps(coef[r]);
  int64_t c = c0;
  const uint8_t* cp[R];
  for (int r = 0; r < R; ++r) cp[r] = codes[r] + c0 / kQBlock * F::kCodeBytes;
  for (; c + kQBlock <= c1; c += kQBlock) {
    float* s = S + c - c0;
    __m512 o0 = _mm512_loadu_ps(s), o1 = _mm512_loadu_ps(s + 16);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m512 lo, hi;
      vnni_codes32<F>(cp[r], &lo, &hi);
      cp[r] += F::kCodeBytes;
      o0 = _mm512_fmadd_ps(lo, cb[r], o0);
      o1 = _mm512_fmadd_ps(hi, cb[r], o1);
    }
    _mm512_storeu_ps(s, o0);
    _mm512_storeu_ps(s + 16, o1);
  }
  if (c < c1) {  // the partial last block, S's offset kept
    for (int64_t i = c; i < c1; ++i) {
      float v = S[i - c0];
      for (int r = 0; r < R; ++r)
        v += coef[r] * float(F::code(codes[r] + c / kQBlock * F::kCodeBytes, int(i - c)));
      S[i - c0] = v;
    }
  }
  (void)lds;
}
#endif  // FI_HAVE_X86

// =======================================================================================
// 4. Table builders: fn[T - 1][R - 1] (dot) and fn[T - 1][{1, 2, 4} -> 0, 1, 2] (the rest)
// =======================================================================================

enum class Level { Scalar, Avx2, Vnni };

template <class F, Level L, int T, int R>
constexpr QDotTileFn dot_fn() {
#ifdef FI_HAVE_X86
  if constexpr (L == Level::Vnni) return &vnni_dot<F, T, R>;
  if constexpr (L == Level::Avx2) return &avx2_dot<F, T, R>;
#endif
  return &scalar_dot<F, T, R>;
}
template <class F, Level L, int T, int R>
constexpr QAccumTileFn accum_fn() {
#ifdef FI_HAVE_X86
  if constexpr (L == Level::Vnni && T == 1) return &vnni_accum1<F, R>;
  if constexpr (L != Level::Scalar) return &avx2_accum<F, T, R>;
#endif
  return &scalar_accum<F, T, R>;
}
template <class F, Level L, int T, int R>
constexpr QCodesTileFn codes_fn() {
#ifdef FI_HAVE_X86
  if constexpr (L == Level::Vnni && T == 1) return &vnni_codes1<F, R>;
  if constexpr (L != Level::Scalar) return &avx2_codes<F, T, R>;
#endif
  return &scalar_codes<F, T, R>;
}

template <class F, Level L>
constexpr QDot1Fn dot1_fn() {
#ifdef FI_HAVE_X86
  if constexpr (L == Level::Vnni) return &vnni_dot1<F>;
  if constexpr (L == Level::Avx2) return &avx2_dot1<F>;
#endif
  return &rows_dot1<F, dot_fn<F, L, 1, 1>()>;
}

template <class F, Level L>
constexpr QCodesFinishFn finish_fn() {
#ifdef FI_HAVE_X86
  if constexpr (L != Level::Scalar) return &avx2_codes_finish<F>;
#endif
  return &scalar_codes_finish<F>;
}

// One row's dot with one input at level L (the level's T = 1, R = 1 tile).
template <class F, Level L>
inline float row_dot1(const QuantizedX& x, const uint8_t* row) {
  float v;
  dot_fn<F, L, 1, 1>()(x, 0, &row, x.nb, &v, 1);
  return v;
}

// Up to kFfnGroup active rows' down parts wait in a group and are added in one accumulate
// tile (R = 4): `out` (or S) is loaded and stored once a block for the group instead of once
// a row, and the blocks' offsets (q4_1's m, q4_0's -8 d) are summed before they are added.
// The rows are added in their order, so the sums do not depend on the threads either.
constexpr int kFfnGroup = 4;

// QFfn1Fn (kernels_quant.h): every record of [r0, r1) read once, front to back.
template <class F, Level L>
void ffn1(const QFfn1Args& a, int64_t r0, int64_t r1) {
  const bool gated = a.gate_off >= 0, codes = a.down_scales != nullptr;
  constexpr int kScaleRows = F::kHasMin ? 2 : 1;
  const int64_t ahead = records_ahead(a.row_bytes, a.sel != nullptr);  // kernels.h
  int64_t blk = -1;   // codes layout: the 32-neuron block summed into S
  float hsum = 0.f;
  bool any = false;   // a row of the block had h != 0 (else S is 0: nothing to add)
  // the group: h and down part of active rows not added yet
  float gh[kFfnGroup];
  const void* gp[kFfnGroup];
  int ng = 0;
  auto flush = [&] {  // the group into out (or S): a tile of 4, or of 2 and 1
    int i = 0;
    for (const int r : {4, 2, 1}) {
      for (; ng - i >= r; i += r) {
        if (codes) {
          const QCodesTileFn fn = r == 4 ? codes_fn<F, L, 1, 4>()
                                  : r == 2 ? codes_fn<F, L, 1, 2>() : codes_fn<F, L, 1, 1>();
          fn(gh + i, reinterpret_cast<const uint8_t* const*>(gp + i), 0, a.d, a.S, a.d);
        } else {
          const QAccumTileFn fn = r == 4 ? accum_fn<F, L, 1, 4>()
                                  : r == 2 ? accum_fn<F, L, 1, 2>() : accum_fn<F, L, 1, 1>();
          fn(gh + i, gp + i, 0, a.d, a.out, a.d);
        }
      }
    }
    ng = 0;
  };
  auto finish = [&] {
    flush();
    if (blk >= 0 && any)
      finish_fn<F, L>()(a.S, a.d, &hsum, 1, a.down_scales + blk * kScaleRows * a.d, a.d, 0,
                        a.d, a.out, a.d);
  };
  for (int64_t j = r0; j < r1; ++j) {
    const int64_t row = a.sel ? a.sel[j] : j;
    const uint8_t* rec = a.rows + row * a.row_bytes;
    // a record whole (its three parts are read in turn; picked records are scattered): on a
    // contiguous layer the next: the 1B's q8_0 decode 34.6-35.9 -> 32.9-33.9 ms with it,
    // 34.9-37.2 with the record after next; q4_1 42-44 -> 22.0-22.5 (after next: 22.5-23.0)
    prefetch_records(a.rows, a.row_bytes, a.sel, j, r0, r1, ahead);
    if (a.down_rows != a.rows)
      prefetch_records(a.down_rows, a.down_row_bytes, a.sel, j, r0, r1, ahead);
    float u = row_dot1<F, L>(*a.x, rec + a.up_off);
    if (a.up_bias) u += a.up_bias[row];
    const float h = gated ? activate(a.act, row_dot1<F, L>(*a.x, rec + a.gate_off), a.act_param) * u
                          : activate(a.act, u, a.act_param);
    a.H[j] = h;
    if (codes) {
      const int64_t b = (a.row_ids ? a.row_ids[row] : row) / 32;
      if (b != blk) {
        finish();
        blk = b;
        hsum = 0.f;
        any = false;
        std::fill(a.S, a.S + a.d, 0.f);
      }
      if (h != 0.f) {
        hsum += h;
        any = true;
      }
    }
    if (h != 0.f) {
      gh[ng] = h;
      gp[ng++] = a.down_rows + row * a.down_row_bytes + a.down_off;
      if (ng == kFfnGroup) flush();
    }
  }
  if (codes) finish();
  else flush();
}

template <class F, Level L, int T>
void fill_row(QuantKernels& k) {
  k.dot[T - 1][0] = dot_fn<F, L, T, 1>();
  k.dot[T - 1][1] = dot_fn<F, L, T, 2>();
  k.accum[T - 1][0] = accum_fn<F, L, T, 1>();
  k.accum[T - 1][1] = accum_fn<F, L, T, 2>();
  k.accum[T - 1][2] = accum_fn<F, L, T, 4>();
  k.codes[T - 1][0] = codes_fn<F, L, T, 1>();
  k.codes[T - 1][1] = codes_fn<F, L, T, 2>();
  k.codes[T - 1][2] = codes_fn<F, L, T, 4>();
}

template <class F, Level L>
QuantKernels make_table(void (*quantize_row)(const float*, int64_t, uint8_t*),
                        void (*dequantize_row)(const uint8_t*, int64_t, float*)) {
  static_assert(kQTileT == 4 && kQTileR == 2, "fill_row covers T <= 4, R <= 2");
  QuantKernels k{};
  k.dtype = F::kType;
  fill_row<F, L, 1>(k);
  fill_row<F, L, 2>(k);
  fill_row<F, L, 3>(k);
  fill_row<F, L, 4>(k);
  k.dot1 = dot1_fn<F, L>();
  k.codes_finish = finish_fn<F, L>();
  k.ffn1 = &ffn1<F, L>;
  k.scale_rows = F::kHasMin ? 2 : 1;
  k.quantize_row = quantize_row;
  k.dequantize_row = dequantize_row;
  return k;
}

// The table of format F for `isa` (built once per level).
template <class F>
const QuantKernels& table_for(Isa isa, void (*q)(const float*, int64_t, uint8_t*),
                              void (*dq)(const uint8_t*, int64_t, float*)) {
  static const QuantKernels scalar = make_table<F, Level::Scalar>(q, dq);
#ifdef FI_HAVE_X86
  static const QuantKernels avx2 = make_table<F, Level::Avx2>(q, dq);
  static const QuantKernels vnni = make_table<F, Level::Vnni>(q, dq);
  if (isa == Isa::Avx512) return vnni;
  if (isa == Isa::Avx2) return avx2;
#endif
  return scalar;
}

// Scalar dequantization of whole rows (embeddings, sketches of quantized records, tests):
// value = d * code + e, multiplied then added (no fused rounding), as llama.cpp's reference.
template <class F>
void dequantize_row(const uint8_t* row, int64_t len, float* out) {
  float w[kQBlock];
  for (int64_t c = 0; c < len; c += kQBlock) {
    const uint8_t* blk = row + c / kQBlock * F::kBytes;
    const float d = F::d(blk);
    for (int i = 0; i < kQBlock; ++i) {
      const float q = float(F::code(blk + F::kCodesOff, i));
      w[i] = F::kHasMin ? d * q + F::m(blk) : d * (q + float(F::kCodeShift));
    }
    std::memcpy(out + c, w, sizeof(float) * std::min<int64_t>(kQBlock, len - c));
  }
}

}  // namespace qtiles
}  // namespace flashinfer

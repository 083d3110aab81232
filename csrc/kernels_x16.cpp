// kernels_x16.cpp: resident 4-bit matrices with 16 rows interleaved, and their products.
//
// Why: a row-major q4_0 / q4_1 row dotted with x costs ~13 vector operations a block of 32
// weights (unpacking its nibbles, two integer dots, the scales' conversion and product; the
// chunked form in quant_tiles.h's vnni_rows does fewer and is no faster), which holds one core
// to 16-21 GB/s, below what memory gives it. With 16 rows interleaved, one 512-bit lane per row, the same
// work serves 16 rows at once: the nibbles unpack with ands (no widening), a pair of x
// values is broadcast to all 16 rows, and the 16 rows' scales convert in one instruction;
// no horizontal sum at all (AVX2: the same with 256-bit halves and pmaddwd). Measured in a
// standalone microbenchmark (2026-11-30, one
// thread, matrices streamed from DRAM): 1.45-1.60x the row-major kernel, 29-32 GB/s.
//
// Layout (kernels_quant.h): the rows in groups of 16 (the last group padded with zero rows);
// a group is nb blocks, each block: the 16 rows' fp16 d, then (q4_1) their fp16 m, then 4
// vectors of 64 bytes, vector g holding values 8g..8g+7 of the block, one 32-bit lane per
// row; in a lane, the nibble at bit 4j is value 8g+2j and the nibble at bit 16+4j is value
// 8g+2j+1 (j = 0..3). So `lane & (0x000F000F << 4j)` is the pair (8g+2j, 8g+2j+1) as two
// 16-bit words, scaled by 16^j: vpdpwssd multiplies it with x's pair (x stays in natural
// order) into one accumulator per j, and the scaled sums are exact multiples of 16^j, shifted
// back exactly (j = 3, whose words would not fit a signed 16-bit word, is shifted first).
// The integer sums are the row-major kernels' exactly; only the float accumulation order
// differs (one lane per row, the blocks in order).
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <vector>

#include "common.h"
#include "half.h"
#include "kernels.h"
#include "kernels_q4.h"  // BlockQ4_0, BlockQ4_1: the row-major blocks
#include "kernels_quant.h"
#include "thread_pool.h"

#include "simd.h"

namespace flashinfer {
namespace {

bool x16_format(DType dt) { return dt == DType::Q4_0 || dt == DType::Q4_1; }

void check_x16(DType dt) {
  FI_CHECK(x16_format(dt), "interleaved rows exist for q4_0 and q4_1 only, not ",
           dtype_name(dt));
}

// The row-major blocks (kernels_q4.h's BlockQ4_0 / BlockQ4_1); byte i of qs = value i (low
// nibble) | value i + 16 (high nibble).
struct RowFmt {
  bool has_min;
  int block_bytes;
  int qs_off;
};
RowFmt row_fmt(DType dt) {
  return dt == DType::Q4_1
             ? RowFmt{true, int(sizeof(BlockQ4_1)), int(offsetof(BlockQ4_1, qs))}
             : RowFmt{false, int(sizeof(BlockQ4_0)), int(offsetof(BlockQ4_0, qs))};
}

inline int code_of(const uint8_t* qs, int i) { return i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4; }

// One block of a group: the 16 rows' fp16 d (and m), then the codes from codes_off(...).
constexpr int64_t group_block_bytes(bool has_min) {
  return kX16 * int64_t(has_min ? sizeof(BlockQ4_1) : sizeof(BlockQ4_0));
}
int64_t group_block_bytes(DType dt) { return group_block_bytes(dt == DType::Q4_1); }
constexpr int codes_off(bool has_min) { return int(kX16) * 2 * (has_min ? 2 : 1); }

// ---- scalar (every ISA; the reference the vector kernel is tested against) ------------

// out[t * ldo + r] = row r . x_t for the rows of groups [g0, g1) below m, t in [t0, t0 + T)
void scalar_groups(const QuantizedX& x, int64_t t0, int T, const uint8_t* w16, DType dt,
                   int64_t nb, int64_t m, int64_t g0, int64_t g1, float* out, int64_t ldo) {
  const bool has_min = dt == DType::Q4_1;
  const int64_t gbb = group_block_bytes(has_min);
  const int co = codes_off(has_min);
  for (int64_t g = g0; g < g1; ++g)
    for (int t = 0; t < T; ++t) {
      float fa[kX16] = {}, fb[kX16] = {};
      const int16_t* xq = x.qrow(t0 + t);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = w16 + (g * nb + b) * gbb;
        const float dx = x.drow(t0 + t)[b], sx = x.srow(t0 + t)[b];
        for (int r = 0; r < kX16; ++r) {
          int32_t acc = 0;
          for (int v = 0; v < 4; ++v) {
            uint32_t lane;
            std::memcpy(&lane, p + co + 64 * v + 4 * r, 4);
            for (int j = 0; j < 4; ++j) {
              const int k = 8 * v + 2 * j;
              acc += int32_t((lane >> (4 * j)) & 0xF) * xq[b * kQBlock + k] +
                     int32_t((lane >> (16 + 4 * j)) & 0xF) * xq[b * kQBlock + k + 1];
            }
          }
          uint16_t dh;
          std::memcpy(&dh, p + 2 * r, 2);
          const float d = half_to_float(dh);
          fa[r] += float(acc) * (d * dx);
          if (has_min) {
            uint16_t mh;
            std::memcpy(&mh, p + 32 + 2 * r, 2);
            fb[r] += half_to_float(mh) * sx;
          } else {
            fb[r] += d * (-8.f * sx);
          }
        }
      }
      for (int r = 0; r < kX16; ++r)
        if (g * kX16 + r < m) out[t * ldo + g * kX16 + r] = fa[r] + fb[r];
    }
}

#ifdef FI_HAVE_X86
// ---- AVX-512 VNNI ---------------------------------------------------------------------

template <bool kHasMin, int T>
FI_AVX512VNNI void vnni_groups(const QuantizedX& x, int64_t t0, const uint8_t* w16, int64_t nb,
                               int64_t m, int64_t g0, int64_t g1, float* out, int64_t ldo) {
  constexpr int64_t gbb = group_block_bytes(kHasMin);
  constexpr int co = codes_off(kHasMin);
  const __m512i m0 = _mm512_set1_epi32(0x000F000F), m1 = _mm512_set1_epi32(0x00F000F0),
                m2 = _mm512_set1_epi32(0x0F000F00);
  // the item's groups are one stream, read ahead (prefetch_stream, kernels.h)
  const uint8_t *const begin = w16 + g0 * nb * gbb, *const end = w16 + g1 * nb * gbb;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* p = w16 + g * nb * gbb;
    __m512 fa[T], fb[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) fa[t] = fb[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b, p += gbb) {
      prefetch_stream(begin, p, end, gbb);
      __m512i a0[T], a1[T], a2[T], a3[T];
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) a0[t] = a1[t] = a2[t] = a3[t] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const __m512i c = _mm512_loadu_si512(p + co + 64 * v);
        const __m512i w0 = _mm512_and_si512(c, m0), w1 = _mm512_and_si512(c, m1),
                      w2 = _mm512_and_si512(c, m2),
                      w3 = _mm512_and_si512(_mm512_srli_epi32(c, 12), m0);
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) {
          int32_t xp[4];
          std::memcpy(xp, x.qrow(t0 + t) + b * kQBlock + 8 * v, 16);
          a0[t] = _mm512_dpwssd_epi32(a0[t], w0, _mm512_set1_epi32(xp[0]));
          a1[t] = _mm512_dpwssd_epi32(a1[t], w1, _mm512_set1_epi32(xp[1]));
          a2[t] = _mm512_dpwssd_epi32(a2[t], w2, _mm512_set1_epi32(xp[2]));
          a3[t] = _mm512_dpwssd_epi32(a3[t], w3, _mm512_set1_epi32(xp[3]));
        }
      }
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      __m512 ev;
      if constexpr (kHasMin)
        ev = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
      else
        ev = dv;
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const __m512i acc = _mm512_add_epi32(
            _mm512_add_epi32(a0[t], a3[t]),
            _mm512_add_epi32(_mm512_srai_epi32(a1[t], 4), _mm512_srai_epi32(a2[t], 8)));
        const float dx = x.drow(t0 + t)[b], sx = x.srow(t0 + t)[b];
        fa[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(dv, _mm512_set1_ps(dx)),
                                fa[t]);
        fb[t] = _mm512_fmadd_ps(ev, _mm512_set1_ps(kHasMin ? sx : -8.f * sx), fb[t]);
      }
    }
    const int64_t left = std::min<int64_t>(kX16, m - g * kX16);
    const __mmask16 keep = left >= kX16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t)
      _mm512_mask_storeu_ps(out + t * ldo + g * kX16, keep, _mm512_add_ps(fa[t], fb[t]));
  }
}

// ---- AVX2 (no VNNI): the same layout, a group as two halves of 8 rows (the low and high
// 32 bytes of each 64-byte vector), pmaddwd + add for each vpdpwssd, up to 2 inputs a pass
// (16 registers). Each row's lane runs the VNNI kernel's float operations in the same order,
// so both give the same floats.

template <bool kHasMin, int T>
FI_AVX2 void avx2_groups(const QuantizedX& x, int64_t t0, const uint8_t* w16, int64_t nb,
                         int64_t m, int64_t g0, int64_t g1, float* out, int64_t ldo) {
  constexpr int64_t gbb = group_block_bytes(kHasMin);
  constexpr int co = codes_off(kHasMin);
  const __m256i m0 = _mm256_set1_epi32(0x000F000F), m1 = _mm256_set1_epi32(0x00F000F0),
                m2 = _mm256_set1_epi32(0x0F000F00);
  const uint8_t *const begin = w16 + g0 * nb * gbb, *const end = w16 + g1 * nb * gbb;
  for (int64_t g = g0; g < g1; ++g)
    for (int half = 0; half < 2; ++half) {
      const uint8_t* p = w16 + g * nb * gbb;
      __m256 fa[T], fb[T];
#pragma GCC unroll 2
      for (int t = 0; t < T; ++t) fa[t] = fb[t] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b, p += gbb) {
        if (half == 0) prefetch_stream(begin, p, end, gbb);  // half 1 reads the group from L1
        __m256i a0[T], a1[T], a2[T], a3[T];
#pragma GCC unroll 2
        for (int t = 0; t < T; ++t) a0[t] = a1[t] = a2[t] = a3[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          const __m256i c = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(p + co + 64 * v + 32 * half));
          const __m256i w0 = _mm256_and_si256(c, m0), w1 = _mm256_and_si256(c, m1),
                        w2 = _mm256_and_si256(c, m2),
                        w3 = _mm256_and_si256(_mm256_srli_epi32(c, 12), m0);
#pragma GCC unroll 2
          for (int t = 0; t < T; ++t) {
            int32_t xp[4];
            std::memcpy(xp, x.qrow(t0 + t) + b * kQBlock + 8 * v, 16);
            a0[t] = _mm256_add_epi32(a0[t], _mm256_madd_epi16(w0, _mm256_set1_epi32(xp[0])));
            a1[t] = _mm256_add_epi32(a1[t], _mm256_madd_epi16(w1, _mm256_set1_epi32(xp[1])));
            a2[t] = _mm256_add_epi32(a2[t], _mm256_madd_epi16(w2, _mm256_set1_epi32(xp[2])));
            a3[t] = _mm256_add_epi32(a3[t], _mm256_madd_epi16(w3, _mm256_set1_epi32(xp[3])));
          }
        }
        const __m256 dv = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * half)));
        __m256 ev;
        if constexpr (kHasMin)
          ev = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 + 16 * half)));
        else
          ev = dv;
#pragma GCC unroll 2
        for (int t = 0; t < T; ++t) {
          const __m256i acc = _mm256_add_epi32(
              _mm256_add_epi32(a0[t], a3[t]),
              _mm256_add_epi32(_mm256_srai_epi32(a1[t], 4), _mm256_srai_epi32(a2[t], 8)));
          const float dx = x.drow(t0 + t)[b], sx = x.srow(t0 + t)[b];
          fa[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(dv, _mm256_set1_ps(dx)),
                                  fa[t]);
          fb[t] = _mm256_fmadd_ps(ev, _mm256_set1_ps(kHasMin ? sx : -8.f * sx), fb[t]);
        }
      }
      const int64_t r0 = g * kX16 + 8 * half;
      const int64_t left = std::min<int64_t>(8, m - r0);
      for (int t = 0; t < T; ++t) {
        alignas(32) float v[8];
        _mm256_store_ps(v, _mm256_add_ps(fa[t], fb[t]));
        for (int64_t r = 0; r < left; ++r) out[t * ldo + r0 + r] = v[r];
      }
    }
}

using GroupsFn = void (*)(const QuantizedX&, int64_t, const uint8_t*, int64_t, int64_t, int64_t,
                          int64_t, float*, int64_t);

template <bool kHasMin>
GroupsFn vnni_for(int T) {
  switch (T) {
    case 1: return &vnni_groups<kHasMin, 1>;
    case 2: return &vnni_groups<kHasMin, 2>;
    case 3: return &vnni_groups<kHasMin, 3>;
    default: return &vnni_groups<kHasMin, 4>;
  }
}
#endif

// Tokens per register tile: each group's codes are unpacked once for this many inputs.
constexpr int kX16Tile = 4;

void groups(const QuantizedX& x, int64_t t0, int T, const uint8_t* w16, DType dt, int64_t nb,
            int64_t m, int64_t g0, int64_t g1, float* out, int64_t ldo) {
#ifdef FI_HAVE_X86
  const Isa isa = kernel_isa();
  if (isa == Isa::Avx512) {
    const GroupsFn fn = dt == DType::Q4_1 ? vnni_for<true>(T) : vnni_for<false>(T);
    fn(x, t0, w16, nb, m, g0, g1, out, ldo);
    return;
  }
  if (isa == Isa::Avx2) {
    for (int t = 0; t < T; t += 2) {  // two inputs a pass
      const bool two = T - t >= 2;
      const GroupsFn fn = dt == DType::Q4_1 ? (two ? &avx2_groups<true, 2> : &avx2_groups<true, 1>)
                                            : (two ? &avx2_groups<false, 2> : &avx2_groups<false, 1>);
      fn(x, t0 + t, w16, nb, m, g0, g1, out + t * ldo, ldo);
    }
    return;
  }
#endif
  scalar_groups(x, t0, T, w16, dt, nb, m, g0, g1, out, ldo);
}

}  // namespace

bool x16_supported(DType dt) { return x16_format(dt); }

int64_t x16_bytes(DType dt, int64_t m, int64_t k) {
  check_x16(dt);
  return (m + kX16 - 1) / kX16 * q_blocks(k) * group_block_bytes(dt);
}

namespace {
// The `n` (<= 16) rows of one group, row-major at `rows`, interleaved into `out` (the group's
// nb blocks; lanes past n zero).
void interleave_group(const uint8_t* rows, int n, int64_t nb, DType dt, uint8_t* out) {
  const RowFmt f = row_fmt(dt);
  const int64_t gbb = group_block_bytes(f.has_min);
  const int co = codes_off(f.has_min);
  std::memset(out, 0, size_t(nb * gbb));
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* o = out + b * gbb;
    for (int r = 0; r < n; ++r) {
      const uint8_t* blk = rows + (r * nb + b) * f.block_bytes;
      std::memcpy(o + 2 * r, blk, 2);                          // d
      if (f.has_min) std::memcpy(o + 32 + 2 * r, blk + 2, 2);  // m
      const uint8_t* qs = blk + f.qs_off;
      for (int v = 0; v < 4; ++v) {
        uint32_t lane = 0;
        for (int j = 0; j < 4; ++j) {
          lane |= uint32_t(code_of(qs, 8 * v + 2 * j)) << (4 * j);
          lane |= uint32_t(code_of(qs, 8 * v + 2 * j + 1)) << (16 + 4 * j);
        }
        std::memcpy(o + co + 64 * v + 4 * r, &lane, 4);
      }
    }
  }
}
}  // namespace

void interleave16(const uint8_t* rows, int64_t m, int64_t k, DType dt, uint8_t* out) {
  const int64_t nb = q_blocks(k), groups_n = (m + kX16 - 1) / kX16;
  const int64_t rb = nb * row_fmt(dt).block_bytes, gb = nb * group_block_bytes(dt);
  for (int64_t g = 0; g < groups_n; ++g)
    interleave_group(rows + g * kX16 * rb, int(std::min<int64_t>(kX16, m - g * kX16)), nb, dt,
                     out + g * gb);
}

void interleave16_in_place(uint8_t* rows, int64_t m, int64_t k, DType dt) {
  FI_CHECK(m % kX16 == 0, "in place, the rows must be whole groups of 16, got ", m);
  const int64_t nb = q_blocks(k), gb = nb * group_block_bytes(dt);  // = 16 rows' bytes
  std::vector<uint8_t> group(static_cast<size_t>(gb));
  for (int64_t g = 0; g < m / kX16; ++g) {
    std::memcpy(group.data(), rows + g * gb, size_t(gb));
    interleave_group(group.data(), int(kX16), nb, dt, rows + g * gb);
  }
}

void deinterleave16(const uint8_t* w16, int64_t m, int64_t k, DType dt, int64_t r0, int64_t r1,
                    uint8_t* rows) {
  const RowFmt f = row_fmt(dt);
  const int64_t nb = q_blocks(k), gbb = group_block_bytes(f.has_min);
  const int co = codes_off(f.has_min);
  FI_CHECK(0 <= r0 && r0 <= r1 && r1 <= m, "rows [", r0, ", ", r1, ") outside [0, ", m, ")");
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t g = row / kX16;
    const int r = int(row % kX16);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = w16 + (g * nb + b) * gbb;
      uint8_t* blk = rows + ((row - r0) * nb + b) * f.block_bytes;
      std::memcpy(blk, p + 2 * r, 2);
      if (f.has_min) std::memcpy(blk + 2, p + 32 + 2 * r, 2);
      int c[kQBlock];
      for (int v = 0; v < 4; ++v) {
        uint32_t lane;
        std::memcpy(&lane, p + co + 64 * v + 4 * r, 4);
        for (int j = 0; j < 4; ++j) {
          c[8 * v + 2 * j] = (lane >> (4 * j)) & 0xF;
          c[8 * v + 2 * j + 1] = (lane >> (16 + 4 * j)) & 0xF;
        }
      }
      for (int i = 0; i < 16; ++i) blk[f.qs_off + i] = uint8_t(c[i] | (c[i + 16] << 4));
    }
  }
}

void linear_x16(const float* x, int64_t n, int64_t k, const uint8_t* w16, DType dt, int64_t m,
                const float* bias, float* out, int threads) {
  check_x16(dt);
  if (n == 0 || m == 0) return;
  thread_local QuantizedX qx_scratch;
  quantize_x(x, n, k, k, qx_scratch);
  const QuantizedX& qx = qx_scratch;
  const int64_t nb = qx.nb, groups_n = (m + kX16 - 1) / kX16;
  const double work = double(n) * double(m) * double(k);
  const int nt = n == 1 ? resolve_decode_threads(threads, work,
                                                 double(groups_n) * double(nb * group_block_bytes(dt)))
                        : resolve_threads(threads, work);
  // Groups per work item: about 256 KiB of weights for one input (each item is one stream
  // for the prefetchers, as decode_rows in kernels.cpp), at least 4 items a thread when the
  // matrix allows; prompts the same (the tokens loop inside, so a group is read once per 4).
  const int64_t group_bytes = nb * group_block_bytes(dt);
  const int64_t by_bytes = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, group_bytes));
  const int64_t by_threads = std::max<int64_t>(1, groups_n / (4 * int64_t(nt)));
  const int64_t per = std::min(by_bytes, by_threads);
  const int64_t items = (groups_n + per - 1) / per;
  ComputePool::instance().run(items, nt, [&](int64_t i, int) {
    const int64_t g0 = i * per, g1 = std::min(groups_n, g0 + per);
    for (int64_t t = 0; t < n; t += kX16Tile) {
      const int T = int(std::min<int64_t>(kX16Tile, n - t));
      groups(qx, t, T, w16, dt, nb, m, g0, g1, out + t * m, m);
    }
    if (bias)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = g0 * kX16; j < std::min(m, g1 * kX16); ++j) out[t * m + j] += bias[j];
  });
}

void ffn_dense(const float* x, int64_t n, int64_t d, int64_t f, const void* ug,
               const void* down, DType dt, bool x16, bool gated, Activation act, float act_param,
               float* out, float* act_out, int threads) {
  if (n == 0) return;
  if (x16) check_x16(dt);
  const int64_t r = gated ? 2 * f : f;
  // Scratch kept per thread for decode-sized calls (no allocation in the decode loop); a long
  // prompt's (n x 3f floats: 68 MB for a 7B's 512 tokens) is freed when the call returns.
  thread_local std::vector<float> keep_ug, keep_h;
  std::vector<float> big_ug, big_h;
  const bool small = n * r <= (int64_t(1) << 20);
  std::vector<float>& ug_out = small ? keep_ug : big_ug;
  std::vector<float>& h = small ? keep_h : big_h;
  ug_out.resize(size_t(n * r));
  h.resize(act_out ? 0 : size_t(n * f));
  float* hp = act_out ? act_out : h.data();  // h straight into the caller's act_out
  auto product = [&](const float* in, int64_t k, const void* w, int64_t m, float* o) {
    if (x16)
      linear_x16(in, n, k, static_cast<const uint8_t*>(w), dt, m, nullptr, o, threads);
    else
      linear(in, n, k, w, dt, m, nullptr, o, threads);
  };
  product(x, d, ug, r, ug_out.data());
  for (int64_t t = 0; t < n; ++t) {
    const float* u = ug_out.data() + t * r;
    float* ht = hp + t * f;
    if (gated)
      for (int64_t j = 0; j < f; ++j) ht[j] = activate(act, u[f + j], act_param) * u[j];
    else
      for (int64_t j = 0; j < f; ++j) ht[j] = activate(act, u[j], act_param);
  }
  product(hp, f, down, d, out);
}

}  // namespace flashinfer

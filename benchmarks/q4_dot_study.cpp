// q4_dot_study.cpp: what bounds the 4-bit dot on one core? A standalone loop (not the
// library's code) over q4_0 rows 4096 wide, one thread, four ways to compute row . x:
//   x16         the library's scheme before 2026-12-01: x in 16 bits (QuantizedX::qp order),
//               codes unpacked to 16-bit words, vpmaddwd + vpdpwssd, a chunk of 8 blocks
//               reduced by a tree of horizontal adds, the 8 block scales loaded one by one
//   x8          llama.cpp's 8-bit x: codes unpacked to bytes, one vpdpbusd a block, the same
//               chunk reduction and scale loads
//   x8b         8-bit x, each block's 8 lanes converted and multiplied by its own scale
//               (llama.cpp's reduction), two blocks a step
//   x16v        x16 with the chunk's 8 scales gathered by one word permute (vpermt2w) of
//               its first 128 bytes: the library's VNNI level since 2026-12-01
// GB/s of weight bytes: a 0.9 MB matrix repeated (in L2) and a 132 MB one (from DRAM).
//
//   g++ -O2 -std=c++17 -o /tmp/q4_dot_study benchmarks/q4_dot_study.cpp && /tmp/q4_dot_study
//
// Needs an AVX-512 VNNI + VBMI CPU. Results: benchmarks/RESULTS.md section 13.
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <vector>
#include <chrono>
#include <random>
#define TGT __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
constexpr int KB = 18;
TGT static inline __m256i sum8x8(const __m256i* p) {
  __m256i h01 = _mm256_hadd_epi32(p[0], p[1]), h23 = _mm256_hadd_epi32(p[2], p[3]);
  __m256i h45 = _mm256_hadd_epi32(p[4], p[5]), h67 = _mm256_hadd_epi32(p[6], p[7]);
  __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}
TGT static inline void scales8(const uint8_t* row, int64_t b0, __m256* dw) {
  const uint8_t* c = row + b0 * KB;
  int w[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&w[i], c + i * KB, 4);
  __m128i a = _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(_mm_cvtsi32_si128(w[0]), w[1], 1), w[2], 2), w[3], 3);
  __m128i b = _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(_mm_cvtsi32_si128(w[4]), w[5], 1), w[6], 2), w[7], 3);
  __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
  const __m256i pick = _mm256_setr_epi8(0,1,4,5,8,9,12,13,2,3,6,7,10,11,14,15,0,1,4,5,8,9,12,13,2,3,6,7,10,11,14,15);
  __m256i dm = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, pick), 0xD8);
  *dw = _mm256_cvtph_ps(_mm256_castsi256_si128(dm));
}
TGT static inline float hsum(__m256 acc) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s); return _mm_cvtss_f32(s);
}
TGT static inline void scales8v(const uint8_t* row, int64_t b0, __m256* dw) {
  const uint8_t* c = row + b0 * KB;
  const __m512i lo = _mm512_loadu_si512(c), hi = _mm512_loadu_si512(c + 64);
  const __m512i idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                       0, 0, 0, 0, 0, 0, 0, 0, 63, 54, 45, 36, 27, 18, 9, 0);
  *dw = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_permutex2var_epi16(lo, idx, hi)));
}
// The integer dot of block b: x in 16 bits (qp order), codes unpacked to 16-bit words
struct Block16 {
  const int16_t* qp;
  TGT __m256i operator()(const uint8_t* row, int64_t b) const {
    const __m256i sh1 = _mm256_setr_epi16(0,0,0,0,0,0,0,0,4,4,4,4,4,4,4,4);
    const __m256i sh2 = _mm256_setr_epi16(8,8,8,8,8,8,8,8,12,12,12,12,12,12,12,12);
    const __m256i mask = _mm256_set1_epi16(0xF);
    __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(row + b * KB + 2)));
    __m256i c1 = _mm256_and_si256(_mm256_srlv_epi16(raw, sh1), mask);
    __m256i c2 = _mm256_and_si256(_mm256_srlv_epi16(raw, sh2), mask);
    const int16_t* yp = qp + b * 32;
    return _mm256_dpwssd_epi32(_mm256_madd_epi16(c1, _mm256_loadu_si256((const __m256i*)yp)), c2, _mm256_loadu_si256((const __m256i*)(yp + 16)));
  }
};
// ... and x in 8 bits (value order), codes unpacked to bytes, one vpdpbusd
struct Block8 {
  const int8_t* q8;
  TGT __m256i operator()(const uint8_t* row, int64_t b) const {
    const __m256i mask = _mm256_set1_epi8(0xF);
    __m128i lo = _mm_loadu_si128((const __m128i*)(row + b * KB + 2));
    __m256i v = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), _mm_srli_epi16(lo, 4), 1), mask);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), v, _mm256_loadu_si256((const __m256i*)(q8 + b * 32)));
  }
};
// The chunk loop x16, x8 and x16v share: 8 blocks' integer dots, reduced by a tree of
// horizontal adds, times the 8 blocks' scales (`Scales`: loaded one by one, or permuted)
template <void (*Scales)(const uint8_t*, int64_t, __m256*), class Block>
TGT inline float chunked(const uint8_t* row, int64_t nb, Block block, const float* dx, const float* sx) {
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    __m256i p[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) p[i] = block(row, b0 + i);
    __m256 dw; Scales(row, b0, &dw);
    __m256 ew = _mm256_mul_ps(_mm256_set1_ps(-8.f), dw);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8x8(p)), _mm256_mul_ps(dw, _mm256_loadu_ps(dx + b0)), acc);
    accm = _mm256_fmadd_ps(ew, _mm256_loadu_ps(sx + b0), accm);
  }
  return hsum(_mm256_add_ps(acc, accm));
}
TGT float dot16(const uint8_t* row, int64_t nb, const int16_t* qp, const float* dx, const float* sx) {
  return chunked<scales8>(row, nb, Block16{qp}, dx, sx);
}
TGT float dot8(const uint8_t* row, int64_t nb, const int8_t* q8, const float* dx, const float* sx) {
  return chunked<scales8>(row, nb, Block8{q8}, dx, sx);
}
TGT float dot16v(const uint8_t* row, int64_t nb, const int16_t* qp, const float* dx, const float* sx) {
  return chunked<scales8v>(row, nb, Block16{qp}, dx, sx);
}
// x8, per-block float accumulate (llama.cpp style, no hadd tree): 8 lanes per block -> cvt, fma with broadcast scale
TGT float dot8b(const uint8_t* row, int64_t nb, const int8_t* q8, const float* dx, const float* sx) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(0xF);
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    __m256 dw; scales8(row, b0, &dw);
    __m256 ds = _mm256_mul_ps(dw, _mm256_loadu_ps(dx + b0));
    alignas(32) float dsv[8]; _mm256_store_ps(dsv, ds);
#pragma GCC unroll 4
    for (int i = 0; i < 8; i += 2) {
      int64_t b = b0 + i;
      __m256i lo = _mm256_loadu2_m128i((const __m128i*)(row + (b+1) * KB + 2), (const __m128i*)(row + b * KB + 2));
      __m256i hi = _mm256_srli_epi16(lo, 4);
      // block b: low128(lo), low128(hi); block b+1: high halves
      __m256i vb0 = _mm256_and_si256(_mm256_permute2x128_si256(lo, hi, 0x20), mask);
      __m256i vb1 = _mm256_and_si256(_mm256_permute2x128_si256(lo, hi, 0x31), mask);
      __m256i s0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), vb0, _mm256_loadu_si256((const __m256i*)(q8 + b * 32)));
      __m256i s1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), vb1, _mm256_loadu_si256((const __m256i*)(q8 + b * 32 + 32)));
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(dsv[i]), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(dsv[i+1]), acc1);
    }
    __m256 ew = _mm256_mul_ps(_mm256_set1_ps(-8.f), dw);
    accm = _mm256_fmadd_ps(ew, _mm256_loadu_ps(sx + b0), accm);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), accm));
}
int main(int argc, char** argv) {
  int64_t K = 4096, nb = K / 32;
  int64_t rows_big = 60000, rows_small = 400;  // 132 MB and 0.9 MB
  std::vector<uint8_t> W(rows_big * nb * KB);
  std::mt19937 g(1); for (auto& c : W) c = g();
  for (int64_t r = 0; r < rows_big; ++r) for (int64_t b = 0; b < nb; ++b) { uint16_t h = 0x2000 + (g() & 0xff); memcpy(&W[(r*nb+b)*KB], &h, 2); }
  std::vector<int16_t> qp(K); std::vector<int8_t> q8(K); std::vector<float> dx(nb, 1e-3f), sx(nb, 0.5f);
  for (auto& v : qp) v = int16_t(g() % 60000 - 30000);
  for (auto& v : q8) v = int8_t(g() % 255 - 127);
  std::vector<float> out(rows_big);
  auto run = [&](const char* name, auto fn, int64_t rows, int reps) {
    double best = 1e9;
    for (int k = 0; k < 5; ++k) {
      auto t0 = std::chrono::steady_clock::now();
      for (int rep = 0; rep < reps; ++rep)
        for (int64_t r = 0; r < rows; ++r) {
          const uint8_t* row = &W[r * nb * KB];
          _mm_prefetch((const char*)row + 4 * nb * KB, _MM_HINT_T0);
          _mm_prefetch((const char*)row + 4 * nb * KB + 1024, _MM_HINT_T0);
          out[r] = fn(row, nb);
        }
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::min(best, s);
    }
    printf("%-8s rows %6ld: %.1f GB/s\n", name, rows, rows * nb * KB * double(reps) / best / 1e9);
  };
  for (int pass = 0; pass < 2; ++pass) {
    run("x16", [&](const uint8_t* r, int64_t n) { return dot16(r, n, qp.data(), dx.data(), sx.data()); }, rows_small, 200);
    run("x8", [&](const uint8_t* r, int64_t n) { return dot8(r, n, q8.data(), dx.data(), sx.data()); }, rows_small, 200);
    run("x8b", [&](const uint8_t* r, int64_t n) { return dot8b(r, n, q8.data(), dx.data(), sx.data()); }, rows_small, 200);
    run("x16v", [&](const uint8_t* r, int64_t n) { return dot16v(r, n, qp.data(), dx.data(), sx.data()); }, rows_small, 200);
    run("x16", [&](const uint8_t* r, int64_t n) { return dot16(r, n, qp.data(), dx.data(), sx.data()); }, rows_big, 1);
    run("x8", [&](const uint8_t* r, int64_t n) { return dot8(r, n, q8.data(), dx.data(), sx.data()); }, rows_big, 1);
    run("x8b", [&](const uint8_t* r, int64_t n) { return dot8b(r, n, q8.data(), dx.data(), sx.data()); }, rows_big, 1);
    run("x16v", [&](const uint8_t* r, int64_t n) { return dot16v(r, n, qp.data(), dx.data(), sx.data()); }, rows_big, 1);
  }
}

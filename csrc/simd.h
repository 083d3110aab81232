// simd.h: the x86 SIMD target attributes of the kernel files, defined once. The library is
// built without -march (wheels run on any x86_64 / arm64): each SIMD function carries its
// target attribute and is called only after the runtime dispatch checked the CPU.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FI_HAVE_X86 1
#define FI_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FI_AVX512VNNI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

// The sum of the 8 floats of v (the float and the block-format kernels' reductions).
FI_AVX2 inline float fi_hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

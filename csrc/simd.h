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
#endif

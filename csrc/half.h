// half.h: bit-exact float <-> float16 / bfloat16 conversions shared by the kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace flashinfer {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half -> float, exact incl. subnormals, inf and NaN (branch-free; after
// Maratyszcza/FP16 fp16_ieee_to_fp32_value).
inline float half_to_float(uint16_t h) {
#if defined(__aarch64__)
  __fp16 v; std::memcpy(&v, &h, 2); return static_cast<float>(v);
#else
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? f32_bits(denormalized)
                                                      : f32_bits(normalized));
  return f32_from_bits(result);
#endif
}

// float -> IEEE half, round to nearest even, overflow -> inf, NaN -> quiet NaN.
inline uint16_t float_to_half(float f) {
#if defined(__aarch64__)
  __fp16 v = static_cast<__fp16>(f); uint16_t h; std::memcpy(&h, &v, 2); return h;
#else
  // Scaling by 2^112 then 2^-110 lets the FPU do the rounding (incl. subnormals).
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

inline float bf16_to_float(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16, round to nearest even; NaN keeps its sign and becomes quiet (torch).
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace flashinfer

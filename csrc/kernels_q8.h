// kernels_q8.h: the 8-bit block format q8_0 (llama.cpp's Q8_0), as stored in bundle records
// and resident matrices. Its kernels are in kernels_q8.cpp (table: q8_0_kernels), with the
// quantization of activations that every block format's dot products use.
//
// Block: 32 consecutive values of a row -> 34 bytes
//   uint16 d       fp16 scale, d = max|w| / 127
//   int8   qs[32]  q = round(w / d), half away from zero;  value = d * q
// A row of len values takes ceil(len / 32) blocks; the last one is zero padded.
#pragma once

#include <cstdint>

#include "kernels_quant.h"

namespace flashinfer {

#pragma pack(push, 1)
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
#pragma pack(pop)
static_assert(sizeof(BlockQ8_0) == 34, "q8_0 blocks are 34 bytes (GGUF's Q8_0)");

}  // namespace flashinfer

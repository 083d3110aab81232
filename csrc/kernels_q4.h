// kernels_q4.h: the 4-bit block formats q4_0 and q4_1 (llama.cpp's Q4_0 and Q4_1) as stored in
// bundle records and resident matrices, and the 4-bit "sketch" of neuron parts that ranks
// uncached neurons. Kernels in kernels_q4.cpp (tables: q4_0_kernels, q4_1_kernels).
//
// q4_0 block: 32 consecutive values -> 18 bytes
//   uint16 d        fp16 scale
//   uint8  qs[16]   byte i holds value i (low nibble) and value i + 16 (high nibble)
//   value = (q - 8) * d
// q4_1 block: 32 values -> 20 bytes
//   uint16 d, m     fp16 scale and minimum
//   uint8  qs[16]   as in q4_0
//   value = q * d + m
// Weights are quantized as llama.cpp's reference quantizer does: q4_0 d = w* / -8 with w* the
// value of largest magnitude, q = min(15, trunc(w / d + 8.5)); q4_1 d = (max - min) / 15,
// m = min, q = min(15, trunc((w - min) / d + 0.5)). A row of len values takes ceil(len / 32)
// blocks; the last one is zero padded before quantizing.
//
// The sketch uses the q4_0 block with its own symmetric rule, d = max|w| / 7 and
// q = trunc(w / d + 8.5) clamped to [1, 15] (no value is clipped), one block row per part.
// A neuron's sketch record is its parts one after the other (up, then gate when gated).
#pragma once

#include <cstdint>

#include "bundle_format.h"   // DType
#include "kernels.h"         // Activation
#include "kernels_quant.h"   // kQBlock

namespace flashinfer {

#pragma pack(push, 1)
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];
};
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[16];
};
#pragma pack(pop)
static_assert(sizeof(BlockQ4_0) == 18, "q4_0 blocks are 18 bytes (GGUF's Q4_0)");
static_assert(sizeof(BlockQ4_1) == 20, "q4_1 blocks are 20 bytes (GGUF's Q4_1)");

constexpr int64_t kQ4Block = kQBlock;                 // elements per block
constexpr int64_t kQ4BlockBytes = sizeof(BlockQ4_0);  // the sketch's blocks

inline int64_t q4_blocks(int64_t len) { return (len + kQ4Block - 1) / kQ4Block; }
inline int64_t q4_part_bytes(int64_t len) { return q4_blocks(len) * kQ4BlockBytes; }

// Quantize parts of storage-format rows into 4-bit sketch records.
//   src       rows in format `dt` (a block format is expanded block by block), row stride
//             src_ld elements of its array (bytes for block formats)
//   src_rows  (n,) which source rows; dst_rows (n,) which destination records
//   part_off  (n_parts,) offset of each part inside a source row, in the same units
//   dst       records of dst_ld bytes (>= n_parts * q4_part_bytes(len))
void quantize_q4_parts(const void* src, DType dt, int64_t src_ld, const int64_t* src_rows,
                       int64_t n, const int64_t* part_off, int n_parts, int64_t len,
                       uint8_t* dst, int64_t dst_ld, const int64_t* dst_rows, int threads);

// Back to float32 (tests and tools): out (n_parts * len) for one record.
void dequantize_q4_record(const uint8_t* rec, int n_parts, int64_t len, float* out);

// Estimated contribution of every sketch record j:
//   u = up~_j . x_t,  h = act(gate~_j . x_t) * u (gated) or act(u)
//   out[j] = max_t |h| * (scale ? scale[j] : 1)
// x is quantized to 16 bits per 32-block on the fly (kernels_quant.h), so the inner loop is
// an integer dot product (the q4_0 dot tiles, two parts as one R = 2 tile).
//   x    (n_tok, len) f32
//   sk   (n_rec, ld) bytes: part 0 = up, part 1 = gate when gated
void q4_scores(const float* x, int64_t n_tok, int64_t len, const uint8_t* sk, int64_t n_rec,
               int64_t ld, bool gated, Activation act, float act_param, const float* scale,
               float* out, int threads);

}  // namespace flashinfer

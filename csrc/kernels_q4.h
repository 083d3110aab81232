// kernels_q4.h: 4-bit block quantization of neuron parts, and the kernel that estimates each
// neuron's FFN contribution from those 4-bit copies (the "sketch" that ranks uncached neurons).
//
// Block format (the layout of llama.cpp's Q4_0, so the same unpacking serves later 4-bit
// weight formats): 32 consecutive elements of one part -> 18 bytes
//   uint16 d        fp16 scale
//   uint8  qs[16]   byte i holds element i (low nibble) and element i + 16 (high nibble)
//   value = (q - 8) * d,  q in [1, 15]:  symmetric, d = max|w| / 7
// A part of `len` elements takes ceil(len / 32) blocks; the last one is zero padded.
// A neuron's sketch record is its parts one after the other (up, then gate when gated).
#pragma once

#include <cstdint>

#include "bundle_format.h"  // DType
#include "kernels.h"        // Activation

namespace flashinfer {

constexpr int64_t kQ4Block = 32;       // elements per block
constexpr int64_t kQ4BlockBytes = 18;  // fp16 scale + 16 bytes of nibbles

inline int64_t q4_blocks(int64_t len) { return (len + kQ4Block - 1) / kQ4Block; }
inline int64_t q4_part_bytes(int64_t len) { return q4_blocks(len) * kQ4BlockBytes; }

// Quantize parts of storage-dtype rows into 4-bit records.
//   src       rows in dtype `dt`, row stride src_ld elements
//   src_rows  (n,) which source rows; dst_rows (n,) which destination records
//   part_off  (n_parts,) element offset of each part inside a source row
//   dst       records of dst_ld bytes (>= n_parts * q4_part_bytes(len))
void quantize_q4_parts(const void* src, DType dt, int64_t src_ld, const int64_t* src_rows,
                       int64_t n, const int64_t* part_off, int n_parts, int64_t len,
                       uint8_t* dst, int64_t dst_ld, const int64_t* dst_rows, int threads);

// Back to float32 (tests and tools): out (n_parts * len) for one record.
void dequantize_q4_record(const uint8_t* rec, int n_parts, int64_t len, float* out);

// Estimated contribution of every sketch record j:
//   u = up~_j . x_t,  h = act(gate~_j . x_t) * u (gated) or act(u)
//   out[j] = max_t |h| * (scale ? scale[j] : 1)
// x is quantized to 8 bits per 32-block on the fly (like llama.cpp's Q8_0 activations), so
// the inner loop is an int8 dot product.
//   x    (n_tok, len) f32
//   sk   (n_rec, ld) bytes: part 0 = up, part 1 = gate when gated
void q4_scores(const float* x, int64_t n_tok, int64_t len, const uint8_t* sk, int64_t n_rec,
               int64_t ld, bool gated, Activation act, float act_param, const float* scale,
               float* out, int threads);

}  // namespace flashinfer

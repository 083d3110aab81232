// kernels_quant.h: the interface between the kernel drivers (kernels.cpp: threading,
// blocking, the FFN's structure) and the per-format kernels on block-quantized weights
// (kernels_q8.cpp: q8_0; kernels_q4.cpp: q4_0, q4_1). The block layouts themselves are
// defined in kernels_q8.h and kernels_q4.h; bundle_format.h says how records use them.
//
// How a product with quantized weights is computed (llama.cpp's scheme, with x in 16 bits):
//   - dots along the blocks (y = x @ W.T, the up/gate parts, every resident matrix): x is
//     quantized once per call to 16 bits per block of 32 (QuantizedX: scale d, int16 q, and
//     s = d * sum(q)); a block's contribution is  dw * dx * sum(qw * qx) + ew * sx,  an
//     integer dot product per block, where ew is the format's per-block offset per unit of
//     code (q4_0: -8 dw, q4_1: the min m, q8_0: 0) and qw its raw codes (q4: 0..15).
//     Why 16 bits and not llama.cpp's 8: 8-bit x moved SmolLM2's Wikipedia perplexity by
//     0.4-0.6% from the float model computing the very same weights, and by +-0.1% between
//     runs whose float sums differed in order (an 8-bit rounding tipped); 16 bits make both
//     256x smaller. The weights' bytes are the same; the integer dot costs pmaddwd pairs
//     (vpdpwssd with VNNI) instead of pmaddubsw + pmaddwd. Nor would 8 bits be faster here:
//     measured, a 4-bit dot with 8-bit x ran 0-10% faster (benchmarks/q4_dot_study.cpp,
//     RESULTS.md section 13): the per-chunk scales and reduction bound it, not the dot.
//   - accumulation across the blocks (out += h * down, the down parts): each block of the
//     row is expanded to floats (dw * qw + ew) and added h times, in float.
//   - down parts in the "codes" layout (GGUF's down_proj kept exactly, bundle_format.h): the
//     codes of the rows of one 32-neuron block are summed in float, S = sum_j h_j * q_j, and
//     the block's resident scales applied once: out += d[b] * S + e[b] * sum_j h_j.
// Accumulation is float32; the only rounding beyond float's is x's to 16 bits.
#pragma once

#include <cstdint>
#include <vector>

#include "bundle_format.h"  // DType
#include "kernels.h"        // Isa

namespace flashinfer {

constexpr int64_t kQBlock = 32;  // values per block, every block format

inline int64_t q_blocks(int64_t len) { return (len + kQBlock - 1) / kQBlock; }

// ---- x quantized to 16 bits per block of 32 --------------------------------------------

// n rows of nb blocks: q (n, nb * 32) int16, d (n, nb) scales, s (n, nb) = d * sum(q).
// Per block: d = max|x| / 32767, q = round(x / d) (half away from zero), the tail of the last
// block zero. Buffers are reused between calls (no allocation in the decode loop).
constexpr float kXLevels = 32767.f;
// Also, for the VNNI kernels of the 4-bit formats: qp, each block's q in the order in
// which a block's nibbles come out of its 16 bytes read as 8 little-endian 16-bit words
// (word k holds values 2k, 2k+16, 2k+1, 2k+17 in its 4 nibbles): values 0, 2, .., 14,
// 16, 18, .., 30, then 1, 3, .., 15, 17, .., 31.
// Integer dots do not depend on the order: the results are the same.
struct QuantizedX {
  int64_t n = 0, nb = 0;
  std::vector<int16_t> q, qp;
  std::vector<float> d, s;
  const int16_t* qrow(int64_t t) const { return q.data() + t * nb * kQBlock; }
  const int16_t* qprow(int64_t t) const { return qp.data() + t * nb * kQBlock; }
  const float* drow(int64_t t) const { return d.data() + t * nb; }
  const float* srow(int64_t t) const { return s.data() + t * nb; }
};
// x (n, len) rows with stride ldx floats -> qx.
void quantize_x(const float* x, int64_t n, int64_t len, int64_t ldx, QuantizedX& qx);

// ---- the per-format kernel table -----------------------------------------------------

constexpr int kQTileT = 4;  // inputs per register tile
constexpr int kQTileR = 2;  // weight rows per dot tile (4 x 2 accumulators + 2 rows in ymm)

// out[t * ldo + r] = row_r . x_{t0 + t} over nb blocks, t < T, r < R (tile sizes from the table)
using QDotTileFn = void (*)(const QuantizedX& x, int64_t t0, const uint8_t* const* rows,
                            int64_t nb, float* out, int64_t ldo);
// out[j] = row_j . x_t for j in [j0, j1), row_j = base + (idx ? idx[j] : j) * stride bytes:
// one input (decode), whole rows one after the other, so a contiguous matrix is one
// sequential stream.
using QDot1Fn = void (*)(const QuantizedX& x, int64_t t, const uint8_t* base, int64_t stride,
                         const int32_t* idx, int64_t j0, int64_t j1, float* out);
// out[t * ldo + c] += sum_r coef[t * R + r] * row_r[c], c in [c0, c1), c0 a multiple of 32
// (rows point at the part's first block). Same shape as the float kernels' accumulate tile.
using QAccumTileFn = void (*)(const float* coef, const void* const* rows, int64_t c0,
                              int64_t c1, float* out, int64_t ldo);
// S[t * lds + c - c0] += sum_r coef[t * R + r] * code_r[c] (raw codes: q4 0..15, q8 -128..127)
using QCodesTileFn = void (*)(const float* coef, const uint8_t* const* codes, int64_t c0,
                              int64_t c1, float* S, int64_t lds);
// out[t * ldo + c] += d[c] * S[t * lds + c - c0] + e[c] * hsum[t], t < nt, with the resident
// fp16 scale rows of one 32-neuron block: sc[0] = d, and for q4_1 sc[d_model..] = m
// (e = m; q4_0: e = -8 d; q8_0: e = 0).
using QCodesFinishFn = void (*)(const float* S, int64_t lds, const float* hsum, int64_t nt,
                                const uint16_t* sc, int64_t d_model, int64_t c0, int64_t c1,
                                float* out, int64_t ldo);

// The FFN of one input (decode) on used rows [r0, r1), fused per neuron: its up (and gate)
// dot, the activation, then its down part added into out (h != 0 only), one record after
// the other, so the records are read as one sequential stream. The codes layout
// (down_scales): rows in neuron-id order, each 32-neuron block's codes summed into S, its
// scales applied when the block ends.
struct QFfn1Args {
  const QuantizedX* x = nullptr;  // (1, d) quantized
  int64_t d = 0;
  const uint8_t* rows = nullptr;
  int64_t row_bytes = 0;
  const int32_t* sel = nullptr;     // used row j -> row (nullptr: j)
  const int32_t* row_ids = nullptr;  // row -> neuron id (codes layout; nullptr: the row)
  int64_t up_off = 0, gate_off = -1, down_off = 0;  // bytes
  const uint8_t* down_rows = nullptr;  // the down parts' matrix: rows itself, or a split
  int64_t down_row_bytes = 0;          // cache's own (and its row stride)
  Activation act = Activation::Relu;
  float act_param = 0.f;
  const float* up_bias = nullptr;    // by row
  const uint16_t* down_scales = nullptr;  // codes layout: (d_ff / 32, scale_rows, d)
  float* H = nullptr;    // h of used row j
  float* out = nullptr;  // (d,) accumulated
  float* S = nullptr;    // (d,) scratch (codes layout)
};
using QFfn1Fn = void (*)(const QFfn1Args& a, int64_t r0, int64_t r1);

struct QuantKernels {
  DType dtype;
  QDotTileFn dot[kQTileT][kQTileR];      // [T - 1][R - 1]
  QDot1Fn dot1;
  QAccumTileFn accum[kQTileT][3];        // [T - 1][R in {1, 2, 4} -> 0, 1, 2]
  QCodesTileFn codes[kQTileT][3];        // same indexing
  QCodesFinishFn codes_finish;
  QFfn1Fn ffn1;
  int scale_rows;                        // rows of the codes layout's scale table: 1 or 2
  // One row: len values <-> whole blocks (quantize: llama.cpp's reference rounding).
  void (*quantize_row)(const float* x, int64_t len, uint8_t* row);
  void (*dequantize_row)(const uint8_t* row, int64_t len, float* out);
};

// The kernels of block format `dt` for the instruction set the kernels use now
// (kernel_isa()): the one run-time dispatcher of the block formats (kernels.cpp).
const QuantKernels& quant_kernels(DType dt);

// Per format and ISA (kernels_q8.cpp, kernels_q4.cpp). Avx512 falls back to Avx2 where a
// format has nothing wider.
const QuantKernels& q8_0_kernels(Isa isa);
const QuantKernels& q4_0_kernels(Isa isa);
const QuantKernels& q4_1_kernels(Isa isa);

// ---- resident 4-bit matrices with 16 rows interleaved (kernels_x16.cpp) -----------------

// The rows in groups of kX16 (the last padded with zero rows); each group nb blocks of the 16
// rows' fp16 d, (q4_1) their fp16 m, then 4 x 64 bytes of codes, one 32-bit lane a row (the
// file's comment has the nibble order). Same bytes a block as the row-major layout, plus the
// padding rows. Products on it read each weight byte once for 16 rows' worth of unpacking.
constexpr int64_t kX16 = 16;
bool x16_supported(DType dt);  // q4_0, q4_1
int64_t x16_bytes(DType dt, int64_t m, int64_t k);
// m row-major rows of k values (row_bytes(dt, k) each) -> x16_bytes(dt, m, k) bytes
void interleave16(const uint8_t* rows, int64_t m, int64_t k, DType dt, uint8_t* out);
// The same in the rows' own memory (m a multiple of 16: a group takes exactly its rows' bytes),
// one group at a time through a group-sized scratch: no second copy of the matrix.
void interleave16_in_place(uint8_t* rows, int64_t m, int64_t k, DType dt);
// rows [r0, r1) back to row-major blocks (embedding lookups, tests)
void deinterleave16(const uint8_t* w16, int64_t m, int64_t k, DType dt, int64_t r0, int64_t r1,
                    uint8_t* rows);
// y = x @ W.T + bias, W interleaved: the same sums as linear() on the row-major rows, within
// float rounding (the integer dots are identical; each row accumulates its blocks in order,
// the same for a token alone and in a prompt).
void linear_x16(const float* x, int64_t n, int64_t k, const uint8_t* w16, DType dt, int64_t m,
                const float* bias, float* out, int threads);

// ---- whole-array helpers (converter, embeddings, tests) ------------------------------

// n rows of len float32 values (stride ldx) -> n rows of row_bytes(dt, len) bytes (stride ldo).
void quantize_rows(const float* x, int64_t n, int64_t len, int64_t ldx, DType dt, uint8_t* out,
                   int64_t ldo, int threads);
// n rows of row_bytes(dt, len) bytes (stride ldr) -> float32 (stride ldo).
void dequantize_rows(const uint8_t* rows, int64_t n, int64_t len, int64_t ldr, DType dt,
                     float* out, int64_t ldo, int threads);

}  // namespace flashinfer
